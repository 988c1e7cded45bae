"""A real LLM end to end: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct.

Needs `bash tests/support/setup_real_llm.sh` first (CI runs it); skipped with that hint otherwise.
Checks the wire format NeuroMesh's router relies on: /v1/models, a plain chat completion,
and a streamed one that really arrives chunk by chunk.
"""

import json
import os
import sys
import time

import pytest
import requests

from support.real_llm import LlamaServer, available  # noqa: E402

REQUEST_TIMEOUT = 120  # seconds; generations here take a few seconds even on a busy machine


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    log_path = tmp_path_factory.mktemp("real_llm") / "llama-server.log"
    with LlamaServer(log_path=str(log_path)) as server:
        yield server


def _chat(llm, content, **extra):
    body = {"model": llm.model, "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


def test_models_lists_one_model(llm):
    resp = requests.get(llm.url + "/v1/models", timeout=REQUEST_TIMEOUT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1, body
    model = body["data"][0]
    assert model["object"] == "model"
    assert model["id"] == llm.model
    assert model["id"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_chat_completion(llm):
    resp = requests.post(
        llm.url + "/v1/chat/completions",
        json=_chat(llm, "Say hello.", max_tokens=16),
        timeout=REQUEST_TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == llm.model
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, str) and content.strip(), "empty answer; server log: %s" % llm.log_path
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_streams_incrementally(llm):
    started = time.monotonic()
    resp = requests.post(
        llm.url + "/v1/chat/completions",
        json=_chat(llm, "Count from 1 to 20, separated by commas.", max_tokens=32, stream=True, temperature=0),
        timeout=REQUEST_TIMEOUT,
        stream=True,
    )
    with resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = []  # (seconds since the request, payload after "data: ")
        deadline = started + REQUEST_TIMEOUT
        for line in resp.iter_lines(chunk_size=1):
            assert time.monotonic() < deadline, "stream still going after %ds" % REQUEST_TIMEOUT
            if not line:
                continue  # the blank line that ends each SSE event
            text = line.decode("utf-8")
            assert text.startswith("data: "), text
            events.append((time.monotonic() - started, text[len("data: "):]))

    assert events and events[-1][1] == "[DONE]", events[-3:]
    chunks = [json.loads(payload) for _, payload in events[:-1]]
    assert len(chunks) >= 5, chunks
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == llm.model
        assert chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert all(isinstance(piece, str) for piece in contents), contents
    assert "".join(contents).strip()

    # Incremental: the chunks arrived spread over the generation, not all at the end.
    content_times = [t for t, _ in events[1:-2]]
    spread = content_times[-1] - content_times[0]
    assert spread > 0.05, "all %d chunks arrived within %.3f s" % (len(content_times), spread)
    assert len({round(t, 3) for t in content_times}) >= 3


def test_embeddings_and_show_through_the_mesh(cluster, tmp_path):
    """llama.cpp's server started with ``--embedding true`` embeds; a node without an LLM
    asks it through its peer's relay (``/v1/embeddings`` and ``/api/embed``), and ``/api/show``
    answers what an OpenAI-compatible server lets one know honestly (its name, no details)."""
    from conftest import fully_linked, wait_for

    reason = available()
    if reason:
        pytest.skip(reason)
    openai = pytest.importorskip("openai")
    with LlamaServer(log_path=str(tmp_path / "llama-embed.log"), model_alias="smollm2:135m",
                     extra_args=["--embedding", "true"]) as server:
        probe = requests.post(server.url + "/v1/embeddings", json={"model": server.model, "input": "hi"},
                              timeout=REQUEST_TIMEOUT)
        if probe.status_code != 200:
            pytest.skip("this llama.cpp server cannot embed (HTTP %d): %s" % (probe.status_code, probe.text[:200]))
        host = cluster.start("llm-host", extra=["--openai-url", server.url + "/v1"])
        laptop = cluster.start("laptop")
        wait_for(lambda: fully_linked([host, laptop]), message="pair")
        wait_for(lambda: "smollm2:135m" in {m["name"] for m in laptop.json("/api/models")["models"]},
                 timeout=15, message="access")
        client = openai.OpenAI(base_url=laptop.url + "/v1", api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT)
        reply = client.embeddings.create(model="smollm2:135m", input=["red", "blue"], encoding_format="float")
        assert len(reply.data) == 2 and len(reply.data[0].embedding) == len(probe.json()["data"][0]["embedding"])
        assert reply.data[0].embedding != reply.data[1].embedding
        embedded = laptop.post("/api/embed", json={"model": "smollm2:135m", "input": "green"}, timeout=REQUEST_TIMEOUT)
        assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 1
        shown = laptop.post("/api/show", json={"model": "smollm2:135m"}, timeout=30).json()
        assert shown["capabilities"] == ["completion"] and shown["details"]["family"] == ""


def test_anthropic_messages_through_the_mesh(cluster, tmp_path):
    """The official ``anthropic`` SDK asks a node without an LLM on ``/v1/messages``; a
    real llama.cpp server behind its peer answers, whole and streamed."""
    from conftest import fully_linked, wait_for
    reason = available()
    if reason:
        pytest.skip(reason)
    anthropic = pytest.importorskip("anthropic")
    with LlamaServer(log_path=str(tmp_path / "llama-messages.log"), model_alias="smollm2:135m") as server:
        host = cluster.start("llm-host", extra=["--openai-url", server.url + "/v1"])
        laptop = cluster.start("laptop")
        wait_for(lambda: fully_linked([host, laptop]), message="pair")
        wait_for(lambda: "smollm2:135m" in {m["name"] for m in laptop.json("/api/models")["models"]},
                 timeout=15, message="access")
        client = anthropic.Anthropic(base_url=laptop.url, api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT)
        reply = client.messages.create(model="smollm2:135m", max_tokens=16, system="Answer briefly.",
                                       messages=[{"role": "user", "content": "Say hello."}])
        assert reply.content[0].type == "text" and reply.content[0].text.strip()
        assert reply.stop_reason in ("end_turn", "max_tokens") and 0 < reply.usage.output_tokens <= 16
        with client.messages.stream(model="smollm2:135m", max_tokens=16,
                                    messages=[{"role": "user", "content": "Count to five."}]) as stream:
            pieces = [event.text for event in stream if event.type == "text"]
        assert len(pieces) >= 2 and "".join(pieces).strip()
