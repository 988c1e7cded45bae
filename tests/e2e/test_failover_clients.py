"""Failover and fair queueing hold for Anthropic's ``/v1/messages`` and OpenAI's
``/v1/responses`` as they do for ``/api/chat`` (tests/e2e/test_failover.py, tests/rooms/test_llm_fair_queue.py):
a host killed mid-answer is continued by the other, a host that fails before answering is
passed over, and a client's many chats do not keep another's one waiting behind them."""

import json
import signal
import threading

import requests

import neuromesh
from conftest import API_MODEL as MODEL, StubNode, scripted_router, wait_for, wsgi_call
from support.held_backend import HeldBackend
from support.llm_mesh import LONG_QUESTION as QUESTION, two_llm_mesh

TOOL = {"type": "function", "name": "get_weather", "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def sse_data(response):
    """The JSON of each ``data:`` line of a server-sent event stream, as it arrives."""
    for line in response.iter_lines(chunk_size=1):
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


def _kill_the_answering_host_at_the_tenth_delta(cluster, fakes, path, body, is_delta, text_of):
    first, second, h1, h2, student = two_llm_mesh(cluster, fakes, token_delay=0.05)
    nodes = {id(first): h1, id(second): h2}
    events, deltas = [], 0
    with requests.post(student.url + path, json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        for data in sse_data(response):
            events.append(data)
            deltas += 1 if is_delta(data) else 0
            if is_delta(data) and deltas == 10:
                answering = [fake for fake in (first, second) if fake.requests_to("/api/chat")]
                assert len(answering) == 1
                nodes[id(answering[0])].process.send_signal(signal.SIGKILL)
    expected = first.answer_for([{"role": "user", "content": QUESTION}], MODEL)
    assert "".join(text_of(e) for e in events if is_delta(e)) == expected, "one answer, no text twice"
    assert len(first.requests_to("/api/chat")) == len(second.requests_to("/api/chat")) == 1
    return events


def test_a_messages_stream_goes_on_across_the_failover(cluster, fakes):
    events = _kill_the_answering_host_at_the_tenth_delta(
        cluster, fakes, "/v1/messages",
        {"model": MODEL, "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": QUESTION}]},
        lambda e: e["type"] == "content_block_delta", lambda e: e["delta"]["text"])
    kinds = [e["type"] for e in events]
    assert "error" not in kinds and kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == 1  # the client sees one text block that goes on
    assert events[-2]["delta"]["stop_reason"] == "end_turn" and events[-2]["usage"]["output_tokens"] == 50


def test_a_responses_stream_goes_on_across_the_failover(cluster, fakes):
    events = _kill_the_answering_host_at_the_tenth_delta(
        cluster, fakes, "/v1/responses", {"model": MODEL, "stream": True, "input": QUESTION},
        lambda e: e["type"] == "response.output_text.delta", lambda e: e["delta"])
    kinds = [e["type"] for e in events]
    assert "error" not in kinds and kinds[-1] == "response.completed"
    assert events[-1]["response"]["usage"]["output_tokens"] == 50


def test_a_host_failing_before_it_answers_is_passed_over_and_none_left_is_a_clear_503(cluster, fakes):
    first, second, _h1, _h2, student = two_llm_mesh(cluster, fakes, token_delay=0.0)
    first.set_fail("500")
    body = {"model": MODEL, "input": QUESTION, "tools": [TOOL]}  # with a tool: passed to a host as it is
    reply = requests.post(student.url + "/v1/responses", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert [item["name"] for item in reply.json()["output"] if item["type"] == "function_call"] == ["get_weather"]
    assert len(second.requests_to("/api/chat")) == 1
    asked = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": QUESTION}],
             "tools": [{"name": "get_weather", "input_schema": TOOL["parameters"]}]}
    assert requests.post(student.url + "/v1/messages", json=asked, timeout=30).json()["stop_reason"] == "tool_use"
    second.set_fail("500")
    refused = requests.post(student.url + "/v1/messages", json=asked, timeout=30)
    assert refused.status_code == 503, refused.text
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert "answered HTTP 500" in error["error"]["message"]  # each host's failure, said once
    gone = requests.post(student.url + "/v1/responses", json=body, timeout=30)
    assert gone.status_code == 503 and "answered HTTP 500" in gone.json()["error"]["message"]


def test_one_clients_many_chats_do_not_keep_anothers_waiting(tmp_path):
    """A LAN client queues five chats on /v1/messages; another's one chat on /v1/responses starts
    next, as on /api/chat: the fair queue is per requester, whichever API it speaks."""
    host = HeldBackend("host", parallel=1)
    node = StubNode(tmp_path, scripted_router(local=[host]), lan_api=True)
    app = node.app()
    replies = {}

    def ask(label, path, body, remote):
        replies[label] = wsgi_call(app, "POST", path, body, remote=remote)

    def message(label):
        return {"model": "m1", "max_tokens": 50, "messages": [{"role": "user", "content": label}]}
    threads = []
    for index in range(5):
        threads.append(threading.Thread(target=ask, args=("H%d" % index, "/v1/messages", message("H%d" % index),
                                                          "192.168.1.50")))
        threads[-1].start()
        wait_for(lambda: host.waiting_and_running() == index + 1, timeout=10, message="heavy chat %d queued" % index)
    threads.append(threading.Thread(target=ask, args=("L", "/v1/responses", {"model": "m1", "input": "L"},
                                                      "192.168.1.60")))
    threads[-1].start()
    wait_for(lambda: host.waiting_and_running() == 6, timeout=10, message="the light chat queued")
    host.open()
    for thread in threads:
        thread.join(30)
    try:
        order = host.started_order()
        assert order.index("L") == 1, order  # right after the heavy client's running chat
        assert replies["L"].status == 200 and replies["L"].json()["output"][0]["content"][0]["text"] == "fair answer"
        assert all(replies["H%d" % i].json()["content"][0]["text"] == "fair answer" for i in range(5))
    finally:
        node.store.close()
