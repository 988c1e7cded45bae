"""HTTP server benchmark on loopback: the old wsgiref server (commit 0d82e28) against waitress,
and a classroom: 30 open pages (SSE) while 8 clients chat.

    PYTHONPATH=_vendor python3 bench/bench_http.py [--seconds 5] [--clients 32] [--old-rev 0d82e28]

Starts one node per server (``--host 127.0.0.1``, no discovery, no LLM), runs ``--clients``
concurrent clients doing GET /api/peers, each on a new connection, for a bounded time and
count, and prints p50/p95/p99, the requests that took 0.9 s or more (a dropped SYN is retried
after 1 s: the old listen backlog was 5), and the ratio old/new. The old node is the old
neuromesh.py taken from git into a temp folder beside links to _vendor and the static files.

The classroom (``classroom()``): 30 pages hold /api/events open (3 processes of raw-socket
readers), 8 clients each ask 5 questions of the fake Ollama (tests/support/fake_ollama.py, its own
process) and wait for the stored answer; prints the chats served and how long after its POST
each question reached every page. ``measure_clients()`` and ``classroom()`` feed bench/run.py.
"""

import argparse
import collections
import http.client
import json
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import requests  # noqa: E402

from conftest import NodeProcess  # noqa: E402

MAX_REQUESTS = 200000


def old_script(rev, folder):
    """The neuromesh.py of ``rev``, runnable from ``folder``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", "%s:neuromesh.py" % rev], check=True,
                            capture_output=True).stdout
    (folder / "neuromesh.py").write_bytes(source)
    for name in ("_vendor", "neuromesh_static"):
        os.symlink(os.path.realpath(ROOT / name), folder / name)
    return folder / "neuromesh.py"


def start_node(script, data_dir, extra=("--ollama-url", "none")):
    """A node of ``script`` (this tree's neuromesh.py when None) on loopback."""
    import conftest
    args = ["--host", "127.0.0.1", "--http-port", "0", "--tcp-port", "0", "--no-discovery",
            "--log-level", "warning"] + list(extra)
    saved = conftest.SCRIPT
    conftest.SCRIPT = str(script or saved)
    try:
        return NodeProcess(data_dir, args, "bench").start()
    finally:
        conftest.SCRIPT = saved


def load(port, clients, seconds, keep_alive=False):
    """Latencies (s) of GET /api/peers from ``clients`` threads: a new connection per request, or
    one kept open (``keep_alive``; wsgiref closes it after each reply, so it is opened again)."""
    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + seconds

    def client():
        connection = None
        while time.monotonic() < deadline and len(latencies) < MAX_REQUESTS:
            started = time.monotonic()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/api/peers")
                response = connection.getresponse()
                response.read()
                if not keep_alive or response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                connection = None
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return latencies, errors[0]


def report(label, latencies, errors):
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    slow = sum(1 for value in ordered if value >= 0.9)
    print("%-20s requests %6d  errors %d  p50 %7.1f ms  p95 %7.1f ms  p99 %7.1f ms  max %7.1f ms  >=0.9 s: %d"
          % (label, len(ordered), errors, pick(0.5) * 1e3, pick(0.95) * 1e3, pick(0.99) * 1e3,
             ordered[-1] * 1e3, slow))
    return pick(0.95), slow, statistics.mean(ordered)


def summary(latencies, errors):
    """p50/p95/max (ms), requests and those that took 0.9 s or more, of one load."""
    ordered = sorted(latencies) or [float("nan")]
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"requests": len(latencies), "errors": errors, "p50_ms": pick(0.5) * 1e3, "p95_ms": pick(0.95) * 1e3,
            "max_ms": ordered[-1] * 1e3, "slow": sum(1 for value in latencies if value >= 0.9)}


def measure_clients(clients=32, seconds=5.0, rounds=3):
    """GET /api/peers from ``clients`` kept-alive clients against this tree's node (waitress):
    the summary of each of ``rounds`` loads of ``seconds``, and their medians."""
    with tempfile.TemporaryDirectory() as temp:
        node = start_node(None, Path(temp) / "data")
        try:
            runs = [summary(*load(node.info["http_port"], clients, seconds, keep_alive=True)) for _ in range(rounds)]
        finally:
            node.stop()
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}, runs


