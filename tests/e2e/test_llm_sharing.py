"""The llm room end-to-end: every node answers chats with an LLM of the mesh, real nodes on loopback.

What it covers: the official Ollama and OpenAI clients on a node without an LLM get the peer's
answer, streamed; a conversation's chat streams, is stored and syncs; a client that disconnects
cancels the upstream request; nothing on the mesh is a clear error; two hosts share concurrent
chats, a host that refuses before the first token is failed over, a cut answer ends with a clear
error, busy hosts queue; --no-share-llm keeps the LLM home; a real small LLM answers through
the mesh when it is set up."""

import json
import threading
import time

import pytest
import requests

import neuromesh
from conftest import API_MODEL as MODEL, fully_linked, serving_mesh, wait_for
from support.llm_mesh import hosts_of, read_sse, two_llm_mesh


def models_on(node):
    return {entry["name"] for entry in node.json("/api/models")["models"]}


def one_llm_mesh(cluster, fakes, token_delay=0.05):
    fake = fakes(models=(MODEL, "qwen2.5:0.5b"), token_delay=token_delay)
    host = cluster.start("host", extra=["--ollama-url", fake.url])
    a, b = cluster.start("a"), cluster.start("b")
    wait_for(lambda: fully_linked([host, a, b]), message="mesh")
    for node in (a, b):
        wait_for(lambda: hosts_of(node) == {host.node_id}, message="LLM access granted to %s" % node.label)
    return fake, host, a, b


def test_official_ollama_client_on_a_node_without_llm_gets_the_peers_answer(cluster, fakes):
    ollama = pytest.importorskip("ollama")
    fake, host, a, _b = one_llm_mesh(cluster, fakes)
    assert a.health()["has_llm"] is False and host.health()["has_llm"] is True
    client = ollama.Client(host=a.url, timeout=30)

    listed = {model.model for model in client.list().models}
    assert listed == {MODEL, "qwen2.5:0.5b"}

    arrivals, parts = [], []
    started = time.monotonic()
    for chunk in client.chat(model=MODEL, messages=[{"role": "user", "content": "Why is the sky blue?"}],
                             stream=True):
        arrivals.append(time.monotonic() - started)
        parts.append(chunk.message.content)
    answer = "".join(parts)
    assert answer == fake.answer_for([{"role": "user", "content": "Why is the sky blue?"}], MODEL)
    # streamed incrementally: the first token came long before the last (token delay 50 ms)
    assert len(arrivals) >= 8 and arrivals[-1] - arrivals[0] > 0.25
    assert fake.requests_to("/api/chat"), "the host's Ollama generated it"

    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "once"}], stream=False)
    assert reply.message.content == fake.answer_for([{"role": "user", "content": "once"}], MODEL)
    assert reply.done is True and reply.eval_count > 0

    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="no-such-model:7b", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404
    assert MODEL in str(error.value)  # the error lists what the mesh has

    generated = client.generate(model=MODEL, prompt="Name a colour.", stream=False)
    assert generated.response == fake.answer_for("Name a colour.", MODEL)


def test_official_openai_client_streams_through_the_mesh(cluster, fakes):
    openai = pytest.importorskip("openai")
    fake, _host, a, _b = one_llm_mesh(cluster, fakes)
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
    assert {model.id for model in client.models.list().data} == {MODEL, "qwen2.5:0.5b"}

    question = [{"role": "user", "content": "Count to three."}]
    arrivals, parts = [], []
    started = time.monotonic()
    for chunk in client.chat.completions.create(model=MODEL, messages=question, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == fake.answer_for(question, MODEL)
    assert arrivals[-1] - arrivals[0] > 0.25

    completion = client.chat.completions.create(model=MODEL, messages=question)
    assert completion.choices[0].message.content == fake.answer_for(question, MODEL)
    assert completion.choices[0].finish_reason == "stop"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=question)


