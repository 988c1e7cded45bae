"""HTTP hardening and access: who may ask what of a node, and what a hostile client cannot do.

What it covers: X-Forwarded-For is ignored, another machine without --guests or --lan-api is
refused with what to do, a foreign Host (DNS rebinding) and cross-site posts are refused; guests
sign in with the guest code (never the room code) and see and change only what is theirs; the
LAN API needs the room code as a bearer; chats past the rate, --max-queued or the per-address
cap get 429 or 503; bad bodies are 400, never 500; a live node refuses bad lengths, big chunked
bodies and deep JSON, and closes half-open connections.

Most tests call the WSGI app in-process with a chosen REMOTE_ADDR (another machine is only
ever an environ value); the live-node tests talk to a node on 127.0.0.1 only.
"""

import io
import json
import socket
import threading
import time
from wsgiref.util import setup_testing_defaults

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuromesh
from conftest import (OTHER_MACHINE, ScriptedBackend, StubNode, guest_headers, scripted_router, wait_for,
                      wsgi_call)

PHONE = "192.168.1.31"


@pytest.fixture
def app(open_node):
    return open_node.app()


def call(app, method, path, body=b"", remote="127.0.0.1", **environ_extra):
    """One WSGI call with raw environ values (Content-Type, Content-Length, Host as given)."""
    environ = {}
    setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": remote,
                    "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
                    "CONTENT_TYPE": "application/json"})
    environ.update(environ_extra)
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"], started["headers"] = int(status.split()[0]), dict(headers)

    result = app(environ, start_response)
    try:
        data = b"".join(part if isinstance(part, bytes) else part.encode() for part in result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return started["status"], started["headers"], data


# -- who is asking ----------------------------------------------------------------------


def test_x_forwarded_for_is_ignored(stub_node):
    app = stub_node.app()
    spoofed = wsgi_call(app, "GET", "/api/tags", remote=OTHER_MACHINE, headers={"X-Forwarded-For": "127.0.0.1"})
    assert spoofed.status == 403
    owner = wsgi_call(app, "GET", "/api/tags", headers={"X-Forwarded-For": "8.8.8.8"})
    assert owner.status == 200


def test_another_machine_without_flags_is_refused_with_what_to_do(stub_node):
    app = stub_node.app()
    page = wsgi_call(app, "GET", "/api/conversations", remote=OTHER_MACHINE)
    assert page.status == 403 and "--guests" in page.json()["error"]
    assert wsgi_call(app, "GET", "/", remote=OTHER_MACHINE).status == 403
    llm = wsgi_call(app, "POST", "/api/chat", {"model": "m1", "messages": [{"role": "user", "content": "x"}]},
                    remote=OTHER_MACHINE)
    assert llm.status == 403 and "--lan-api" in llm.json()["error"]
    assert wsgi_call(app, "GET", "/api/guests", remote=OTHER_MACHINE).status == 403
    assert wsgi_call(app, "GET", "/api/conversations").status == 200  # the owner, as before


def test_a_foreign_host_is_refused_dns_rebinding(app):
    status, _headers, body = call(app, "GET", "/api/conversations", HTTP_HOST="evil.example:8080")
    assert status == 421 and "open it by its address" in json.loads(body)["error"]
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "192.168.1.5",
                 socket.gethostname() + ":8080", socket.gethostname() + ".local:8080"):
        assert call(app, "GET", "/api/conversations", HTTP_HOST=host)[0] == 200, host


