"""A post costs the same however long its conversation is, in-process.

Not timed: the tests count the stored messages a request decodes (every message row read goes
through ``MessageReads.from_row``) and check that the counts the pages show stay right as they are kept
up to date instead of recounted.
"""

import pytest

import neuromesh
from conftest import wsgi_call

LONG = 400          # messages in the long conversation
TEXT = "words " * 50


class RowSpy:
    """Counts the message rows decoded (``MessageReads.from_row``) while installed."""

    def __init__(self, monkeypatch):
        self.rows = 0
        original = neuromesh.MessageReads.from_row

        def counted(row):
            self.rows += 1
            return original(row)
        monkeypatch.setattr(neuromesh.MessageReads, "from_row", staticmethod(counted))


def fill(store, conversation_id, count, content=TEXT):
    """``count`` alternating questions and answers written straight into the store."""
    for number in range(count):
        role = "user" if number % 2 == 0 else "assistant"
        store.add_message(conversation_id, role, "%d %s" % (number, content), "student")


@pytest.fixture
def app(stub_node):
    return stub_node.app()


@pytest.fixture
def long_conversation(stub_node):
    conversation_id = stub_node.store.create_conversation("long")["id"]
    fill(stub_node.store, conversation_id, LONG)
    return conversation_id


def test_a_post_without_an_answer_reads_no_stored_message(app, stub_node, long_conversation, monkeypatch):
    spy = RowSpy(monkeypatch)
    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % long_conversation,
                      {"content": "one more question", "answer": False})
    assert reply.status == 201
    assert reply.json()["content"] == "one more question"
    assert spy.rows == 0
    assert stub_node.store.get_conversation_record(long_conversation)["message_count"] == LONG + 1


def test_an_answer_reads_only_the_history_it_can_send(app, stub_node, long_conversation, monkeypatch):
    spy = RowSpy(monkeypatch)
    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % long_conversation,
                      {"content": "the newest question"})
    assert reply.status == 201
    assert reply.json()["assistant"]["content"] == "Hello from the fake"
    budget = neuromesh.ChatService.history_budget
    assert spy.rows <= 2 * budget // len(TEXT) + 2 < LONG
    _model, sent = stub_node.router.local[0].asked[-1]
    assert sent[-1] == {"role": "user", "content": "the newest question"}
    assert sent[-2]["content"].startswith("%d " % (LONG - 1))     # the newest stored answer before it
    assert sum(len(message["content"]) for message in sent) <= budget


def test_the_history_is_the_same_as_from_the_whole_conversation(stub_node, long_conversation):
    chat = neuromesh.ChatService(stub_node.router, stub_node.store, stub_node.host_info)
    whole = stub_node.store.get_conversation(long_conversation)["messages"]
    expected = chat.fit_history(chat.history_of(whole), chat.history_budget)
    recent = stub_node.store.messages.recent_messages(long_conversation, 2 * chat.history_budget)
    assert chat.fit_history(chat.history_of(recent), chat.history_budget) == expected
    assert recent == whole[-len(recent):]


def test_editing_the_last_question_is_checked_without_the_whole_conversation(app, stub_node, long_conversation,
                                                                             monkeypatch):
    last_question = stub_node.store.get_conversation(long_conversation)["messages"][-2]
    assert last_question["role"] == "user"
    spy = RowSpy(monkeypatch)
    path = "/api/conversations/%s/messages" % long_conversation
    older = wsgi_call(app, "POST", path, {"content": "edit", "answer": False, "replaces": "not-the-last"})
    assert older.status == 409
    edited = wsgi_call(app, "POST", path, {"content": "edit", "answer": False, "replaces": last_question["id"]})
    assert edited.status == 201
    assert edited.json()["replaces"] == last_question["id"]
    assert spy.rows == 0


def test_a_missing_conversation_is_still_a_404(app):
    reply = wsgi_call(app, "POST", "/api/conversations/nope/messages", {"content": "hi", "answer": False})
    assert reply.status == 404
    assert "no conversation" in reply.json()["error"]


def test_counts_stay_right_through_writes_sync_privacy_and_a_rollback(stub_node, tmp_path):
    store = stub_node.store
    first = store.create_conversation("first")["id"]
    fill(store, first, 3)
    assert store.message_count() == 3 and store.list_conversations()[0]["message_count"] == 3

    # a peer's entries, one of them repeating a message id: the repeat is kept unlisted
    key = neuromesh.NodeKey.generate()
    peer = neuromesh.Store(str(tmp_path / "peer.db"), key.node_id, "peer", key)
    theirs = peer.create_conversation("theirs")["id"]
    fill(peer, theirs, 2)
    entries, _more = peer.entries_missing({})
    repeat = dict(entries[-1], seq=entries[-1]["seq"] + 1)
    store.apply_entries(entries + [repeat])
    peer.close()
    assert store.get_conversation_record(theirs)["message_count"] == 2
    assert store.message_count() == 5

    # private and back: the messages written meanwhile are republished, each listed once
    store.update_conversation(first, private=True)
    fill(store, first, 2)
    store.update_conversation(first, private=False)
    assert store.get_conversation_record(first)["message_count"] == 5
    assert len(store.get_conversation(first)["messages"]) == 5

    # a write that fails after its insert is rolled back, and so is the count
    def insert_then_fail():
        store._log.append(store.node_id, "message", first, {"role": "user", "content": "x", "sender": "s"})
        raise neuromesh.StoreError("fails after the insert")
    with pytest.raises(neuromesh.StoreError):
        store._db.write(insert_then_fail)
    assert store.get_conversation_record(first)["message_count"] == 5
    assert store.message_count() == 7
