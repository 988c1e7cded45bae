"""Hostile peers: every frame is checked against a schema, loads are clamped, sync
cannot be swamped, entries are capped in size and sequence, and a relay to a frozen peer fails
over. In-process first (fuzz and units), then live nodes on loopback."""

import json
import signal
import socket
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuromesh as nm
from conftest import RecordingMesh, ScriptedBackend, TLSRelay, fully_linked, keyed_store, scripted_router, wait_for
from support.llm_mesh import hosts_of

MODEL = "llama3.2:1b"

# -- fuzz: frames, peers, entries -------------------------------------------------------------

_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
_small_keys = st.sampled_from(["t", "node_id", "address", "tcp_port", "in_flight", "queued", "parallel", "x"])
_json = (_leaf | st.lists(_leaf, max_size=3) | st.dictionaries(_small_keys, _leaf, max_size=3)
         | st.lists(st.dictionaries(_small_keys, _leaf, max_size=4), max_size=2))  # flat: cheap to draw
_schema_keys = sorted({key for schema in nm.FRAME_SCHEMAS.values() for key in schema})


@settings(max_examples=3500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(marker=st.sampled_from(sorted(nm.MARKERS)),
       payload=st.dictionaries(st.sampled_from(_schema_keys), _json, max_size=4))
def test_fuzzed_frames_are_accepted_or_refused_with_a_protocol_error(marker, payload):
    try:
        nm.check_frame(marker, payload)
    except nm.ProtocolError as exc:
        assert marker.decode("ascii") in str(exc)


@settings(max_examples=1000, deadline=None)
@given(info=st.dictionaries(st.sampled_from(_schema_keys), _json, max_size=4),
       load=st.dictionaries(st.sampled_from(["in_flight", "queued", "parallel", "x"]), _json))
def test_fuzzed_peer_updates_stay_typed_and_serializable(info, load):
    peer = nm.Peer("p" * 32)
    peer.update(dict(info, load=load))
    record = peer.to_dict()
    json.dumps(record, allow_nan=False)
    assert isinstance(peer.has_llm, bool) and isinstance(peer.name, str)
    assert all(isinstance(model, str) for model in peer.models)
    assert all(type(value) is int and 0 <= value <= 10000 for value in peer.load.values())


def _entries():
    source = nm.Store(":memory:", "nodeA", "alice")
    conversation = source.create_conversation("t")
    source.add_message(conversation["id"], "user", "fine", "alice")
    return source.entries_missing({})[0]


_ENTRIES = _entries()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["origin", "seq", "kind", "uid", "data", "timestamp"]), value=_json,
       seq=st.integers(min_value=-5, max_value=2 ** 64), data_field=st.text(max_size=10))
def test_fuzzed_entries_are_applied_or_skipped(field, value, seq, data_field):
    snapshot, message = _ENTRIES
    target = nm.Store(":memory:", "nodeB", "bob")
    try:
        odd = [dict(message, **{field: value}), dict(snapshot, data=dict(snapshot["data"], **{data_field: value})),
               dict(message, seq=seq, uid="nodeA:%d" % seq)]
        target.apply_entries(odd + [snapshot, message])
        assert target.version_vector().get("nodeA", 0) <= 2 + nm.MAX_SEQ_JUMP
        target.list_conversations()
    finally:
        target.close()


_host = st.fixed_dictionaries({"node_id": st.sampled_from(["a" * 32, "b" * 32, "", "x y", "~p"]) | _leaf,
                                "name": _leaf | st.text(min_size=1020, max_size=1030),
                                "tokens": _leaf | st.integers(-2, nm.MAX_CONTENT_BYTES + 2)})