def test_cross_site_posts_are_refused(app):
    body = json.dumps({"title": "x"}).encode()
    foreign = call(app, "POST", "/api/conversations", body, HTTP_HOST="127.0.0.1:8080",
                   HTTP_ORIGIN="http://evil.example")
    assert foreign[0] == 403 and "cross-site" in json.loads(foreign[2])["error"]
    form = call(app, "POST", "/api/conversations", body, HTTP_HOST="127.0.0.1:8080", CONTENT_TYPE="text/plain")
    assert form[0] == 415
    llm_form = call(app, "POST", "/api/chat", body, CONTENT_TYPE="text/plain")
    assert llm_form[0] == 415
    fetch_meta = call(app, "DELETE", "/api/conversations/x", b"", HTTP_SEC_FETCH_SITE="cross-site")
    assert fetch_meta[0] == 403
    same = call(app, "POST", "/api/conversations", body, HTTP_HOST="127.0.0.1:8080",
                HTTP_ORIGIN="http://127.0.0.1:8080")
    assert same[0] == 201


# -- guests -----------------------------------------------------------------------------


def test_guest_login_with_wrong_and_right_code(app, open_node):
    assert wsgi_call(app, "GET", "/api/conversations", remote=PHONE).status == 401
    assert wsgi_call(app, "GET", "/", remote=PHONE).status == 200  # the page, to enter the code
    wrong = wsgi_call(app, "POST", "/api/guest/login", {"code": "NOPE1234"}, remote=PHONE)
    assert wrong.status == 403 and "wrong guest code" in wrong.json()["error"]
    code = neuromesh.guest_code(open_node.config)
    right = wsgi_call(app, "POST", "/api/guest/login", {"code": code.lower()}, remote=PHONE)
    cookie = right.headers["Set-Cookie"]
    assert right.status == 200 and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    headers = {"Cookie": cookie.split(";")[0]}
    assert wsgi_call(app, "GET", "/api/conversations", remote=PHONE, headers=headers).status == 200
    assert wsgi_call(app, "GET", "/api/guests", remote=PHONE, headers=headers).status == 403
    owner_view = wsgi_call(app, "GET", "/api/guests").json()
    assert owner_view["code"] == code and owner_view["guests"] is True
    # wrong codes are limited per address
    statuses = [wsgi_call(app, "POST", "/api/guest/login", {"code": "BAD"}, remote="192.168.1.99").status
                for _ in range(12)]
    assert statuses[:10] == [403] * 10 and statuses[-1] == 429


def test_the_guest_code_is_never_the_mesh_key(open_node):
    open_node.config.mesh_key = "room-42"
    app = open_node.app()
    assert wsgi_call(app, "POST", "/api/guest/login", {"code": "room-42"}, remote=PHONE).status == 403
    code = neuromesh.guest_code(open_node.config)
    assert wsgi_call(app, "POST", "/api/guest/login", {"code": code}, remote=PHONE).status == 200


def test_guests_see_their_own_and_shared_conversations_never_private_ones(app, open_node):
    owner_private = wsgi_call(app, "POST", "/api/conversations", {"title": "Owner secret", "private": True}).json()
    owner_shared = wsgi_call(app, "POST", "/api/conversations", {"title": "Owner shared"}).json()
    alice, bob = guest_headers(app, open_node, PHONE), guest_headers(app, open_node, "192.168.1.32")
    mine = wsgi_call(app, "POST", "/api/conversations", {"title": "Alice's"}, remote=PHONE, headers=alice).json()
    hidden = wsgi_call(app, "POST", "/api/conversations", {"title": "Alice private", "private": True},
                       remote=PHONE, headers=alice).json()

    listed = wsgi_call(app, "GET", "/api/conversations", remote="192.168.1.32", headers=bob).json()
    assert {c["title"]: c["own"] for c in listed} == {"Owner shared": False, "Alice's": False}
    alice_list = wsgi_call(app, "GET", "/api/conversations", remote=PHONE, headers=alice).json()
    assert {c["title"]: c["own"] for c in alice_list} == {"Owner shared": False, "Alice's": True,
                                                         "Alice private": True}
    for conversation in (owner_private, hidden):
        path = "/api/conversations/" + conversation["id"]
        assert wsgi_call(app, "GET", path, remote="192.168.1.32", headers=bob).status == 404
    assert wsgi_call(app, "GET", "/api/conversations/" + owner_shared["id"], remote=PHONE,
                     headers=alice).status == 200
    # the owner sees everything, as before
    assert len(wsgi_call(app, "GET", "/api/conversations").json()) == 4
    assert mine["id"] in {c["id"] for c in alice_list}


