"""The HTTP APIs in-process: each unit, and the whole app, called through WSGI with a stub node;
and the page as a one-file archive serves it from inside itself (never its own code).

No sockets: the router's backends are scripted (conftest.ScriptedBackend) and requests are
WSGI environ dicts handed straight to the app.
"""

import json
import threading
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuromesh
from conftest import ScriptedBackend, ScriptedPeerBackend, StubNode, scripted_router, wsgi_call

USER = [{"role": "user", "content": "Hi?"}]


@pytest.fixture
def app(stub_node):
    return stub_node.app()


def unit_app(node, unit):
    """One API unit alone, built from the node's collaborators as build_app builds it."""
    extra = {neuromesh.PageApi: (node.store, node.events, node.mesh, node.room, node, node),
             neuromesh.OllamaApi: (node.pulls,), neuromesh.OpenAIApi: (node.started,)}.get(unit, ())
    chat = neuromesh.ChatService(node.router, node.store, node.host_info)
    return unit(node.router, chat, neuromesh.Gatekeeper(node.config), *extra).build()


def new_conversation(app, title="Lesson"):
    reply = wsgi_call(app, "POST", "/api/conversations", {"title": title})
    assert reply.status == 201
    return reply.json()["id"]


def sse_events(text):
    """``[(event name, data)]`` of an SSE body."""
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            events.append((lines.get("event"), lines["data"]))
    return events


# -- the page API ---------------------------------------------------------------------


def test_page_creates_lists_and_answers_a_message_with_the_stored_answer(app, stub_node):
    conversation_id = new_conversation(app)
    listed = wsgi_call(app, "GET", "/api/conversations").json()
    assert [c["id"] for c in listed] == [conversation_id]

    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % conversation_id,
                      {"content": "What is a mesh?", "sender": "ada"})
    assert reply.status == 201 and reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    assert body["user"]["content"] == "What is a mesh?" and body["user"]["sender"] == "ada"
    assert body["assistant"]["content"] == "Hello from the fake"
    assert body["assistant"]["answered_by_name"] == "stub-llm" and body["assistant"]["model"] == "m1"
    stored = wsgi_call(app, "GET", "/api/conversations/" + conversation_id).json()["messages"]
    assert [m["id"] for m in stored] == [body["user"]["id"], body["assistant"]["id"]]
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]


def test_page_streams_the_answer_as_sse_when_asked(app):
    conversation_id = new_conversation(app)
    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % conversation_id, {"content": "Hi"},
                      headers={"Accept": "text/event-stream"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/event-stream"
    names = [name for name, _data in sse_events(reply.text)]
    assert names == ["user", "start", "token", "token", "token", "token", "done"]
    done = json.loads(sse_events(reply.text)[-1][1])
    assert done["message"]["content"] == "Hello from the fake"


def test_regenerate_answers_the_last_question_again_without_the_old_answer(app, stub_node):
    conversation_id = new_conversation(app)
    wsgi_call(app, "POST", "/api/conversations/%s/messages" % conversation_id, {"content": "Why?"})
    backend = stub_node.router.local[0]
    backend.reply = "Because."

    reply = wsgi_call(app, "POST", "/api/conversations/%s/regenerate" % conversation_id, {})
    assert reply.status == 201
    assert reply.json()["user"] is None and reply.json()["assistant"]["content"] == "Because."
    _model, history = backend.asked[-1]
    assert history == [{"role": "user", "content": "Why?"}]
    messages = wsgi_call(app, "GET", "/api/conversations/" + conversation_id).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]


def test_regenerate_without_a_question_is_a_400(app):
    conversation_id = new_conversation(app)
    reply = wsgi_call(app, "POST", "/api/conversations/%s/regenerate" % conversation_id, {})
    assert reply.status == 400
    assert reply.json() == {"error": "nothing to regenerate: the conversation has no question yet"}


