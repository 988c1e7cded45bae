"""Meshes inside the test process: a Mesh started on its own thread, and a listener that records
what the mesh tells it; peers are named by their KEYS labels (conftest)."""

import threading

import neuromesh as nm
from conftest import KEYS


class RecordingListener(nm.MeshListener):
    """Records what a mesh tells it, as ``(what, ...)`` tuples in ``calls`` (peers by KEYS label)."""

    def __init__(self, http_port=0):
        self.http_port = http_port
        self.calls = []
        self.lock = threading.Lock()

    def _record(self, *call):
        with self.lock:
            self.calls.append(call)

    def of(self, what):
        with self.lock:
            return [call[1:] for call in self.calls if call[0] == what]

    def hello_extra(self):
        return {"http_port": self.http_port}

    def peer_up(self, peer):
        self._record("peer_up", KEYS.label_of(peer.node_id))

    def peer_down(self, peer, reason):
        self._record("peer_down", KEYS.label_of(peer.node_id), reason)

    def peer_changed(self, peer):
        self._record("peer_changed", KEYS.label_of(peer.node_id))

    def frame(self, marker, peer, payload):
        self._record("frame", marker, KEYS.label_of(peer.node_id), payload)


class RunningMesh:
    """A started Mesh serving on its own thread; ``node_id`` is a KEYS label (ids are key hashes);
    ``heartbeats`` sets its tunables (e.g. ``{"handshake_timeout": 1.0}``) before it starts."""

    def __init__(self, config, node_id, listener, heartbeats=None):
        self.listener = listener
        self.mesh = nm.Mesh(config, KEYS.id(node_id), listener, key=KEYS[node_id])
        for name, value in (heartbeats or {}).items():
            setattr(self.mesh.heartbeats, name, value)
        self.mesh.start()
        self.thread = threading.Thread(target=self.mesh.serve_forever, name="test-mesh-" + node_id)
        self.thread.start()

    def linked_ids(self):
        return {KEYS.label_of(peer.node_id) for peer in self.mesh.linked_peers()}

    def stop(self):
        if self.thread.is_alive():
            self.mesh.shutdown()
            self.thread.join(10)


def linked(a, b):
    """True when the RunningMeshes ``a`` and ``b`` each list the other as linked."""
    return KEYS.label_of(b.mesh.node_id) in a.linked_ids() and KEYS.label_of(a.mesh.node_id) in b.linked_ids()