def test_guests_cannot_change_what_is_not_theirs(app, open_node):
    owner_shared = wsgi_call(app, "POST", "/api/conversations", {"title": "Owner shared"}).json()
    alice, bob = guest_headers(app, open_node, PHONE), guest_headers(app, open_node, "192.168.1.32")
    alices = wsgi_call(app, "POST", "/api/conversations", {"title": "Alice's"}, remote=PHONE, headers=alice).json()
    for conversation, headers, remote in ((owner_shared, bob, "192.168.1.32"), (alices, bob, "192.168.1.32"),
                                          (owner_shared, alice, PHONE)):
        path = "/api/conversations/" + conversation["id"]
        assert wsgi_call(app, "DELETE", path, remote=remote, headers=headers).status == 403
        assert wsgi_call(app, "PATCH", path, {"title": "mine now"}, remote=remote, headers=headers).status == 403
        posted = wsgi_call(app, "POST", path + "/messages", {"content": "hi"}, remote=remote, headers=headers)
        assert posted.status == 403 and "not change it" in posted.json()["error"]
        assert wsgi_call(app, "POST", path + "/regenerate", {}, remote=remote, headers=headers).status == 403
    path = "/api/conversations/" + alices["id"]
    answered = wsgi_call(app, "POST", path + "/messages", {"content": "hi"}, remote=PHONE, headers=alice)
    assert answered.status == 201 and answered.json()["assistant"]["content"] == "Hello from the fake"
    assert wsgi_call(app, "PATCH", path, {"title": "Renamed"}, remote=PHONE, headers=alice).status == 200
    assert wsgi_call(app, "DELETE", path, remote=PHONE, headers=alice).status == 200


def test_writes_into_a_peers_conversation_are_refused(app, open_node, tmp_path):
    peer = neuromesh.Store(str(tmp_path / "peer.db"), "b" * 32, "peer-node")
    try:
        theirs = peer.create_conversation("Peer's")
        entries, _more = peer.entries_missing({})
        open_node.store.apply_entries(entries)
    finally:
        peer.close()
    path = "/api/conversations/" + theirs["id"]
    assert wsgi_call(app, "GET", path).status == 200
    posted = wsgi_call(app, "POST", path + "/messages", {"content": "mine?"})
    assert posted.status == 403 and "peer-node" in posted.json()["error"]
    assert wsgi_call(app, "DELETE", path).status == 403


# -- LAN API -------------------------------------------------------------------------------


