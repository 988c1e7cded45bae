"""Mesh security: the room code, the key proof inside TLS, origin
checks, and the bounds that keep one hostile peer from hurting a node. In-process meshes on
loopback where possible, a few real nodes (the ``cluster`` fixture) for the black-box view.

Network safety: loopback only (127.0.0.0/8); datagrams go to 127.0.0.1 or 127.255.255.255."""

import collections
import json
import logging
import select
import socket
import ssl
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh as nm
from conftest import KEYS, LOOPBACK_BROADCAST, RawPeer, TamperingProxy, reserve_udp_port, wait_for
from support.running_mesh import linked

KEY = "correct horse battery staple"
BUSY_DEADLINE = 120.0  # seconds: a wait that only ends early must not fail on a loaded machine


def proven_peer(mesh, node_id="raw-peer", key=KEY, name="raw", port=None):
    """A RawPeer that proved ``key`` to ``mesh`` and sent its HELO; waits until it is linked."""
    peer = RawPeer(port or mesh.mesh.tcp_port, nm.derive_room_key(key) if key else None)
    peer.prove()
    peer.send(nm.HELLO, nm.signed_hello(KEYS[node_id], peer, {"node_id": KEYS.id(node_id), "name": name, "tcp_port": 1}))
    wait_for(lambda: node_id in mesh.linked_ids(), message="the raw peer linked")
    return peer


# -- keys, configuration, health -------------------------------------------------------


def test_room_key_and_config_never_show_the_code(mesh_config):
    config = mesh_config(extra=["--mesh-key", "  s3cret code "])
    assert config.mesh_key == "s3cret code" and "s3cret" not in repr(config)
    key = nm.derive_room_key(config.mesh_key)
    assert key == nm.derive_room_key("s3cret code\n") and not nm.is_open_room(key)
    status = nm.room_status(key)
    assert status["closed"] and len(status["key_hash"]) == 8 and "s3cret" not in str(status)
    assert nm.room_status(nm.derive_room_key(None)) == {"closed": False, "key_hash": None}
    from_env = nm.load_config(nm.build_arg_parser().parse_args([]), environ={"NEUROMESH_MESH_KEY": "abc"})
    assert from_env.mesh_key == "abc"
    with pytest.raises(nm.ConfigError) as info:
        nm.load_config(nm.build_arg_parser().parse_args(["--mesh-key", "   "]), environ={})
    assert "room code is empty" in str(info.value)


def test_log_once_counts_the_repeats(caplog):
    limiter = nm.LogOnce(interval=60.0)
    with caplog.at_level(logging.WARNING, logger="neuromesh"):
        assert limiter.log(logging.WARNING, "k", "flood from %s", "x")
        assert not any(limiter.log(logging.WARNING, "k", "flood from %s", "x") for _ in range(99))
        limiter._next["k"] = 0.0  # the interval is over
        assert limiter.log(logging.WARNING, "k", "flood from %s", "x")
    lines = [r.getMessage() for r in caplog.records if "flood" in r.getMessage()]
    assert lines == ["flood from x", "flood from x (and 99 more like it since the last such line)"]


# -- linking with and without the key ----------------------------------------------------


def test_same_key_links_a_wrong_key_or_no_key_learns_nothing(meshes):
    a = meshes("node-a", key=KEY)
    b = meshes("node-b", key=KEY, peer_of=a)
    wrong = meshes("node-wrong", key="another code", peer_of=a)
    open_node = meshes("node-open", peer_of=a)
    # Four key derivations and three key proofs on a busy CI machine: a deadline that fits it,
    # each wait ending as soon as what it waits for happened.
    wait_for(lambda: linked(a, b), timeout=BUSY_DEADLINE, message="A and B linked")
    wait_for(lambda: a.mesh.counters["protocol_errors"] >= 2 and wrong.mesh.counters["protocol_errors"] >= 1
             and open_node.mesh.counters["protocol_errors"] >= 1, timeout=BUSY_DEADLINE,
             message="both strangers refused")
    assert a.linked_ids() == {"node-b"} and {p["node_id"] for p in a.mesh.peers()} == {KEYS.id("node-b")}
    for stranger in (wrong, open_node):
        assert stranger.mesh.peers() == [] and stranger.listener.calls == []
    assert a.mesh.counters["key_proofs"] == 1  # only B's link got past the proof