_answered_by_hosts = _json | st.lists(_host | _leaf, max_size=nm.MAX_ANSWER_HOSTS + 2)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts=_answered_by_hosts)
def test_fuzzed_answered_by_hosts_are_kept_clean_or_the_entry_refused(hosts):
    """A peer's ``answered_by_hosts`` (mid-answer failover) is a list of 2 to 16 {node_id, name,
    tokens}, kept as it is, or the entry is refused with a ValueError naming the field."""
    _snapshot, message = _ENTRIES
    raw = dict(message, data=dict(message["data"], role="assistant", answered_by_hosts=hosts))
    try:
        clean = nm._clean_entry(raw)
    except ValueError as exc:
        assert "answered_by_hosts" in str(exc) and hosts is not None
        return
    kept = clean["data"].get("answered_by_hosts")
    if hosts is None:
        assert kept is None
    else:
        assert kept == hosts and 2 <= len(kept) <= nm.MAX_ANSWER_HOSTS
        assert all(type(host["tokens"]) is int and host["tokens"] >= 0 for host in kept)
        json.dumps(clean, allow_nan=False)


def test_an_answer_continued_on_another_host_syncs_with_both_hosts_and_bad_ones_are_skipped():
    source = nm.Store(":memory:", "nodeA", "alice")
    conversation = source.create_conversation("t")
    hosts = [{"node_id": "h1" * 16, "name": "Ana's laptop", "tokens": 10},
             {"node_id": "h2" * 16, "name": "Ben's laptop", "tokens": 40}]
    source.add_message(conversation["id"], "assistant", "an answer", "LLM", answered_by="h2" * 16,
                       answered_by_name="Ben's laptop", answered_by_hosts=hosts)
    with pytest.raises(nm.StoreError):
        source.add_message(conversation["id"], "assistant", "x", "LLM", answered_by_hosts=hosts[:1])
    snapshot, message = source.entries_missing({})[0]
    forged = dict(message, seq=3, uid="nodeA:3",
                  data=dict(message["data"], answered_by_hosts=[dict(hosts[0], tokens=-1), hosts[1]]))
    target = nm.Store(":memory:", "nodeB", "bob")
    assert target.apply_entries([snapshot, message, forged]) == [snapshot, message]
    stored = target.get_conversation(conversation["id"])["messages"][-1]
    assert stored["answered_by_hosts"] == hosts and stored["answered_by"] == "h2" * 16
    for store in (source, target):
        store.close()


# -- frame schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("marker, payload, field", [
    (nm.LLM_CAPS, {"has_llm": "false"}, "has_llm"),
    (nm.LLM_CAPS, {"load": {"in_flight": "x"}}, "load.in_flight"),
    (nm.LLM_CAPS, {"load": {"in_flight": -100}}, "load.in_flight"),
    (nm.LLM_CAPS, {"models": "m1"}, "models"),
    (nm.PONG, {"t": -1e308}, "t"),
    (nm.PING, {"t": float("nan")}, "t"),
    (nm.HELLO, {"node_id": "x" * 65, "tcp_port": 1}, "node_id"),
    (nm.HELLO, {"node_id": "x", "tcp_port": True}, "tcp_port"),
    (nm.PEERS, {"peers": [{"node_id": "x", "address": "127.0.0.1", "tcp_port": 70000}]}, "tcp_port"),
    (nm.GOODBYE, {"reason": 5}, "reason"),
    (nm.SYNC, {"vector": {"a": 2 ** 62}}, "vector.a"),
    (nm.SYNC, {"vector": []}, "vector"),
    (nm.FILE, {"entries": [1]}, "entries[0]"),
    (nm.FILE, {"entries": [], "more": "yes"}, "more"),
    (nm.LLM_REQUEST, {"peer_name": ["x"]}, "peer_name"),
    (nm.LLM_RESPONSE, {"granted": "true"}, "granted"),
    (nm.LLM_RESPONSE, {"granted": True, "llm_port": 1e9}, "llm_port"),
])
def test_a_bad_field_is_named_in_the_protocol_error(marker, payload, field):
    with pytest.raises(nm.ProtocolError, match="bad %s frame from .*%s" % (marker.decode(), field.replace("[", r"\["))):
        nm.check_frame(marker, payload)


