"""A real small LLM for tests: llama-cpp-python's OpenAI-compatible server on 127.0.0.1.

``bash tests/support/setup_real_llm.sh`` puts llama-cpp-python[server] into ``_llm/site`` and the
SmolLM2-135M-Instruct GGUF into ``_llm/``. Then::

    reason = available()
    if reason:
        pytest.skip(reason)
    with LlamaServer() as llm:
        requests.post(llm.url + "/v1/chat/completions",
                      json={"model": llm.model, "messages": [...], "max_tokens": 16})

The server answers ``/v1/models`` and ``/v1/chat/completions`` (also ``/v1/completions``,
``/v1/embeddings``), not Ollama's ``/api/*``, and handles one generation at a time.
Standard library only; runs on Python 3.9+.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

__all__ = ["LlamaServer", "available", "ROOT", "LLM_DIR", "SITE", "GGUF", "SETUP_SCRIPT"]

HOST = "127.0.0.1"  # never anything else
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLM_DIR = os.path.join(ROOT, "_llm")
SITE = os.path.join(LLM_DIR, "site")
GGUF = os.path.join(LLM_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
SETUP_SCRIPT = "tests/support/setup_real_llm.sh"

_BIND_ERRORS = ("address already in use", "error while attempting to bind", "errno 98")


def available() -> Optional[str]:
    """None when the server and the model are installed, else why not (a skip reason)."""
    missing = []
    if not os.path.isdir(os.path.join(SITE, "llama_cpp")):
        missing.append(os.path.relpath(os.path.join(SITE, "llama_cpp"), ROOT))
    if not os.path.isfile(GGUF):
        missing.append(os.path.relpath(GGUF, ROOT))
    if not missing:
        return None
    return "real LLM not set up (missing %s): run `bash %s`" % (", ".join(missing), SETUP_SCRIPT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LlamaServerError(RuntimeError):
    pass


class LlamaServer:
    """``python3 -m llama_cpp.server`` on 127.0.0.1 and a free port, for one test or module.

    ``url`` is ``http://127.0.0.1:PORT`` (no trailing slash, no ``/v1``); ``model`` is the
    model id that ``/v1/models`` reports (the GGUF's path unless ``model_alias`` is given).
    The server's output goes to ``log_path`` (a temporary file unless given).

    ``threads`` (default 1) is passed as ``--n_threads`` and ``--n_threads_batch``: with the
    server's default of 2 prompt threads on a 2-core machine that is busy with other tests,
    the time to first token jumped to several seconds; with 1 it stayed well under one.
    ``threads=None`` keeps the server's own defaults.
    """

    def __init__(
        self,
        model_path: str = GGUF,
        n_ctx: int = 2048,
        start_timeout: float = 120.0,
        log_path: Optional[str] = None,
        model_alias: Optional[str] = None,
        threads: Optional[int] = 1,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        attempts: int = 3,
    ):
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.start_timeout = start_timeout
        self.model_alias = model_alias
        self.threads = threads
        self.extra_args = list(extra_args)
        self.python = python
        self.attempts = attempts
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
        self.log_path = str(log_path)
        self.process = None  # type: Optional[subprocess.Popen]
        self.port = None  # type: Optional[int]
        self.url = None  # type: Optional[str]
        self.model = None  # type: Optional[str]
        self.models_json = None  # type: Optional[dict]
        self.start_seconds = None  # type: Optional[float]

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "LlamaServer":
        reason = available() if self.model_path == GGUF else None
        if reason:
            raise LlamaServerError(reason)
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            self.port = free_port()
            self.url = "http://%s:%d" % (HOST, self.port)
            self._spawn()
            try:
                self._wait_ready()
            except LlamaServerError:
                tail = self.log_tail()
                self.stop()
                bind_failed = any(marker in tail.lower() for marker in _BIND_ERRORS)
                if bind_failed and attempt < self.attempts:
                    continue  # someone took the port between free_port() and the bind
                raise
            self.start_seconds = time.monotonic() - started
            return self
        raise LlamaServerError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        cmd = [
            self.python, "-m", "llama_cpp.server",
            "--model", self.model_path,
            "--host", HOST,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
        ]
        if self.model_alias:
            cmd += ["--model_alias", self.model_alias]
        if self.threads:
            cmd += ["--n_threads", str(self.threads), "--n_threads_batch", str(self.threads)]
        cmd += self.extra_args
        env = dict(os.environ)
        env["PYTHONPATH"] = SITE  # only _llm/site: its pydantic, fastapi, ... not _vendor's
        env.pop("PYTHONSTARTUP", None)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(("\n$ %s\n" % " ".join(cmd)).encode())
            log.flush()
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = None  # type: Optional[BaseException]
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LlamaServerError(
                    "llama_cpp.server exited with code %s before answering; log %s:\n%s"
                    % (code, self.log_path, self.log_tail())
                )
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                    body = json.loads(resp.read().decode("utf-8"))
                self.models_json = body
                self.model = body["data"][0]["id"]
                return
            except (OSError, ValueError, KeyError, IndexError) as exc:  # URLError is an OSError
                last_error = exc
            time.sleep(0.2)
        raise LlamaServerError(
            "llama_cpp.server did not answer GET /v1/models within %.0f s (last error: %r); log %s:\n%s"
            % (self.start_timeout, last_error, self.log_path, self.log_tail())
        )

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        else:
            proc.wait()

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


if __name__ == "__main__":  # manual check: python3 tests/support/real_llm.py
    why = available()
    if why:
        sys.exit(why)
    with LlamaServer() as llm:
        print("url:", llm.url, "model:", llm.model, "started in %.1f s" % llm.start_seconds)
        print("log:", llm.log_path)