def test_page_errors_have_the_error_shape(app):
    assert wsgi_call(app, "GET", "/api/conversations/nope").status == 404
    assert wsgi_call(app, "GET", "/api/conversations/nope").json() == {"error": "no conversation nope"}
    assert wsgi_call(app, "POST", "/api/conversations/nope/messages", {"content": "x"}).json() == \
        {"error": "no conversation nope"}
    unknown = wsgi_call(app, "GET", "/no/such/page")
    assert unknown.status == 404 and unknown.json() == {"error": "not found: /no/such/page"}
    wrong_method = wsgi_call(app, "PUT", "/api/conversations")
    assert wrong_method.status == 405
    assert wrong_method.json() == {"error": "method PUT is not allowed on /api/conversations"}
    bad_json = wsgi_call(app, "POST", "/api/conversations", b"{not json")
    assert bad_json.status == 400 and bad_json.json()["error"].startswith("the request body is not valid JSON")


def test_an_answer_that_fails_midway_is_a_502_with_the_stored_question(app, stub_node):
    conversation_id = new_conversation(app)
    stub_node.router.local[0].fail = "midway"
    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % conversation_id, {"content": "Hi"})
    assert reply.status == 502
    error = reply.json()["error"]
    assert error.startswith("stub-llm broke mid-answer; no other host of m1 could continue") and "kept" in error
    assert reply.json()["user"]["content"] == "Hi"


def test_an_answer_that_cannot_be_stored_ends_with_an_error(app, stub_node):
    conversation_id = new_conversation(app)
    wsgi_call(app, "POST", "/api/conversations/%s/messages" % conversation_id, {"content": "Hi", "answer": False})
    backend = stub_node.router.local[0]
    backend.gate = threading.Event()
    replies = []
    asking = threading.Thread(target=lambda: replies.append(
        wsgi_call(app, "POST", "/api/conversations/%s/regenerate" % conversation_id, {})))
    asking.start()
    assert backend.started.wait(5)
    assert wsgi_call(app, "DELETE", "/api/conversations/" + conversation_id).status == 200
    backend.gate.set()
    asking.join(10)
    assert replies[0].status == 502
    assert replies[0].json()["error"].startswith("the answer could not be stored")


def test_the_page_sees_its_place_in_the_queue(app, stub_node):
    """With one slot, a second question hears `queued` before its answer starts."""
    backend = stub_node.router.local[0]
    backend.gate = threading.Event()
    first, second = new_conversation(app, "one"), new_conversation(app, "two")
    holder = threading.Thread(target=wsgi_call, args=(app, "POST", "/api/conversations/%s/messages" % first,
                                                      {"content": "A"}))
    holder.start()
    assert backend.started.wait(5)
    threading.Timer(0.3, backend.gate.set).start()
    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % second, {"content": "B"},
                      headers={"Accept": "text/event-stream"})
    holder.join(10)
    events = sse_events(reply.text)
    assert [name for name, _ in events[:3]] == ["user", "queued", "start"]
    assert json.loads(events[1][1])["position"] == 1


def test_models_lists_the_mesh(app):
    body = wsgi_call(app, "GET", "/api/models").json()
    assert body["default"] == "m1" and body["llm_hosts"] == 1
    assert body["models"][0]["name"] == "m1" and body["models"][0]["hosts"][0]["local"] is True


# -- the Ollama API -------------------------------------------------------------------


