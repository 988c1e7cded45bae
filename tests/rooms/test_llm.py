"""The Router in-process, over scripted backends: which LLM answers, failover (before the first
token, and mid-answer: another host continues), the FIFO queue."""

import json
import threading
import time
import types

import pytest

import neuromesh
from conftest import (ScriptedBackend, ScriptedPeerBackend, StubNode, TLSRelay, scripted_router, wait_for,
                      wsgi_call)

USER = [{"role": "user", "content": "Hi?"}]


def answer(router, model="m1", on_queue=None, messages=USER):
    """(who answered, text) of one chat."""
    events = list(router.chat(model, messages, on_queue=on_queue))
    text = "".join(event["content"] for event in events if event["type"] == "token")
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    return events[-1]["node_name"], text


def test_the_local_llm_answers_first():
    local, peer = ScriptedBackend("home", reply="local answer"), ScriptedPeerBackend("away")
    router = scripted_router(local=[local], peers=[peer])
    assert answer(router) == ("home", "local answer")
    assert peer.asked == []
    assert router.candidates("m1") == [local, peer]


def test_an_idle_peer_goes_first_when_the_local_llm_is_full():
    local, peer = ScriptedBackend("home", gate=threading.Event()), ScriptedPeerBackend("away")
    router = scripted_router(local=[local], peers=[peer])
    holder = threading.Thread(target=answer, args=(router,))
    holder.start()
    try:
        assert local.started.wait(5)
        assert router.candidates("m1") == [peer, local]
    finally:
        local.gate.set()
        holder.join(10)


def test_a_backend_failing_before_the_first_token_is_failed_over():
    broken, working = ScriptedBackend("broken", fail="refuse"), ScriptedBackend("working", reply="still here")
    router = scripted_router(local=[broken, working])
    assert answer(router) == ("working", "still here")
    assert len(broken.asked) == 1 and len(working.asked) == 1


def test_a_failing_local_llm_is_failed_over_to_a_peer():
    router = scripted_router(local=[ScriptedBackend("home", fail="refuse")],
                             peers=[ScriptedPeerBackend("away", reply="from the peer")])
    assert answer(router) == ("away", "from the peer")
    assert not any(router.peer_in_flight.values())


def test_a_failure_mid_answer_is_continued_by_another_host_with_the_same_model():
    """Mid-answer failover: the second host is sent the partial answer as the assistant's
    message to continue, and the answer goes on with no text twice."""
    broken = ScriptedBackend("broken", reply="one two three four five", fail="midway", fail_after=2)
    other = ScriptedBackend("other", reply="one two three four five", continues=True)
    router = scripted_router(local=[broken, other])
    events = list(router.chat("m1", USER, options={"num_predict": 10}))
    assert [event["type"] for event in events] == ["start", "token", "token", "continued"] + ["token"] * 3 + ["done"]
    assert "".join(event["content"] for event in events if event["type"] == "token") == "one two three four five"
    (model, messages), = other.asked
    assert model == "m1" and messages == USER + [{"role": "assistant", "content": "one two"}]
    assert other.options[-1]["num_predict"] == 8  # what is left of the limit
    continued = events[3]
    assert (continued["node_name"], continued["from_node_name"], continued["after_tokens"]) == ("other", "broken", 2)
    assert events[-1]["node_name"] == "other" and events[-1]["eval_count"] == 5


def test_a_client_prefill_is_extended_not_repeated():
    broken = ScriptedBackend("broken", reply="b c d", fail="midway", fail_after=1)
    other = ScriptedBackend("other", reply="a b c d", continues=True)
    router = scripted_router(local=[broken, other])
    prefilled = USER + [{"role": "assistant", "content": "a "}]
    list(router.chat("m1", prefilled))
    assert other.asked[0][1] == USER + [{"role": "assistant", "content": "a b"}]


def test_no_host_with_the_same_model_keeps_the_partial_answer():
    broken = ScriptedBackend("broken", fail="midway", fail_after=2)
    elsewhere = ScriptedBackend("elsewhere", models=("m2",))
    router = scripted_router(local=[broken, elsewhere])
    seen = []
    with pytest.raises(neuromesh.LLMError) as caught:
        for event in router.chat("m1", USER):
            seen.append(event)
    assert caught.value.partial is True and elsewhere.asked == []
    assert "could continue" in str(caught.value) and "kept" in str(caught.value)
    assert [event["type"] for event in seen] == ["start", "token", "token"]