def test_lan_api_needs_the_mesh_key_as_bearer_once_one_is_set(open_node):
    app = open_node.app()
    assert wsgi_call(app, "GET", "/api/tags", remote=OTHER_MACHINE).status == 200  # no mesh key yet
    assert wsgi_call(app, "GET", "/api/tags", remote="8.8.8.8").status == 403  # not a private network
    open_node.config.mesh_key = "room-42"
    no_key = wsgi_call(app, "GET", "/api/tags", remote=OTHER_MACHINE)
    assert no_key.status == 401 and "Bearer" in no_key.json()["error"]
    wrong = wsgi_call(app, "GET", "/v1/models", remote=OTHER_MACHINE, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.json()["error"]["message"].startswith("this node's LLM API needs")
    right = wsgi_call(app, "GET", "/api/tags", remote=OTHER_MACHINE, headers={"Authorization": "Bearer room-42"})
    assert right.status == 200
    assert wsgi_call(app, "GET", "/api/tags").status == 200  # the owner needs no key


# -- limits ---------------------------------------------------------------------------------


def test_a_flood_of_chats_gets_429_past_the_rate_while_another_client_is_served(open_node):
    app = open_node.app()
    ask = {"model": "m1", "prompt": "hi", "stream": False}
    statuses = []
    for _ in range(1000):
        reply = wsgi_call(app, "POST", "/api/generate", ask, remote=OTHER_MACHINE)
        statuses.append(reply.status)
        if reply.status == 429:
            assert int(reply.headers["Retry-After"]) >= 1
    assert statuses.count(200) == open_node.config.chat_rate == 100
    assert statuses.count(429) == 900
    print("\n1,000 chats from one client: %d answered, %d got 429" % (statuses.count(200), statuses.count(429)))
    other = wsgi_call(app, "POST", "/api/generate", ask, remote="192.168.1.21")
    assert other.status == 200 and other.json()["response"] == "Hello from the fake"


def test_chats_past_max_queued_get_503_with_retry_after(tmp_path):
    gate = threading.Event()
    node = StubNode(tmp_path, scripted_router(local=[ScriptedBackend("stub-llm", gate=gate)]), max_queued=2)
    try:
        app = node.app()
        ask = {"model": "m1", "prompt": "hi", "stream": False}
        replies = []
        workers = [threading.Thread(target=lambda: replies.append(wsgi_call(app, "POST", "/api/generate", ask)))
                   for _ in range(2)]
        for worker in workers:
            worker.start()

        def full():
            reply = wsgi_call(app, "POST", "/api/generate", ask)
            return reply if reply.status == 503 else None

        # each probe that got in also waits on the gate; wait until the queue is full
        refused = wait_for(full, timeout=10, message="the queue to fill")
        assert refused.headers["Retry-After"] == "5" and "waiting for an LLM" in refused.json()["error"]
        gate.set()
        for worker in workers:
            worker.join(10)
        assert all(reply.status == 200 for reply in replies)
    finally:
        gate.set()
        node.store.close()


def test_requests_in_progress_are_capped_per_address(tmp_path):
    node = StubNode(tmp_path, scripted_router(local=[ScriptedBackend()]), guests=True,
                    max_requests_per_address=2)
    try:
        app = node.app()
        headers = guest_headers(app, node)
        environ_cookie = {"HTTP_COOKIE": headers["Cookie"]}
        open_streams = []
        for _ in range(2):
            environ = {}
            setup_testing_defaults(environ)
            environ.update({"REQUEST_METHOD": "GET", "PATH_INFO": "/api/events", "REMOTE_ADDR": OTHER_MACHINE,
                            "wsgi.input": io.BytesIO(b"")}, **environ_cookie)
            open_streams.append(app(environ, lambda status, headers, exc_info=None: None))
        status, response_headers, body = call(app, "GET", "/api/health", remote=OTHER_MACHINE, **environ_cookie)
        assert status == 429 and response_headers["Retry-After"] == "1" and b"at most 2" in body
        assert call(app, "GET", "/api/health", remote="192.168.1.21", **environ_cookie)[0] == 200
        assert call(app, "GET", "/api/health")[0] == 200  # the owner is never capped
        open_streams.pop().close()
        assert call(app, "GET", "/api/health", remote=OTHER_MACHINE, **environ_cookie)[0] == 200
    finally:
        for stream in open_streams:
            stream.close()
        node.store.close()


# -- bodies ------------------------------------------------------------------------------------


def test_bad_bodies_are_400_never_500(app):
    for length in ("abc", "1e3", "2, 2", "-1"):
        status, _h, body = call(app, "POST", "/api/conversations", b"{}", CONTENT_LENGTH=length)
        assert status == 400 and "Content-Length" in json.loads(body)["error"], length
    deep = b"[" * 1000 + b"]" * 1000
    for path in ("/api/conversations", "/api/chat", "/v1/chat/completions", "/api/guest/login"):
        status, _h, body = call(app, "POST", path, deep)
        assert status == 400 and "deeper than" in body.decode(), path
    status, _h, body = call(app, "POST", "/api/conversations", b"[" * 100000)
    assert status == 400
    assert call(app, "POST", "/api/conversations", b"\xff\xfe garbage")[0] == 400


def json_routes(conversation_id):
    path = "/api/conversations/" + conversation_id
    return [("POST", "/api/conversations"), ("PATCH", path), ("POST", path + "/messages"),
            ("POST", path + "/regenerate"), ("POST", "/api/guest/login"), ("POST", "/api/chat"),
            ("POST", "/api/generate"), ("POST", "/v1/chat/completions"), ("POST", neuromesh.RELAY_PATH)]


# Shallow strategies: hypothesis draws them fast, and read_json_body's depth limit has its own test.
LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
FIELDS = st.sampled_from(["model", "messages", "prompt", "content", "title", "private", "stream", "options",
                          "code", "sender", "answer", "system", "message", "temperature", "role"])
VALUES = (LEAVES | st.lists(LEAVES, max_size=3) | st.dictionaries(FIELDS, LEAVES, max_size=3)
          | st.lists(st.dictionaries(FIELDS, LEAVES, max_size=3), max_size=2))
BODIES = (st.dictionaries(FIELDS, VALUES, max_size=4).map(lambda value: json.dumps(value).encode())
          | VALUES.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=32))


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_fuzz_every_json_route_never_answers_500(fuzz_app, body):
    """Each example goes to all 9 JSON routes: 800 examples are 7,200 requests."""
    app, conversation_id = fuzz_app
    for method, path in json_routes(conversation_id):
        status, _headers, reply = call(app, method, path, body)
        assert status < 500 or status in (502, 503), (method, path, body, status, reply)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    node = StubNode(tmp_path_factory.mktemp("fuzz"), scripted_router(local=[ScriptedBackend("stub-llm")]),
                    guests=True, lan_api=True, chat_rate=10 ** 9)
    app = node.app()
    conversation_id = wsgi_call(app, "POST", "/api/conversations", {"title": "fuzz"}).json()["id"]
    yield app, conversation_id
    node.store.close()