def test_ollama_chat_streams_ndjson(app):
    reply = wsgi_call(app, "POST", "/api/chat", {"model": "m1", "messages": USER})
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/x-ndjson"
    lines = reply.lines()
    assert all(line["done"] is False for line in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(line["message"]["content"] for line in lines) == "Hello from the fake"
    assert lines[-1]["eval_count"] == 4 and lines[-1]["done_reason"] == "stop"


def test_ollama_chat_and_generate_without_streaming(app):
    chat = wsgi_call(app, "POST", "/api/chat", {"model": "m1", "messages": USER, "stream": False})
    assert chat.status == 200 and chat.json()["message"] == {"role": "assistant", "content": "Hello from the fake"}
    generate = wsgi_call(app, "POST", "/api/generate", {"model": "m1", "prompt": "Hi", "stream": False})
    assert generate.json()["response"] == "Hello from the fake" and generate.json()["done"] is True


def test_ollama_tags_and_errors(app):
    tags = wsgi_call(app, "GET", "/api/tags").json()
    assert [entry["name"] for entry in tags["models"]] == ["m1"]
    assert tags["models"][0]["neuromesh_hosts"] == ["stub"]
    missing = wsgi_call(app, "POST", "/api/chat", {"model": "nope", "messages": USER})
    assert missing.status == 404 and missing.json()["error"].startswith("model 'nope' is not on the mesh")
    assert wsgi_call(app, "POST", "/api/chat", {"messages": USER}).json() == {"error": "model is required"}


def test_the_seeds_chat_answers_in_the_seeds_shape(app):
    reply = wsgi_call(app, "POST", "/api/chat", {"message": "Hello", "sender": "bob"})
    assert reply.status == 200
    assert reply.json()["content"] == "Hello from the fake" and reply.json()["message_type"] == "Response"


def test_the_llm_apis_answer_only_loopback_without_lan_api(app, tmp_path):
    refused = wsgi_call(app, "GET", "/api/tags", remote="192.168.1.20")
    assert refused.status == 403 and refused.json()["error"].startswith("this node's LLM API answers only")
    openai = wsgi_call(app, "GET", "/v1/models", remote="192.168.1.20")
    assert openai.status == 403 and openai.json()["error"]["type"] == "permission_error"
    page = wsgi_call(app, "GET", "/api/health", remote="192.168.1.20")  # the page needs --guests
    assert page.status == 403 and "--guests" in page.json()["error"]
    lan_node = StubNode(tmp_path / "lan", scripted_router(local=[ScriptedBackend()]), lan_api=True)
    try:
        lan_app = lan_node.app()
        assert wsgi_call(lan_app, "GET", "/api/tags", remote="192.168.1.20").status == 200
        assert wsgi_call(lan_app, "GET", "/api/tags", remote="8.8.8.8").status == 403
    finally:
        lan_node.store.close()


# -- the OpenAI API -------------------------------------------------------------------


def test_openai_chat_completion(app):
    reply = wsgi_call(app, "POST", "/v1/chat/completions", {"model": "m1", "messages": USER, "max_tokens": 9})
    assert reply.status == 200
    body = reply.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the fake"}
    assert body["usage"]["completion_tokens"] == 4


def test_openai_chat_completion_streams_sse_chunks_then_done(app):
    reply = wsgi_call(app, "POST", "/v1/chat/completions", {"model": "m1", "messages": USER, "stream": True})
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/event-stream"
    data = [block[len("data: "):] for block in reply.text.split("\n\n") if block]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello from the fake"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


def test_openai_errors_have_the_openai_shape(app):
    missing = wsgi_call(app, "POST", "/v1/chat/completions", {"model": "nope", "messages": USER})
    assert missing.status == 404
    error = missing.json()["error"]
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found" and error["param"] is None
    assert error["message"].startswith("model 'nope' is not on the mesh")
    no_model = wsgi_call(app, "POST", "/v1/chat/completions", {"messages": USER})
    assert no_model.status == 400 and no_model.json() == {"error": {
        "message": "model is required", "type": "invalid_request_error", "param": None, "code": None}}


# -- the relay ------------------------------------------------------------------------


def test_the_relay_refuses_a_bad_token(app, stub_node):
    stub_node.router.tokens.issued["peer"] = "the-right-token"
    on_relay = {neuromesh.RelayServer.PEER_KEY: "peer"}  # the TLS relay connection of the peer "peer"
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "the-right-token"}):
        reply = wsgi_call(app, "POST", neuromesh.RELAY_PATH, {"model": "m1", "messages": USER}, headers=header,
                          environ=on_relay)
        assert reply.status == 401
        assert reply.json() == {"error": "no valid LLM access token: ask for access over the mesh link (LREQ:)"}
    on_another = {neuromesh.RelayServer.PEER_KEY: "another-peer"}  # the right token, on another's connection
    reply = wsgi_call(app, "POST", neuromesh.RELAY_PATH, {"model": "m1", "messages": USER},
                      headers={"Authorization": "Bearer the-right-token"}, environ=on_another)
    assert reply.status == 401
    plain = wsgi_call(app, "POST", neuromesh.RELAY_PATH, {"model": "m1", "messages": USER},
                      headers={"Authorization": "Bearer the-right-token"})  # the HTTP port
    assert plain.status == 403 and "never over plain HTTP" in plain.json()["error"]


