"""The fast paths, in-process on loopback: relay answers over one kept-alive
connection, and no frame encoded for a broadcast that reaches nobody. Not timed."""

import threading
import types

import pytest

import neuromesh as nm
from conftest import KEYS, ScriptedBackend, StubNode, TLSRelay, scripted_router, wait_for
from support.running_mesh import RecordingListener, RunningMesh

USER = [{"role": "user", "content": "Hi?"}]


@pytest.fixture
def relay_host(tmp_path):
    """A host's whole app (its LLM scripted) served on its relay connections (a TLSRelay: TLS on
    127.0.0.1, RelayServer); the token the asking peer was granted is "granted-token"."""
    node = StubNode(tmp_path, scripted_router(local=[ScriptedBackend("host-llm")]))
    relay = TLSRelay(app=node.app())
    node.router.tokens.issued[relay.client_id] = "granted-token"
    try:
        yield relay
    finally:
        relay.close()
        node.store.close()


def test_relay_answers_arrive_whole_over_one_kept_alive_connection(relay_host):
    """Each relayed answer is read to its end, so the next goes over the same relay connection."""
    peer = types.SimpleNamespace(node_id=relay_host.node_id, name="host", models=["m1"], connected=True, load=None,
                                 rtt_ms=1)
    backend = relay_host.peer_backend(peer, "granted-token")
    try:
        answers = []
        for _ in range(3):
            events = list(backend.chat("m1", USER, {}, threading.Event()))
            answers.append("".join(event["content"] for event in events if event["type"] == "token"))
            assert events[-1]["type"] == "done"
        assert answers == ["Hello from the fake"] * 3
        assert relay_host.connections == 1 and backend.connections.idle() == 1
    finally:
        backend.connections.close()


@pytest.fixture
def linked_pair(mesh_config):
    a = RunningMesh(mesh_config(extra=["--name", "A"]), "node-a", RecordingListener())
    b = RunningMesh(mesh_config(extra=["--name", "B", "--peer", "127.0.0.1:%d" % a.mesh.tcp_port]), "node-b",
                    RecordingListener())
    try:
        wait_for(lambda: a.linked_ids() and b.linked_ids(), message="the link")
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_a_forward_that_reaches_nobody_is_not_encoded(linked_pair, monkeypatch):
    a, b = linked_pair
    encoded = []
    original = nm.encode_frame

    def counting(marker, payload):
        if marker in (nm.FILE, nm.LLM_REQUEST):  # not the heartbeats the loop sends meanwhile
            encoded.append(marker)
        return original(marker, payload)
    monkeypatch.setattr(nm, "encode_frame", counting)
    b.mesh.broadcast(nm.FILE, {"entries": [], "heads": {}, "more": False}, exclude=KEYS.id("node-a"))
    assert encoded == []
    b.mesh.broadcast(nm.LLM_REQUEST, {"peer_name": "B"})
    wait_for(lambda: a.listener.of("frame"), message="the broadcast at A")
    assert encoded == [nm.LLM_REQUEST]
    assert a.listener.of("frame") == [(nm.LLM_REQUEST, "node-b", {"peer_name": "B"})]
