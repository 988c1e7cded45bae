"""Host names given with --peer: looked up off the mesh thread, so a slow
DNS freezes no link; at most one lookup per name at a time, retried on the dial backoff.
Meshes in the test process on loopback; the lookup is the test's own (no DNS is asked)."""

import socket
import threading
import time

import neuromesh as nm
from conftest import KEYS, wait_for
from support.running_mesh import RecordingListener, RunningMesh

SLOW_NAME = "slow-peer.test"  # .test: a name no real DNS answers


class ScriptedLookup:
    """A resolver for Mesh: each call takes ``seconds``, then raises the next of ``failures``
    (socket.gaierror) or answers 127.0.0.1, calling ``on_answer()`` first. It records when each
    call began and ended, the thread it ran on, and the most calls under way at once."""

    def __init__(self, seconds=0.0, failures=0, on_answer=None):
        self.seconds, self.failures, self.on_answer = seconds, failures, on_answer
        self.calls = []  # (name, thread name, began, ended)
        self.busy = self.most_busy = 0
        self.answered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, name):
        began = time.monotonic()
        with self._lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            time.sleep(self.seconds)  # the slow DNS itself
            with self._lock:
                failing = len(self.calls) < self.failures
            if failing:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            if self.on_answer is not None:
                self.on_answer()
            self.answered.set()
            return "127.0.0.1"
        finally:
            with self._lock:
                self.busy -= 1
                self.calls.append((name, threading.current_thread().name, began, time.monotonic()))


class MeshWithLookup(RunningMesh):
    """A RunningMesh whose Mesh looks names up with ``resolve``."""

    def __init__(self, config, node_id, listener, resolve):
        self.listener = listener
        self.mesh = nm.Mesh(config, KEYS.id(node_id), listener, key=KEYS[node_id], resolve=resolve)
        self.mesh.start()
        self.thread = threading.Thread(target=self.mesh.serve_forever, name="test-mesh-" + node_id)
        self.thread.start()


def test_a_five_second_lookup_freezes_no_other_link(mesh_config):
    """While --peer's name takes 5 s to look up, the link to the other peer keeps its heartbeats
    (peer timeout 2 s: a frozen loop would lose it); then the named peer links at its address."""
    a = RunningMesh(mesh_config(extra=["--name", "A"]), "node-a", RecordingListener())
    b = RunningMesh(mesh_config(extra=["--name", "B"]), "node-b", RecordingListener())
    meshes, frames_in = [a, b], []
    lookup = ScriptedLookup(seconds=5.0, on_answer=lambda: frames_in.append(x.mesh.stats()["frames_in"]))
    try:
        flags = ["--name", "X", "--peer", "127.0.0.1:%d" % a.mesh.tcp_port,
                 "--peer", "%s:%d" % (SLOW_NAME, b.mesh.tcp_port)]
        x = MeshWithLookup(mesh_config(extra=flags), "node-x", RecordingListener(), lookup)
        meshes.append(x)
        wait_for(lambda: x.linked_ids() == {"node-a"}, message="X linked to A during the lookup")
        frames_in.append(x.mesh.stats()["frames_in"])
        assert not lookup.answered.is_set(), "linked to A while the name was still being looked up"
        assert lookup.answered.wait(30), "the lookup returned"
        wait_for(lambda: x.linked_ids() == {"node-a", "node-b"}, message="X linked to the named peer B")

        (name, thread, began, ended), = lookup.calls
        assert name == SLOW_NAME and thread != x.thread.name and ended - began >= 5.0
        linked_a, answered = frames_in
        assert answered - linked_a >= 3, "PINGs and PONGs went on on the link to A during the lookup"
        lost = [label for label, _reason in x.listener.of("peer_down") + a.listener.of("peer_down")]
        assert "node-a" not in lost and "node-x" not in lost, "the link X-A never went down"
        record = {peer["node_id"]: peer for peer in x.mesh.peers()}[KEYS.id("node-b")]
        assert record["address"] == "127.0.0.1", "the looked-up address, not the name"
    finally:
        for mesh in reversed(meshes):
            mesh.stop()


def test_a_name_that_does_not_resolve_is_asked_again_on_the_dial_backoff(mesh_config):
    """One lookup at a time, each after the dial backoff of the failed one (0.5 s, then 1 s),
    not in a tight loop; the third answers and the peer links."""
    b = RunningMesh(mesh_config(extra=["--name", "B"]), "node-b", RecordingListener())
    lookup = ScriptedLookup(seconds=0.2, failures=2)
    x = None
    try:
        flags = ["--name", "X", "--peer", "%s:%d" % (SLOW_NAME, b.mesh.tcp_port)]
        x = MeshWithLookup(mesh_config(extra=flags), "node-x", RecordingListener(), lookup)
        wait_for(lambda: x.linked_ids() == {"node-b"}, timeout=20, message="X linked once the name resolved")
        assert len(lookup.calls) == 3 and lookup.most_busy == 1
        gaps = [later[2] - earlier[3] for earlier, later in zip(lookup.calls, lookup.calls[1:])]
        assert gaps[0] >= 0.45 and gaps[1] >= 0.95, gaps  # DialPlan.failed: 0.25 s * 2 ** failures
    finally:
        if x is not None:
            x.stop()
        b.stop()
