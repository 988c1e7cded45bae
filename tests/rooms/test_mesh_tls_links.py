"""Private links: every peer link and every relayed chat runs in TLS, bound to who
speaks; a machine in the middle is refused; TLS 1.2 links with 1.3; garbage and stalls close only
their own link. Real nodes on loopback (the ``cluster`` fixture) and in-process meshes.

Network safety: loopback only (127.0.0.0/8); nodes bind 127.0.0.1."""

import hashlib
import select
import socket
import ssl
import struct
import sys
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh as nm
from conftest import API_MODEL as MODEL, NodeProcess, RawPeer, TamperingProxy, tls_client_context, wait_for
from support.llm_mesh import hosts_of
from support.previous_release import previous_release
from support.running_mesh import linked

KEY = "correct horse battery staple"


def ask(node, question):
    reply = requests.post(node.url + "/api/chat", timeout=60, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": question}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["message"]["content"]


def tls_of(node, other):
    return next(peer for peer in node.peers() if peer["node_id"] == other.node_id)["tls"]


# -- the certificate --------------------------------------------------------------------------


def test_each_node_makes_its_own_p256_certificate_once_kept_0600(tmp_path):
    first = nm.TLSIdentity.load_or_create(str(tmp_path))
    again = nm.TLSIdentity.load_or_create(str(tmp_path))
    other = nm.TLSIdentity.load_or_create(str(tmp_path / "other"))
    assert first.certificate == again.certificate != other.certificate
    path = tmp_path / nm.TLS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert b"EC PRIVATE KEY" in path.read_bytes()
    path.write_text("damaged")
    assert nm.TLSIdentity.load_or_create(str(tmp_path)).certificate != first.certificate  # made anew


# -- real nodes: relayed chats in TLS, versions on view -------------------------------------------


def test_a_relayed_chat_crosses_a_tls_connection_to_the_mesh_port(cluster, fakes):
    fake = fakes()
    host = cluster.start("host", discovery=False, extra=["--ollama-url", fake.url])
    guest = cluster.start("guest", discovery=False, extra=["--peer", "127.0.0.1:%d" % host.tcp_port])
    wait_for(lambda: hosts_of(guest) == {host.node_id}, message="LLM access granted")
    question = "what is a lock?"
    assert ask(guest, question) == fake.answer_for([{"role": "user", "content": question}], MODEL)
    assert host.health()["counters"]["relay_connections"] >= 1, "the chat came over the mesh port"
    tls = tls_of(guest, host)
    assert tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["cipher"]
    assert tls_of(host, guest) == tls


def test_a_node_capped_at_tls_12_links_syncs_and_relays_with_a_tls_13_node(cluster, fakes):
    fake = fakes()
    host = cluster.start("host", discovery=False, extra=["--ollama-url", fake.url])
    old_tls = cluster.start("mac", discovery=False, extra=["--tls-max", "1.2", "--peer",
                                                           "127.0.0.1:%d" % host.tcp_port])
    wait_for(lambda: hosts_of(old_tls) == {host.node_id}, message="LLM access granted")
    assert tls_of(old_tls, host)["version"] == "TLSv1.2" and tls_of(host, old_tls)["version"] == "TLSv1.2"
    assert ask(old_tls, "sync me") == fake.answer_for([{"role": "user", "content": "sync me"}], MODEL)
    cid = old_tls.post("/api/conversations", json={"title": "from a Mac"}).json()["id"]
    wait_for(lambda: host.get("/api/conversations/%s" % cid).status_code == 200, message="the conversation synced")
    assert host.health()["counters"]["relay_connections"] >= 1


# -- a machine in the middle ----------------------------------------------------------------


def _middle(identity):
    """A wrap for TamperingProxy: end TLS towards the dialer with ``identity``'s certificate, and
    towards the node with a TLS client of its own; everything inside passes unchanged."""
    def wrap(client, upstream):
        return identity.server.wrap_socket(client, server_side=True), tls_client_context().wrap_socket(upstream)
    return wrap


@pytest.mark.parametrize("room", ["open", "keyed"])
def test_a_machine_in_the_middle_is_refused_by_both_ends(meshes, tmp_path, room):
    key = KEY if room == "keyed" else None
    a = meshes("node-a", key=key)
    with TamperingProxy(a.mesh.tcp_port, wrap=_middle(nm.TLSIdentity.load_or_create(str(tmp_path / "mitm")))) as proxy:
        b = meshes("node-b", key=key, flags=["--peer", "127.0.0.1:%d" % proxy.port])
        wait_for(lambda: a.mesh.counters["protocol_errors"] >= 1 and b.mesh.counters["protocol_errors"] >= 1,
                 message="both ends refuse the link in the middle")
        assert a.linked_ids() == set() and b.linked_ids() == set()
        assert a.mesh.counters["key_proofs"] == 0 and b.mesh.counters["key_proofs"] == 0
    c = meshes("node-c", key=key, peer_of=a)  # a direct link still works
    wait_for(lambda: linked(a, c), message="A and C linked directly")


def test_the_middle_is_named_in_the_log(meshes, tmp_path, caplog, fresh_log_once):
    a = meshes("node-a")
    with TamperingProxy(a.mesh.tcp_port, wrap=_middle(nm.TLSIdentity.load_or_create(str(tmp_path / "m")))) as proxy:
        with caplog.at_level("WARNING", logger="neuromesh"):
            b = meshes("node-b", flags=["--peer", "127.0.0.1:%d" % proxy.port])
            wait_for(lambda: any("machine in the middle" in r.getMessage() for r in caplog.records),
                     message="the refusal says why")
        assert b.linked_ids() == set()


# -- garbage and stalls close only their own link ---------------------------------------------------


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_garbage_around_the_tls_handshake_closes_only_that_link(meshes, when):
    a = meshes("node-a", key=KEY, handshake_timeout=2.0)
    b = meshes("node-b", key=KEY, peer_of=a)
    wait_for(lambda: linked(a, b), message="A and B linked")
    garbage = bytes(range(256)) * 4
    if when == "before":
        sock = socket.create_connection(("127.0.0.1", a.mesh.tcp_port), timeout=5)
        sock.sendall(garbage)
    elif when == "during":  # a genuine ClientHello, then junk where the rest of the handshake goes
        sock = socket.create_connection(("127.0.0.1", a.mesh.tcp_port), timeout=5)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = tls_client_context().wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(outgoing.read())
        assert select.select([sock], [], [], 5)[0], "the node answered the ClientHello"
        sock.sendall(struct.pack(">BHH", 22, 0x0303, len(garbage)) + garbage)
    else:
        peer = RawPeer(a.mesh.tcp_port, nm.derive_room_key(KEY))
        peer.prove()
        raw = socket.socket(fileno=peer.sock.detach())  # below TLS: junk where a record should be
        raw.sendall(struct.pack(">BHH", 23, 0x0303, len(garbage)) + garbage)
        sock = raw
    started = time.monotonic()
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, socket.timeout):
        pass
    finally:
        sock.close()
    assert time.monotonic() - started < 2.0 + a.mesh.heartbeats.interval + 1.0
    wait_for(lambda: a.mesh.counters["tls_errors"] >= 1, message="a TLS error counted")
    assert linked(a, b) and a.listener.of("peer_down") == [] and a.mesh.counters["loop_errors"] == 0


