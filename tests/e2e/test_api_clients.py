"""The official clients and tools, against a node WITHOUT an LLM, served by a peer.

Every request below reaches the fake Ollama (tests/support/fake_ollama.py, a real HTTP server on
loopback) of the other node through that node's relay (``/relay/forward``), and comes back
in the shape the client expects: text, tool calls, JSON, embeddings, model details.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
import requests

from conftest import API_MODEL
from support.fake_ollama import VERSION, embedding_for
from support.sdk_clients import ollama_client, openai_client

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
JS_OLLAMA_VERSION = "0.6.3"  # the npm package `ollama`, pinned


# -- the Python `ollama` client ------------------------------------------------------------

def test_ollama_list_show_ps_and_version_tell_the_hosts_real_details(served_mesh):
    ollama, client = ollama_client(served_mesh)
    fake, plain = served_mesh.fake, served_mesh.plain
    assert plain.health()["has_llm"] is False
    listed = {model.model: model for model in client.list().models}
    assert set(listed) == set(m["model"] for m in fake.tags)
    for entry in fake.tags:  # the host's real size, digest, family, parameter size, quantisation
        model = listed[entry["model"]]
        assert model.size == entry["size"] and model.digest == entry["digest"]
        assert model.details.family == entry["details"]["family"]
        assert model.details.parameter_size == entry["details"]["parameter_size"]
        assert model.details.quantization_level == entry["details"]["quantization_level"]

    shown = client.show(API_MODEL)
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert shown.modelinfo["llama.context_length"] == 131072
    assert shown.details.family == "llama"
    assert fake.requests_to("/api/show")[-1]["model"] == API_MODEL  # the host's Ollama was asked
    with pytest.raises(ollama.ResponseError) as error:
        client.show("no-such-model:7b")
    assert error.value.status_code == 404

    assert client.ps().models == []  # nothing loaded yet: the fake loads a model on its first chat
    client.chat(model=API_MODEL, messages=[{"role": "user", "content": "hi"}], stream=False)
    running = client.ps().models
    assert [m.model for m in running] == [API_MODEL] and running[0].size_vram > 0

    assert plain.json("/api/version") == {"version": VERSION}  # the highest version of the mesh's Ollamas


def test_ollama_chat_generate_and_name_aliases(served_mesh):
    ollama, client = ollama_client(served_mesh)
    fake = served_mesh.fake
    parts = [chunk.message.content for chunk in client.chat(model=API_MODEL, messages=QUESTION, stream=True)]
    assert len(parts) > 3 and "".join(parts) == fake.answer_for(QUESTION, API_MODEL)
    reply = client.chat(model=API_MODEL, messages=QUESTION, stream=False)
    assert reply.message.content == fake.answer_for(QUESTION, API_MODEL) and reply.prompt_eval_count > 0

    generated = client.generate(model=API_MODEL, prompt="Name a colour.", system="Be brief.", stream=False)
    assert generated.response == fake.answer_for("Name a colour.", API_MODEL)
    raw = client.generate(model=API_MODEL, prompt="[INST] hi [/INST]", raw=True, suffix=" end", stream=False)
    assert raw.response == fake.answer_for("[INST] hi [/INST]", API_MODEL)
    sent = fake.requests_to("/api/generate")[-1]
    assert sent["raw"] is True and sent["suffix"] == " end"  # passed on to the host as they were

    # `name` and `name:latest` are the same model, whichever way the host lists it
    alias = client.chat(model="tinyllama:latest", messages=QUESTION, stream=False)
    assert alias.message.content == fake.answer_for(QUESTION, "tinyllama")
    plain = client.chat(model="nomic-embed-text", messages=QUESTION, stream=False)
    assert plain.message.content == fake.answer_for(QUESTION, "nomic-embed-text:latest")
    assert client.show("tinyllama:latest").details.family == "tinyllama"


def test_ollama_embed_and_the_old_embeddings(served_mesh):
    _ollama, client = ollama_client(served_mesh)
    embedded = client.embed(model="nomic-embed-text", input=["one", "two"])
    assert embedded.embeddings == [embedding_for("one"), embedding_for("two")]
    old = client.embeddings(model="nomic-embed-text", prompt="three")
    assert list(old.embedding) == embedding_for("three")


def test_ollama_pull_of_a_model_on_the_mesh_succeeds_and_of_another_says_what_to_do(served_mesh):
    ollama, client = ollama_client(served_mesh)
    assert client.pull(API_MODEL).status == "success"
    assert [p.status for p in client.pull("tinyllama:latest", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as error:
        client.pull("mistral:7b")
    message = str(error.value)
    host_name = served_mesh.host.health()["name"]
    assert "ollama pull mistral:7b" in message and host_name in message  # the host's name, what to run there
    assert not served_mesh.fake.requests_to("/api/pull")  # nothing is downloaded


def test_ollama_chat_with_tools_comes_back_with_tool_calls(served_mesh):
    _ollama, client = ollama_client(served_mesh)
    reply = client.chat(model=API_MODEL, messages=QUESTION, tools=[WEATHER_TOOL], stream=False)
    assert reply.message.tool_calls[0].function.name == "get_weather"
    assert reply.message.tool_calls[0].function.arguments == {"city": "value of city"}
    streamed = [c.message.tool_calls for c in client.chat(model=API_MODEL, messages=QUESTION,
                                                            tools=[WEATHER_TOOL], stream=True) if c.message.tool_calls]
    assert streamed and streamed[0][0].function.name == "get_weather"
    assert served_mesh.fake.requests_to("/api/chat")[-1]["tools"] == [WEATHER_TOOL]

    answered = client.chat(model=API_MODEL, stream=False, tools=[WEATHER_TOOL], messages=QUESTION + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}])
    assert answered.message.content and not answered.message.tool_calls  # the tool's answer went back

    formatted = client.chat(model=API_MODEL, messages=QUESTION, format="json", stream=False)
    assert json.loads(formatted.message.content) == {"answer": served_mesh.fake.answer_for(QUESTION, API_MODEL)}
    schema = {"type": "object", "properties": {"forecast": {"type": "string"}}}
    chunks = client.chat(model=API_MODEL, messages=QUESTION, format=schema, stream=True)
    assert set(json.loads("".join(c.message.content for c in chunks))) == {"forecast"}


# -- the Python `openai` client --------------------------------------------------------------

def test_openai_models_chat_with_usage_and_completions(served_mesh):
    openai, client = openai_client(served_mesh)
    fake = served_mesh.fake
    assert {m.id for m in client.models.list().data} == set(m["model"] for m in fake.tags)
    assert client.models.retrieve(API_MODEL).id == API_MODEL
    assert client.models.retrieve("tinyllama:latest").id == "tinyllama"
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-5")
    assert error.value.body["type"] == "not_found_error"  # OpenAI's error shape

    chunks = list(client.chat.completions.create(model=API_MODEL, messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fake.answer_for(QUESTION, API_MODEL)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    whole = client.chat.completions.create(model=API_MODEL, messages=QUESTION)
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens == usage.completion_tokens

    completion = client.completions.create(model=API_MODEL, prompt="Once upon a time")
    assert completion.choices[0].text == fake.answer_for("Once upon a time", API_MODEL)
    assert completion.object == "text_completion" and completion.usage.completion_tokens > 0
    streamed = client.completions.create(model=API_MODEL, prompt="Once upon a time", stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text


def test_openai_embeddings(served_mesh):
    _openai, client = openai_client(served_mesh)
    reply = client.embeddings.create(model="nomic-embed-text", input=["one", "two"])  # base64 by default
    assert [pytest.approx(d.embedding, abs=1e-6) for d in reply.data] == [embedding_for("one"), embedding_for("two")]
    floats = client.embeddings.create(model="nomic-embed-text", input="one", encoding_format="float")
    assert floats.data[0].embedding == embedding_for("one") and floats.usage.prompt_tokens > 0


def test_openai_tools_and_response_format_streamed_or_not(served_mesh):
    _openai, client = openai_client(served_mesh)
    fake = served_mesh.fake
    reply = client.chat.completions.create(model=API_MODEL, messages=QUESTION, tools=[WEATHER_TOOL])
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "value of city"}

    chunks = list(client.chat.completions.create(model=API_MODEL, messages=QUESTION, tools=[WEATHER_TOOL],
                                                 stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].index == 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    follow = client.chat.completions.create(model=API_MODEL, tools=[WEATHER_TOOL], messages=QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content and follow.choices[0].finish_reason == "stop"
    assert fake.requests_to("/api/chat")[-1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == \
        {"city": "Paris"}  # Ollama's shape reached the host

    as_json = client.chat.completions.create(model=API_MODEL, messages=QUESTION,
                                             response_format={"type": "json_object"})
    assert json.loads(as_json.choices[0].message.content) == {"answer": fake.answer_for(QUESTION, API_MODEL)}
    schema = {"type": "object", "properties": {"forecast": {"type": "string"}}, "required": ["forecast"]}
    chunks = client.chat.completions.create(model=API_MODEL, messages=QUESTION, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    assert set(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))) == {"forecast"}
    assert fake.requests_to("/api/chat")[-1]["format"] == schema


# -- the `ollama` command line's `run`, replayed ------------------------------------------------

def test_the_ollama_cli_run_sequence_gets_an_answer(served_mesh):
    """The requests of `OLLAMA_HOST=<node> ollama run <model> "<prompt>"`, read from Ollama's source
    (cmd/cmd.go: RunHandler -> checkServerHeartbeat (HEAD /), client.Show, on a 404 PullHandler
    (POST /api/pull) and Show again, then loadOrUnloadModel (POST /api/chat without messages) and
    generate/chat (POST /api/chat, streamed)), with the Go client's headers (api/client.go)."""
    url = served_mesh.plain.url
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "ollama/0.12.0"}
    head = requests.head(url + "/", headers=headers, timeout=5)
    assert head.status_code == 200
    assert requests.get(url + "/", headers=headers, timeout=5).text == "Ollama is running"
    assert "<html" in requests.get(url + "/", headers={"Accept": "text/html"}, timeout=5).text.lower()

    # a model on the mesh: show answers, no pull
    shown = requests.post(url + "/api/show", json={"name": "tinyllama"}, headers=headers, timeout=10)
    assert shown.status_code == 200 and shown.json()["details"]["family"] == "tinyllama"
    loaded = requests.post(url + "/api/chat", json={"model": "tinyllama", "messages": [], "stream": False},
                           headers=headers, timeout=10)
    assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"
    prompt = [{"role": "user", "content": "Why is the sky blue?"}]
    stream = requests.post(url + "/api/chat", json={"model": "tinyllama", "messages": prompt, "stream": True,
                                                    "options": {}}, headers=dict(headers, Accept="application/x-ndjson"),
                           stream=True, timeout=30)
    lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert "".join(l["message"]["content"] for l in lines) == served_mesh.fake.answer_for(prompt, "tinyllama")
    assert lines[-1]["done"] is True

    # a model nowhere on the mesh: show 404, pull says what to do (the CLI prints it and stops)
    missing = requests.post(url + "/api/show", json={"name": "phi3:mini"}, headers=headers, timeout=10)
    assert missing.status_code == 404
    pull = requests.post(url + "/api/pull", json={"name": "phi3:mini", "stream": True}, headers=headers, timeout=10)
    assert pull.status_code == 404 and "ollama pull phi3:mini" in pull.json()["error"]


