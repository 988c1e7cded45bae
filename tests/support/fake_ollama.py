"""A fake Ollama server for tests: a real HTTP server on 127.0.0.1, standard library only.

It answers the Ollama API (``/api/*``) and the OpenAI-compatible API (``/v1/*``)
deterministically (with ``think``, a thinking model thinks aloud first; with ``images``, the
answer says which images it saw; ``/api/create``, ``/api/copy``, ``/api/delete``, ``/api/push``
and ``/api/blobs/<digest>`` change its model list and blob store), streams really incrementally (HTTP/1.1 chunked, one write per
token, Nagle off), and can inject failures::

    with FakeOllama(models=("llama3.2:1b",), token_delay=0.01) as fake:
        ...  # talk to fake.url
        fake.set_fail("503", count=1)   # the next generation request gets a 503
        fake.set_fail("refuse")         # connects are refused until fake.heal()

A chat whose last message is the assistant's is continued from there, as Ollama does with
a prefill: the answer is the rest of the deterministic reply after that text.

Runs on Python 3.9+.  CLI (foreground, for browser tests and manual checks)::

    python tests/support/fake_ollama.py --port 11434 --models a,b --token-delay 0.05
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

__all__ = ["FakeOllama", "tokens_for", "FAIL_MODES", "ERROR_500", "ERROR_503", "VERSION"]

HOST = "127.0.0.1"  # never anything else
VERSION = "0.6.5"
FAIL_MODES = (None, "refuse", "500", "503", "die_midstream", "error_midstream", "hang")
ERROR_500 = "llama runner process has terminated: exit status 2"
ERROR_503 = "server busy, please try again.  maximum pending requests exceeded"
ERROR_MIDSTREAM = "an error was encountered while running the model: unexpected EOF"
MAX_HANG_SECONDS = 600.0  # a hanging request is released by stop()/heal(), or after this
MAX_BODY_BYTES = 64 * 1024 * 1024
_MODIFIED_AT = "2025-01-01T12:00:00.123456789Z"  # nanoseconds + "Z", like the real server
_GEN_PATHS = ("/api/chat", "/api/generate", "/v1/chat/completions")
_EMBED_PATHS = ("/api/embed", "/api/embeddings", "/v1/embeddings")
_MANAGE_PATHS = ("/api/create", "/api/copy", "/api/delete", "/api/push")
EMBED_DIMENSIONS = 8


def embedding_for(text: str) -> List[float]:
    """A deterministic unit-free vector for ``text`` (the same text, the same vector)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round((b - 128) / 128.0, 6) for b in digest[:EMBED_DIMENSIONS]]


def tokens_for(text: str) -> List[str]:
    """Split ``text`` into tokens, each keeping its leading whitespace: ``"".join(...) == text``."""
    toks = re.findall(r"\s*\S+", text)
    rest = text[len("".join(toks)):]
    if rest:
        if toks:
            toks[-1] += rest
        else:
            toks = [rest]
    return toks


def _rfc3339_now(offset_s: float = 0.0) -> str:
    ns = time.time_ns() + int(offset_s * 1e9)
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%09dZ" % frac


def _normalize_model(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _text_of(content: Any) -> str:
    """Message content as text: a string, or OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


VISION_MARKS = ("llava", "vision", "-vl", "vl:", "gemma3")
THINKING_MARKS = ("qwen3", "deepseek-r1", "think", "gpt-oss")


def capabilities_of(name: str) -> List[str]:
    """What Ollama's ``/api/show`` says a model can do, guessed from its name as the fake serves it."""
    if "embed" in name:
        return ["embedding"]
    found = ["completion", "tools"]
    found += ["vision"] if any(mark in name for mark in VISION_MARKS) else []
    return found + (["thinking"] if any(mark in name for mark in THINKING_MARKS) else [])


def thinking_for(text: str) -> str:
    """What a thinking model of the fake thinks before it answers ``text``."""
    return "Let me think about %r step by step." % text


def image_note(images: Any) -> str:
    """What the fake's answer adds about the images it was given: how many, and each one's digest."""
    if not isinstance(images, list) or not images:
        return ""
    return " [saw %d image(s): %s]" % (len(images), ", ".join(
        hashlib.sha256(str(image).encode("ascii", "replace")).hexdigest()[:12] for image in images))


def _tag_entry(name: str) -> Dict[str, Any]:
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    base, _, tag = name.partition(":")
    fam_m = re.match(r"[A-Za-z]+", base.rsplit("/", 1)[-1])
    family = fam_m.group(0).lower() if fam_m else "llama"
    size_m = re.fullmatch(r"(\d+(?:\.\d+)?)([bBmM])", tag or "")
    param_size = (size_m.group(1) + size_m.group(2).upper()) if size_m else "1.2B"
    return {
        "name": name,
        "model": name,
        "modified_at": _MODIFIED_AT,
        "size": 1_000_000_000 + int(digest[:6], 16),
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": param_size,
            "quantization_level": "Q8_0",
        },
    }