def test_a_wrong_key_fails_the_proof_on_both_ends(meshes):
    a = meshes("node-a", key=KEY)
    peer = RawPeer(a.mesh.tcp_port, nm.derive_room_key("guess"))
    with pytest.raises((nm.ProtocolError, ConnectionError), match="key|closed"):
        peer.prove()
    assert peer.closed_by_node()
    assert a.listener.calls == [] and a.mesh.peers() == []


def test_an_old_protocol_helo_gets_a_clear_log_line(meshes, caplog, fresh_log_once):
    a = meshes("node-a")
    sock = socket.create_connection(("127.0.0.1", a.mesh.tcp_port), timeout=5)
    with caplog.at_level(logging.WARNING, logger="neuromesh"):
        sock.sendall(nm.encode_frame(nm.HELLO, {"node_id": "old", "name": "oldie", "tcp_port": 1}))
        try:
            assert RawPeer.closed_by_node(type("S", (), {"sock": sock})())
        finally:
            sock.close()
        wait_for(lambda: any("runs an older NeuroMesh" in r.getMessage() for r in caplog.records),
                 message="the upgrade hint")
    assert any("127.0.0.1" in r.getMessage() and "upgrade it" in r.getMessage() for r in caplog.records)


# -- a keyed node refuses forged, replayed and early frames ---------------------------------


@pytest.mark.parametrize("attack", ["replay", "alter", "before_proof", "stolen_id", "unproven_sync"])
def test_a_keyed_node_refuses(meshes, attack):
    a = meshes("node-a", key=KEY)
    b = meshes("node-b", key=KEY, peer_of=a)
    wait_for(lambda: linked(a, b), message="A and B linked")
    got_back = []
    if attack in ("replay", "alter"):  # on the wire, below TLS: a record sent again, or one bit flipped
        with TamperingProxy(a.mesh.tcp_port) as proxy:
            peer = proven_peer(a, port=proxy.port)
            peer.send(nm.SYNC, {"vector": {}})
            wait_for(lambda: a.listener.of("frame"), message="the genuine frame")
            proxy.tamper = attack
            peer.send(nm.SYNC, {"vector": {"x": 1}})
            assert peer.closed_by_node()
        assert len(a.listener.of("frame")) == 1 and a.mesh.counters["tls_errors"] >= 1
    else:
        peer = RawPeer(a.mesh.tcp_port)  # inside TLS, before the key proof
        if attack == "before_proof":
            peer.send(nm.PING, {"t": 1})
        elif attack == "stolen_id":
            peer.send(nm.HELLO, {"node_id": "node-b", "name": "B", "tcp_port": 1})
        else:
            peer.send(nm.SYNC, {})
        assert peer.closed_by_node()
        peer.close()
        got_back = [m for m in a.listener.of("frame")]
        assert a.mesh.counters["protocol_errors"] >= 1
    assert got_back == [] and linked(a, b)
    assert a.mesh.counters["loop_errors"] == 0


def test_an_unproven_socket_hears_nothing_but_the_nonce(meshes):
    a = meshes("node-a", key=KEY)
    peer = RawPeer(a.mesh.tcp_port)
    data = b""
    try:
        peer.sock.sendall(nm.encode_frame(nm.SYNC, {}))
        while True:
            try:
                chunk = peer.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
    finally:
        peer.close()
    assert [marker for marker, _p in _all_frames(data)] == [nm.HELLO_NONCE]
    assert KEYS.id("node-a").encode() not in data


def _all_frames(data):
    decoder, frames = nm.FrameDecoder(1 << 20), []
    batch = decoder.feed(data)
    while batch:
        frames += batch
        batch = decoder.feed(b"")
    return frames


# -- discovery ---------------------------------------------------------------------------