# -- a live node on loopback -------------------------------------------------------------------


def raw_request(port, data, timeout=5.0):
    """Sends raw bytes to the node on loopback; the status line's code."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_live_node_refuses_bad_lengths_big_chunked_bodies_and_deep_json(cluster):
    node = cluster.start(discovery=False)
    port = node.info["http_port"]
    for length in (b"abc", b"1e3", b"2, 2"):
        request = b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
                  b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n{}"
        assert raw_request(port, request) == 400, length

    def chunks():
        piece = b"x" * 65536
        for _ in range(80):  # 5 MiB
            yield piece

    big = requests.post(node.url + "/api/conversations", data=chunks(), timeout=30,
                        headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    deep = node.post("/api/conversations", data=b"[" * 1000 + b"]" * 1000,
                     headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "deeper than" in deep.json()["error"]
    assert node.health()["status"] == "ok"


def test_live_node_closes_half_open_connections_at_the_idle_deadline(cluster):
    node = cluster.start(discovery=False, extra=["--http-idle-timeout", "2"])
    port = node.info["http_port"]
    sockets = []
    try:
        opened = time.monotonic()
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
            sockets.append(sock)
        slowest, closed = [0.0], set()

        def all_closed():
            started = time.monotonic()
            assert node.get("/api/health", timeout=5).status_code == 200  # answered throughout
            slowest[0] = max(slowest[0], time.monotonic() - started)
            for index, sock in enumerate(sockets):
                if index not in closed:
                    sock.setblocking(False)
                    try:
                        if sock.recv(1) == b"":
                            closed.add(index)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed.add(index)
            return len(closed) == len(sockets)

        wait_for(all_closed, timeout=15, interval=0.05, message="the half-open connections to be closed")
        took = time.monotonic() - opened
        print("\n200 half-open connections closed after %.2f s (idle timeout 2 s); slowest /api/health %.3f s"
              % (took, slowest[0]))
        assert len(closed) == 200, len(closed)
        assert took < 10 and slowest[0] < 1.0
    finally:
        for sock in sockets:
            sock.close()