def test_what_a_node_sends_passes_its_own_schemas(tmp_path, mesh_config):
    node = nm.Node(mesh_config())
    node.mesh.tcp_port = 7878  # set by start(), which this test does not need
    certificate = bytes(32)  # the server certificate's hash, as both ends of one TLS link see it
    ends = [nm.Handshake(nm.OPEN_ROOM_KEY, True, certificate), nm.Handshake(nm.OPEN_ROOM_KEY, False, certificate)]
    outgoing = [ends[0].start(), []]
    while not ends[0].done or not ends[1].done:  # a key proof in memory: the HELO is signed for a link
        for index, end in enumerate(ends):
            frames, outgoing[1 - index] = outgoing[1 - index], []
            for frame in frames:
                outgoing[index] += end.receive(*nm.FrameDecoder(1 << 20).feed(frame)[0])
    hello = nm.signed_hello(node.key, types.SimpleNamespace(handshake=ends[0]), node.mesh.hello_payload())
    try:
        for marker, payload in [(nm.HELLO, hello), (nm.LLM_CAPS, node.router.local_capability()),
                                (nm.PING, {"t": time.monotonic()}), (nm.PONG, {"t": time.monotonic()}),
                                (nm.GOODBYE, {"reason": "shutdown"}), (nm.SYNC, {"vector": {"a" * 64: 3}}),
                                (nm.FILE, {"entries": list(_ENTRIES), "more": False}),
                                (nm.LLM_REQUEST, {"peer_name": "n" * 300, "reason": "r"}),
                                (nm.LLM_RESPONSE, {"granted": False, "message": "no"}),
                                (nm.PEERS, {"peers": [{"node_id": "b" * 32, "name": "b", "address": "127.0.0.2",
                                                       "tcp_port": 7878}]})]:
            nm.check_frame(marker, payload)
    finally:
        node.store.close()


def test_a_non_finite_rtt_never_reaches_the_peers_json():
    peer = nm.Peer("p" * 32)
    for rtt in (float("inf"), float("nan"), 1e308 * 10, 1e300):
        peer.rtt_ms = rtt
        assert peer.to_dict()["rtt_ms"] is None
        json.dumps(peer.to_dict(), allow_nan=False)
    peer.rtt_ms = 1.23456
    assert peer.to_dict()["rtt_ms"] == 1.235


def test_string_booleans_are_not_true():
    peer = nm.Peer("p" * 32)
    peer.update({"has_llm": "false", "http_port": True, "protocol_version": "1"})
    assert peer.has_llm is False and peer.http_port == 0 and peer.protocol_version == 0
    with pytest.raises(ValueError):
        nm._clean_conversation_data({"title": "t", "private": "false", "deleted": False,
                                     "created_at": nm.utc_now(), "origin_name": "a"})


def test_parse_json_turns_every_failure_into_one_error():
    assert nm.parse_json(b'{"a": [1]}', "x") == {"a": [1]}
    for bad in (b"[" * 100000, b"\xff", b"{", "x" * 20):
        with pytest.raises(nm.JSONInputError):
            nm.parse_json(bad, "x", max_bytes=10 if bad == "x" * 20 else None)


# -- loads and the router ---------------------------------------------------------------------