class _ClientGone(Exception):
    """The client closed the connection while we were writing."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, port: int, fake: "FakeOllama") -> None:
        self.fake = fake
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can
        # stall for seconds on a machine without network: skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.fake.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOllama/" + VERSION
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections are dropped after this

    server: _Server

    def version_string(self) -> str:
        return self.server_version

    # ----- connection bookkeeping -------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.busy = False
        self._chunked = False
        self.fake = self.server.fake
        self.fake._register_conn(self)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.fake._unregister_conn(self)

    def log_message(self, format: str, *args: Any) -> None:
        if self.fake.verbose:
            sys.stderr.write("fake-ollama %s - %s\n" % (self.address_string(), format % args))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # ----- low-level writing ------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError,
                socket.timeout, ValueError, OSError) as exc:
            self.close_connection = True
            raise _ClientGone() from exc

    def _send_head(self, status: int, ctype: str, length: Optional[int]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self._chunked = False
        if length is None:
            if self.request_version == "HTTP/1.0":  # close-delimited body
                self.close_connection = True
            else:
                self._chunked = True
                self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        if self.close_connection or self.fake._refusing:
            self.send_header("Connection", "close")
            self.close_connection = True
        try:
            self.end_headers()
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone() from exc

    def _send_bytes(self, status: int, body: bytes, ctype: str) -> None:
        self._send_head(status, ctype, len(body))
        if self.command != "HEAD":
            self._write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send_bytes(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8")

    def _send_text(self, status: int, text: str) -> None:
        self._send_bytes(status, text.encode("utf-8"), "text/plain; charset=utf-8")

    def _chunk(self, data: bytes) -> None:
        """Send one piece of a streamed body at once (chunked, or raw for HTTP/1.0)."""
        if data:
            self._write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _end_chunks(self) -> None:
        if self._chunked:
            self._write(b"0\r\n\r\n")

    def _send_error(self, status: int, message: str, openai: bool) -> None:
        if openai:
            etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            self._send_json(status, {"error": {"message": message, "type": etype,
                                               "param": None, "code": None}})
        else:
            self._send_json(status, {"error": message})

    def _abort_connection(self) -> None:
        """Close the TCP connection right now, without finishing the response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            total = 0
            for _ in range(1_000_000):
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(1000):  # trailers up to the blank line
                        if self.rfile.readline(65536) in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise ValueError("body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    # ----- routing ----------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        fake = self.fake
        self.busy = True
        try:
            if fake._refusing:  # raced with set_fail("refuse"): behave like a dead server
                self._abort_connection()
                return
            path = urlsplit(self.path).path
            if len(path) > 1:
                path = path.rstrip("/")
            body: Any = None
            bad_json: Optional[str] = None
            if path.startswith("/api/blobs/"):
                return self._blob(method, path[len("/api/blobs/"):])
            self.raw = b""
            if method in ("POST", "DELETE"):
                try:
                    raw = self.raw = self._read_body()
                except (ValueError, OSError):
                    self.close_connection = True
                    self._send_error(400, "invalid request body", path.startswith("/v1/"))
                    return
                if raw.strip() and not path.startswith("/api/blobs/"):
                    try:
                        body = json.loads(raw.decode("utf-8"))
                    except (ValueError, UnicodeDecodeError) as exc:
                        bad_json = str(exc)
                elif path in _GEN_PATHS or path == "/api/show":
                    bad_json = "EOF"
            fake._record(path, body, {k.lower(): v for k, v in self.headers.items()})
            self._route(method, path, body, bad_json)
        except _ClientGone:
            self.close_connection = True
        finally:
            self.busy = False
            if fake._refusing or fake._stopping.is_set():
                self.close_connection = True

    def _route(self, method: str, path: str, body: Any, bad_json: Optional[str]) -> None:
        fake = self.fake
        get = method in ("GET", "HEAD")
        if method == "OPTIONS":
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "*")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/" and get:
            return self._send_text(200, "Ollama is running")
        if path == "/api/version" and get:
            return self._send_json(200, {"version": VERSION})
        if path == "/api/tags" and get:
            return self._send_json(200, {"models": fake.tags})
        if path == "/api/ps" and get:
            return self._send_json(200, {"models": fake._ps_entries()})
        if path == "/v1/models" and get:
            return self._send_json(200, {"object": "list",
                                         "data": [fake._openai_model(t) for t in fake.tags]})
        if path.startswith("/v1/models/") and get:
            name = path[len("/v1/models/"):]
            entry = fake._find_model(name)
            if entry is None:
                return self._send_error(404, 'model "%s" not found' % name, True)
            return self._send_json(200, fake._openai_model(entry))
        if path == "/api/show" and method == "POST":
            return self._show(body, bad_json)
        if path == "/api/create" and method == "POST" and isinstance(body, dict) and body.get("files"):
            return self._create(body)  # a model from uploaded blobs (a pull from the room)
        if path in _MANAGE_PATHS:
            return self._manage(method, path, body)
        if path in _EMBED_PATHS and method == "POST":
            return self._embed(path, body, bad_json)
        if path in _GEN_PATHS:
            if method != "POST":
                return self._send_text(405, "405 method not allowed")
            return self._generation(path, body, bad_json)
        if path.startswith("/api/") or path.startswith("/v1/"):
            return self._send_text(404, "404 page not found")
        return self._send_text(404, "404 page not found")

    def _blob(self, method: str, digest: str) -> None:
        """``HEAD /api/blobs/sha256:<hex>`` (200 if held), ``POST`` (the body, kept only if its sha256 is the name)."""
        fake = self.fake
        hex_digest = digest[7:] if digest.startswith("sha256:") else ""
        if not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
            return self._send_error(400, "invalid digest format", False)
        if method == "HEAD":
            return self._send_bytes(200 if hex_digest in fake.blobs else 404, b"", "text/plain")
        if method != "POST":
            return self._send_text(405, "405 method not allowed")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_body()
            length, whole, left = len(body), hashlib.sha256(body), 0
        else:
            length = int(self.headers.get("Content-Length") or 0)
            whole, left = hashlib.sha256(), length
        while left > 0:
            piece = self.rfile.read(min(left, 1 << 20))
            if not piece:
                break
            whole.update(piece)
            left -= len(piece)
        fake._record("/api/blobs", {"digest": digest, "size": length}, {})
        if left or whole.hexdigest() != hex_digest:
            self.close_connection = True
            return self._send_error(400, "digest mismatch, expected %s, got sha256:%s" % (digest, whole.hexdigest()),
                                    False)
        with fake._lock:
            fake.blobs[hex_digest] = length
        self._send_bytes(201, b"", "text/plain")

    def _create(self, body: Any) -> None:
        """``POST /api/create`` from uploaded blobs: recorded in ``created``, then listed in /api/tags."""
        fake = self.fake
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._send_error(400, "model is required", False)
        files = body.get("files") or {}
        missing = [d for d in files.values() if not isinstance(d, str) or d[7:] not in fake.blobs]
        if not files or missing:
            return self._send_error(400, "missing blobs: %s" % missing, False)
        with fake._lock:
            fake.created.append(body)
            name = _normalize_model(body["model"])
            if fake._find_model(name) is None:
                fake.models.append(name)
                fake.tags.append(dict(_tag_entry(name), size=sum(fake.blobs[d[7:]] for d in files.values())))
        if body.get("stream") is False:
            return self._send_json(200, {"status": "success"})
        self._send_head(200, "application/x-ndjson", None)
        for status in ("using existing layer %s" % d for d in files.values()):
            self._chunk((json.dumps({"status": status}) + "\n").encode())
        self._chunk(b'{"status":"success"}\n')
        self._end_chunks()

    def _show(self, body: Any, bad_json: Optional[str]) -> None:
        if bad_json is not None or not isinstance(body, dict):
            return self._send_error(400, "invalid request body: %s" % (bad_json or "not an object"), False)
        name = str(body.get("model") or body.get("name") or "")
        entry = self.fake._find_model(name)
        if entry is None:
            return self._send_error(404, 'model "%s" not found' % name, False)
        self._send_json(200, {
            "modelfile": "FROM %s\n" % entry["model"],
            "parameters": "stop \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": entry.get("details", {}),
            "model_info": {"general.architecture": entry.get("details", {}).get("family", "llama"),
                           "llama.context_length": 131072},
            "capabilities": capabilities_of(entry["model"]),
            "modified_at": entry.get("modified_at", _MODIFIED_AT),
        })

    def _manage(self, method: str, path: str, body: Any) -> None:
        """Model management on this Ollama: create (from a model), copy, delete, push."""
        fake = self.fake
        body = body if isinstance(body, dict) else {}
        wanted = {"/api/create": "POST", "/api/copy": "POST", "/api/delete": "DELETE", "/api/push": "POST"}[path]
        if method != wanted:
            return self._send_text(405, "405 method not allowed")
        name = str(body.get("model") or body.get("source") or "")
        if path == "/api/create":
            if body.get("from") and fake._find_model(str(body["from"])) is None:
                return self._send_error(404, 'model "%s" not found' % body["from"], False)
            fake.add_model(name)
        elif fake._find_model(name) is None:
            return self._send_error(404, 'model "%s" not found' % name, False)
        elif path == "/api/copy":
            fake.add_model(str(body.get("destination") or ""))
        elif path == "/api/delete":
            fake.remove_model(name)
        if path in ("/api/copy", "/api/delete"):
            return self._send_bytes(200, b"", "text/plain")
        statuses = ([{"status": "reading model metadata"}] if path == "/api/create" else
                    [{"status": "retrieving manifest"}]) + [{"status": "success"}]
        if body.get("stream", True) is False:
            return self._send_json(200, statuses[-1])
        self._send_head(200, "application/x-ndjson", None)
        for status in statuses:
            self._chunk(json.dumps(status).encode("utf-8") + b"\n")
        self._end_chunks()

    def _embed(self, path: str, body: Any, bad_json: Optional[str]) -> None:
        """``/api/embed`` ({input} -> {embeddings}), the old ``/api/embeddings`` ({prompt} -> {embedding}),
        and ``/v1/embeddings`` (OpenAI's list of {embedding, index})."""
        openai = path.startswith("/v1/")
        if bad_json is not None or not isinstance(body, dict):
            return self._send_error(400, "invalid request body: %s" % (bad_json or "not an object"), openai)
        name = str(body.get("model") or "")
        if self.fake._find_model(name) is None:
            return self._send_error(404, 'model "%s" not found, try pulling it first' % name, openai)
        if path == "/api/embeddings":
            return self._send_json(200, {"embedding": embedding_for(str(body.get("prompt") or ""))})
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self._send_error(400, "invalid input type", openai)
        count = sum(len(tokens_for(t)) for t in texts)
        if openai:
            return self._send_json(200, {"object": "list", "model": name, "data": [
                {"object": "embedding", "index": i, "embedding": embedding_for(t)} for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": count, "total_tokens": count}})
        self._send_json(200, {"model": name, "embeddings": [embedding_for(t) for t in texts],
                              "total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": count})

    # ----- generation -------------------------------------------------------------
    def _generation(self, path: str, body: Any, bad_json: Optional[str]) -> None:
        fake = self.fake
        openai = path.startswith("/v1/")
        fake._enter()
        try:
            if bad_json is not None or not isinstance(body, dict):
                return self._send_error(400, "invalid request: %s" % (bad_json or "body must be an object"), openai)
            model = body.get("model")
            if not model or not isinstance(model, str):
                return self._send_error(400, "model is required", openai)
            mode = fake._take_fail()
            if mode == "refuse":
                return self._abort_connection()
            if mode == "hang":
                fake._hang_wait()
                return self._abort_connection()
            if mode == "500":
                return self._send_error(500, ERROR_500, openai)
            if mode == "503":
                return self._send_error(503, ERROR_503, openai)
            if fake._find_model(model) is None:
                return self._send_error(404, 'model "%s" not found, try pulling it first' % model, openai)

            if path == "/api/chat":
                messages = body.get("messages") or []
                subject: Union[str, list] = messages
                stream = body.get("stream", True) is not False
                limit = (body.get("options") or {}).get("num_predict")
                empty = not messages
            elif path == "/api/generate":
                prompt = body.get("prompt") or ""
                subject = prompt
                messages = [{"role": "user", "content": prompt}]
                if body.get("system"):
                    messages.insert(0, {"role": "system", "content": body["system"]})
                stream = body.get("stream", True) is not False
                limit = (body.get("options") or {}).get("num_predict")
                empty = not prompt
            else:
                messages = body.get("messages") or []
                subject = messages
                stream = bool(body.get("stream", False))
                limit = body.get("max_completion_tokens", body.get("max_tokens"))
                empty = False
            fake._mark_loaded(model)

            if empty:  # Ollama: an empty chat/prompt just loads the model
                toks: List[str] = []
                reason = "load"
            else:
                toks = tokens_for(fake.rest_after_prefill(messages, fake.answer_for(subject, model)))
                reason = "stop"
                if isinstance(limit, int) and 0 <= limit < len(toks):
                    toks = toks[:limit]
                    reason = "length"
            prompt_tokens = sum(len(tokens_for(_text_of(m.get("content"))))
                                for m in messages if isinstance(m, dict)) + 1
            think = body.get("think")
            if think is None and path != "/v1/chat/completions":  # as Ollama: a thinking model thinks unless told not to
                think = "thinking" in capabilities_of(model)
            if think and "thinking" not in capabilities_of(model):
                return self._send_error(400, '"%s" does not support thinking' % model, openai)
            if not empty:
                images = body.get("images") if path == "/api/generate" else next(
                    (m.get("images") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    None)
                if image_note(images):
                    toks = tokens_for(fake.answer_for(subject, model) + image_note(images))
            ctx = _GenContext(fake, path, model, toks, reason, prompt_tokens, mode, body)
            if not empty:
                ctx.shape_answer(fake.answer_for(subject, model))
                if think and path != "/v1/chat/completions":
                    ctx.thinking = tokens_for(thinking_for(fake.answer_for(subject, model)))
            if openai:
                if stream:
                    self._openai_stream(ctx)
                else:
                    self._openai_full(ctx)
            elif stream:
                self._ollama_stream(ctx)
            else:
                self._ollama_full(ctx)
        finally:
            fake._leave()

    def _ollama_stream(self, ctx: "_GenContext") -> None:
        key = "message" if ctx.path == "/api/chat" else "response"
        self._send_head(200, "application/x-ndjson", None)
        for tok in ctx.thinking:  # a thinking model thinks aloud first, in chunks of their own
            obj = ctx.ollama_base()
            obj.update({"message": {"role": "assistant", "content": "", "thinking": tok}} if key == "message"
                       else {"response": "", "thinking": tok})
            obj["done"] = False
            self._chunk_or_count(json.dumps(obj).encode("utf-8") + b"\n")
        n_ok = len(ctx.toks)
        if ctx.mode in ("die_midstream", "error_midstream"):
            n_ok = min(2, max(len(ctx.toks) - 1, 0))
        if self.fake.first_token_delay and self.fake._stopping.wait(self.fake.first_token_delay):
            return self._abort_connection()  # the prompt's evaluation, before the first word
        for i, tok in enumerate(ctx.toks[:n_ok]):
            if i and ctx.wait_token():
                return self._abort_connection()
            obj = ctx.ollama_base()
            obj[key] = {"role": "assistant", "content": tok} if key == "message" else tok
            obj["done"] = False
            self._chunk_or_count(json.dumps(obj).encode("utf-8") + b"\n")
        if ctx.tool_calls:  # Ollama streams tool calls in a chunk of their own, content empty
            obj = ctx.ollama_base()
            obj["message"] = {"role": "assistant", "content": "", "tool_calls": ctx.tool_calls}
            obj["done"] = False
            self._chunk_or_count(json.dumps(obj).encode("utf-8") + b"\n")
        if ctx.mode == "die_midstream":
            ctx.wait_token()
            return self._abort_connection()
        if ctx.mode == "error_midstream":
            self._chunk(json.dumps({"error": ERROR_MIDSTREAM}).encode("utf-8") + b"\n")
            return self._end_chunks()
        if ctx.toks and ctx.wait_token():
            return self._abort_connection()
        self._chunk_or_count(json.dumps(ctx.ollama_final(key, "")).encode("utf-8") + b"\n")
        self._end_chunks()

    def _ollama_full(self, ctx: "_GenContext") -> None:
        key = "message" if ctx.path == "/api/chat" else "response"
        if ctx.wait_all():
            return self._abort_connection()
        text = "".join(ctx.toks)
        if ctx.mode == "error_midstream":
            return self._send_error(500, ERROR_MIDSTREAM, False)
        obj = ctx.ollama_final(key, text)
        if ctx.thinking:
            if key == "message":
                obj["message"]["thinking"] = "".join(ctx.thinking)
            else:
                obj["thinking"] = "".join(ctx.thinking)
        if key == "message" and ctx.tool_calls:  # not streamed: the calls come with the answer
            obj["message"]["tool_calls"] = ctx.tool_calls
        body = json.dumps(obj).encode("utf-8")
        self._send_partial_or_full(ctx, body, "application/json; charset=utf-8")

    def _openai_stream(self, ctx: "_GenContext") -> None:
        self._send_head(200, "text/event-stream", None)
        n_ok = len(ctx.toks)
        if ctx.mode in ("die_midstream", "error_midstream"):
            n_ok = min(2, max(len(ctx.toks) - 1, 0))
        for i, tok in enumerate(ctx.toks[:n_ok]):
            if i and ctx.wait_token():
                return self._abort_connection()
            self._sse(ctx.openai_chunk({"role": "assistant", "content": tok}, None))
        if ctx.mode == "die_midstream":
            return self._abort_connection()
        if ctx.mode == "error_midstream":
            self._sse({"error": {"message": ERROR_MIDSTREAM, "type": "api_error",
                                 "param": None, "code": None}})
            return self._end_chunks()
        if ctx.toks and ctx.wait_token():
            return self._abort_connection()
        self._sse(ctx.openai_chunk({"role": "assistant", "content": ""}, ctx.finish_reason()))
        opts = ctx.body.get("stream_options") or {}
        if isinstance(opts, dict) and opts.get("include_usage"):
            chunk = ctx.openai_chunk(None, None)
            chunk["choices"] = []
            chunk["usage"] = ctx.usage()
            self._sse(chunk)
        self._chunk_or_count(b"data: [DONE]\n\n")
        self._end_chunks()

    def _openai_full(self, ctx: "_GenContext") -> None:
        if ctx.wait_all():
            return self._abort_connection()
        if ctx.mode == "error_midstream":
            return self._send_error(500, ERROR_MIDSTREAM, True)
        obj = {
            "id": ctx.completion_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": "".join(ctx.toks)},
                         "finish_reason": ctx.finish_reason()}],
            "usage": ctx.usage(),
        }
        if ctx.tool_calls:
            obj["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_%d" % i, "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
                for i, c in enumerate(ctx.tool_calls)]}
            obj["choices"][0]["finish_reason"] = "tool_calls"
        self._send_partial_or_full(ctx, json.dumps(obj).encode("utf-8"), "application/json")

    def _send_partial_or_full(self, ctx: "_GenContext", body: bytes, ctype: str) -> None:
        if ctx.mode == "die_midstream":  # promise the whole body, send half, hang up
            self._send_head(200, ctype, len(body))
            self._write(body[: len(body) // 2])
            return self._abort_connection()
        self._send_bytes(200, body, ctype)

    def _sse(self, obj: Any) -> None:
        self._chunk_or_count(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")

    def _chunk_or_count(self, data: bytes) -> None:
        try:
            self._chunk(data)
        except _ClientGone:
            self.fake._count_abort()
            raise


def _format_of(response_format: Any) -> Any:
    """OpenAI's ``response_format`` as Ollama's ``format`` ("json", a schema, or None)."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or "json"
    return "json" if response_format.get("type") == "json_object" else None


class _GenContext:
    """Everything one generation answer needs."""

    def __init__(self, fake: "FakeOllama", path: str, model: str, toks: List[str], reason: str,
                 prompt_tokens: int, mode: Optional[str], body: Dict[str, Any]) -> None:
        self.fake = fake
        self.path = path
        self.model = model
        self.toks = toks
        self.reason = reason
        self.prompt_tokens = prompt_tokens
        self.mode = mode
        self.body = body
        self.created = int(time.time())
        self.completion_id = "chatcmpl-%d" % fake._next_id()
        self.delay = float(fake.token_delay)
        self.tool_calls: List[Dict[str, Any]] = []
        self.thinking: List[str] = []

    def shape_answer(self, text: str) -> None:
        """As a model does: with ``tools`` and a user question last, call the first tool (arguments
        from its schema's properties); with ``format`` (\"json\" or a schema), answer JSON."""
        tools = self.body.get("tools")
        messages = self.body.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if isinstance(tools, list) and tools and last.get("role") == "user":
            function = (tools[0] or {}).get("function") or {}
            props = ((function.get("parameters") or {}).get("properties") or {})
            self.tool_calls = [{"function": {"name": function.get("name", ""),
                                             "arguments": {k: "value of %s" % k for k in props}}}]
            self.toks = []
        elif self.body.get("format") or _format_of(self.body.get("response_format")):
            fmt = self.body.get("format") or _format_of(self.body.get("response_format"))
            props = fmt.get("properties") if isinstance(fmt, dict) else None
            answer = {k: text for k in props} if isinstance(props, dict) and props else {"answer": text}
            self.toks = tokens_for(json.dumps(answer))

    def wait_token(self) -> bool:
        """Sleep one token delay; True if the server is stopping."""
        if self.delay > 0:
            return self.fake._stopping.wait(self.delay)
        return self.fake._stopping.is_set()

    def wait_all(self) -> bool:
        if self.delay > 0 and self.toks:
            return self.fake._stopping.wait(self.delay * len(self.toks))
        return self.fake._stopping.is_set()

    def finish_reason(self) -> str:
        return "length" if self.reason == "length" else "stop"

    def ollama_base(self) -> Dict[str, Any]:
        return {"model": self.model, "created_at": _rfc3339_now()}

    def ollama_final(self, key: str, text: str) -> Dict[str, Any]:
        per_tok_ns = int(self.delay * 1e9) if self.delay > 0 else 10_000_000
        eval_count = len(self.toks)
        eval_ns = max(eval_count * per_tok_ns, 1)
        prompt_ns = self.prompt_tokens * 1_000_000
        load_ns = 1_000_000
        obj = self.ollama_base()
        obj[key] = {"role": "assistant", "content": text} if key == "message" else text
        obj["done"] = True
        obj["done_reason"] = self.reason
        if key == "response" and self.reason != "load" and not self.body.get("raw"):
            obj["context"] = list(range(1, self.prompt_tokens + eval_count + 1))
        if self.reason == "load":
            obj["total_duration"] = load_ns
            obj["load_duration"] = load_ns
            return obj
        obj.update({
            "total_duration": load_ns + prompt_ns + eval_ns,
            "load_duration": load_ns,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt_ns,
            "eval_count": eval_count,
            "eval_duration": eval_ns,
        })
        return obj

    def openai_chunk(self, delta: Optional[Dict[str, Any]], finish: Optional[str]) -> Dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        }

    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.toks),
                "total_tokens": self.prompt_tokens + len(self.toks)}


class FakeOllama:
    """A real HTTP server on 127.0.0.1 that answers like Ollama, deterministically.

    Attributes you may read or set at any time:
      url, port, models, tags (list of /api/tags entries; set it to customize),
      token_delay (seconds between streamed tokens; also paces non-stream answers),
      first_token_delay (seconds before the first token of a streamed /api/chat or /api/generate; 0),
      requests (list of (path, parsed JSON body or None)),
      request_headers (parallel list of dicts, header names lower-cased),
      in_flight / max_in_flight (chat, generate, /v1/chat/completions being answered),
      aborted (streams whose client went away mid-answer), fail_mode / fail_count.
    """

    def __init__(self, models: Sequence[str] = ("llama3.2:1b",), token_delay: float = 0.0,
                 port: int = 0, verbose: bool = False) -> None:
        if isinstance(models, str):
            models = [m for m in models.split(",") if m]
        self.models: List[str] = list(models)
        self.tags: List[Dict[str, Any]] = [_tag_entry(m) for m in self.models]
        self.token_delay = float(token_delay)
        self.first_token_delay = 0.0
        self.port = int(port)
        self.verbose = verbose
        self.requests: List[Tuple[str, Any]] = []
        self.request_headers: List[Dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.aborted = 0
        self.fail_mode: Optional[str] = None
        self.fail_count: Optional[int] = None
        self._lock = threading.RLock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._conns: set = set()
        self._stopping = threading.Event()
        self._release = threading.Event()
        self._refusing = False
        self._ids = 0
        self._loaded: Dict[str, float] = {}
        self.blobs: Dict[str, int] = {}  # hex digest -> size, of the blobs posted to /api/blobs
        self.created: List[Dict[str, Any]] = []  # the bodies of /api/create

    # ----- lifecycle -------------------------------------------------------------
    @property
    def url(self) -> str:
        return "http://%s:%d" % (HOST, self.port)

    def start(self) -> "FakeOllama":
        with self._lock:
            if self._server is not None:
                return self
            self._stopping.clear()
            self._release = threading.Event()
            if self.fail_mode == "refuse":
                self.fail_mode = self.fail_count = None
            self._open_listener()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            self._release.set()
            self._close_listener()
            conns = list(self._conns)
        for h in conns:
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeOllama":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _open_listener(self) -> None:
        deadline = time.monotonic() + 3.0
        for _ in range(100):
            try:
                server = _Server(self.port, self)
                break
            except OSError:
                if self.port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        else:  # pragma: no cover
            raise OSError("could not bind %s:%d" % (HOST, self.port))
        self.port = server.server_address[1]
        self._server = server
        self._refusing = False
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-ollama-%d" % self.port, daemon=True)
        self._thread.start()

    def _close_listener(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # waits for serve_forever to return (poll interval 0.02 s)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    # ----- failure injection ------------------------------------------------------
    def set_fail(self, mode: Optional[str], count: Optional[int] = None) -> None:
        """Fail chat/generate/completions requests: until cleared (count=None) or the next N.

        "refuse" closes the listening socket (connects are refused, idle keep-alive
        connections are closed) until heal(); it takes no count.
        """
        if mode not in FAIL_MODES:
            raise ValueError("unknown fail mode %r; one of %r" % (mode, FAIL_MODES))
        if mode == "refuse" and count is not None:
            raise ValueError('"refuse" cannot count requests it never sees; call heal() instead')
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        if mode is None:
            self.heal()
            return
        with self._lock:
            if self.fail_mode == "hang" and mode != "hang":
                self._release_hangers()
            if self._refusing and mode != "refuse" and not self._stopping.is_set():
                self._open_listener()  # same port
            self.fail_mode = mode
            self.fail_count = count
            idle = []
            if mode == "refuse" and not self._refusing:
                self._refusing = True
                self._close_listener()
                idle = [h for h in self._conns if not h.busy]
        for h in idle:
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def heal(self) -> None:
        """Clear any failure mode, release hanging requests, reopen a refused port."""
        with self._lock:
            self.fail_mode = None
            self.fail_count = None
            self._release_hangers()
            if self._refusing and not self._stopping.is_set():
                self._open_listener()  # same port
            self._refusing = False

    def _release_hangers(self) -> None:
        self._release.set()
        self._release = threading.Event()

    def _take_fail(self) -> Optional[str]:
        with self._lock:
            mode = self.fail_mode
            if mode is None:
                return None
            if self.fail_count is not None:
                if self.fail_count <= 0:
                    self.fail_mode = self.fail_count = None
                    return None
                self.fail_count -= 1
                if self.fail_count == 0:
                    self.fail_mode = self.fail_count = None
            return mode

    def _hang_wait(self) -> None:
        with self._lock:
            release = self._release
        deadline = time.monotonic() + MAX_HANG_SECONDS
        while time.monotonic() < deadline:
            if release.wait(0.5) or self._stopping.is_set():
                return

    # ----- the answer ------------------------------------------------------------
    def answer_for(self, messages_or_prompt: Union[str, Sequence[Dict[str, Any]]], model: str) -> str:
        """Deterministic answer text for a prompt (str) or a chat message list."""
        if isinstance(messages_or_prompt, str):
            last = messages_or_prompt
        else:
            last = ""
            for m in reversed(list(messages_or_prompt or [])):
                if isinstance(m, dict) and m.get("role") == "user":
                    last = _text_of(m.get("content"))
                    break
        return "Echo from %s: %s (this is a deterministic fake reply)" % (model, last)

    @staticmethod
    def rest_after_prefill(messages: Sequence[Any], text: str) -> str:
        """What is left of ``text`` to say when the chat ends with the assistant's own message:
        Ollama (and llama.cpp's server) continue that message instead of starting a new one."""
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        prefix = _text_of(last.get("content")) if last.get("role") == "assistant" else ""
        return text[len(prefix):] if prefix and text.startswith(prefix) else text

    def add_model(self, name: str) -> None:
        """Serve one more model (as ``ollama create`` or ``cp`` would)."""
        with self._lock:
            if name and self._find_model(name) is None:
                self.models.append(name)
                self.tags.append(_tag_entry(_normalize_model(name)))

    def remove_model(self, name: str) -> None:
        with self._lock:
            entry = self._find_model(name)
            if entry is not None:
                self.tags.remove(entry)
                self.models = [m for m in self.models if _normalize_model(m) != _normalize_model(entry["model"])]

    # ----- helpers for tests -------------------------------------------------------
    def requests_to(self, path: str) -> List[Any]:
        """Bodies of the requests received on ``path``."""
        with self._lock:
            return [b for p, b in self.requests if p == path]

    def clear_requests(self) -> None:
        with self._lock:
            del self.requests[:]
            del self.request_headers[:]
            self.max_in_flight = self.in_flight
            self.aborted = 0

    @staticmethod
    def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
        """Poll ``predicate`` until true or ``timeout``; returns its last truthiness."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return bool(predicate())
            time.sleep(interval)

    # ----- internals ---------------------------------------------------------------
    def _record(self, path: str, body: Any, headers: Dict[str, str]) -> None:
        with self._lock:
            self.requests.append((path, body))
            self.request_headers.append(headers)

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _count_abort(self) -> None:
        with self._lock:
            self.aborted += 1

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _register_conn(self, h: _Handler) -> None:
        with self._lock:
            self._conns.add(h)

    def _unregister_conn(self, h: _Handler) -> None:
        with self._lock:
            self._conns.discard(h)

    def _find_model(self, name: str) -> Optional[Dict[str, Any]]:
        want = _normalize_model(name)
        for entry in list(self.tags):
            for key in ("model", "name"):
                v = entry.get(key)
                if isinstance(v, str) and (v == name or _normalize_model(v) == want):
                    return entry
        return None

    def _mark_loaded(self, model: str) -> None:
        entry = self._find_model(model)
        if entry is not None:
            with self._lock:
                self._loaded[entry.get("model") or entry.get("name")] = time.time()

    def _ps_entries(self) -> List[Dict[str, Any]]:
        with self._lock:
            loaded = dict(self._loaded)
        out = []
        for name in loaded:
            entry = self._find_model(name)
            if entry is None:
                continue
            e = {k: v for k, v in entry.items() if k != "modified_at"}
            e["expires_at"] = _rfc3339_now(300.0)
            e["size_vram"] = e.get("size", 0)
            out.append(e)
        return out

    @staticmethod
    def _openai_model(entry: Dict[str, Any]) -> Dict[str, Any]:
        name = entry.get("model") or entry.get("name") or ""
        owner = name.split("/", 1)[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": 1735732800, "owned_by": owner}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fake Ollama server on 127.0.0.1 (for tests).")
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--models", default="llama3.2:1b", help="comma-separated model names")
    ap.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    ap.add_argument("--first-token-delay", type=float, default=0.0,
                    help="seconds before the first token of a streamed Ollama answer")
    ap.add_argument("--fail", default=None, choices=[m for m in FAIL_MODES if m], help="start in a fail mode")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long (0: 24 h)")
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = ap.parse_args(argv)

    fake = FakeOllama(models=[m.strip() for m in args.models.split(",") if m.strip()],
                      token_delay=args.token_delay, port=args.port, verbose=args.verbose)
    fake.first_token_delay = args.first_token_delay
    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fake.start()
    if args.fail:
        fake.set_fail(args.fail)
    print("FakeOllama listening on %s (models: %s)" % (fake.url, ", ".join(fake.models)), flush=True)
    deadline = time.monotonic() + (args.max_seconds if args.max_seconds > 0 else 86400.0)
    try:
        while not done.is_set() and time.monotonic() < deadline:
            done.wait(0.2)
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