def test_the_relay_answers_a_granted_peer_with_this_nodes_llm_only(tmp_path):
    peer = ScriptedPeerBackend("elsewhere", models=("m2",))
    node = StubNode(tmp_path, scripted_router(local=[ScriptedBackend("stub-llm")], peers=[peer]))
    node.router.tokens.issued["peer"] = "the-right-token"
    try:
        app = unit_app(node, neuromesh.RelayApi)
        auth, on_relay = {"Authorization": "Bearer the-right-token"}, {neuromesh.RelayServer.PEER_KEY: "peer"}
        lines = wsgi_call(app, "POST", neuromesh.RELAY_PATH, {"model": "m1", "messages": USER}, headers=auth,
                          environ=on_relay).lines()
        assert "".join(line["message"]["content"] for line in lines[:-1]) == "Hello from the fake"
        assert lines[-1]["done"] is True
        refused = wsgi_call(app, "POST", neuromesh.RELAY_PATH, {"model": "m2", "messages": USER}, headers=auth,
                            environ=on_relay)
        assert refused.lines()[0]["status"] == 404 and peer.asked == []
    finally:
        node.store.close()


# -- each unit on its own -------------------------------------------------------------


@pytest.mark.parametrize("unit, method, path", [
    (neuromesh.PageApi, "GET", "/api/conversations"),
    (neuromesh.OllamaApi, "GET", "/api/tags"),
    (neuromesh.OpenAIApi, "GET", "/v1/models"),
])
def test_each_unit_serves_only_its_own_routes(stub_node, unit, method, path):
    app = unit_app(stub_node, unit)
    assert wsgi_call(app, method, path).status == 200
    others = {"/api/conversations", "/api/tags", "/v1/models"} - {path}
    for other in others:
        assert wsgi_call(app, "GET", other).status == 404


def test_fit_history_keeps_the_newest_messages_within_the_budget():
    messages = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
                {"role": "user", "content": "c" * 10}]
    assert neuromesh.ChatService.fit_history(messages, 25) == messages[1:]
    assert neuromesh.ChatService.fit_history(messages, 4) == [{"role": "user", "content": "cccc"}]


# ---- the page, served from inside the one-file archive ------------------------------------------

def test_the_page_is_served_from_inside_the_archive(tmp_path):
    archive = str(tmp_path / "neuromesh-test.pyz")
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("neuromesh_static/index.html", "<!doctype html><title>NeuroMesh</title>")
        bundle.writestr("neuromesh_static/app.js", "console.log(1);")
        bundle.writestr("neuromesh.py", "secret = 1")
    files = neuromesh.ArchivedFiles(archive)
    page = files.response("index.html")
    assert page.status_code == 200 and page.body == b"<!doctype html><title>NeuroMesh</title>"
    assert page.headers["Content-Type"] == "text/html; charset=UTF-8"
    assert "javascript" in files.response("app.js").headers["Content-Type"]
    for name in ("../neuromesh.py", "neuromesh.py", "", "nope.css", "..\\neuromesh.py"):
        assert files.response(name).status_code == 404, name


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=40))
def test_any_path_asked_of_the_archive_is_its_file_or_a_404(name):
    files = neuromesh.ArchivedFiles("unused.pyz")
    files._files = {"index.html": b"page", "sub/app.js": b"js"}
    reply = files.response(name)
    assert reply.status_code in (200, 404)
    if reply.status_code == 200:
        assert reply.body in (b"page", b"js") and name.replace("\\", "/").lstrip("/") in files._files
