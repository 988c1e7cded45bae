"""HTTP server benchmark on loopback: the old wsgiref server (commit 0d82e28) against waitress.

    PYTHONPATH=_vendor python3 bench/bench_http.py [--seconds 5] [--clients 32] [--old-rev 0d82e28]

Starts one node per server (``--host 127.0.0.1``, no discovery, no LLM), runs ``--clients``
concurrent clients doing GET /api/peers, each on a new connection, for a bounded time and
count, and prints p50/p95/p99, the requests that took 0.9 s or more (a dropped SYN is retried
after 1 s: the old listen backlog was 5), and the ratio old/new. The old node is the old
neuromesh.py taken from git into a temp folder beside links to _vendor and the static files.
"""

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

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


def start_node(script, data_dir):
    """A node of ``script`` (this tree's neuromesh.py when None) on loopback."""
    import conftest
    args = ["--host", "127.0.0.1", "--http-port", "0", "--tcp-port", "0", "--no-discovery",
            "--ollama-url", "none", "--log-level", "warning"]
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


if __name__ == "__main__":
    main()
