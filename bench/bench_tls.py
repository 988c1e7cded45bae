"""Private links (issue 22): what TLS costs a link, and what the relay carries at once.

    PYTHONPATH=_vendor python3 bench/bench_tls.py [--quick]

1. One link, in process: small frames/s (a 60-byte SYNC: each) and bulk MB/s (1 MiB frames)
   from A to B, counted as B's mesh hands them on.
2. Link-up time: B started with --peer A until both list each other (median of 5).
3. 16 streaming clients at once for a few seconds, through a node without an LLM (the relay)
   and through the host's own API (a fake Ollama, --llm-parallel 16 on the host): chats/s and
   p50/p95 first token.
Runs on the code beside it, so the same file measures the previous commit in its checkout.
Loopback only; every loop is bounded in count and time.
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

import neuromesh as nm  # noqa: E402
from conftest import KEYS, Cluster, fully_linked, wait_for  # noqa: E402
from support.fake_ollama import FakeOllama  # noqa: E402


class Counting(nm.MeshListener):
    """Counts the SYNC: frames and their bytes the mesh hands on; ``done`` once ``expect`` came."""

    def __init__(self):
        self.count, self.expect, self.done, self.up = 0, None, threading.Event(), threading.Event()

    def peer_up(self, peer):
        self.up.set()

    def frame(self, marker, peer, payload):
        self.count += 1
        if self.expect is not None and self.count >= self.expect:
            self.done.set()


def _mesh(tmp, name, listener, extra=()):
    cluster = Cluster(tmp / name)
    args = ["--data-dir", str(tmp / name)] + cluster.node_args(False, {"peer_timeout": "30"}, ["--name", name] + list(extra))
    config = nm.load_config(nm.build_arg_parser().parse_args(args), environ={})
    mesh = nm.Mesh(config, KEYS.id(name), listener, key=KEYS[name])
    mesh.start()
    thread = threading.Thread(target=mesh.serve_forever, daemon=True)
    thread.start()
    return mesh, thread, cluster


def link_throughput(tmp, small=100000, bulk=64):
    """(small frames/s, bulk MB/s) over one link."""
    sender_listener, receiver = Counting(), Counting()
    a, a_thread, a_cluster = _mesh(tmp, "bench-a", receiver)
    b, b_thread, b_cluster = _mesh(tmp, "bench-b", sender_listener, ["--peer", "127.0.0.1:%d" % a.tcp_port])
    try:
        assert receiver.up.wait(20) and sender_listener.up.wait(20)
        link = b.peer_table[KEYS.id("bench-a")].link
        b.io.max_outgoing = 1 << 30  # the bench queues ahead of the socket on purpose
        figures = []
        for count, payload in ((small, {"vector": {}}), (bulk, {"vector": {}, "pad": "x" * (1 << 20)})):
            frame = nm.encode_frame(nm.SYNC, payload)
            receiver.count, receiver.expect = 0, count
            receiver.done.clear()
            started = time.perf_counter()

            def push(left=count):  # in slices, so the loop also reads and writes in between
                for _ in range(min(left, 2000 if len(frame) < 1000 else 4)):
                    b.io.queue(link, frame)
                if left > 2000 or (len(frame) > 1000 and left > 4):
                    b.call_soon(push, left - (2000 if len(frame) < 1000 else 4))

            b.call_soon(push)
            assert receiver.done.wait(60), "%d of %d frames came" % (receiver.count, count)
            elapsed = time.perf_counter() - started
            figures.append(count / elapsed if len(frame) < 1000 else count * len(frame) / elapsed / 1e6)
        return tuple(figures)
    finally:
        for mesh, thread, cluster in ((b, b_thread, b_cluster), (a, a_thread, a_cluster)):
            mesh.shutdown()
            thread.join(10)
            cluster.close()


def link_up(tmp, rounds=5):
    """Median seconds from starting B (with --peer A) until both are linked."""
    times = []
    for index in range(rounds):
        listener_a, listener_b = Counting(), Counting()
        a, a_thread, a_cluster = _mesh(tmp, "up-a%d" % index, listener_a)
        started = time.perf_counter()
        b, b_thread, b_cluster = _mesh(tmp, "up-b%d" % index, listener_b, ["--peer", "127.0.0.1:%d" % a.tcp_port])
        assert listener_a.up.wait(20) and listener_b.up.wait(20)
        times.append(time.perf_counter() - started)
        for mesh, thread, cluster in ((b, b_thread, b_cluster), (a, a_thread, a_cluster)):
            mesh.shutdown()
            thread.join(10)
            cluster.close()
    return statistics.median(times)


def _client(url, model, stop, firsts, done):
    session = requests.Session()
    while not stop.is_set():
        started = time.perf_counter()
        first = None
        with session.post(url + "/api/chat", stream=True, timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "a short question"}]}) as response:
            if response.status_code != 200:
                continue
            for line in nm.iter_lines_live(response):
                if line and first is None:
                    first = time.perf_counter() - started
        if first is not None and not stop.is_set():
            firsts.append(first)
            done.append(time.perf_counter())


def concurrent(tmp, clients=16, seconds=6.0):
    """{"host": (chats/s, p50 ms, p95 ms), "relay": (...)}: ``clients`` streaming at once."""
    model = "bench:1b"
    with FakeOllama(models=(model,), token_delay=0.005) as fake:
        cluster = Cluster(tmp / "concurrent")
        try:
            host = cluster.start("host", extra=["--ollama-url", fake.url, "--llm-parallel", str(clients),
                                                "--max-queued", "256", "--chat-rate", "100000"])
            laptop = cluster.start("laptop")
            wait_for(lambda: fully_linked([host, laptop]), message="pair")
            wait_for(lambda: laptop.json("/api/models")["models"], message="access granted")
            figures = {}
            for label, node in (("host", host), ("relay", laptop)):
                stop, firsts, done = threading.Event(), [], []
                threads = [threading.Thread(target=_client, args=(node.url, model, stop, firsts, done), daemon=True)
                           for _ in range(clients)]
                for thread in threads:
                    thread.start()
                time.sleep(1.0)  # warm up: connections, the relay pool
                del firsts[:], done[:]
                time.sleep(seconds)
                count = len(done)
                stop.set()
                for thread in threads:
                    thread.join(60)
                ordered = sorted(firsts[:count]) or [float("nan")]
                figures[label] = (count / seconds, ordered[len(ordered) // 2] * 1e3,
                                  ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1e3)
                print("16 clients through the %-5s: %.1f chats/s, first token p50 %.1f ms, p95 %.1f ms"
                      % (label, *figures[label]))
            return figures
        finally:
            cluster.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        small, bulk = link_throughput(tmp, 30000 if args.quick else 100000, 32 if args.quick else 64)
        print("one link: %.0f small frames/s, %.0f MB/s in 1 MiB frames" % (small, bulk))
        print("link-up (start to linked, median of 5): %.1f ms" % (link_up(tmp) * 1e3))
        concurrent(tmp, 16, 4.0 if args.quick else 6.0)


if __name__ == "__main__":
    main()