def _broadcast(port, datagram):
    """Send ``datagram`` to the loopback broadcast address (a unicast one would reach only one
    of the sockets sharing the port, maybe the test's own port reservation)."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    try:
        sender.sendto(datagram, (LOOPBACK_BROADCAST, port))
    finally:
        sender.close()


def test_a_keyed_announcement_carries_only_what_a_dial_needs():
    hello = {"node_id": "n1", "name": "secret-room-A", "tcp_port": 7878, "models": ["m"], "has_llm": True,
             "protocol_version": nm.PROTOCOL_VERSION}
    key = nm.derive_room_key(KEY)
    body = nm.Discovery.make_announcement("ONLINE", nm.public_announcement(hello))
    datagram = nm.tag_datagram(key, body)
    assert b"secret-room-A" not in datagram and b'"m"' not in datagram
    assert nm.open_datagram(key, datagram) == body
    assert nm.open_datagram(nm.OPEN_ROOM_KEY, datagram) is None  # an open node drops another room's
    assert nm.open_datagram(key, body) is None  # a keyed node drops untagged ones
    assert nm.open_datagram(nm.derive_room_key("other"), datagram) is None


def test_datagrams_without_the_tag_start_no_dial(meshes):
    a = meshes("node-a", key=KEY, discovery=True)
    bait = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # where a dial would land
    bait.bind(("127.0.0.1", 0))
    bait.listen(8)
    try:
        announcement = nm.Discovery.make_announcement("ONLINE", {"node_id": "bait", "tcp_port": bait.getsockname()[1]})
        _broadcast(a.mesh.config.udp_port, announcement)
        _broadcast(a.mesh.config.udp_port, nm.tag_datagram(nm.derive_room_key("other"), announcement))
        wait_for(lambda: a.mesh.counters["unauthenticated_datagrams"] >= 2, message="two dropped datagrams")
        assert select.select([bait], [], [], 0.5)[0] == [] and "bait" not in a.mesh.peer_table
        _broadcast(a.mesh.config.udp_port, nm.tag_datagram(a.mesh.room_key, announcement))  # the control
        assert select.select([bait], [], [], 5.0)[0] == [bait], "a tagged announcement is dialed"
    finally:
        bait.close()


# -- origin checks -------------------------------------------------------------------------


@pytest.mark.parametrize("address,private", [
    ("10.1.2.3", True), ("172.16.0.1", True), ("172.32.0.1", False), ("192.168.1.8", True),
    ("127.0.0.1", True), ("127.9.9.9", True), ("169.254.3.4", True), ("100.64.0.1", True),
    ("100.128.0.1", False), ("8.8.8.8", False), ("::1", True), ("fd00::1", True), ("fe80::1%eth0", True),
    ("2001:db8::1", False), ("::ffff:10.0.0.1", True), ("::ffff:8.8.8.8", False), ("0.0.0.0", False),
    ("localhost", False), ("example.com", False), ("", False), (167772161, False), (None, False),
])
def test_the_private_address_predicate(address, private):
    assert nm.is_private_address(address) is private


def test_peer_addresses_must_be_ip_literals():
    assert nm.peer_address_allowed("192.168.0.4") and not nm.peer_address_allowed("8.8.8.8")
    assert nm.peer_address_allowed("8.8.8.8", allow_public=True)
    assert not nm.peer_address_allowed("localhost", allow_public=True)  # no DNS on the mesh thread
    assert not nm.peer_address_allowed(["127.0.0.1"], allow_public=True)


def test_discovery_drops_public_sources():
    counters = collections.Counter()
    discovery = nm.Discovery(0, [], "me", 30.0, counters)
    datagram = nm.tag_datagram(nm.OPEN_ROOM_KEY, nm.Discovery.make_announcement("ONLINE", {"node_id": "x", "tcp_port": 5}))
    assert discovery.open_announcement("8.8.8.8", datagram) is None and counters["public_datagrams"] == 1
    assert discovery.open_announcement("192.168.1.9", datagram)["node_id"] == "x"
    discovery.allow_public = True
    assert discovery.open_announcement("8.8.8.8", datagram)["node_id"] == "x"


@pytest.mark.parametrize("allow_public", [False, True])
def test_a_link_from_a_public_address_is_refused(meshes, monkeypatch, allow_public):
    monkeypatch.setattr(nm, "is_private_address", lambda address: False)  # loopback plays the internet
    a = meshes("node-a", flags=["--allow-public"] if allow_public else [])
    if allow_public:
        peer = RawPeer(a.mesh.tcp_port)
        peer.prove()
        assert a.mesh.counters["refused_public"] == 0
        peer.close()
    else:
        with pytest.raises(OSError):  # closed before TLS starts
            RawPeer(a.mesh.tcp_port).prove()
        assert a.mesh.counters["refused_public"] == 1 and a.mesh.counters["accepted"] == 0


def test_peer_exchange_skips_names_and_public_addresses(meshes):
    a = meshes("node-a")
    peer = proven_peer(a, key=None)
    entries = [{"node_id": "n-name", "address": "localhost", "tcp_port": 9},
               {"node_id": "n-public", "address": "8.8.8.8", "tcp_port": 9},
               {"node_id": "n-private", "address": "127.0.0.1", "tcp_port": 9}]
    peer.send(nm.PEERS, {"peers": entries})
    wait_for(lambda: ("127.0.0.1", 9) in a.mesh.dials.targets, message="the private entry")
    assert {host for host, _port in a.mesh.dials.targets} == {"127.0.0.1"}


# -- deadlines -------------------------------------------------------------------------------


def test_half_open_connections_are_closed_by_the_handshake_deadline(meshes):
    a = meshes("node-a", key=KEY, handshake_timeout=1.0)
    b = meshes("node-b", key=KEY, peer_of=a)
    wait_for(lambda: linked(a, b), message="A and B linked")
    started = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", a.mesh.tcp_port), timeout=5) for _ in range(200)]
    open_socks = set(socks)
    try:
        deadline = time.monotonic() + 15
        while open_socks and time.monotonic() < deadline:
            for sock in select.select(list(open_socks), [], [], 0.5)[0]:
                try:
                    if not sock.recv(65536):
                        open_socks.discard(sock)
                except ConnectionResetError:
                    open_socks.discard(sock)
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert not open_socks, "%d half-open sockets still open" % len(open_socks)
    assert elapsed < 1.0 + a.mesh.heartbeats.interval + 5.0
    assert linked(a, b) and a.listener.of("peer_down") == []
    print("200 half-open sockets closed in %.2f s (handshake_timeout 1.0 s)" % elapsed)


def test_a_trickling_peer_is_closed_within_the_peer_timeout(meshes):
    a = meshes("node-a", settings={"peer_timeout": "1.5"})
    peer = proven_peer(a, key=None)
    peer.sock.sendall(struct.pack("<5sQ", b"PING:", 1000))  # a frame that never completes
    started = time.monotonic()
    closed = False
    while not closed and time.monotonic() - started < 10:
        try:
            peer.sock.sendall(b" ")
        except OSError:
            break
        readable = select.select([peer.sock], [], [], 0.2)[0]
        while readable and not closed:
            try:
                closed = not peer.sock.recv(65536)
            except ConnectionResetError:
                closed = True
            readable = not closed and select.select([peer.sock], [], [], 0)[0]
    elapsed = time.monotonic() - started
    wait_for(lambda: "raw-peer" not in a.linked_ids(), message="the trickler unlinked")
    assert elapsed < 1.5 + a.mesh.heartbeats.interval + 2.0, elapsed
    assert any("silent" in reason for _id, reason in a.listener.of("peer_down"))


# -- bad input and floods ---------------------------------------------------------------------


def test_deep_nesting_closes_only_that_link(meshes):
    a = meshes("node-a", key=KEY)
    b = meshes("node-b", key=KEY, peer_of=a)
    wait_for(lambda: linked(a, b), message="A and B linked")
    peer = proven_peer(a)
    body = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    peer.sock.sendall(struct.pack("<5sQ", b"SYNC:", len(body)) + body)
    assert peer.closed_by_node()
    assert a.mesh.counters["loop_errors"] == 0 and a.mesh.counters["protocol_errors"] == 1
    assert linked(a, b)


def test_deep_nesting_is_a_protocol_error_in_the_decoder():
    body = b"[" * 100000 + b"]" * 100000
    with pytest.raises(nm.ProtocolError, match="bad JSON"):
        _proven_decoder().feed(struct.pack("<5sQ", b"SYNC:", len(body)) + body)


def test_a_peer_that_never_reads_is_dropped_at_the_write_cap(meshes, fresh_log_once, caplog):
    a = meshes("node-a")
    a.mesh.io.max_outgoing = 1 * nm.MiB
    peer = proven_peer(a, key=None)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pad = "x" * (256 * 1024)

    def dropped():
        a.mesh.send(KEYS.id("raw-peer"), nm.SYNC, {"pad": pad})
        return a.mesh.counters["links_not_reading"] >= 1

    with caplog.at_level(logging.WARNING, logger="neuromesh"):
        wait_for(dropped, timeout=20, message="the never-reading peer dropped")
    assert "raw-peer" not in a.linked_ids()
    assert any("does not read" in r.getMessage() for r in caplog.records)


def test_the_peer_table_is_capped_against_fake_announcements_and_helos(meshes):
    a = meshes("node-a", discovery=True)
    port = a.mesh.config.udp_port
    for batch in range(20):
        for index in range(50):
            node_id = "fake-%04d" % (batch * 50 + index)
            _broadcast(port, nm.Discovery.make_announcement("ONLINE", {"node_id": node_id, "tcp_port": 9}))
        wait_for(lambda: a.mesh.counters["announcements_heard"] >= (batch + 1) * 50 - 5,
                 message="batch %d heard" % batch)
    assert len(a.mesh.peer_table) <= a.mesh.peer_table.max_peers
    for index in range(300):
        peer = RawPeer(a.mesh.tcp_port)
        peer.prove()
        peer.send(nm.HELLO, {"node_id": "helo-%04d" % index, "tcp_port": 9})
        peer.close()
    wait_for(lambda: a.mesh.counters["key_proofs"] >= 300 and not a.mesh.io.links, message="300 HELOs handled")
    assert len(a.mesh.peers()) <= 256 and a.mesh.counters["loop_errors"] == 0


def test_a_peer_frame_with_1000_entries_causes_bounded_dials(meshes):
    a = meshes("node-a", settings={"peer_timeout": "30"})
    peer = proven_peer(a, key=None)
    ports = reserve_udp_port()  # hold nothing on TCP: every dial is refused at once
    try:
        entries = [{"node_id": "%032x" % i, "address": "127.0.0.%d" % (2 + i % 200), "tcp_port": 1}
                   for i in range(1000)]
        started = time.monotonic()
        peer.send(nm.PEERS, {"peers": entries})
        wait_for(lambda: a.mesh.counters["dials"] >= nm.DialPlan.dial_burst, message="the first dials")
        elapsed = time.monotonic() - started
        dials = a.mesh.counters["dials"]
    finally:
        ports.close()
    assert dials <= nm.DialPlan.dial_burst + nm.DialPlan.dial_rate * (elapsed + 0.5) + 1
    assert len(a.mesh.dials) <= nm.DialPlan.max_exchanged + 1


# -- fuzz: nothing but ProtocolError (or None) from what a peer sends ---------------------------


def _proven_decoder():
    decoder = nm.FrameDecoder(1 << 20)
    decoder.proven = True
    return decoder


MARKER = st.sampled_from(sorted(nm.MARKERS) + [b"EVIL:", b"\x00\x00\x00\x00\x00"])
# Strings from a fixed set and hex: st.text() and lambdas make Hypothesis slow to start.
WORD = st.sampled_from(["", "a", "ONLINE", "OFFLINE", "\u00e9\u2713", "0" * 64, "zz" * 32, "node-a"]) \
    | st.binary(max_size=40).map(bytes.hex)
SCALAR = st.none() | st.booleans() | st.integers() | WORD
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tagged_json(document):
    return nm.tag_datagram(nm.OPEN_ROOM_KEY, json.dumps(document).encode())


@FUZZ
@given(MARKER, st.integers(0, 5000), st.binary(max_size=300), st.integers(1, 64), st.booleans())
def test_fuzz_frame_decoder_feed(marker, length, tail, chunk, proven):
    stream = struct.pack("<5sQ", marker, length) + tail
    decoder = _proven_decoder() if proven else nm.FrameDecoder(1 << 16)
    try:
        for start in range(0, len(stream), chunk):
            frames = decoder.feed(stream[start:start + chunk])
            while frames:
                assert all(m in nm.MARKERS and isinstance(p, dict) for m, p in frames)
                frames = decoder.feed(b"")
    except nm.ProtocolError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200) | st.builds(_tagged_json, st.dictionaries(
           st.sampled_from(["message_type", "node_id", "tcp_port"]), SCALAR | st.integers(0, 70000), max_size=3)),
       st.sampled_from(["127.0.0.1", "10.0.0.2", "8.8.8.8"]), st.booleans())
def test_fuzz_discovery_datagrams(data, ip, keyed):
    discovery = nm.Discovery(0, [], "me", 30.0, room_key=KEYED if keyed else nm.OPEN_ROOM_KEY)
    message = discovery.open_announcement(ip, data)
    assert message is None or (isinstance(message, dict) and message["message_type"] in ("ONLINE", "OFFLINE"))
    parsed = nm.Discovery.parse_announcement(data)
    assert parsed is None or isinstance(parsed, dict)


KEYED = nm.derive_room_key(KEY)


# -- real nodes (black box) ---------------------------------------------------------------------


def _titles(node):
    return {record["title"] for record in node.json("/api/conversations")}


@pytest.fixture
def fake_llm():
    from support.fake_ollama import FakeOllama
    fake = FakeOllama(models=("secret-model:1b",)).start()
    yield fake
    fake.stop()


def _models(node):
    return {entry["name"] for entry in node.json("/api/models")["models"]}


def test_real_nodes_with_the_key_share_and_strangers_learn_nothing(cluster, fake_llm):
    a = cluster.start("a", extra=["--mesh-key", KEY, "--ollama-url", fake_llm.url])
    b = cluster.start("b", extra=["--mesh-key", KEY])
    wrong = cluster.start("wrong", extra=["--mesh-key", "not the code", "--peer", "127.0.0.1:%d" % a.tcp_port])
    stranger = cluster.start("open", extra=["--peer", "127.0.0.1:%d" % a.tcp_port])
    assert a.post("/api/conversations", json={"title": "room secret chat"}).status_code == 201
    wait_for(lambda: b.node_id in a.connected_ids() and "room secret chat" in _titles(b)
             and "secret-model:1b" in _models(b), message="A and B share chats and the LLM")
    wait_for(lambda: a.health()["counters"].get("unauthenticated_datagrams", 0) >= 1
             and a.health()["counters"].get("protocol_errors", 0) >= 2, message="A refused the strangers")
    for node in (wrong, stranger):
        assert node.peers() == [] and "room secret chat" not in _titles(node)
        assert _models(node) == set()
    assert {peer["node_id"] for peer in a.peers()} == {b.node_id}
    health = a.health()
    assert health["room"]["closed"] is True and len(health["room"]["key_hash"]) == 8
    assert health["room"]["key_hash"] == b.health()["room"]["key_hash"] != wrong.health()["room"]["key_hash"]
    assert stranger.health()["room"] == {"closed": False, "key_hash": None}
    with open(a.log_path, errors="replace") as handle:
        whole_log = handle.read()
    assert KEY not in str(health) and KEY not in whole_log
    assert "Room: closed by a room code (key hash %s)" % health["room"]["key_hash"] in whole_log
    with open(stranger.log_path, errors="replace") as handle:
        assert "Room: open" in handle.read()