def test_the_seeds_chat_answers_in_the_seeds_shape(cluster, fakes):
    fake, _host, a, b = one_llm_mesh(cluster, fakes, token_delay=0)
    response = a.post("/api/chat", json={"message": "What is 2+2?", "sender": "Ada"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"content", "timestamp", "sender", "message_type", "host_info"}
    assert body["message_type"] == "Response" and body["content"] == fake.answer_for(
        [{"role": "user", "content": "What is 2+2?"}], MODEL)
    assert body["host_info"]["is_llm_host"] is True and body["timestamp"].endswith("Z")
    # both sides of the exchange are stored in A's default conversation, and they sync
    default = [c for c in a.json("/api/conversations") if c["own"]][0]
    messages = a.json("/api/conversations/%s" % default["id"])["messages"]
    assert [(m["role"], m["sender"]) for m in messages] == [("user", "Ada"), ("assistant", "LLM")]
    wait_for(lambda: len(b.json("/api/conversations/%s" % default["id"])["messages"]) == 2,
             message="the exchange synced to B")


def test_a_conversation_chat_streams_stores_and_syncs_the_answer(cluster, fakes):
    fake, host, a, b = one_llm_mesh(cluster, fakes)
    conversation = a.post("/api/conversations", json={"title": "Science"}).json()["id"]
    with requests.post(a.url + "/api/conversations/%s/messages" % conversation, stream=True, timeout=30,
                       json={"content": "Why do leaves fall?"}, headers={"Accept": "text/event-stream"}) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = list(read_sse(response))
    kinds = [kind for kind, _data in events]
    assert kinds[0] == "user" and kinds[1] == "start" and kinds[-1] == "done"
    assert kinds.count("token") >= 8
    start, done = events[1][1], events[-1][1]
    assert start["node_id"] == host.node_id and start["model"] == MODEL
    answer = "".join(data["content"] for kind, data in events if kind == "token")
    assert done["message"]["content"] == answer == fake.answer_for(
        [{"role": "user", "content": "Why do leaves fall?"}], MODEL)
    assert done["message"]["answered_by"] == host.node_id and done["message"]["model"] == MODEL
    assert done["tokens_per_second"] > 0 and done["message"]["tokens_per_second"] == done["tokens_per_second"]
    wait_for(lambda: [m["role"] for m in b.json("/api/conversations/%s" % conversation)["messages"]]
             == ["user", "assistant"], message="question and answer synced to B")

    # a script asking for JSON gets one reply once the answer is stored
    reply = a.post("/api/conversations/%s/messages" % conversation, json={"content": "And in spring?"},
                   headers={"Accept": "application/json"})
    assert reply.status_code == 201
    assert reply.json()["assistant"]["content"].startswith("Echo from %s: And in spring?" % MODEL)
    # the history went to the LLM, within the context budget
    last = fake.requests_to("/api/chat")[-1]
    assert [m["content"] for m in last["messages"]][-1] == "And in spring?" and len(last["messages"]) == 3
    assert last["options"]["temperature"] == 0.2 and last["options"]["num_ctx"] == 2048

    regenerated = a.post("/api/conversations/%s/regenerate" % conversation, json={},
                         headers={"Accept": "application/json"})
    assert regenerated.status_code == 201
    roles = [m["role"] for m in a.json("/api/conversations/%s" % conversation)["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "assistant"]


def test_a_client_that_disconnects_cancels_the_upstream_request(cluster, fakes):
    fake, _host, a, _b = one_llm_mesh(cluster, fakes, token_delay=0.2)
    response = requests.post(a.url + "/api/chat", stream=True, timeout=30,
                             json={"model": MODEL, "messages": [{"role": "user", "content": " ".join(["w"] * 40)}]})
    lines = response.iter_lines(chunk_size=1)
    assert json.loads(next(lines))["done"] is False
    response.close()
    wait_for(lambda: fake.aborted >= 1 and fake.in_flight == 0, timeout=10,
             message="the host's Ollama saw the request cancelled")


def test_nothing_on_the_mesh_is_a_clear_error(cluster):
    node = cluster.start()
    response = node.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert "No LLM is reachable" in response.json()["error"] and "ollama pull" in response.json()["error"]
    conversation = node.post("/api/conversations", json={}).json()["id"]
    reply = node.post("/api/conversations/%s/messages" % conversation, json={"content": "hello?"},
                      headers={"Accept": "application/json"})
    assert reply.status_code == 503 and "No LLM" in reply.json()["error"]
    assert reply.json()["user"]["content"] == "hello?"  # the question is kept
    assert node.json("/api/models") == {"models": [], "default": None, "llm_hosts": 0}
    empty = node.post("/api/conversations", json={}).json()["id"]
    nothing = node.post("/api/conversations/%s/regenerate" % empty, json={}, headers={"Accept": "text/event-stream"})
    assert nothing.status_code == 400 and "nothing to regenerate" in nothing.json()["error"]


def ask_concurrently(node, count, path="/api/chat"):
    results = [None] * count

    def ask(index):
        try:
            response = requests.post(node.url + path, timeout=60, json={
                "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "question %d" % index}]})
            results[index] = (response.status_code, response.json())
        except requests.RequestException as exc:
            results[index] = (None, repr(exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return results


def test_two_hosts_share_concurrent_chats(cluster, fakes):
    first, second, _h1, _h2, client = two_llm_mesh(cluster, fakes, token_delay=0.05)
    results = ask_concurrently(client, 4)
    assert all(status == 200 for status, _body in results), results
    for index, (_status, body) in enumerate(results):
        assert body["message"]["content"] == first.answer_for(
            [{"role": "user", "content": "question %d" % index}], MODEL)
    served = (len(first.requests_to("/api/chat")), len(second.requests_to("/api/chat")))
    assert served[0] >= 1 and served[1] >= 1 and sum(served) == 4, served


def test_a_host_refusing_before_the_first_token_is_failed_over(cluster, fakes):
    first, second, _h1, _h2, client = two_llm_mesh(cluster, fakes, token_delay=0)
    first.set_fail("503")
    results = ask_concurrently(client, 4)
    assert all(status == 200 for status, _body in results), results
    assert len(first.requests_to("/api/chat")) >= 1, "the failing host was tried"
    assert len(second.requests_to("/api/chat")) == 4, "and the other one answered every chat"
    assert "failing over" in client.log()

    first.set_fail(None)
    second.set_fail("refuse")  # connection refused at the second host's Ollama
    results = ask_concurrently(client, 2)
    assert all(status == 200 for status, _body in results), results


def test_an_answer_cut_mid_stream_ends_with_a_clear_error(cluster, fakes):
    fake, _host, a, _b = one_llm_mesh(cluster, fakes, token_delay=0)
    fake.set_fail("die_midstream")
    response = a.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "long"}]})
    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    assert lines[0]["done"] is False and "error" in lines[-1]
    assert "stopped answering" in lines[-1]["error"] or "failed mid-answer" in lines[-1]["error"]


def test_both_hosts_busy_requests_queue_and_all_are_answered(cluster, fakes):
    first, second, h1, _h2, client = two_llm_mesh(cluster, fakes, token_delay=0.03)
    conversations = [client.post("/api/conversations", json={}).json()["id"] for _ in range(6)]
    outcomes, positions = [None] * 6, []

    def chat(index):
        with requests.post(client.url + "/api/conversations/%s/messages" % conversations[index], stream=True,
                           timeout=60, json={"content": "busy %d" % index},
                           headers={"Accept": "text/event-stream"}) as response:
            for kind, data in read_sse(response):
                if kind == "queued":
                    positions.append(data["position"])
                if kind in ("done", "error"):
                    outcomes[index] = (kind, data)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert [kind for kind, _data in outcomes] == ["done"] * 6, outcomes
    assert first.max_in_flight == 1 and second.max_in_flight == 1  # --llm-parallel 1 held
    assert positions and min(positions) >= 1  # callers were told their place in the queue
    assert len(first.requests_to("/api/chat")) + len(second.requests_to("/api/chat")) == 6


def test_no_share_llm_keeps_the_llm_home_and_the_relay_needs_a_token(cluster, fakes):
    fake = fakes()
    private = cluster.start("private", extra=["--ollama-url", fake.url, "--no-share-llm"])
    other = cluster.start("other")
    wait_for(lambda: fully_linked([private, other]), message="pair")
    assert models_on(private) == {MODEL}  # it uses its own LLM
    peer = next(p for p in other.peers() if p["node_id"] == private.node_id)
    assert peer["has_llm"] is False and models_on(other) == set()
    refused = requests.post(private.url + "/relay/chat", timeout=5,
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 403 and "never over plain HTTP" in refused.json()["error"]


def test_a_real_llm_answers_a_node_without_one_through_the_mesh(cluster, tmp_path):
    """llama.cpp's OpenAI-compatible server with SmolLM2-135M (tests/support/setup_real_llm.sh)."""
    from support.real_llm import LlamaServer, available

    reason = available()
    if reason:
        pytest.skip(reason)
    openai = pytest.importorskip("openai")
    with LlamaServer(log_path=str(tmp_path / "llama.log"), model_alias="smollm2:135m") as server:
        host = cluster.start("llm-host", extra=["--openai-url", server.url + "/v1"])
        laptop = cluster.start("laptop")
        wait_for(lambda: fully_linked([host, laptop]), message="pair")
        wait_for(lambda: hosts_of(laptop, "smollm2:135m") == {host.node_id}, timeout=15, message="access")
        client = openai.OpenAI(base_url=laptop.url + "/v1", api_key="x", max_retries=0, timeout=120)
        parts = []
        for chunk in client.chat.completions.create(
                model="smollm2:135m", stream=True, max_tokens=24, temperature=0,
                messages=[{"role": "user", "content": "Name one colour of the rainbow."}]):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        answer = "".join(parts)
        assert len(parts) >= 3 and answer.strip(), "a real, streamed, non-empty answer"
        # and through a conversation: stored with the node and model that answered
        conversation = laptop.post("/api/conversations", json={"title": "Real"}).json()["id"]
        reply = laptop.post("/api/conversations/%s/messages" % conversation, timeout=120,
                            json={"content": "Say hello in French."}, headers={"Accept": "application/json"})
        assert reply.status_code == 201, reply.text
        assistant = reply.json()["assistant"]
        assert assistant["content"].strip() and assistant["answered_by"] == host.node_id
        assert assistant["model"] == "smollm2:135m" and assistant["tokens_per_second"] > 0


def test_an_openai_stream_cut_without_a_finish_reason_is_not_an_empty_answer():
    """llama.cpp's server ends an interrupted answer with a bare [DONE]: that is a failure, not ""."""
    import http.server
    import neuromesh as nm

    class Interrupted(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\ndata: [DONE]\n\n')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Interrupted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = nm.OpenAIBackend("http://127.0.0.1:%d" % server.server_port, "id", "llama-box")
        backend.available, backend.models = True, ["m"]
        with pytest.raises(nm.LLMError, match="without answering"):
            list(backend.chat("m", [{"role": "user", "content": "hi"}], {}, None))
        assert backend.slots.in_flight == 0
    finally:
        server.shutdown()
        server.server_close()


def test_a_relayed_chat_queued_behind_a_long_answer_gets_its_whole_answer(cluster):
    """A student opens the page on a node without an LLM (it lists the room's models: a short
    request on the relay connection to the host), and asks while the host's owner is being
    answered at length: the question waits in the host's queue, longer than that short
    request's timeout, is told its place, and then gets its whole answer."""
    with serving_mesh(cluster, token_delay=0.1) as served:
        host, plain = served.host, served.plain
        assert plain.get("/api/room-models").status_code == 200  # what the page asks as it opens
        long_question = " ".join(["wait"] * 60)  # about 7 s of answer: longer than any short request waits
        owner_chat = host.post("/api/conversations", json={}).json()["id"]
        student_chat = plain.post("/api/conversations", json={}).json()["id"]
        answering = threading.Event()

        def owner_asks():
            with requests.post(host.url + "/api/conversations/%s/messages" % owner_chat, stream=True, timeout=60,
                               json={"content": long_question}, headers={"Accept": "text/event-stream"}) as reply:
                for kind, _data in read_sse(reply):
                    if kind == "token":
                        answering.set()

        owner = threading.Thread(target=owner_asks, daemon=True)
        owner.start()
        assert answering.wait(20), "the owner's long answer began"
        with requests.post(plain.url + "/api/conversations/%s/messages" % student_chat, stream=True, timeout=60,
                           json={"content": "Second in line."}, headers={"Accept": "text/event-stream"}) as reply:
            events = list(read_sse(reply))
        owner.join(60)
        kinds = [kind for kind, _data in events]
        assert ("queued", {"type": "queued", "position": 1, "node_name": host.info["name"]}) in events, kinds
        assert kinds[-1] == "done", events[-1]
        assert events[-1][1]["message"]["content"] == served.answer("Second in line.")
        assert events[-1][1]["message"]["waited_s"] > neuromesh.RoomHolders.timeout
        stored = plain.json("/api/conversations/%s" % student_chat)["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [("user", "Second in line."),
                                                               ("assistant", served.answer("Second in line."))]
