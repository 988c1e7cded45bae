"""Crash safety: a node killed at random while a writer posts loses no acknowledged message."""

import random
import sqlite3
import threading

import requests

from conftest import wait_for

KILLS = 20


def _writer(node_url, conversation_id, acknowledged, stop):
    """Posts numbered messages until told to stop; records each one the node acknowledged."""
    number = 0
    while not stop.is_set():
        number += 1
        text = "message %d" % number
        try:
            reply = requests.post(node_url() + "/api/conversations/%s/messages" % conversation_id,
                                  json={"content": text, "answer": False}, timeout=5)
        except requests.RequestException:
            continue  # the node is down or restarting: this one was not acknowledged
        if reply.status_code == 201:
            acknowledged.append(text)


def _all_contents(node, conversation_id):
    """Every message of the conversation, page by page (a page holds the newest 200 by default)."""
    contents, before = [], ""
    for _ in range(1000):
        page = node.json("/api/conversations/%s?limit=1000%s" % (conversation_id, before))
        contents = [m["content"] for m in page["messages"]] + contents
        if not page["has_more"]:
            return contents
        before = "&before=" + page["messages"][0]["id"]
    raise AssertionError("more pages than messages")


def test_random_sigkills_lose_no_acknowledged_message(cluster):
    node = cluster.start("victim", discovery=False)
    conversation_id = node.post("/api/conversations", json={"title": "crash test"}).json()["id"]
    acknowledged, stop = [], threading.Event()
    writer = threading.Thread(target=_writer, args=(lambda: node.url, conversation_id, acknowledged, stop),
                              name="test-writer", daemon=True)
    writer.start()
    chance = random.Random(20)
    try:
        for _ in range(KILLS):
            before = len(acknowledged)
            wait_for(lambda: len(acknowledged) >= before + chance.randint(1, 15), timeout=20,
                     message="acknowledged writes before the next kill")
            node.kill()
            node.start()
    finally:
        stop.set()
        writer.join(10)
    stored = _all_contents(node, conversation_id)
    assert len(acknowledged) >= KILLS
    missing = set(acknowledged) - set(stored)
    assert not missing, "acknowledged but lost: %s" % sorted(missing)[:10]
    assert len(stored) == len(set(stored)), "a message was stored twice"
    node.stop()
    database = sqlite3.connect(node.data_dir + "/neuromesh.db")
    try:
        assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        database.close()