def test_a_stalled_tls_handshake_is_closed_by_the_handshake_deadline(meshes):
    a = meshes("node-a", handshake_timeout=1.0)
    sock = socket.create_connection(("127.0.0.1", a.mesh.tcp_port), timeout=5)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = tls_client_context().wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        sock.sendall(hello[:len(hello) // 2])  # and then nothing
        started = time.monotonic()
        while sock.recv(65536):
            pass
        assert time.monotonic() - started < 1.0 + a.mesh.heartbeats.interval + 2.0
    finally:
        sock.close()
    assert a.mesh.io.links == set()


def test_an_older_node_is_refused_with_one_clear_line(meshes, caplog, fresh_log_once):
    a = meshes("node-a")
    with caplog.at_level("WARNING", logger="neuromesh"):
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", a.mesh.tcp_port), timeout=5)
            sock.sendall(nm.encode_frame(nm.HELLO_NONCE, {"v": 2, "n": "00" * 32, "e": "00" * 32}))
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            sock.close()
        wait_for(lambda: a.mesh.counters["outdated_peers"] == 3, message="three refusals")
    lines = [r.getMessage() for r in caplog.records if "older NeuroMesh" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "it runs an older NeuroMesh: upgrade it" in lines[0]


# -- the key proof inside the tunnel, fuzzed ----------------------------------------------------------

CERT = hashlib.sha256(b"a certificate").digest()
HEX = st.sampled_from(["", "00" * 32, CERT.hex(), "zz" * 32, "0" * 63]) | st.binary(max_size=40).map(bytes.hex)
VALUE = st.none() | st.booleans() | st.integers() | HEX
NONCE = st.fixed_dictionaries({"v": st.just(nm.AUTH_VERSION) | VALUE, "n": HEX | st.just("11" * 32), "c": HEX})


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(nm.MARKERS)), NONCE | st.dictionaries(
    st.sampled_from(["v", "n", "c", "p"]), VALUE, max_size=4)), max_size=4), st.booleans())
