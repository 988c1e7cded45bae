"""Benchmarks of NeuroMesh on loopback; prints figures and ratios against baselines of the same run.

    PYTHONPATH=_vendor python3 bench/bench_mesh.py

Measures: frame decoding against plain json.loads, link-up time of a 3-node mesh, sync of 500
messages from three writers, memory per node, and the cost of streaming an answer through a
peer's relay against asking the (fake) Ollama directly. Every node binds 127.0.0.1 and
broadcasts to 127.255.255.255 only; every loop is bounded.
"""

import json
import os
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
from conftest import Cluster, fully_linked, wait_for  # noqa: E402
from support.fake_ollama import FakeOllama  # noqa: E402


def bench_frames():
    payloads = [{"entries": [{"origin": "a" * 32, "seq": i, "kind": "message", "data": {"content": "x" * 200}}
                             for i in range(50)]} for _ in range(200)]
    stream = b"".join(nm.encode_frame(nm.FILE, p) for p in payloads)
    bodies = [json.dumps(p).encode() for p in payloads]
    started = time.perf_counter()
    for body in bodies:
        json.loads(body)
    baseline = time.perf_counter() - started
    decoder = nm.FrameDecoder(1 << 26)
    decoder.proven = True  # a linked peer's frames, after the key proof (TLS decrypted them)
    started = time.perf_counter()
    frames = []
    for offset in range(0, len(stream), 65536):  # as a socket delivers it
        frames += decoder.feed(stream[offset:offset + 65536])
    decoding = time.perf_counter() - started
    assert len(frames) == len(payloads)
    mb = len(stream) / 1e6
    print("frames: %.1f MB decoded at %.0f MB/s; plain json.loads %.0f MB/s; ratio %.2fx the baseline time"
          % (mb, mb / decoding, mb / baseline, decoding / baseline))
    return {"mb_per_s": mb / decoding, "json_mb_per_s": mb / baseline, "ratio": decoding / baseline}


def bench_mesh(tmp):
    cluster = Cluster(tmp / "mesh")
    try:
        started = time.monotonic()
        nodes = [cluster.start() for _ in range(3)]
        spawned = time.monotonic()
        wait_for(lambda: fully_linked(nodes), timeout=20, interval=0.01, message="mesh")
        linked = time.monotonic()
        print("link-up: 3 processes started in %.2f s; fully linked %.3f s after the last one started"
              % (spawned - started, linked - spawned))
        figures = {"link_up_s": linked - spawned}
        idle = [n.health()["memory_rss_bytes"] / 1e6 for n in nodes]
        # each writer into its own conversation: only a conversation's owner writes into it
        conversations = {n.label: n.post("/api/conversations", json={"title": "bench"}).json()["id"] for n in nodes}
        wait_for(lambda: all(len(n.json("/api/conversations")) >= 3 for n in nodes),
                 message="conversations everywhere")
        per_writer, latencies = 167, []

        def write(node):
            session = requests.Session()
            for index in range(per_writer):
                t0 = time.perf_counter()
                reply = session.post(node.url + "/api/conversations/%s/messages" % conversations[node.label],
                                     timeout=10, json={"content": "%s-%d" % (node.label, index), "answer": False})
                latencies.append(time.perf_counter() - t0)
                assert reply.status_code == 201, reply.text

        started = time.monotonic()
        writers = [threading.Thread(target=write, args=(n,)) for n in nodes]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(120)
        written = time.monotonic()
        total = per_writer * 3

        def converged():
            return all(sum(c["message_count"] for c in n.json("/api/conversations")
                           if c["id"] in conversations.values()) == total for n in nodes)

        wait_for(converged, timeout=60, interval=0.02, message="convergence")
        done = time.monotonic()
        print("sync: %d messages from 3 writers written in %.2f s (%.0f msg/s, median ack %.1f ms, p95 %.1f ms); "
              "all nodes hold all %d %.3f s after the last ack"
              % (total, written - started, total / (written - started), statistics.median(latencies) * 1e3,
                 sorted(latencies)[int(len(latencies) * 0.95)] * 1e3, total, done - written))
        busy = [n.health()["memory_rss_bytes"] / 1e6 for n in nodes]
        print("memory: RSS per node idle %s MB, after %d messages %s MB"
              % ("/".join("%.0f" % m for m in idle), total, "/".join("%.0f" % m for m in busy)))
        figures.update(messages=total, write_rate=total / (written - started), ack_median_ms=statistics.median(
            latencies) * 1e3, converged_s=done - written, rss_idle_mb=statistics.median(idle),
            rss_busy_mb=statistics.median(busy))
        return figures
    finally:
        cluster.close()


def stream_timing(url, model, prompt, rounds=5):
    """Median time to first token and to the end of a streamed /api/chat answer."""
    firsts, totals = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        with requests.post(url + "/api/chat", stream=True, timeout=30,
                           json={"model": model, "messages": [{"role": "user", "content": prompt}]}) as response:
            for line in nm.iter_lines_live(response):
                if line and first is None:
                    first = time.perf_counter() - started
        totals.append(time.perf_counter() - started)
        firsts.append(first)
    return statistics.median(firsts), statistics.median(totals)


def bench_relay(tmp, rounds=5):
    """Medians of first token and whole answer (s): {"direct", "host", "relay"}: (first, total).
    The three are asked in turn, ``rounds`` times, so a busy moment of the machine hits all three."""
    model = "bench:1b"
    prompt = " ".join("word%d" % i for i in range(60))
    with FakeOllama(models=(model,), token_delay=0.0) as fake:
        cluster = Cluster(tmp / "relay")
        try:
            host = cluster.start("host", extra=["--ollama-url", fake.url])
            laptop = cluster.start("laptop")
            wait_for(lambda: fully_linked([host, laptop]), message="pair")
            wait_for(lambda: laptop.json("/api/models")["models"], message="access granted")
            urls = {"direct": fake.url, "host": host.url, "relay": laptop.url}
            for url in urls.values():
                stream_timing(url, model, prompt, 1)   # warm up: first connections, first grant use
            samples = {label: ([], []) for label in urls}
            for _ in range(rounds):
                for label, url in urls.items():
                    first, total = stream_timing(url, model, prompt, 1)
                    samples[label][0].append(first)
                    samples[label][1].append(total)
            figures = {label: (statistics.median(firsts), statistics.median(totals))
                       for label, (firsts, totals) in samples.items()}
            for label, name in (("direct", "Ollama directly"), ("host", "the host node"),
                                ("relay", "a peer, through the relay")):
                first, total = figures[label]
                print("relay: ~70 tokens from %-27s first token %6.1f ms, whole answer %6.1f ms (%.1fx direct)"
                      % (name, first * 1e3, total * 1e3, total / figures["direct"][1]))
            return figures
        finally:
            cluster.close()


def main():
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        bench_frames()
        bench_mesh(tmp)
        bench_relay(tmp)


if __name__ == "__main__":
    main()
