"""Tests for tests/support/fake_ollama.py: the fake Ollama server NeuroMesh's tests talk to."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from support.fake_ollama import ERROR_500, ERROR_503, FakeOllama, tokens_for  # noqa: E402

MODEL = "llama3.2:1b"
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture
def make_fake():
    """Factory: start FakeOllama servers; every one is stopped at teardown."""
    made: List[FakeOllama] = []

    def _make(**kw: Any) -> FakeOllama:
        f = FakeOllama(**kw).start()
        made.append(f)
        return f

    yield _make
    for f in made:
        f.stop()


@pytest.fixture
def fake(make_fake):
    return make_fake(models=(MODEL, "qwen2.5:0.5b"))


# ----- small raw HTTP helpers (no third-party code between us and the socket) -------------

def _conn(fake: FakeOllama, timeout: float = 5.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", fake.port, timeout=timeout)


def _get(fake: FakeOllama, path: str) -> Tuple[int, str, Dict[str, str]]:
    c = _conn(fake)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def _post(fake: FakeOllama, path: str, body: Any, timeout: float = 5.0) -> Tuple[int, bytes, Dict[str, str]]:
    c = _conn(fake, timeout)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def _raw_stream_times(fake: FakeOllama, path: str, body: Dict[str, Any],
                      timeout: float = 5.0) -> List[Tuple[float, bytes]]:
    """POST over a raw socket; return (arrival time, bytes) of every recv until close/end."""
    data = json.dumps(body).encode()
    req = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (path.encode(), len(data))) + data
    s = socket.create_connection(("127.0.0.1", fake.port), timeout=timeout)
    out: List[Tuple[float, bytes]] = []
    try:
        s.sendall(req)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            buf = s.recv(65536)
            if not buf:
                break
            out.append((time.monotonic(), buf))
            if b"0\r\n\r\n" in buf and (b'"done": true' in buf or b"[DONE]" in buf):
                break
    finally:
        s.close()
    return out


def _recv_until(s: socket.socket, marker: bytes, timeout: float = 3.0) -> bytes:
    """Read from ``s`` until ``marker`` has arrived (or timeout/close); return all bytes read."""
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got and time.monotonic() < deadline:
        buf = s.recv(65536)
        if not buf:
            break
        got += buf
    return got


def _start_raw_chat(fake: FakeOllama, timeout: float = 3.0) -> socket.socket:
    """Start a streaming /api/chat on a raw socket and return once the first token arrived."""
    s = socket.create_connection(("127.0.0.1", fake.port), timeout=timeout)
    body = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b'"Echo"' in _recv_until(s, b'"Echo"', timeout)
    return s


def _ndjson(raw: bytes) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


# ----- basics ----------------------------------------------------------------------------

def test_tokens_roundtrip():
    for text in ["", "a", " a b  c ", "Echo from m: hi (x)", "multi\nline  text\t"]:
        toks = tokens_for(text)
        assert "".join(toks) == text
    assert tokens_for("Echo from x") == ["Echo", " from", " x"]


def test_root_version_tags_ps(fake):
    st, body, hdr = _get(fake, "/")
    assert (st, body) == (200, "Ollama is running")
    st, body, _ = _get(fake, "/api/version")
    assert st == 200 and json.loads(body)["version"]
    st, body, hdr = _get(fake, "/api/tags")
    assert st == 200 and hdr["content-type"].startswith("application/json")
    models = json.loads(body)["models"]
    assert [m["name"] for m in models] == [MODEL, "qwen2.5:0.5b"]
    for m in models:
        assert m["model"] == m["name"]
        assert set(m) >= {"name", "model", "modified_at", "size", "digest", "details"}
        assert set(m["details"]) >= {"parent_model", "format", "family", "families",
                                     "parameter_size", "quantization_level"}
    assert models[0]["details"]["family"] == "llama"
    assert json.loads(_get(fake, "/api/ps")[1]) == {"models": []}
    _post(fake, "/api/generate", {"model": MODEL, "prompt": "x", "stream": False})
    ps = json.loads(_get(fake, "/api/ps")[1])["models"]
    assert [p["model"] for p in ps] == [MODEL]
    assert "modified_at" not in ps[0] and {"expires_at", "size_vram"} <= set(ps[0])
    assert _get(fake, "/nope")[0] == 404
    assert [p for p, _ in fake.requests][:3] == ["/", "/api/version", "/api/tags"]


def test_custom_tags(make_fake):
    f = make_fake()
    f.tags = [{"name": "custom:7b", "model": "custom:7b", "modified_at": "2025-01-01T00:00:00Z",
               "size": 1, "digest": "abc", "details": {}}]
    assert [m["name"] for m in json.loads(_get(f, "/api/tags")[1])["models"]] == ["custom:7b"]
    assert _post(f, "/api/chat", {"model": "custom:7b", "messages": MSGS, "stream": False})[0] == 200
    assert _post(f, "/api/chat", {"model": MODEL, "messages": MSGS, "stream": False})[0] == 404


def test_chat_stream_chunks_and_final(fake):
    st, raw, hdr = _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS})
    assert st == 200 and hdr["content-type"] == "application/x-ndjson"
    assert hdr.get("transfer-encoding") == "chunked"
    lines = _ndjson(raw)
    answer = fake.answer_for(MSGS, MODEL)
    assert answer.startswith("Echo from %s: hello world" % MODEL)
    assert len(lines) == len(tokens_for(answer)) + 1 >= 5
    for ln in lines[:-1]:
        assert ln["done"] is False and ln["model"] == MODEL and ln["created_at"].endswith("Z")
        assert ln["message"]["role"] == "assistant"
    assert "".join(ln["message"]["content"] for ln in lines) == answer
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    for k in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
              "eval_count", "eval_duration"):
        assert isinstance(final[k], int) and final[k] > 0
    assert final["eval_count"] == len(lines) - 1
    assert fake.requests_to("/api/chat")[0]["messages"] == MSGS


def test_chat_and_generate_non_stream(fake):
    st, raw, hdr = _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS, "stream": False})
    obj = json.loads(raw)
    assert st == 200 and hdr["content-type"].startswith("application/json")
    assert obj["done"] is True and obj["message"]["content"] == fake.answer_for(MSGS, MODEL)
    st, raw, _ = _post(fake, "/api/generate", {"model": MODEL, "prompt": "why?", "stream": False})
    obj = json.loads(raw)
    assert obj["response"] == fake.answer_for("why?", MODEL) and obj["done_reason"] == "stop"
    assert isinstance(obj["context"], list) and obj["eval_count"] > 3
    # streamed generate carries "response"
    lines = _ndjson(_post(fake, "/api/generate", {"model": MODEL, "prompt": "why?"})[1])
    assert "".join(ln["response"] for ln in lines) == fake.answer_for("why?", MODEL)
    # num_predict truncates with done_reason "length"
    obj = json.loads(_post(fake, "/api/generate", {"model": MODEL, "prompt": "p", "stream": False,
                                                   "options": {"num_predict": 2}})[1])
    assert obj["response"] == "Echo from" and obj["done_reason"] == "length" and obj["eval_count"] == 2
    # empty prompt just loads the model
    obj = json.loads(_post(fake, "/api/generate", {"model": MODEL, "stream": False})[1])
    assert obj["done_reason"] == "load" and obj["response"] == ""
    # "name" without a tag means ":latest"
    f2 = FakeOllama(models=("phi3:latest",))
    assert f2._find_model("phi3") is not None and f2._find_model("phi3:mini") is None


def test_errors_404_400(fake):
    st, raw, _ = _post(fake, "/api/chat", {"model": "nope:1b", "messages": MSGS})
    assert st == 404 and json.loads(raw) == {"error": 'model "nope:1b" not found, try pulling it first'}
    st, raw, _ = _post(fake, "/api/generate", {"model": "nope", "prompt": "x"})
    assert st == 404 and "not found" in json.loads(raw)["error"]
    st, raw, _ = _post(fake, "/v1/chat/completions", {"model": "nope", "messages": MSGS})
    err = json.loads(raw)["error"]
    assert st == 404 and err["type"] == "not_found_error" and 'model "nope" not found' in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert _post(fake, "/api/chat", {"messages": MSGS})[0] == 400
    c = _conn(fake)
    c.request("POST", "/api/chat", body=b"{not json")
    assert c.getresponse().status == 400
    c.close()


def test_keep_alive_reuses_connection(fake):
    c = _conn(fake)
    try:
        for _ in range(3):
            c.request("POST", "/api/chat", body=json.dumps({"model": MODEL, "messages": MSGS}))
            r = c.getresponse()
            assert r.status == 200 and _ndjson(r.read())[-1]["done"] is True
    finally:
        c.close()


def test_http10_client_gets_close_delimited_stream(make_fake):
    f = make_fake(token_delay=0.01)
    s = socket.create_connection(("127.0.0.1", f.port), timeout=3)
    body = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    s.sendall(b"POST /api/chat HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = b""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        buf = s.recv(65536)
        if not buf:
            break
        raw += buf
    s.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"chunked" not in head.lower()
    lines = _ndjson(payload)
    assert lines[-1]["done"] is True
    assert "".join(x["message"]["content"] for x in lines) == f.answer_for(MSGS, MODEL)


# ----- streaming is incremental -----------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/api/chat", {"model": MODEL, "messages": MSGS}),
    ("/api/generate", {"model": MODEL, "prompt": "hello world"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "stream": True}),
])
def test_stream_is_incremental_raw_socket(make_fake, path, body):
    delay = 0.03
    f = make_fake(token_delay=delay)
    t0 = time.monotonic()
    recvs = _raw_stream_times(f, path, body)
    t_end = recvs[-1][0]
    first_token = next(t for t, b in recvs if b"Echo" in b)
    n_tok = len(tokens_for(f.answer_for(body.get("messages") or body.get("prompt"), MODEL)))
    assert n_tok >= 8
    assert t_end - t0 >= delay * (n_tok - 1) * 0.9
    assert first_token - t0 < (t_end - t0) / 2, "first token should arrive long before the end"
    assert len(recvs) >= n_tok // 2, "tokens should arrive in separate packets"


def test_stream_is_incremental_requests(make_fake):
    requests = pytest.importorskip("requests")
    delay = 0.03
    f = make_fake(token_delay=delay)
    t0 = time.monotonic()
    times = []
    with requests.post(f.url + "/api/chat", json={"model": MODEL, "messages": MSGS},
                       stream=True, timeout=5) as r:
        for line in r.iter_lines(chunk_size=1):
            if line:
                times.append((time.monotonic() - t0, json.loads(line)))
    assert times[-1][1]["done"] is True
    assert times[0][0] < times[-1][0] / 2 and times[-1][0] >= delay * (len(times) - 2) * 0.9
    f.token_delay = 0.0
    with requests.post(f.url + "/v1/chat/completions", stream=True, timeout=5,
                       json={"model": MODEL, "messages": MSGS, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines(chunk_size=1) if ln]
    assert all(e.startswith(b"data: ") for e in events) and events[-1] == b"data: [DONE]"


def test_openai_shapes_raw(fake):
    st, raw, _ = _post(fake, "/v1/chat/completions", {"model": MODEL, "messages": MSGS})
    obj = json.loads(raw)
    assert st == 200 and obj["object"] == "chat.completion" and obj["id"].startswith("chatcmpl-")
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": fake.answer_for(MSGS, MODEL)}
    assert obj["choices"][0]["finish_reason"] == "stop"
    u = obj["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    raw = _post(fake, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "stream": True,
                                                "stream_options": {"include_usage": True}})[1]
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == fake.answer_for(MSGS, MODEL)
    models = json.loads(_get(fake, "/v1/models")[1])
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL, "qwen2.5:0.5b"]
    assert set(models["data"][0]) == {"id", "object", "created", "owned_by"}


# ----- failure injection ------------------------------------------------------------------

@pytest.mark.parametrize("mode,status,msg", [("500", 500, ERROR_500), ("503", 503, ERROR_503)])
def test_fail_status(fake, mode, status, msg):
    fake.set_fail(mode, count=2)
    for _ in range(2):
        st, raw, _ = _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS})
        assert (st, json.loads(raw)) == (status, {"error": msg})
    assert _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS, "stream": False})[0] == 200
    assert fake.fail_mode is None
    fake.set_fail(mode)  # until cleared; GETs are unaffected
    assert _get(fake, "/api/tags")[0] == 200
    st, raw, _ = _post(fake, "/v1/chat/completions", {"model": MODEL, "messages": MSGS})
    assert st == status and json.loads(raw)["error"]["message"] == msg
    assert _post(fake, "/api/generate", {"model": MODEL, "prompt": "x"})[0] == status
    fake.heal()
    assert _post(fake, "/api/generate", {"model": MODEL, "prompt": "x"})[0] == 200


def test_fail_die_midstream(fake):
    fake.set_fail("die_midstream")
    recvs = _raw_stream_times(fake, "/api/chat", {"model": MODEL, "messages": MSGS})
    raw = b"".join(b for _, b in recvs)
    assert b'"Echo"' in raw and b'"done": true' not in raw and not raw.endswith(b"0\r\n\r\n")
    # http.client sees an incomplete chunked body
    c = _conn(fake)
    c.request("POST", "/api/chat", body=json.dumps({"model": MODEL, "messages": MSGS}))
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    c.close()
    # non-stream: promised Content-Length, half delivered
    c = _conn(fake)
    c.request("POST", "/api/chat", body=json.dumps({"model": MODEL, "messages": MSGS, "stream": False}))
    r = c.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    c.close()
    raw = b"".join(b for _, b in _raw_stream_times(
        fake, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "stream": True}))
    assert b"data: {" in raw and b"[DONE]" not in raw


def test_fail_error_midstream(fake):
    fake.set_fail("error_midstream", count=1)
    st, raw, _ = _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS})
    lines = _ndjson(raw)
    assert st == 200 and lines[0]["message"]["content"] == "Echo" and "error" in lines[-1]


def test_fail_hang_until_heal_and_stop(fake):
    fake.set_fail("hang")
    c = _conn(fake, timeout=0.3)
    c.request("POST", "/api/chat", body=json.dumps({"model": MODEL, "messages": MSGS}))
    with pytest.raises(socket.timeout):
        c.getresponse()
    c.close()
    assert fake.wait_until(lambda: fake.in_flight == 1, 2)
    assert _get(fake, "/api/tags")[0] == 200  # only generation requests hang
    fake.heal()
    assert fake.wait_until(lambda: fake.in_flight == 0, 2)
    assert _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS, "stream": False})[0] == 200
    # stop() releases hanging requests too, and the client sees the connection close
    fake.set_fail("hang")
    result: Dict[str, Any] = {}

    def worker() -> None:
        try:
            result["r"] = _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS}, timeout=5)
        except Exception as exc:  # noqa: BLE001
            result["e"] = exc

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    assert fake.wait_until(lambda: fake.in_flight == 1, 2)
    t0 = time.monotonic()
    fake.stop()
    t.join(3)
    assert not t.is_alive() and "e" in result and time.monotonic() - t0 < 2
    assert fake.wait_until(lambda: fake.in_flight == 0, 2)


def test_fail_refuse_and_heal_same_port(fake):
    port = fake.port
    # a keep-alive connection opened before "refuse" is closed too
    c = _conn(fake)
    c.request("GET", "/api/tags")
    assert c.getresponse().read()
    fake.set_fail("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        c.request("GET", "/api/tags")
        c.getresponse().read()
    c.close()
    with pytest.raises(ValueError):
        fake.set_fail("refuse", count=1)
    fake.heal()
    assert fake.port == port
    assert _get(fake, "/")[1] == "Ollama is running"
    # switching from refuse to another mode reopens the port as well
    fake.set_fail("refuse")
    fake.set_fail("503")
    assert _post(fake, "/api/chat", {"model": MODEL, "messages": MSGS})[0] == 503


def test_refuse_lets_in_flight_stream_finish(make_fake):
    f = make_fake(token_delay=0.03)
    out: Dict[str, Any] = {}

    def worker() -> None:
        out["r"] = _post(f, "/api/chat", {"model": MODEL, "messages": MSGS})

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    assert f.wait_until(lambda: f.in_flight == 1, 2)
    f.set_fail("refuse")
    t.join(5)
    assert _ndjson(out["r"][1])[-1]["done"] is True


def test_in_flight_and_client_abort(make_fake):
    f = make_fake(token_delay=0.02)
    results: List[int] = []

    def worker() -> None:
        results.append(_post(f, "/api/chat", {"model": MODEL, "messages": MSGS, "stream": False})[0])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    assert f.wait_until(lambda: f.in_flight == 3, 3)
    for t in threads:
        t.join(5)
    assert results == [200, 200, 200] and f.max_in_flight == 3
    assert f.wait_until(lambda: f.in_flight == 0, 2)
    # a client that goes away mid-stream is noticed
    _start_raw_chat(f).close()
    assert f.wait_until(lambda: f.aborted == 1 and f.in_flight == 0, 3)


def test_stop_ends_stream_promptly(make_fake):
    f = make_fake(token_delay=1.0)
    s = _start_raw_chat(f)
    t0 = time.monotonic()
    f.stop()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and s.recv(65536):
        pass
    s.close()
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", f.port), timeout=2).close()


def test_cli_foreground(tmp_path):
    with socket.socket() as probe:  # pick a free port for the CLI
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_ollama.py")
    p = subprocess.Popen([sys.executable, script, "--port", str(port), "--models", "a:1b,b",
                          "--token-delay", "0", "--max-seconds", "20"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "http://127.0.0.1:%d" % port in line
        f = FakeOllama(port=port)  # only used for its url/port in the helpers
        names = [m["name"] for m in json.loads(_get(f, "/api/tags")[1])["models"]]
        assert names == ["a:1b", "b"]
        assert json.loads(_post(f, "/api/generate", {"model": "b", "prompt": "q", "stream": False})[1])[
            "response"].startswith("Echo from b: q")
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    assert p.returncode == 0


# ----- the official clients ---------------------------------------------------------------

def test_ollama_client(make_fake):
    ollama = pytest.importorskip("ollama")
    f = make_fake(models=(MODEL, "qwen2.5:0.5b"), token_delay=0.01)
    client = ollama.Client(host=f.url, timeout=5)
    listed = client.list()
    assert [m.model for m in listed.models] == [MODEL, "qwen2.5:0.5b"]
    assert listed.models[0].details.family == "llama" and listed.models[0].modified_at is not None
    t0 = time.monotonic()
    parts = []
    for chunk in client.chat(model=MODEL, messages=MSGS, stream=True):
        parts.append((time.monotonic() - t0, chunk))
    assert len(parts) > 5 and parts[0][0] < parts[-1][0] - 0.05  # arrived over time
    f.token_delay = 0.0
    assert "".join(c.message.content for _, c in parts) == f.answer_for(MSGS, MODEL)
    last = parts[-1][1]
    assert last.done and last.done_reason == "stop" and last.eval_count == len(parts) - 1
    resp = client.chat(model=MODEL, messages=MSGS, stream=False)
    assert resp.message.content == f.answer_for(MSGS, MODEL)
    gen = client.generate(model=MODEL, prompt="why?")
    assert gen.response == f.answer_for("why?", MODEL)
    assert [m.model for m in client.ps().models] == [MODEL]
    body = f.requests_to("/api/chat")[0]
    assert body["stream"] is True and body["messages"] == MSGS
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="missing:1b", messages=MSGS)
    assert ei.value.status_code == 404 and "not found" in ei.value.error
    f.set_fail("503", count=1)
    with pytest.raises(ollama.ResponseError) as ei:
        list(client.chat(model=MODEL, messages=MSGS, stream=True))
    assert ei.value.status_code == 503
    f.set_fail("error_midstream", count=1)
    with pytest.raises(ollama.ResponseError):
        list(client.chat(model=MODEL, messages=MSGS, stream=True))
    f.set_fail("die_midstream", count=1)
    got = []
    with pytest.raises(Exception):
        for c in client.chat(model=MODEL, messages=MSGS, stream=True):
            got.append(c)
    assert got and got[0].message.content == "Echo"
    f.set_fail("refuse")
    with pytest.raises(ConnectionError):  # ollama turns httpx.ConnectError into ConnectionError
        client.list()
    f.heal()
    assert len(client.list().models) == 2


def test_openai_client(make_fake):
    openai = pytest.importorskip("openai")
    f = make_fake(models=(MODEL,))
    client = openai.OpenAI(base_url=f.url + "/v1", api_key="x", max_retries=0, timeout=5)
    assert [m.id for m in client.models.list()] == [MODEL]
    resp = client.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.choices[0].message.content == f.answer_for(MSGS, MODEL)
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens > 3
    f.token_delay = 0.01
    t0 = time.monotonic()
    parts = [(time.monotonic() - t0, c) for c in
             client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)]
    f.token_delay = 0.0
    text = "".join(c.choices[0].delta.content or "" for _, c in parts if c.choices)
    assert text == f.answer_for(MSGS, MODEL)
    assert parts[0][0] < parts[-1][0] - 0.05
    assert parts[-1][1].choices[0].finish_reason == "stop"
    assert f.request_headers[-1].get("authorization") == "Bearer x"
    assert f.requests_to("/v1/chat/completions")[-1]["stream"] is True
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MSGS)
    f.set_fail("500", count=1)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=MSGS)
    f.set_fail("error_midstream", count=1)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, messages=MSGS, stream=True))
    f.set_fail("refuse")
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=MSGS)
    f.heal()
    assert client.chat.completions.create(model=MODEL, messages=MSGS).choices[0].message.content