def test_a_bad_load_is_refused_clamped_and_never_breaks_local_chats():
    with pytest.raises(nm.ProtocolError, match="load.in_flight"):
        nm.check_frame(nm.LLM_CAPS, {"has_llm": True, "models": ["m1"], "load": {"in_flight": "x"}})
    local = ScriptedBackend("home", reply="local answer")
    liar = ScriptedBackend("liar", reply="fake answer")
    liar.local = False
    liar.peer = nm.Peer(liar.node_id, name="liar", models=["m1"])
    liar.peer.link = object()  # connected
    liar.peer.update({"load": {"in_flight": "x", "queued": -100}})  # an announcement is not a frame
    router = scripted_router(local=[local], peers=[liar])
    assert liar.peer.load == {"queued": 0}
    events = list(router.chat("m1", [{"role": "user", "content": "hi"}]))
    assert events[-1]["type"] == "done" and events[-1]["node_name"] == "home"
    liar.peer.update({"load": {"in_flight": -100, "queued": -100, "parallel": -5}})
    assert liar.peer.load == {"in_flight": 0, "queued": 0, "parallel": 1}
    assert router.candidates("m1")[0] is local  # a negative load does not rank the liar first


def test_a_relay_to_a_peer_that_goes_down_fails_over_at_once():
    held = []
    silent = TLSRelay(held.append)  # takes the relay connection, never answers: a frozen peer
    try:
        peer = nm.Peer(silent.node_id, name="frozen", models=["m1"])
        peer.link = object()
        frozen = silent.peer_backend(peer, "t")
        backup = ScriptedBackend("backup", reply="from backup")
        backup.local = False
        backup.peer = nm.Peer(backup.node_id, name="backup", models=["m1"])
        backup.peer.link = object()
        router = scripted_router(peers=[frozen, backup])
        router.peer_in_flight[backup.node_id] = 5  # the frozen one is tried first
        result = {}

        def chat():
            result["events"] = list(router.chat("m1", [{"role": "user", "content": "hi"}]))

        thread = threading.Thread(target=chat)
        thread.start()
        wait_for(lambda: frozen.slots.in_flight == 1, message="the relay call under way")
        router.access.peer_down(peer)
        thread.join(10)
        assert not thread.is_alive(), "the chat still waits on the frozen peer"
        assert result["events"][-1]["node_name"] == "backup"
    finally:
        silent.close()


# -- sync queue ---------------------------------------------------------------------------------


def test_two_thousand_syncs_are_merged_and_a_real_push_goes_first(tmp_path):
    store, _key = keyed_store(tmp_path / "db", "bob")  # only keyed logs are served
    conversation = store.create_conversation("big")
    for index in range(20):
        store.add_message(conversation["id"], "user", "x" * 50000 + str(index), "bob")
    mesh, events = RecordingMesh(), nm.EventBus()
    worker = nm.SyncWorker(store, mesh, events, interval=30.0)
    flooder = nm.Peer("f" * 32, name="flooder")
    for index in range(2000):
        worker.handle_sync(flooder, {"vector": {store.node_id: index % 3}})
    assert len(worker.requests) == 1 and worker._jobs.qsize() <= 1
    assert worker.counters["sync_requests_merged"] == 1999
    friend_store, friend_key = keyed_store(name="friend")  # a push must be signed by its origin
    chat = friend_store.create_conversation("t")["id"]
    friend_store.add_message(chat, "user", "fine", "friend")
    friend = nm.Peer(friend_key.node_id, name="friend")
    worker.handle_file(friend, friend_store.batches.missing({}))
    next_round = time.monotonic() + 30
    for _ in range(4):
        next_round = worker.run_once(next_round)
    assert store.message_count() == 21, "the friend's push was applied"
    answers = [item for item in mesh.sent if item[0] == flooder.node_id]
    assert len(answers) == 1 and answers[0][1] == nm.FILE, "one answer for 2,000 requests"
    for _ in range(100):
        worker.handle_sync(flooder, {"vector": {}})
    next_round = worker.run_once(worker.run_once(next_round))
    for _ in range(100):
        worker.handle_sync(flooder, {"vector": {}})
    worker.requests.gap = 60.0  # the same vector again: not answered within the repeat gap
    next_round = worker.run_once(next_round)
    assert len([item for item in mesh.sent if item[0] == flooder.node_id]) == 2, "answers are rate-limited"
    for index in range(worker.max_files_per_peer + 50):
        worker.handle_file(flooder, {"entries": [], "more": False})
    assert worker.counters["files_dropped"] == 50
    store.close()