class EventPage:
    """One open page: an SSE stream of /api/events on a raw socket, read on its own thread; the
    arrival time of every "message" event of a question, by conversation id."""

    pattern = re.compile(r"event: message\ndata: (\{.*?\})\n")

    def __init__(self, port, stop):
        self.port, self.stop = port, stop
        self.arrivals = collections.defaultdict(list)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, name="bench-sse-page", daemon=True)
        self.thread.start()

    def _read(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
            sock.settimeout(0.2)
            text = ""
            while not self.stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                now = time.perf_counter()
                text += chunk.decode("utf-8", "replace")
                if "event: hello" in text:
                    self.ready.set()
                end = 0
                for match in self.pattern.finditer(text):
                    end = match.end()
                    data = json.loads(match.group(1))["data"]
                    if data.get("role") == "user":
                        self.arrivals[data["conversation_id"]].append(now)
                text = text[max(end, len(text) - 4096):] if end else text[-65536:]
        finally:
            sock.close()


class FakeOllamaProcess:
    """tests/support/fake_ollama.py in a process of its own (its tokens then cost this process nothing);
    ``url`` once started. Exits by itself after ``max_seconds``."""

    def __init__(self, model, token_delay, max_seconds=300):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "support" / "fake_ollama.py"), "--port", "0", "--models", model,
             "--token-delay", str(token_delay), "--max-seconds", str(max_seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if not match:
            self.close()
            raise RuntimeError("the fake Ollama did not start: %r" % line)
        self.url = match.group(1)

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def page_group(port, count, stop, ready, results):
    """A process of ``count`` open pages (EventPage): ``ready`` counts the pages that said hello;
    after ``stop``, their arrivals go to ``results``. Its own process, so the readers' wake-ups
    do not wait for the chat clients' GIL."""
    local_stop = threading.Event()
    pages = [EventPage(port, local_stop) for _ in range(count)]
    for page in pages:
        if page.ready.wait(10):
            with ready.get_lock():
                ready.value += 1
    stop.wait(300)
    local_stop.set()
    for page in pages:
        page.thread.join(5)
    results.put([dict(page.arrivals) for page in pages])


def group_sizes(total, groups):
    return [total // groups + (1 if number < total % groups else 0) for number in range(groups)]


def classroom(pages=30, chats=8, questions=5, seconds=60.0, token_delay=0.002, page_processes=3):
    """``pages`` open SSE pages and ``chats`` clients asking ``questions`` each (answered by the
    fake Ollama) at once: chats served, and how long each question took to reach every page."""
    model = "bench:1b"
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as temp, FakeOllamaProcess(model, token_delay) as fake:
        node = start_node(None, Path(temp) / "data", ["--ollama-url", fake.url])
        context = multiprocessing.get_context("fork")
        stop, ready, results = context.Event(), context.Value("i", 0), context.Queue()
        groups = [context.Process(target=page_group, args=(node.info["http_port"], size, stop, ready, results),
                                  daemon=True) for size in group_sizes(pages, page_processes)]
        arrivals = []
        try:
            for group in groups:
                group.start()
            wait_deadline = time.monotonic() + 20
            while ready.value < pages and time.monotonic() < wait_deadline:
                time.sleep(0.05)
            sent, served, failed, answer_times = collections.defaultdict(list), [0], [0], []
            lock = threading.Lock()

            def chat(number):
                session = requests.Session()
                try:
                    conversation = session.post(node.url + "/api/conversations", timeout=10,
                                                json={"title": "chat %d" % number}).json()["id"]
                    for question in range(questions):
                        if time.monotonic() > deadline:
                            break
                        started = time.perf_counter()
                        sent[conversation].append(started)
                        reply = session.post(node.url + "/api/conversations/%s/messages" % conversation,
                                             json={"content": "question %d of %d" % (question, number),
                                                   "model": model}, timeout=max(1.0, deadline - time.monotonic()))
                        with lock:
                            if reply.status_code == 201 and reply.json()["assistant"]["content"]:
                                served[0] += 1
                                answer_times.append(time.perf_counter() - started)
                            else:
                                failed[0] += 1
                except requests.RequestException:
                    with lock:
                        failed[0] += 1
                finally:
                    session.close()

            clients = [threading.Thread(target=chat, args=(n,), name="bench-chat") for n in range(chats)]
            for client in clients:
                client.start()
            for client in clients:
                client.join(seconds + 10)
            time.sleep(0.5)  # the last questions' events are on their way to the pages
            stop.set()
            for _group in groups:
                arrivals += results.get(timeout=30)
        finally:
            stop.set()
            for group in groups:
                group.join(10)
            node.stop()
    delays, missing = [], 0
    for conversation, times in sent.items():
        for page in arrivals:
            arrived = page.get(conversation, [])
            missing += max(0, len(times) - len(arrived))
            delays += [arrival - start for start, arrival in zip(times, arrived)]
    delays.sort()
    asked = sum(len(times) for times in sent.values())
    return {"pages": ready.value, "asked": asked, "served": served[0],
            "failed": failed[0], "missing_updates": missing, "updates": len(delays),
            "update_p50_ms": delays[len(delays) // 2] * 1e3 if delays else None,
            "update_p95_ms": delays[int(len(delays) * 0.95)] * 1e3 if delays else None,
            "update_max_ms": delays[-1] * 1e3 if delays else None,
            "answer_median_ms": statistics.median(answer_times) * 1e3 if answer_times else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--old-rev", default="0d82e28")
    options = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        (temp / "old").mkdir()
        for label, script in (("wsgiref", old_script(options.old_rev, temp / "old")), ("waitress", None)):
            node = start_node(script, temp / ("data-" + label))
            try:
                for keep_alive in (False, True):
                    latencies, errors = load(node.info["http_port"], options.clients, options.seconds, keep_alive)
                    results[label, keep_alive] = report("%s %s" % (label, "keep-alive" if keep_alive else "new-conn"),
                                                        latencies, errors)
            finally:
                node.stop()
    for keep_alive in (False, True):
        (old_p95, old_slow, _), (new_p95, new_slow, _) = results["wsgiref", keep_alive], results["waitress", keep_alive]
        print("%d clients GET /api/peers (%s): p95 old/new = %.1f ms / %.1f ms = %.2fx; requests >= 0.9 s: %d -> %d"
              % (options.clients, "keep-alive" if keep_alive else "a connection per request", old_p95 * 1e3,
                 new_p95 * 1e3, old_p95 / new_p95 if new_p95 else float("inf"), old_slow, new_slow))
    room = classroom()
    print("30 open pages (SSE) + 8 chats at once: %(served)d of %(asked)d chats served, %(failed)d failed; "
          "a question reached the pages in p50 %(update_p50_ms).1f ms, p95 %(update_p95_ms).1f ms, "
          "max %(update_max_ms).1f ms; %(missing_updates)d page updates missing" % room)


if __name__ == "__main__":
    main()
