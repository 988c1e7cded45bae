"""Mesh and Discovery inside the test process: two meshes linked on loopback, announcements
through a loopback UDP socket. No node processes, no HTTP."""

import collections
import select
import time

import pytest

import neuromesh as nm
from conftest import KEYS, LOOPBACK_BROADCAST, reserve_udp_port, wait_for
from support.running_mesh import RecordingListener, RunningMesh


@pytest.fixture
def two_meshes(mesh_config):
    """Mesh A, and mesh B dialing A as a static ``--peer``; both without discovery."""
    a = RunningMesh(mesh_config(extra=["--name", "A"]), "node-a", RecordingListener(http_port=1111))
    peer_flag = ["--name", "B", "--peer", "127.0.0.1:%d" % a.mesh.tcp_port]
    b = RunningMesh(mesh_config(extra=peer_flag), "node-b", RecordingListener(http_port=2222))
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_two_meshes_link_on_loopback(two_meshes):
    a, b = two_meshes
    wait_for(lambda: a.listener.of("peer_up") and b.listener.of("peer_up"), message="peer_up on both")
    assert a.listener.of("peer_up") == [("node-b",)] and b.listener.of("peer_up") == [("node-a",)]
    assert a.linked_ids() == {"node-b"} and b.linked_ids() == {"node-a"}
    record = {peer["node_id"]: peer for peer in b.mesh.peers()}[KEYS.id("node-a")]
    assert record["name"] == "A" and record["http_port"] == 1111  # listener.hello_extra() in the HELO
    assert record["address"] == "127.0.0.1"
    assert b.mesh.broadcast_addresses == []


def test_a_frame_reaches_the_other_listener(two_meshes):
    a, b = two_meshes
    wait_for(lambda: a.linked_ids() and b.linked_ids(), message="the link")
    a.mesh.send(KEYS.id("node-b"), nm.SYNC, {"vector": {"node-a": 3}})
    b.mesh.broadcast(nm.LLM_REQUEST, {"peer_name": "B"})
    wait_for(lambda: b.listener.of("frame") and a.listener.of("frame"), message="both frames")
    assert b.listener.of("frame") == [(nm.SYNC, "node-a", {"vector": {"node-a": 3}})]
    assert a.listener.of("frame") == [(nm.LLM_REQUEST, "node-b", {"peer_name": "B"})]
    a.mesh.send(KEYS.id("node-b"), nm.LLM_CAPS, {"has_llm": True, "models": ["m1"]})  # the mesh's own marker
    wait_for(lambda: b.listener.of("peer_changed"), message="peer_changed")
    assert {p["node_id"]: p for p in b.mesh.peers()}[KEYS.id("node-a")]["models"] == ["m1"]
    assert len(b.listener.of("frame")) == 1


def test_shutdown_tells_both_listeners_peer_down(two_meshes):
    a, b = two_meshes
    wait_for(lambda: a.linked_ids() and b.linked_ids(), message="the link")
    a.stop()
    assert not a.thread.is_alive()
    assert a.listener.of("peer_down") == [("node-b", "this node is stopping")]
    wait_for(lambda: b.listener.of("peer_down"), message="peer_down on B")
    assert b.listener.of("peer_down") == [("node-a", "peer said goodbye")]
    assert b.linked_ids() == set()


def test_the_default_listener_lets_a_mesh_run_alone(mesh_config):
    alone = RunningMesh(mesh_config(), "node-alone", None)
    try:
        assert isinstance(alone.mesh.listener, nm.MeshListener)
        assert alone.mesh.hello_payload()["http_port"] == 0
        assert alone.mesh.stats()["links"] == 0
    finally:
        alone.stop()


# -- Discovery -------------------------------------------------------------------------


def test_discovery_parses_a_good_datagram():
    hello = {"node_id": "n1", "name": "A", "tcp_port": 7878, "http_port": 8080}
    message = nm.Discovery.parse_announcement(nm.Discovery.make_announcement("OFFLINE", hello))
    assert message["message_type"] == "OFFLINE" and message["node_id"] == "n1" and message["tcp_port"] == 7878


@pytest.mark.parametrize("datagram", [b"\x00\x01 not json", b'{"message_type": "ONLINE", "node_id": 5}'])
def test_discovery_rejects_garbage(datagram):
    assert nm.Discovery.parse_announcement(datagram) is None


def _receive(discovery, timeout=5.0):
    """What ``discovery`` hears within ``timeout``, waiting on its socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([discovery.sock], [], [], deadline - time.monotonic())
        heard = discovery.receive()
        if heard:
            return heard
    return []


def test_announcement_round_trip_on_loopback():
    reservation = reserve_udp_port()
    port = reservation.getsockname()[1]
    speaker = nm.Discovery(port, [LOOPBACK_BROADCAST], "node-s", 30.0)
    hearer = nm.Discovery(port, [LOOPBACK_BROADCAST], "node-h", 30.0, collections.Counter())
    try:
        speaker.open()
        hearer.open()
        assert speaker.broadcast_addresses == [LOOPBACK_BROADCAST]
        assert speaker.due(time.monotonic()) and not speaker.due(time.monotonic())
        speaker.announce("ONLINE", {"node_id": "node-s", "name": "S", "tcp_port": 4242})
        [(ip, message)] = _receive(hearer)
        assert ip.startswith("127.") and message["node_id"] == "node-s" and message["tcp_port"] == 4242
        assert message["message_type"] == "ONLINE" and "name" not in message, "names cross only inside TLS"
        assert hearer.counters["announcements_heard"] == 1
        assert speaker.counters["announcements_sent"] == 1
        assert select.select([speaker.sock], [], [], 5.0)[0], "the speaker hears its own broadcast"
        assert speaker.receive() == [] and speaker.counters["announcements_heard"] == 0  # its own is skipped
    finally:
        speaker.close()
        hearer.close()
        reservation.close()


def test_a_room_that_fails_to_hear_of_a_peer_does_not_keep_the_others_from_hearing(caplog):
    class Broken(nm.MeshListener):
        def peer_down(self, peer, reason):
            raise RuntimeError("a bug in one room")

    later = RecordingListener()
    listeners = nm.MeshListeners()
    listeners.add(Broken())
    listeners.add(later)  # built after the broken room: the pages, say
    with caplog.at_level("ERROR", logger="neuromesh"):
        listeners.peer_down(nm.Peer(KEYS.id("node-b"), name="B"), "silent for 61.0 s (--peer-timeout)")
    assert later.of("peer_down") == [("node-b", "silent for 61.0 s (--peer-timeout)")]
    assert "Broken failed to hear peer_down" in caplog.text and "a bug in one room" in caplog.text