# -- entries: size and sequence -------------------------------------------------------------


def test_an_oversize_entry_is_skipped_and_the_rest_applied():
    snapshot, message = _ENTRIES
    big = dict(message, seq=3, uid="nodeA:3", data=dict(message["data"], content="y" * (nm.MAX_CONTENT_BYTES + 1)))
    wide = dict(message, seq=3, uid="nodeA:3",
                data=dict(message["data"], content="z" * (nm.MAX_CONTENT_BYTES - 10), sender="s" * 1000,
                          host_info={"hostname": "h" * 1000, "ip_address": "", "is_llm_host": False},
                          model="m" * 1000, answered_by_name="a" * 1000))
    target = nm.Store(":memory:", "nodeB", "bob")
    assert len(target.apply_entries([snapshot, big, message])) == 2
    assert target.version_vector() == {"nodeA": 2}
    with pytest.raises(nm.StoreError):
        target.add_message(snapshot["conversation_id"], "user", "q" * (nm.MAX_CONTENT_BYTES + 1), "bob")
    assert nm._clean_entry(wide)  # under both limits
    target.close()


def test_a_seq_jump_is_refused_later_entries_sync_and_a_restart_keeps_the_data(tmp_path):
    source = nm.Store(":memory:", "nodeA", "alice")
    conversation = source.create_conversation("t")
    source.add_message(conversation["id"], "user", "one", "alice")
    snapshot, first = source.entries_missing({})[0]
    poison = dict(first, seq=2 ** 62 - 1, uid="nodeA:%d" % (2 ** 62 - 1))
    path = str(tmp_path / "b.db")
    target = nm.Store(path, "nodeB", "bob")
    assert target.apply_entries([snapshot, first, poison]) == [snapshot, first]
    source.add_message(conversation["id"], "user", "two", "alice")
    later = source.entries_missing(target.version_vector())[0]
    assert [entry["seq"] for entry in later] == [3]
    assert len(target.apply_entries(later)) == 1
    target.close()
    target = nm.Store(path, "nodeB", "bob")
    assert target.version_vector() == {"nodeA": 3}
    assert [m["content"] for m in target.get_conversation(conversation["id"])["messages"]] == ["one", "two"]
    target.close()