def test_fuzz_the_key_proof_in_the_tunnel(steps, initiator):
    handshake = nm.Handshake(nm.OPEN_ROOM_KEY, initiator, CERT)
    handshake.start()
    try:
        for marker, payload in steps:
            for frame in handshake.receive(marker, payload):
                assert frame[:5] in nm.HANDSHAKE_MARKERS
    except nm.ProtocolError:
        pass
    assert not handshake.done  # no proof without the room key's HMAC over this transcript


def test_both_ends_of_one_certificate_prove_and_another_certificate_fails():
    def run(server_sees, client_sees):
        ends = [nm.Handshake(nm.OPEN_ROOM_KEY, True, client_sees), nm.Handshake(nm.OPEN_ROOM_KEY, False, server_sees)]
        pending = [ends[0].start(), []]
        while not (ends[0].done and ends[1].done):
            moved = False
            for index, end in enumerate(ends):
                frames, pending[1 - index] = pending[1 - index], []
                for frame in frames:
                    moved = True
                    pending[index] += end.receive(*nm.FrameDecoder(1 << 20).feed(frame)[0])
            assert moved
        return ends

    client, server = run(CERT, CERT)
    assert client.secrets.channel_binding == server.secrets.channel_binding
    with pytest.raises(nm.ProtocolError, match="machine in the middle"):
        run(CERT, hashlib.sha256(b"the middle's").digest())


# -- upgrade: nothing of the local store is lost -------------------------------------------------


def test_upgrading_a_data_dir_of_the_previous_release_keeps_its_id_and_conversations(cluster, tmp_path):
    tag, _version, _protocol, program = previous_release(tmp_path)
    data_dir = tmp_path / "upgraded"
    old = NodeProcess(data_dir, cluster.node_args(discovery=False), "old " + tag, program=[sys.executable, program])
    cluster.nodes.append(old)
    old.start()
    cid = old.post("/api/conversations", json={"title": "before the upgrade"}).json()["id"]
    reply = old.post("/api/conversations/%s/messages" % cid, json={"content": "kept", "sender": "ana", "answer": False})
    assert reply.status_code == 201, reply.text
    node_id = old.node_id
    old.stop()
    new = NodeProcess(data_dir, cluster.node_args(discovery=False), "new")
    cluster.nodes.append(new)
    new.start()
    assert new.node_id == node_id, "the same key, so the same id"
    held = new.json("/api/conversations/%s" % cid)
    assert held["title"] == "before the upgrade" and [m["content"] for m in held["messages"]] == ["kept"]
    assert (data_dir / nm.TLS_FILE).exists()