def test_a_host_failing_before_its_first_token_is_not_counted_as_an_author():
    answer = neuromesh.AnswerSoFar(USER, {})
    for event in ({"type": "start", "node_id": "a", "node_name": "A"},
                  {"type": "start", "node_id": "b", "node_name": "B"}, {"type": "token", "content": "x"}):
        answer.note(event)
    assert answer.record() is None and answer.request() == (USER + [{"role": "assistant", "content": "x"}], {})


def test_the_chat_room_stores_both_hosts_and_the_page_hears_continued(tmp_path):
    store = neuromesh.Store(str(tmp_path / "s.db"), "n" * 32, "student")
    broken = ScriptedBackend("broken", reply="one two three", fail="midway", fail_after=1)
    other = ScriptedBackend("other", reply="one two three", continues=True)
    chat = neuromesh.ChatService(scripted_router(local=[broken, other]), store, lambda: None)
    conversation = store.create_conversation("t")
    chat.add_question(conversation["id"], "Hi?", "ada")
    events = list(chat.answer(conversation["id"], "m1"))
    assert [e["type"] for e in events if e["type"] != "token"] == ["start", "continued", "done"]
    stored = events[-1]["message"]
    assert stored["content"] == "one two three" and "cut_off" not in stored
    assert stored["answered_by"] == other.node_id and stored["answered_by_name"] == "other"
    assert stored["answered_by_hosts"] == [{"node_id": broken.node_id, "name": "broken", "tokens": 1},
                                           {"node_id": other.node_id, "name": "other", "tokens": 2}]
    assert "Answer by broken, continued on other" in neuromesh.conversation_markdown(
        store.get_conversation(conversation["id"]))


def test_the_chat_room_keeps_a_partial_answer_marked_when_nobody_continues(tmp_path):
    store = neuromesh.Store(str(tmp_path / "s.db"), "n" * 32, "student")
    elsewhere = ScriptedBackend("elsewhere", models=("m2",))  # another model: it may not continue
    router = scripted_router(local=[ScriptedBackend("broken", fail="midway", fail_after=2), elsewhere])
    chat = neuromesh.ChatService(router, store, lambda: None)
    conversation = store.create_conversation("t")
    chat.add_question(conversation["id"], "Hi?", "ada")
    events = list(chat.answer(conversation["id"], "m1"))
    assert events[-1]["type"] == "error" and events[-1]["partial"] is True
    assert events[-1]["message"]["content"] == "Hello from" and events[-1]["message"]["cut_off"] is True
    assert "answered_by_hosts" not in events[-1]["message"] and elsewhere.asked == []
    assert "retry" in events[-1]["error"]


def test_every_backend_failing_is_a_503():
    router = scripted_router(local=[ScriptedBackend("a", fail="refuse"), ScriptedBackend("b", fail="refuse")])
    with pytest.raises(neuromesh.LLMError) as caught:
        list(router.chat("m1", USER))
    assert caught.value.status == 503 and "a refused" in str(caught.value) and "b refused" in str(caught.value)


def test_with_one_slot_chats_queue_in_order_and_hear_their_place():
    backend = ScriptedBackend("home", parallel=1, gate=threading.Event())
    router = scripted_router(local=[backend], llm_parallel=1)
    heard = {"b": [], "c": []}

    def ask(label):
        on_queue = None if label == "a" else (lambda event: heard[label].append(event["position"]))
        answer(router, on_queue=on_queue, messages=[{"role": "user", "content": label}])

    threads = {label: threading.Thread(target=ask, args=(label,)) for label in "abc"}
    threads["a"].start()
    assert backend.started.wait(5)
    threads["b"].start()
    wait_for(lambda: backend.slots.queued == 1, timeout=5, message="b queued")
    threads["c"].start()
    wait_for(lambda: backend.slots.queued == 2 and heard["c"], timeout=5, message="c queued")
    assert backend.slots.load() == {"in_flight": 1, "queued": 2, "parallel": 1}
    backend.gate.set()
    for thread in threads.values():
        thread.join(10)
    assert [messages[0]["content"] for _model, messages in backend.asked] == ["a", "b", "c"]
    assert heard["b"] == [1]
    assert heard["c"] in ([2], [2, 1])  # 1 too, unless b was done before c looked again
    assert backend.slots.load() == {"in_flight": 0, "queued": 0, "parallel": 1}