def test_a_log_poisoned_before_the_fix_is_repaired_at_open(tmp_path):
    path = str(tmp_path / "b.db")
    target = nm.Store(path, "nodeB", "bob")
    conversation = target.create_conversation("mine")
    target.add_message(conversation["id"], "user", "one", "bob")
    snapshot, message = _ENTRIES
    target.apply_entries([snapshot, message])
    target._db.write(lambda: target._db.execute(
        "INSERT INTO entries (origin, seq, uid, kind, conversation_id, timestamp, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("nodeB", 2 ** 62 - 1, "nodeB:%d" % (2 ** 62 - 1), "message", conversation["id"], nm.utc_now(), "{}")))
    target.close()
    target = nm.Store(path, "nodeB", "bob")  # the poisoned entry is dropped
    entry = target.add_message(conversation["id"], "user", "two", "bob")
    assert entry["seq"] == 3
    assert target.version_vector() == {"nodeB": 3, "nodeA": 2}
    target.close()


# -- live nodes ---------------------------------------------------------------------------------


def _contents(node, conversation_id):
    response = node.get("/api/conversations/%s" % conversation_id)
    return [m["content"] for m in response.json()["messages"]] if response.status_code == 200 else None


def _ask(node):
    return node.post("/api/chat", json={"model": MODEL, "stream": False,
                                        "messages": [{"role": "user", "content": "hello?"}]}, timeout=60)


def _deep_nesting_before_the_proof(node):
    """A raw socket's PING frame nested 1,000 deep, as the finding's probe sent it."""
    body = b"[" * 1000 + b"]" * 1000
    with socket.create_connection(("127.0.0.1", node.tcp_port), timeout=5) as sock:
        sock.sendall(nm.FRAME_HEADER.pack(nm.PING, len(body)) + body)
        sock.settimeout(5)
        while sock.recv(65536):
            pass  # the node answers with its nonce, then closes the link


def _trickle(node, seconds=3.0):
    """One byte a tenth of a second of a frame that never completes: closed by a deadline."""
    with socket.create_connection(("127.0.0.1", node.tcp_port), timeout=5) as sock:
        frame = nm.FRAME_HEADER.pack(nm.PING, 1000)
        deadline = time.monotonic() + seconds
        for byte in frame * 100:
            if time.monotonic() > deadline:
                return False
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return True  # closed by the node
            time.sleep(0.1)  # the attack itself is slow: that is what it tests
    return False


LIVE_ATTACKS = ["bad_llmc", "poisoned_file", "sync_flood", "deep_nesting", "bad_pong", "string_bool",
                "oversize_entry", "peer_exchange_flood", "trickle"]


@pytest.mark.parametrize("attack", LIVE_ATTACKS)
def test_a_live_node_under_attack_keeps_its_good_peer_and_syncs(cluster, fakes, linked_peer, attack):
    fake = fakes()
    a = cluster.start("a", extra=["--ollama-url", fake.url])
    b = cluster.start("b")
    wait_for(lambda: fully_linked([a, b]), message="a and b linked")
    conversation = b.post("/api/conversations", json={"title": "during the attack"}).json()["id"]
    wait_for(lambda: _contents(a, conversation) == [], message="the conversation synced")
    own = a.post("/api/conversations", json={"title": "a's notes"}).json()["id"]
    for index in range(5):  # something to answer SYNC with
        written = a.post("/api/conversations/%s/messages" % own,
                         json={"content": "p" * 90000 + str(index), "sender": "a", "answer": False})
        assert written.status_code == 201, written.text
    evil = linked_peer(a, name="evil")
    wait_for(lambda: evil.node_id in a.connected_ids(), message="the raw peer linked")
    if attack == "bad_llmc":
        evil.send(nm.LLM_CAPS, {"has_llm": True, "models": [MODEL], "load": {"in_flight": "x"}})
        wait_for(lambda: "bad LLMC: frame from evil" in a.log() and "load.in_flight" in a.log(),
                 message="the bad LLMC refused, naming the peer and the field")
        assert evil.closed_by_node(), "a bad LLMC closes that link"
    elif attack == "poisoned_file":
        seq = 2 ** 62 - 1
        snapshot, message = _ENTRIES
        evil.send(nm.FILE, {"entries": [dict(message, origin=b.node_id, seq=seq, uid="%s:%d" % (b.node_id, seq),
                                             conversation_id=conversation)], "more": False})
        wait_for(lambda: "rejected a batch" in a.log(), message="the unsigned poisoned batch rejected")
        assert evil.closed_by_node(), "its sender is unlinked"
    elif attack == "sync_flood":
        evil.send_many(nm.SYNC, {"vector": {}}, 2000)
    elif attack == "deep_nesting":
        _deep_nesting_before_the_proof(a)
        body = b'{"t":' + b"[" * 1000 + b"]" * 1000 + b"}"
        evil.link.sock.sendall(nm.FRAME_HEADER.pack(nm.PING, len(body)) + body)
        assert evil.closed_by_node(), "a deeply nested frame closes that link"
    elif attack == "bad_pong":
        evil.send(nm.PONG, {"t": -1e308})
        assert evil.closed_by_node(), "a PONG with an impossible time closes that link"
        assert "Infinity" not in a.get("/api/peers").text
    elif attack == "string_bool":
        snapshot, _message = _ENTRIES
        data = dict(snapshot["data"], private="false")
        evil.send(nm.FILE, {"entries": [dict(snapshot, data=data, origin=evil.node_id,
                                             uid="%s:1" % evil.node_id, seq=1)], "more": False})
        wait_for(lambda: "refused 1 entry" in a.log() or evil.closed_by_node(0.2),
                 message="the entry with a string boolean refused")
    elif attack == "oversize_entry":
        _snapshot, message = _ENTRIES
        data = dict(message["data"], content="x" * (1 << 20))
        evil.send(nm.FILE, {"entries": [dict(message, data=data, origin=evil.node_id,
                                             uid="%s:1" % evil.node_id, seq=1)], "more": False})
        wait_for(lambda: "refused 1 entry" in a.log() or evil.closed_by_node(0.2),
                 message="the oversize entry refused")
    elif attack == "peer_exchange_flood":
        evil.send(nm.PEERS, {"peers": [{"node_id": "%032x" % n, "address": "127.0.%d.%d" % (n // 250, n % 250 + 1),
                                        "tcp_port": 9} for n in range(1000)]})
    else:
        assert _trickle(a) or a.get("/api/health").status_code == 200
    started = time.monotonic()
    b.post("/api/conversations/%s/messages" % conversation, json={"content": "real", "sender": "b", "answer": False})
    wait_for(lambda: "real" in (_contents(a, conversation) or []), timeout=5, message="the real message on a")
    synced_after = time.monotonic() - started
    assert b.node_id in a.connected_ids() and a.node_id in b.connected_ids()
    assert _ask(a).status_code == 200, "a chat on a node with its own LLM still works"
    health = a.health()
    assert health["status"] == "ok"
    if attack == "sync_flood":
        wait_for(lambda: sum(value for key, value in a.health()["sync"].items()
                             if key.startswith("sync_requests_")) >= 2000, message="the flood read")
        sync = a.health()["sync"]
        assert sync.get("sync_answers", 0) < 100 and sync.get("entries_sent", 0) < 500, sync
    if attack == "peer_exchange_flood":
        assert len(a.peers()) <= 257, "the peer table stays bounded"
    if attack in ("oversize_entry", "string_bool"):
        assert all(evil.node_id != record.get("origin") for record in a.json("/api/conversations"))
    if attack == "poisoned_file":
        fresh = b.post("/api/conversations/%s/messages" % conversation,
                       json={"content": "after", "sender": "b", "answer": False})
        assert fresh.json()["seq"] < 100
        wait_for(lambda: "after" in (_contents(a, conversation) or []), message="later entries of b sync")
    assert "Traceback" not in a.log() and "Traceback" not in b.log()
    print("%s: the real message reached a after %.2f s" % (attack, synced_after))


def test_a_chat_relayed_to_a_frozen_peer_completes_on_another(cluster, fakes):
    first, second = fakes(), fakes()
    frozen = cluster.start("frozen", extra=["--ollama-url", first.url])
    backup = cluster.start("backup", extra=["--ollama-url", second.url])
    client = cluster.start("client")
    wait_for(lambda: fully_linked([frozen, backup, client]), message="mesh")
    wait_for(lambda: hosts_of(client) == {frozen.node_id, backup.node_id}, message="both hosts granted")
    first.set_fail("hang")
    results = []
    threads = [threading.Thread(target=lambda: results.append(_ask(client))) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: first.requests_to("/api/chat"), message="a chat relayed to the host that will freeze")
        frozen.process.send_signal(signal.SIGSTOP)
        for thread in threads:
            thread.join(45)
        elapsed = time.monotonic() - started
        assert len(results) == 3 and all(r.status_code == 200 for r in results), [r.text for r in results]
        assert elapsed < 25, "waited %.1f s" % elapsed
        assert "frozen" not in {r.json().get("node_name") for r in results}
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        first.set_fail(None)
    print("the chats completed on the other host after %.1f s" % elapsed)