# -- the JavaScript `ollama` package, run by node ---------------------------------------------

JS_SCRIPT = """
const { Ollama } = require('ollama');
(async () => {
  const client = new Ollama({ host: process.argv[2] });
  const list = await client.list();
  let text = '';
  const stream = await client.chat({ model: process.argv[3], stream: true,
                                     messages: [{ role: 'user', content: 'Hello from node' }] });
  let chunks = 0;
  for await (const part of stream) { text += part.message.content; chunks += 1; }
  console.log(JSON.stringify({ models: list.models.map(m => m.model), text, chunks }));
})().catch(err => { console.error(err); process.exit(1); });
"""


@pytest.fixture(scope="session")
def js_ollama(tmp_path_factory):
    """The npm package `ollama` (pinned), installed into a temporary folder by npm itself."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are needed for the JavaScript ollama client test")
    folder = tmp_path_factory.mktemp("js-ollama")
    try:
        done = subprocess.run(["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund",
                               "ollama@" + JS_OLLAMA_VERSION], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install ollama@%s took too long (no npm registry?)" % JS_OLLAMA_VERSION)
    if done.returncode != 0:
        pytest.skip("npm install ollama@%s failed (no npm registry?): %s" % (JS_OLLAMA_VERSION, done.stderr[-500:]))
    script = folder / "client.js"
    script.write_text(JS_SCRIPT)
    return folder, script


def test_the_javascript_ollama_package_lists_and_streams_a_chat(served_mesh, js_ollama):
    folder, script = js_ollama
    env = dict(os.environ, NODE_PATH=str(folder / "node_modules"))
    started = time.monotonic()
    done = subprocess.run(["node", str(script), served_mesh.plain.url, API_MODEL], capture_output=True, text=True,
                          timeout=60, cwd=str(folder), env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["models"]) == set(m["model"] for m in served_mesh.fake.tags)
    assert result["text"] == served_mesh.fake.answer_for([{"role": "user", "content": "Hello from node"}], API_MODEL)
    assert result["chunks"] > 3 and time.monotonic() - started < 60


# -- a host behind an OpenAI-compatible server (the fake's /v1 side), with an API key ------------

def test_a_host_behind_an_openai_compatible_server_with_a_key(cluster):
    """``--openai-url`` twice (one dead) and ``--openai-key`` (NEUROMESH_OPENAI_KEY works the same):
    Ollama-shaped requests are translated for the OpenAI-compatible host, or refused clearly."""
    from conftest import fully_linked, wait_for
    from support.fake_ollama import FakeOllama

    ollama = pytest.importorskip("ollama")
    fake = FakeOllama(models=(API_MODEL,)).start()
    try:
        host = cluster.start("host", extra=["--openai-url", fake.url + "/v1", "--openai-url", "http://127.0.0.1:9",
                                            "--openai-key", "sk-room-secret"])
        plain = cluster.start("plain")
        wait_for(lambda: fully_linked([host, plain]), message="mesh")
        wait_for(lambda: API_MODEL in {m["name"] for m in plain.json("/api/models")["models"]}, timeout=15,
                 message="access")
        client = ollama.Client(host=plain.url, timeout=30)
        shown = client.show(API_MODEL)
        assert shown.capabilities == ["completion"] and shown.details.family == ""  # nothing made up
        reply = client.chat(model=API_MODEL, messages=QUESTION, tools=[WEATHER_TOOL], stream=False)
        assert reply.message.tool_calls[0].function.arguments == {"city": "value of city"}
        formatted = client.chat(model=API_MODEL, messages=QUESTION, format="json", stream=True)
        assert json.loads("".join(c.message.content for c in formatted)) == {
            "answer": fake.answer_for(QUESTION, API_MODEL)}
        assert fake.requests_to("/v1/chat/completions")[-1]["response_format"] == {"type": "json_object"}
        assert client.embed(model=API_MODEL, input="one").embeddings == [embedding_for("one")]
        with pytest.raises(ollama.ResponseError) as error:
            client.generate(model=API_MODEL, prompt="x", raw=True)
        assert error.value.status_code == 400 and "raw" in str(error.value)
        assert {h.get("authorization") for h in fake.request_headers} == {"Bearer sk-room-secret"}
        assert [m.model for m in client.list().models] == [API_MODEL]
    finally:
        fake.stop()


def test_a_passed_on_stream_ends_with_an_error_when_its_host_freezes(served_mesh):
    """A chat with a format, relayed as it is: the host goes silent mid-answer (SIGSTOP), the peer
    link times out, and the client's stream ends at once with Ollama's error line, not after 300 s."""
    import signal

    served_mesh.fake.token_delay = 0.5
    body = {"model": API_MODEL, "messages": QUESTION, "format": "json", "stream": True}
    started = time.monotonic()
    with requests.post(served_mesh.plain.url + "/api/chat", json=body, stream=True, timeout=25) as reply:
        lines = reply.iter_lines(chunk_size=1)
        first = json.loads(next(lines))
        assert first["done"] is False and first["message"]["content"]
        served_mesh.host.process.send_signal(signal.SIGSTOP)
        try:
            rest = [json.loads(line) for line in lines if line]
        finally:
            served_mesh.host.process.send_signal(signal.SIGCONT)
    assert "error" in rest[-1] and "mid-way" in rest[-1]["error"], rest[-3:]
    assert time.monotonic() - started < 20


def test_several_backend_urls_and_the_openai_key_from_flags_or_the_environment(tmp_path):
    import neuromesh as nm

    def config(args, environ):
        return nm.load_config(nm.build_arg_parser().parse_args(["--data-dir", str(tmp_path)] + args), environ=environ)

    both = config(["--ollama-url", "127.0.0.1:11434", "--ollama-url", "http://10.0.0.5:11434",
                   "--openai-url", "http://127.0.0.1:8000/v1,http://127.0.0.1:9000"], {"OPENAI_API_KEY": "sk-a"})
    assert both.ollama_url == "http://127.0.0.1:11434,http://10.0.0.5:11434"
    assert both.openai_url == "http://127.0.0.1:8000,http://127.0.0.1:9000" and both.openai_key == "sk-a"
    assert "sk-a" not in repr(both)  # never shown
    router = nm.Router(both, "id", "name", mesh=None)
    assert [(b.kind, b.url) for b in router.local] == [
        ("ollama", "http://127.0.0.1:11434"), ("ollama", "http://10.0.0.5:11434"),
        ("openai", "http://127.0.0.1:8000"), ("openai", "http://127.0.0.1:9000")]
    assert {b.session.headers.get("Authorization") for b in router.local if b.kind == "openai"} == {"Bearer sk-a"}
    assert "Authorization" not in router.local[0].session.headers  # the key goes to OpenAI servers only
    assert config([], {"OPENAI_API_KEY": "sk-a", "NEUROMESH_OPENAI_KEY": "sk-b"}).openai_key == "sk-b"
    assert config(["--openai-key", "sk-c"], {"NEUROMESH_OPENAI_KEY": "sk-b"}).openai_key == "sk-c"
    assert config(["--ollama-url", "none"], {}).ollama_url is None
