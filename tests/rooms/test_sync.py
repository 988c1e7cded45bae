"""The sync room in-process: a SyncWorker built with a real Store, an EventBus and a recording mesh.

What it covers: the worker registers its own SYNC: and FILE: handlers with the mesh it is given,
so a FILE: frame a peer sends reaches this node's store and its pages' event stream; and after a
local write the worker pushes the new entries to the peers first, then tells the pages (a
private conversation is told to the pages but never leaves this node).
"""

import types

import pytest

import neuromesh as nm
from conftest import RecordingMesh, drain, keyed_store


class OrderedMesh(RecordingMesh):
    """A RecordingMesh that notes how many events the pages had heard when each frame went out."""

    def __init__(self, inbox):
        RecordingMesh.__init__(self)
        self.inbox = inbox
        self.pages_had = []

    def broadcast(self, marker, payload, exclude=None):
        self.pages_had.append(self.inbox.qsize())
        RecordingMesh.broadcast(self, marker, payload, exclude)


def test_a_file_frame_from_a_peer_reaches_the_store_and_the_page(tmp_path):
    writer, writer_key = keyed_store(tmp_path / "writer.db", "writer")
    conversation = writer.create_conversation("photosynthesis")["id"]
    writer.add_message(conversation, "user", "What do leaves eat?", "ana")
    reader, _key = keyed_store(tmp_path / "reader.db", "reader")
    mesh, events = RecordingMesh(), nm.EventBus()
    worker = nm.SyncWorker(reader, mesh, events, interval=30.0)
    page = events.subscribe()
    try:
        peer = types.SimpleNamespace(node_id=writer_key.node_id, name="writer")
        mesh.handlers[nm.FILE](peer, writer.batches.missing({}))  # as Mesh.link_frame hands it on
        worker.run_ready()
        stored = reader.get_conversation(conversation)
        assert stored["title"] == "photosynthesis"
        assert [m["content"] for m in stored["messages"]] == ["What do leaves eat?"]
        heard = drain(page)
        assert {"conversation", "message"} <= {event["type"] for event in heard}
        assert any(e["type"] == "message" and e["data"]["conversation_id"] == conversation for e in heard)
    finally:
        writer.close()
        reader.close()


def test_a_sync_frame_is_answered_with_what_the_peer_lacks(tmp_path):
    store, key = keyed_store(tmp_path / "a.db", "a")
    conversation = store.create_conversation("lesson")["id"]
    store.add_message(conversation, "user", "hello", "ana")
    mesh = RecordingMesh()
    worker = nm.SyncWorker(store, mesh, nm.EventBus(), interval=30.0)
    try:
        worker.requests.gap = 0.0  # answered at once: time is not simulated here
        asker = types.SimpleNamespace(node_id="b" * 32, name="b")
        mesh.handlers[nm.SYNC](asker, {"vector": {}})
        worker.run_ready()
        files = [payload for peer_id, marker, payload in mesh.sent if marker == nm.FILE and peer_id == asker.node_id]
        sent = [entry["data"].get("content") for payload in files for entry in payload["entries"]]
        assert "hello" in sent
    finally:
        store.close()


@pytest.fixture
def writing_node(tmp_path):
    """``(store, mesh, page)``: a keyed store with its SyncWorker, an OrderedMesh and a page's inbox."""
    store, _key = keyed_store(tmp_path / "a.db", "a")
    events = nm.EventBus()
    page = events.subscribe()
    mesh = OrderedMesh(page)
    nm.SyncWorker(store, mesh, events, interval=30.0)
    yield store, mesh, page
    store.close()


def test_a_local_write_is_pushed_to_peers_then_told_to_the_page(writing_node):
    store, mesh, page = writing_node
    conversation = store.create_conversation("lesson")["id"]
    store.add_message(conversation, "user", "Why is the sky blue?", "ana")
    pushed = [payload for peer_id, marker, payload in mesh.sent if marker == nm.FILE]
    assert [entry["kind"] for payload in pushed for entry in payload["entries"]] == ["conversation", "message"]
    assert all(payload["spread"] for payload in pushed)
    assert mesh.pages_had == [0, 1], "each write went to the peers before the page heard of it"
    assert [event["type"] for event in drain(page)] == ["conversation", "message"]


def test_a_private_conversation_is_told_to_the_page_but_never_pushed(writing_node):
    store, mesh, page = writing_node
    conversation = store.create_conversation("diary", private=True)["id"]
    store.add_message(conversation, "user", "my secret", "ana")
    assert mesh.sent == []
    assert [event["type"] for event in drain(page)] == ["conversation", "message"]
