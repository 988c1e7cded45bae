"""Everything passes through untouched. Through a node WITHOUT an LLM, relayed
to a host whose Ollama is the fake (which records what it received): ``think``, ``images``,
``format`` (a schema), ``keep_alive``, ``options``, ``logprobs``, ``truncate`` and ``tool_name``
arrive as the client sent them, and a thinking model's ``thinking`` comes back apart."""

import json

import pytest
import requests

from support.fake_ollama import image_note, thinking_for
from support.sdk_clients import ollama_client
from conftest import API_MODEL, PIXEL, SEER, THINKER

QUESTION = "What is the weather in Paris?"

SCHEMA = {"type": "object", "properties": {"capital": {"type": "string"}, "country": {"type": "string"}},
          "required": ["capital", "country"]}
FIELDS = {"think": True, "format": SCHEMA, "keep_alive": "10m", "options": {"temperature": 0.3, "seed": 42,
                                                                            "num_ctx": 4096, "stop": ["\n\n"]},
          "logprobs": True, "top_logprobs": 3, "truncate": False}


def test_ollama_chat_with_images_reaches_the_host_unchanged(served):
    _ollama, client = ollama_client(served)
    reply = client.chat(model=SEER, messages=[{"role": "user", "content": "What is this?", "images": [PIXEL]}])
    assert reply.message.content == served.answer("What is this?", SEER) + image_note([PIXEL])
    assert served.fake.requests_to("/api/chat")[-1]["messages"][0]["images"] == [PIXEL]
    streamed = "".join(c.message.content for c in client.chat(model=SEER, stream=True, messages=[
        {"role": "user", "content": "What is this?", "images": [PIXEL]}]))
    assert streamed == reply.message.content


def test_ollama_think_brings_thinking_and_content_apart(served):
    _ollama, client = ollama_client(served)
    answer = served.answer(QUESTION, THINKER)
    reply = client.chat(model=THINKER, messages=[{"role": "user", "content": QUESTION}], think=True)
    assert reply.message.thinking == thinking_for(answer) and reply.message.content == answer
    chunks = list(client.chat(model=THINKER, messages=[{"role": "user", "content": QUESTION}], think=True,
                              stream=True))
    thoughts = [c.message.thinking for c in chunks if c.message.thinking]
    words = [c.message.content for c in chunks if c.message.content]
    assert len(thoughts) > 3 and "".join(thoughts) == thinking_for(answer) and "".join(words) == answer
    assert chunks.index(next(c for c in chunks if c.message.content)) > len(thoughts) - 1  # thinking first
    generated = client.generate(model=THINKER, prompt=QUESTION, think=True)
    assert generated.thinking == thinking_for(served.fake.answer_for(QUESTION, THINKER))
    assert served.fake.requests_to("/api/generate")[-1]["think"] is True


def test_ollama_format_schema_shapes_the_answer(served):
    _ollama, client = ollama_client(served)
    reply = client.chat(model=API_MODEL, messages=[{"role": "user", "content": "Capital of France?"}], format=SCHEMA)
    assert set(json.loads(reply.message.content)) == {"capital", "country"}
    assert served.fake.requests_to("/api/chat")[-1]["format"] == SCHEMA


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_every_field_arrives_at_the_host_as_sent(served, path):
    body = dict(FIELDS, model=THINKER, stream=False)
    if path == "/api/chat":
        body["messages"] = [{"role": "user", "content": QUESTION, "images": [PIXEL]},
                            {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
                                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                            {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}]
    else:
        body.update(prompt=QUESTION, images=[PIXEL], system="Be brief.")
    reply = requests.post(served.plain.url + path, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    received = served.fake.requests_to(path)[-1]
    assert received == body  # every field, and every field of every message, unchanged
    assert (reply.json()["message"] if path == "/api/chat" else reply.json())["thinking"]


@pytest.mark.parametrize("field, value", [("keep_alive", 0), ("think", False), ("logprobs", True),
                                          ("truncate", True), ("options", {"num_predict": 5, "temperature": 0.9})])
def test_one_field_on_a_plain_chat_arrives_as_sent(served, field, value):
    body = {"model": API_MODEL, "stream": False, "messages": [{"role": "user", "content": QUESTION}], field: value}
    reply = requests.post(served.plain.url + "/api/chat", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    received = served.fake.requests_to("/api/chat")[-1]
    if field == "options":  # a plain chat is answered by the mesh's own chat path: the defaults fill the rest
        assert {key: received["options"][key] for key in value} == value
    else:
        assert received[field] == value and received["messages"] == body["messages"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_plain_chat_of_a_thinking_model_brings_its_thinking_apart(served, stream):
    """Without ``think`` the chat takes the mesh's own path (mid-answer failover); a model that
    thinks anyway (as Ollama's thinking models do by default) still has its thinking apart."""
    body = {"model": THINKER, "stream": stream, "messages": [{"role": "user", "content": QUESTION}]}
    reply = requests.post(served.plain.url + "/api/chat", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    chunks = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
    answer = served.answer(QUESTION, THINKER)
    assert "".join(c["message"].get("thinking", "") for c in chunks) == thinking_for(answer)
    assert "".join(c["message"]["content"] for c in chunks) == answer
    assert "think" not in served.fake.requests_to("/api/chat")[-1]