def test_a_token_the_peer_refuses_drops_the_grant_and_asks_again():
    """A host that lost our token (its side of a link went down) answers 401: ask for access anew."""
    def refuse(_environ, start_response):
        start_response("401 Unauthorized", [("Content-Type", "application/json")])
        return [b'{"error": "no valid LLM access token"}']

    with TLSRelay(app=refuse) as relay:
        peer = types.SimpleNamespace(node_id=relay.node_id, name="host", models=["m1"], connected=True,
                                     has_llm=True, load={}, rtt_ms=1, address="127.0.0.1", link=None)
        backend = relay.peer_backend(peer, "stale")
        router = scripted_router(peers=[backend])
        sent = []
        router.access.mesh = types.SimpleNamespace(send=lambda node_id, marker, payload: sent.append((node_id, marker)))
        with pytest.raises(neuromesh.LLMError) as refused:
            list(router.chat("m1", [{"role": "user", "content": "hi"}]))
        assert "401" in str(refused.value)
        assert peer.node_id not in router.grants
        assert sent == [(peer.node_id, neuromesh.LLM_REQUEST)]


def test_the_openai_stream_goes_on_across_a_failover(tmp_path):
    """A client of the OpenAI API sees one stream of chunks: no error, no text twice, usage of both hosts."""
    broken = ScriptedBackend("broken", reply="one two three four", fail="midway", fail_after=2)
    other = ScriptedBackend("other", reply="one two three four", continues=True)
    app = StubNode(tmp_path, scripted_router(local=[broken, other])).app()
    reply = wsgi_call(app, "POST", "/v1/chat/completions", {"model": "m1", "messages": USER, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in reply.body.decode().splitlines()
              if line.startswith("data: {")]
    assert not any("error" in chunk for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert text == "one two three four"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_relay_whose_peer_link_falls_silent_is_continued_elsewhere():
    """A frozen host: its relay sends a word, then nothing, and its mesh link hears nothing for the
    peer timeout. The chat does not wait for the heartbeat to close the link: it goes on elsewhere."""
    release = threading.Event()

    def frozen_relay(_environ, start_response):
        start_response("200 OK", [("Content-Type", "application/x-ndjson")])

        def body():
            yield b'{"message": {"role": "assistant", "content": "one"}, "done": false}\n'
            release.wait(30)
        return body()

    with TLSRelay(app=frozen_relay) as relay:
        try:
            link = types.SimpleNamespace(last_received=time.monotonic())
            peer = types.SimpleNamespace(node_id=relay.node_id, name="frozen", models=["m1"], connected=True,
                                         has_llm=True, load={}, rtt_ms=1, address="127.0.0.1", link=link)
            frozen = relay.peer_backend(peer, "t", stall_timeout=0.5)
            other = ScriptedPeerBackend("other", reply="one two three", continues=True)
            router = scripted_router(peers=[frozen, other])  # equally idle: the first granted goes first
            asked_at = time.monotonic()
            events = list(router.chat("m1", USER))
            waited = time.monotonic() - asked_at
            assert "".join(event["content"] for event in events if event["type"] == "token") == "one two three"
            assert [event["node_name"] for event in events if event["type"] in ("start", "continued")] == \
                ["frozen", "other"]
            assert other.asked[0][1][-1] == {"role": "assistant", "content": "one"}
            assert waited < 10, "found by the link's silence (0.5 s), not the relay's read timeout (300 s)"
        finally:
            release.set()  # the frozen host's worker may end, so the server can shut down


def test_a_host_that_takes_over_and_fails_at_once_is_not_named_as_the_author(tmp_path):
    store = neuromesh.Store(str(tmp_path / "s.db"), "n" * 32, "student")
    broken = ScriptedBackend("broken", fail="midway", fail_after=2)
    taker = ScriptedBackend("taker", fail="midway", fail_after=0)
    chat = neuromesh.ChatService(scripted_router(local=[broken, taker]), store, lambda: None)
    conversation = store.create_conversation("t")
    chat.add_question(conversation["id"], "Hi?", "ada")
    events = list(chat.answer(conversation["id"], "m1"))
    assert [e["type"] for e in events if e["type"] != "token"] == ["start", "continued", "error"]
    stored = events[-1]["message"]
    assert stored["cut_off"] is True and stored["content"] == "Hello from"
    assert stored["answered_by"] == broken.node_id and "answered_by_hosts" not in stored
    assert taker.asked[0][1][-1] == {"role": "assistant", "content": "Hello from"}


def test_a_forwarded_call_that_every_host_refuses_says_so_with_503():
    class Refusing(ScriptedPeerBackend):
        def forward(self, path, body):
            raise neuromesh._UpstreamRefused("%s is busy" % self.node_name)

    router = scripted_router(peers=[Refusing("ana-laptop"), Refusing("ben-laptop")])
    with pytest.raises(neuromesh.LLMError) as refused:
        neuromesh.MeshCalls(router).call("/api/show", {"model": "m1"})
    assert refused.value.status == 503
    assert "ana-laptop is busy" in str(refused.value) and "ben-laptop is busy" in str(refused.value)
