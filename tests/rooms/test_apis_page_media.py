"""The server side of the page: a question with pictures for a vision model,
and a reasoning model's thinking kept apart from its answer, through a node WITHOUT an LLM
relayed to a host whose Ollama is the fake; both stored with the message and synced."""

import base64
import threading

import requests

import neuromesh
from conftest import (API_MODEL, OTHER_MACHINE, PIXEL, SEER, THINKER, ScriptedBackend, guest_headers, scripted_router,
                      wait_for, wsgi_call)
from support.fake_ollama import image_note, thinking_for
from support.llm_mesh import read_sse

SSE = {"Accept": "text/event-stream"}


def test_the_model_list_tells_each_models_capabilities(served):
    models = {m["name"]: m["capabilities"] for m in served.plain.json("/api/models")["models"]}
    assert "vision" in models[SEER] and "thinking" in models[THINKER]
    assert "vision" not in models[API_MODEL] and "thinking" not in models[API_MODEL]


def test_a_question_with_a_picture_is_answered_stored_and_synced(served):
    plain, host = served.plain, served.host
    conversation = plain.post("/api/conversations", json={"title": "homework"}).json()["id"]
    reply = plain.post("/api/conversations/%s/messages" % conversation, headers={"Accept": "application/json"},
                       json={"content": "What is in this picture?", "model": SEER, "images": [PIXEL]})
    assert reply.status_code == 201, reply.text
    assert reply.json()["user"]["images"] == [PIXEL]
    answer = served.answer("What is in this picture?", SEER) + image_note([PIXEL])
    assert reply.json()["assistant"]["content"] == answer
    assert served.fake.requests_to("/api/chat")[-1]["messages"][-1]["images"] == [PIXEL]
    kept = plain.json("/api/conversations/%s" % conversation)["messages"]
    assert kept[0]["images"] == [PIXEL]
    wait_for(lambda: (host.json("/api/conversations/%s" % conversation).get("messages") or [{}])[0].get("images")
             == [PIXEL], timeout=20, message="the picture synced to the other node")


def test_pictures_past_the_limits_are_refused_with_a_clear_error(served):
    plain = served.plain
    conversation = plain.post("/api/conversations", json={}).json()["id"]
    url = plain.url + "/api/conversations/%s/messages" % conversation
    big = base64.b64encode(b"x" * (neuromesh.MAX_IMAGES_BYTES)).decode()
    too_big = requests.post(url, json={"content": "look", "images": [big]}, timeout=10)
    assert too_big.status_code == 413 and "KiB together at most" in too_big.json()["error"]
    not_base64 = requests.post(url, json={"content": "look", "images": ["<script>"]}, timeout=10)
    assert not_base64.status_code == 413
    too_many = requests.post(url, json={"content": "look", "images": [PIXEL] * 5}, timeout=10)
    assert too_many.status_code == 413
    assert requests.post(url, json={"content": "look", "images": "abc"}, timeout=10).status_code == 400


def test_thinking_streams_apart_and_is_stored_with_the_answer(served):
    plain = served.plain
    conversation = plain.post("/api/conversations", json={}).json()["id"]
    with requests.post(plain.url + "/api/conversations/%s/messages" % conversation, headers=SSE, stream=True,
                       json={"content": "Why is the sky blue?", "model": THINKER}, timeout=60) as response:
        events = list(read_sse(response))
    kinds = [kind for kind, _data in events]
    answer = served.answer("Why is the sky blue?", THINKER)
    thoughts = "".join(data["content"] for kind, data in events if kind == "thinking")
    words = "".join(data["content"] for kind, data in events if kind == "token")
    assert thoughts == thinking_for(answer) and words == answer
    assert kinds.index("thinking") < kinds.index("token") and kinds[-1] == "done"
    stored = events[-1][1]["message"]
    assert stored["thinking"] == thinking_for(answer) and stored["content"] == answer
    assert plain.json("/api/conversations/%s" % conversation)["messages"][-1]["thinking"] == thinking_for(answer)


def test_a_guest_asks_with_a_picture_too(open_node):
    """A phone of the room (a guest who entered the room code) sends a picture like the owner."""
    app = open_node.app()
    headers = guest_headers(app, open_node)
    created = wsgi_call(app, "POST", "/api/conversations", {"title": "photo"}, headers=headers, remote=OTHER_MACHINE)
    conversation = created.json()["id"]
    reply = wsgi_call(app, "POST", "/api/conversations/%s/messages" % conversation,
                      {"content": "What is this?", "images": [PIXEL]},
                      headers=dict(headers, Accept="application/json"), remote=OTHER_MACHINE)
    assert reply.status == 201, reply.text
    assert reply.json()["user"]["images"] == [PIXEL]
    _model, asked = open_node.router.local[0].asked[-1]
    assert asked[-1] == {"role": "user", "content": "What is this?", "images": [PIXEL]}


class ShowingBackend(ScriptedBackend):
    """A scripted LLM that answers /api/show with its capabilities once ``release`` is set."""

    def __init__(self, release):
        ScriptedBackend.__init__(self, "slow-host", models=("seer",))
        self.release = release
        self.shown = 0

    def forward(self, path, body):
        self.shown += 1
        self.release.wait(10)
        return neuromesh.Upstream.of_json({"capabilities": ["completion", "vision"]})


def test_a_slow_host_does_not_hold_the_model_list_and_its_answer_is_kept():
    release = threading.Event()
    backend = ShowingBackend(release)
    capabilities = neuromesh.ModelCapabilities(scripted_router(local=[backend]))
    capabilities.wait_s = 0.2
    assert capabilities.of_all(["seer"]) == {"seer": []}  # not known yet: the list goes out without it
    assert capabilities.of_all(["seer"]) == {"seer": []} and backend.shown == 1  # asked once at a time
    release.set()
    wait_for(lambda: capabilities.of_all(["seer"]) == {"seer": ["completion", "vision"]}, timeout=5,
             message="the host's answer kept")
    assert backend.shown == 1


def test_a_picture_reaches_a_host_behind_an_openai_compatible_server_as_an_image_part(cluster):
    from support.fake_ollama import FakeOllama
    with FakeOllama(models=(SEER,)) as fake:
        host = cluster.start("openai-host", extra=["--openai-url", fake.url + "/v1"])
        wait_for(lambda: host.json("/api/models")["models"], timeout=15, message="the model")
        conversation = host.post("/api/conversations", json={}).json()["id"]
        reply = host.post("/api/conversations/%s/messages" % conversation, headers={"Accept": "application/json"},
                          json={"content": "What is this?", "model": SEER, "images": [PIXEL]})
        assert reply.status_code == 201, reply.text
        asked = fake.requests_to("/v1/chat/completions")[-1]["messages"][-1]["content"]
        assert {"type": "text", "text": "What is this?"} in asked
        assert {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PIXEL}} in asked


def test_only_the_newest_question_with_pictures_sends_them_again():
    def message(index, role, images=None):
        found = {"id": "m%d" % index, "role": role, "content": "c%d" % index}
        return dict(found, images=images) if images else found
    history = neuromesh.ChatService.history_of([message(0, "user", ["AAAA"]), message(1, "assistant"),
                                                 message(2, "user", ["BBBB"]), message(3, "assistant"),
                                                 message(4, "user")])
    assert [item.get("images") for item in history] == [None, None, ["BBBB"], None, None]
