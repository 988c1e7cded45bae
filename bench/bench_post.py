"""Posting a message into a long conversation against a new one, over HTTP on loopback.

    PYTHONPATH=_vendor python3 bench/bench_post.py [--messages 10000] [--posts 100] [--rounds 3]

Fills one conversation of a node's store with ``--messages`` messages (written straight into the
store before the node starts), starts the node (``--host 127.0.0.1``, no discovery, no LLM), then
posts ``--posts`` questions (``"answer": false``) over one kept-alive connection into the long
conversation and into a new one, alternating, ``--rounds`` times. Prints posts/s of each (median
of the rounds) and the ratio long/new (goal >= 0.8). Bounded in count; no network but loopback.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

import neuromesh as nm  # noqa: E402
from conftest import NodeProcess  # noqa: E402

TEXT = "A question a student asked, and then some more words so the row has a realistic size. " * 3


def fill(data_dir, messages):
    """The id of a conversation of ``messages`` messages in the store of ``data_dir``."""
    key = nm.load_node_key(str(data_dir))
    store = nm.Store(os.path.join(str(data_dir), nm.DATABASE_FILE), key.node_id, "bench", key)
    try:
        conversation_id = store.create_conversation("long")["id"]
        data = {"role": "user", "content": TEXT, "sender": "student",
                "host_info": {"hostname": "laptop", "ip_address": "", "is_llm_host": False}}
        store._db.write(lambda: [store._log.append(key.node_id, "message", conversation_id, dict(data))
                                 for _ in range(messages)])
        return conversation_id
    finally:
        store.close()


def posts_per_second(session, url, conversation_id, posts):
    path = "%s/api/conversations/%s/messages" % (url, conversation_id)
    started = time.perf_counter()
    for number in range(posts):
        reply = session.post(path, json={"content": "question %d" % number, "answer": False}, timeout=30)
        reply.raise_for_status()
    return posts / (time.perf_counter() - started)


def measure(messages=10000, posts=100, rounds=3):
    """{"long": posts/s, "new": posts/s, "ratio": long/new}, medians of ``rounds``."""
    with tempfile.TemporaryDirectory() as temp:
        data_dir = Path(temp) / "node"
        data_dir.mkdir()
        long_id = fill(data_dir, messages)
        node = NodeProcess(data_dir, ["--host", "127.0.0.1", "--http-port", "0", "--tcp-port", "0",
                                      "--no-discovery", "--ollama-url", "none", "--log-level", "warning"],
                           "bench-post").start()
        try:
            session = requests.Session()
            new_id = session.post(node.url + "/api/conversations", json={"title": "new"}, timeout=10).json()["id"]
            posts_per_second(session, node.url, new_id, 5)   # warm up
            long_rates, new_rates = [], []
            for _ in range(rounds):
                long_rates.append(posts_per_second(session, node.url, long_id, posts))
                new_rates.append(posts_per_second(session, node.url, new_id, posts))
            session.close()
        finally:
            node.stop()
    long_rate, new_rate = statistics.median(long_rates), statistics.median(new_rates)
    return {"long": long_rate, "new": new_rate, "ratio": long_rate / new_rate}


def read_costs(messages=100000, conversations=10, rounds=9):
    """Seconds (median of ``rounds``) of what /api/health and the sidebar read after a post, in a
    store of ``messages`` messages and in one of ``conversations`` messages: {"big", "small"}.
    In-process, no network."""
    result = {}
    with tempfile.TemporaryDirectory() as temp:
        for label, total in (("big", messages), ("small", conversations)):
            key = nm.NodeKey.generate()
            store = nm.Store(os.path.join(temp, label + ".db"), key.node_id, "bench", key)
            try:
                data = {"role": "user", "content": TEXT, "sender": "student",
                        "host_info": {"hostname": "laptop", "ip_address": "", "is_llm_host": False}}
                for _ in range(conversations):
                    conversation_id = store.create_conversation("notes")["id"]
                    store._db.write(lambda: [store._log.append(key.node_id, "message", conversation_id, dict(data))
                                             for _ in range(total // conversations)])
                times = []
                for number in range(rounds):
                    store.add_message(conversation_id, "user", "question %d" % number, "student")
                    started = time.perf_counter()
                    store.message_count()
                    store.list_conversations()
                    times.append(time.perf_counter() - started)
                result[label] = statistics.median(times)
            finally:
                store.close()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--posts", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    result = measure(options.messages, options.posts, options.rounds)
    print("POST into a %d-message conversation: %.1f/s; into a new one: %.1f/s; ratio %.2f (goal >= 0.8),"
          " medians of %d" % (options.messages, result["long"], result["new"], result["ratio"], options.rounds))


if __name__ == "__main__":
    main()
