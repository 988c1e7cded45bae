"""Guests are not signed out by a restart. Sessions are kept in the data dir
(hashed tokens, expiry) and revoked when the room code or the guest code changes; a guest's code
is the node's own, never the room code; the API says which code does what; and the start-up line
tells where guests can really go (or why they cannot)."""

import json
import os
import stat

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuromesh
from conftest import ScriptedBackend, StubNode, scripted_router, wsgi_call

PHONE = "192.168.1.31"


def stub_node(tmp_path, **settings):
    return StubNode(tmp_path, scripted_router(local=[ScriptedBackend("stub-llm")]), guests=True, **settings)


def log_in(app, node, remote=PHONE):
    reply = wsgi_call(app, "POST", "/api/guest/login", {"code": neuromesh.guest_code(node.config)}, remote=remote)
    assert reply.status == 200, reply.text
    return {"Cookie": reply.headers["Set-Cookie"].split(";")[0]}


def conversations(app, cookie):
    return wsgi_call(app, "GET", "/api/conversations", remote=PHONE, headers=cookie).status


def test_a_guest_stays_signed_in_across_a_restart_and_the_file_holds_no_token(tmp_path):
    node = stub_node(tmp_path)
    try:
        cookie = log_in(node.app(), node)
        restarted = node.app()  # a new app and door on the same data dir: a restart
        assert conversations(restarted, cookie) == 200
        assert conversations(restarted, {"Cookie": "neuromesh_guest=made-up"}) == 401
        path = os.path.join(str(tmp_path), neuromesh.GUEST_SESSIONS_FILE)
        token = cookie["Cookie"].split("=", 1)[1]
        text = open(path).read()
        assert token not in text and neuromesh.guest_code(node.config) not in text
        assert len(json.loads(text)["sessions"]) == 1
        if os.name == "posix":
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        node.store.close()


def test_changing_the_room_code_or_the_guest_code_signs_every_guest_out(tmp_path):
    node = stub_node(tmp_path)
    try:
        cookie = log_in(node.app(), node)
        node.config.mesh_key = "new-room-7"
        assert conversations(node.app(), cookie) == 401
        cookie = log_in(node.app(), node)
        assert conversations(node.app(), cookie) == 200
        os.remove(os.path.join(str(tmp_path), neuromesh.GUEST_CODE_FILE))  # the teacher wants a new guest code
        assert conversations(node.app(), cookie) == 401
    finally:
        node.store.close()


def test_expired_and_malformed_sessions_are_dropped(tmp_path):
    config = neuromesh.Config(data_dir=str(tmp_path), ollama_url=None, guests=True)
    short = neuromesh.GuestDoor(config, ttl=-1)
    token, _guest = short.login(PHONE, neuromesh.guest_code(config))
    assert short.guest_of(token) is None
    assert neuromesh.GuestDoor(config).guest_of(token) is None
    path = os.path.join(str(tmp_path), neuromesh.GUEST_SESSIONS_FILE)
    for garbage in ("[[[[", '{"room": 1, "sessions": "x"}', "[" * 10000, '{"sessions": [[1, 2, 3], ["a"]]}'):
        with open(path, "w") as handle:
            handle.write(garbage)
        door = neuromesh.GuestDoor(config)
        assert door.guest_of(token) is None and door.guest_of("x" * 10000) is None
    door = neuromesh.GuestDoor(config, max_sessions=3)
    tokens = [door.login(PHONE, neuromesh.guest_code(config))[0] for _ in range(5)]
    again = neuromesh.GuestDoor(config, max_sessions=3)
    assert [again.guest_of(t) is not None for t in tokens] == [False, False, True, True, True]


def test_guests_get_their_own_code_and_the_api_says_which_code_does_what(tmp_path):
    node = stub_node(tmp_path, mesh_key="plum-tree-77")
    try:
        app = node.app()
        assert wsgi_call(app, "POST", "/api/guest/login", {"code": "plum-tree-77"}, remote=PHONE).status == 403
        log_in(app, node)
        reply = wsgi_call(app, "GET", "/api/guests")
        invite = reply.json()
        guest_code = neuromesh.guest_code(node.config)
        assert invite["code"] == invite["codes"]["guest"]["code"] == guest_code != "plum-tree-77"
        assert "browser" in invite["codes"]["guest"]["lets"] and "cannot run a node" in invite["codes"]["guest"]["lets"]
        room = invite["codes"]["room"]
        assert room["set"] is True and "run a node" in room["lets"]
        assert room["key_hash"] == neuromesh.room_status(neuromesh.derive_room_key("plum-tree-77"))["key_hash"]
        assert "plum-tree-77" not in reply.text and invite["code_is_mesh_key"] is False
    finally:
        node.store.close()


def test_a_loopback_bound_node_says_guests_cannot_reach_it_and_which_flag_to_use(cluster):
    node = cluster.start("teacher", extra=["--guests"])
    lines = node.log()
    assert "Guests cannot come in: this node listens on 127.0.0.1 only" in lines, lines
    assert "--host 0.0.0.0" in lines and "open http://127.0.0.1" not in lines
    invite = node.json("/api/guests")
    assert invite["urls"] == [] and invite["reachable"] is False and "--host 0.0.0.0" in invite["why_not"]


def test_guests_are_told_the_address_they_can_open(tmp_path):
    config = neuromesh.Config(data_dir=str(tmp_path), host="10.20.30.40", guests=True)
    assert neuromesh.guest_reach(config) is None
    assert "--host 0.0.0.0" in neuromesh.guest_reach(neuromesh.Config(data_dir=str(tmp_path), host="127.0.0.1"))


@given(st.one_of(st.binary(max_size=2000), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30).map(lambda value: json.dumps(value).encode())))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_sessions_file_loads_as_sessions_or_none(tmp_path, data):
    """A damaged sessions file signs guests out; it never crashes the node nor lets anyone in."""
    config = neuromesh.Config(data_dir=str(tmp_path), ollama_url=None, guests=True)
    with open(os.path.join(str(tmp_path), neuromesh.GUEST_SESSIONS_FILE), "wb") as handle:
        handle.write(data)
    door = neuromesh.GuestDoor(config)
    assert door.guest_of("any-token") is None
    token, guest = door.login(PHONE, neuromesh.guest_code(config))
    assert neuromesh.GuestDoor(config).guest_of(token) == guest
