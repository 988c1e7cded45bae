"""The chat room in-process: ChatService with a real Store and a Router of scripted backends.

What it covers: a question asked in a conversation is stored, its answer streams as events and
is stored when it is done, named after the LLM that wrote it; an answer cut off by a failing LLM
keeps what arrived, marked as cut off; regenerating answers the last question again; and past
--max-queued waiting chats a new one is refused with a 503 that says to try again.
"""

import pytest

import neuromesh as nm
from conftest import ScriptedBackend, scripted_router


@pytest.fixture
def chat_room(tmp_path):
    def build(*backends, max_queued=nm.DEFAULTS["max_queued"]):
        router = scripted_router(local=backends)
        store = nm.Store(str(tmp_path / ("chat%d.db" % len(made))), router.node_id, router.node_name)
        made.append(store)
        host = {"hostname": "ana's laptop", "ip_address": "", "is_llm_host": False}
        return nm.ChatService(router, store, lambda: host, max_queued=max_queued), store

    made = []
    yield build
    for store in made:
        store.close()


def test_a_question_and_its_answer_are_stored_and_streamed(chat_room):
    chat, store = chat_room(ScriptedBackend("teacher-mac", reply="Leaves make sugar from light"))
    conversation = store.create_conversation("biology")["id"]
    question = chat.add_question(conversation, "What do leaves eat?", "ana")
    assert question["content"] == "What do leaves eat?" and question["sender"] == "ana"
    events = list(chat.answer(conversation, "m1"))
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == "Leaves make sugar from light"
    answer = events[-1]["message"]
    assert answer["content"] == "Leaves make sugar from light" and answer["answered_by_name"] == "teacher-mac"
    stored = store.get_conversation(conversation)["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "What do leaves eat?"),
                                                          ("assistant", "Leaves make sugar from light")]


def test_an_answer_cut_off_by_its_llm_keeps_what_arrived(chat_room):
    chat, store = chat_room(ScriptedBackend("flaky", reply="one two three", fail="midway", fail_after=2))
    conversation = store.create_conversation("numbers")["id"]
    chat.add_question(conversation, "Count", "ana")
    events = list(chat.answer(conversation, "m1"))
    assert events[-1]["type"] == "error" and events[-1]["partial"] is True
    stored = store.get_conversation(conversation)["messages"][-1]
    assert stored["role"] == "assistant" and stored["content"] == "one two" and stored["cut_off"] is True


def test_regenerate_answers_the_last_question_again(chat_room):
    backend = ScriptedBackend("teacher-mac", reply="again")
    chat, store = chat_room(backend)
    conversation = store.create_conversation("retry")["id"]
    chat.add_question(conversation, "Say it", "ana")
    list(chat.answer(conversation, "m1"))
    list(chat.answer(conversation, "m1", regenerate=True))
    assert backend.asked[-1][1] == [{"role": "user", "content": "Say it"}]
    assert [m["role"] for m in store.get_conversation(conversation)["messages"]] == ["user", "assistant", "assistant"]
    empty = store.create_conversation("empty")["id"]
    with pytest.raises(nm.HTTPFailure) as refused:
        chat.answer(empty, "m1", regenerate=True)
    assert refused.value.status == 400 and "nothing to regenerate" in str(refused.value)


def test_past_max_queued_a_chat_is_refused_with_a_503(chat_room):
    chat, _store = chat_room(ScriptedBackend(), max_queued=0)
    with pytest.raises(nm.HTTPFailure) as refused:
        chat.admit()
    assert refused.value.status == 503 and "try again shortly" in str(refused.value)
    assert refused.value.extra == {"retry_after": 5}


def test_an_unknown_conversation_is_a_404(chat_room):
    chat, _store = chat_room(ScriptedBackend())
    with pytest.raises(nm.HTTPFailure) as missing:
        chat.add_question("no-such-chat", "hi", "ana")
    assert missing.value.status == 404 and "no conversation no-such-chat" in str(missing.value)
