"""Catch-up of a peer that comes back while another node keeps writing (issue 20, item 8).

    PYTHONPATH=_vendor python3 bench/bench_live_catchup.py [--rate 5] [--sync-interval 0.5] [--script PATH]

Two node processes on loopback; a writes into one conversation ``--rate`` messages a second
throughout. b is cut off for 6 s, by a restart (SIGTERM, start again) and by a pause (SIGSTOP,
SIGCONT: a laptop whose lid closed; a's link to it times out). Prints, per case, the seconds
from b's relink to b holding every message acknowledged before it came back, with a still writing
(at most ``--patience`` seconds, then "never while writing"), and after how long b catches up
once a stops. ``--script`` runs another copy of neuromesh.py (a baseline). Every node binds
127.0.0.1 and broadcasts to 127.255.255.255; every loop is bounded in count and time.
"""

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from conftest import Cluster, NodeProcess, fully_linked, wait_for  # noqa: E402


class Writer(threading.Thread):
    """Posts a message every 1/rate seconds to one conversation; remembers what was acknowledged."""

    def __init__(self, node, conversation_id, rate, limit=2000):
        threading.Thread.__init__(self, daemon=True)
        self.node, self.conversation_id, self.rate, self.limit = node, conversation_id, rate, limit
        self.acknowledged = []
        self.stop = threading.Event()

    def run(self):
        session = requests.Session()
        url = self.node.url + "/api/conversations/%s/messages" % self.conversation_id
        index = 0
        while not self.stop.is_set() and index < self.limit:
            text = "m%d" % index
            index += 1
            if session.post(url, json={"content": text, "answer": False}, timeout=10).status_code == 201:
                self.acknowledged.append(text)
            self.stop.wait(1.0 / self.rate)


def held(node, conversation_id):
    response = node.get("/api/conversations/%s?limit=1000" % conversation_id)
    return set() if response.status_code != 200 else {m["content"] for m in response.json()["messages"]}


def one_case(cluster, how, rate, patience, settings):
    a, b = cluster.start(settings=settings), cluster.start(settings=settings)
    wait_for(lambda: fully_linked([a, b]), message="pair")
    conversation_id = a.post("/api/conversations", json={"title": "live"}).json()["id"]
    wait_for(lambda: conversation_id in {c["id"] for c in b.json("/api/conversations")}, message="on b")
    writer = Writer(a, conversation_id, rate)
    writer.start()
    time.sleep(2.0)  # writing is under way: the "fresh" streak, if any, has begun
    if how == "restart":
        b.stop()
    else:
        b.process.send_signal(signal.SIGSTOP)
    time.sleep(6.0)
    before_cut = list(writer.acknowledged)  # everything acknowledged while b was away, and before
    if how == "restart":
        b.start()
    else:
        b.process.send_signal(signal.SIGCONT)
        wait_for(lambda: a.node_id not in b.connected_ids(), timeout=10, message="b sees its link gone")
    wait_for(lambda: a.node_id in b.connected_ids(), timeout=15, interval=0.02, message="relinked")
    relinked = time.monotonic()
    caught = None
    while time.monotonic() < relinked + patience:
        if set(before_cut) <= held(b, conversation_id):
            caught = time.monotonic() - relinked
            break
        time.sleep(0.1)
    writer.stop.set()
    writer.join(10)
    stopped = time.monotonic()
    after_stop = None
    if caught is None:
        wait_for(lambda: set(writer.acknowledged) <= held(b, conversation_id), timeout=30, message="caught up")
        after_stop = time.monotonic() - stopped
    a.stop()
    b.stop()
    return caught, after_stop


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--patience", type=float, default=20.0)
    parser.add_argument("--sync-interval", default="0.5", help="--sync-interval of both nodes (the tests' 0.5 s)")
    parser.add_argument("--script", help="another neuromesh.py to run (a baseline)")
    options = parser.parse_args()
    if options.script:
        NodeProcess.__init__.__defaults__ = ((), [sys.executable, options.script])
    for how in ("restart", "pause"):
        with tempfile.TemporaryDirectory() as directory:
            cluster = Cluster(Path(directory))
            try:
                caught, after_stop = one_case(cluster, how, options.rate, options.patience,
                                              {"sync_interval": options.sync_interval})
            finally:
                cluster.close()
        if caught is not None:
            print("%-8s %.1f msg/s: b held all acknowledged before its return %.2f s after relinking, a still writing"
                  % (how, options.rate, caught))
        else:
            print("%-8s %.1f msg/s: not within %.0f s while a wrote; %.2f s after a stopped"
                  % (how, options.rate, options.patience, after_stop))


if __name__ == "__main__":
    main()
