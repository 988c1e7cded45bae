"""The sync room end-to-end: conversations across real nodes on loopback.

What it covers: a message posted on one node is listed on the others; a node that was down
catches up when it returns; three writers at once converge; an acknowledged message survives
SIGKILL and reaches the peers; private conversations stay home while deletes and renames
reach everyone; bad requests get clear errors; the event stream tells the page of a new peer
and a new message; the original program's files are imported and exported by the CLI."""

import json
import os
import threading
import time

import pytest
import requests

from conftest import ROOT, fully_linked, wait_for
from support.cli import run_cli

ORIGINAL_LAYOUT = os.path.join(os.path.dirname(ROOT), "shared", "data", "original-neuromesh-layout")


def new_conversation(node, title="Homework", private=False):
    response = node.post("/api/conversations", json={"title": title, "private": private})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def say(node, conversation_id, content, sender="student"):
    response = node.post("/api/conversations/%s/messages" % conversation_id,
                         json={"content": content, "sender": sender, "answer": False})
    assert response.status_code == 201, response.text
    return response.json()


def contents(node, conversation_id):
    response = node.get("/api/conversations/%s" % conversation_id)
    if response.status_code != 200:
        return None
    return [message["content"] for message in response.json()["messages"]]


def listed_ids(node):
    return {record["id"] for record in node.json("/api/conversations")}


def test_a_message_posted_on_one_node_is_listed_on_the_others(cluster):
    a, b, c = (cluster.start() for _ in range(3))
    wait_for(lambda: fully_linked([a, b, c]), message="mesh")
    conversation_id = new_conversation(a, "Photosynthesis")
    message = say(a, conversation_id, "What do plants eat?")
    assert message["content"] == "What do plants eat?" and message["role"] == "user"
    assert message["sender"] == "student" and message["timestamp"].endswith("Z")
    for node in (b, c):
        wait_for(lambda: contents(node, conversation_id) == ["What do plants eat?"], timeout=5,
                 message="the message on %s" % node.label)
        record = next(r for r in node.json("/api/conversations") if r["id"] == conversation_id)
        assert record["title"] == "Photosynthesis" and record["message_count"] == 1
        assert record["origin"] == a.node_id and record["origin_name"] == "NeuroMesh-" + a.node_id[:4]
        assert record["own"] is False and record["updated_at"].endswith("Z")


def test_a_node_that_was_down_catches_up_when_it_returns(cluster):
    a, b = cluster.start(), cluster.start()
    wait_for(lambda: fully_linked([a, b]), message="pair")
    conversation_id = new_conversation(a)
    wait_for(lambda: conversation_id in listed_ids(b), message="conversation on B")
    b.stop()
    written = ["note %d" % i for i in range(20)]
    for text in written:
        say(a, conversation_id, text)
    b.start()
    wait_for(lambda: contents(b, conversation_id) == written, timeout=10, message="B caught up")


def test_500_messages_from_three_writers_at_once_converge(cluster):
    # a node writes only into its own conversations (a peer's are read-only, as on the page),
    # so each writer writes into its own conversation and every node must end with all three
    nodes = [cluster.start() for _ in range(3)]
    wait_for(lambda: fully_linked(nodes), message="mesh")
    conversations = [new_conversation(node, "Busy class %s" % node.label) for node in nodes]
    for node in nodes:
        wait_for(lambda: set(conversations) <= set(listed_ids(node)), message="shared conversations")
    per_writer = [167, 167, 166]
    errors = []

    def write(node, conversation_id, count):
        session = requests.Session()
        try:
            for index in range(count):
                response = session.post(node.url + "/api/conversations/%s/messages" % conversation_id,
                                        json={"content": "%s-%d" % (node.label, index), "answer": False},
                                        timeout=10)
                if response.status_code != 201:
                    errors.append(response.text)
        except requests.RequestException as exc:
            errors.append(repr(exc))

    writers = [threading.Thread(target=write, args=job) for job in zip(nodes, conversations, per_writer)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert errors == []
    for writer, conversation_id, count in zip(nodes, conversations, per_writer):
        expected = {"%s-%d" % (writer.label, i) for i in range(count)}
        for node in nodes:
            wait_for(lambda: len(contents(node, conversation_id) or []) >= count, timeout=20,
                     message="%d messages of %s on %s" % (count, writer.label, node.label))
            messages = node.json("/api/conversations/%s" % conversation_id)["messages"]
            assert len(messages) == count  # no duplicate
            assert {m["content"] for m in messages} == expected  # no loss
            assert len({(m["origin"], m["seq"]) for m in messages}) == count
    assert sum(per_writer) == 500


def test_an_acknowledged_message_survives_sigkill_and_reaches_peers(cluster):
    a, b = cluster.start(), cluster.start()
    wait_for(lambda: fully_linked([a, b]), message="pair")
    conversation_id = new_conversation(a)
    wait_for(lambda: conversation_id in listed_ids(b), message="conversation on B")
    b.stop()
    say(a, conversation_id, "acknowledged, then the power went out")
    a.kill()  # SIGKILL right after the 201
    a.start()
    assert contents(a, conversation_id) == ["acknowledged, then the power went out"]
    b.start()
    wait_for(lambda: contents(b, conversation_id) == ["acknowledged, then the power went out"], timeout=10,
             message="the peer received it after the restart")


def test_private_conversations_stay_home_and_deletes_reach_everyone(cluster):
    a, b = cluster.start(), cluster.start()
    wait_for(lambda: fully_linked([a, b]), message="pair")
    secret = new_conversation(a, "Diary", private=True)
    say(a, secret, "only for me")
    public = new_conversation(a, "Class notes")
    say(a, public, "for everyone")
    wait_for(lambda: contents(b, public) == ["for everyone"], message="public conversation synced")
    # periodic sync has run several rounds by now (0.5 s interval); the private one never left
    wait_for(lambda: b.health()["sync"].get("sync_rounds", 0) >= 3, message="sync rounds")
    assert secret not in listed_ids(b) and b.get("/api/conversations/%s" % secret).status_code == 404
    assert "only for me" not in json.dumps(b.json("/peers"))

    # only the owner may delete; a tombstone reaches every node
    refused = requests.delete(b.url + "/api/conversations/%s" % public, timeout=5)
    assert refused.status_code == 403 and "belongs to" in refused.json()["error"]
    assert requests.delete(a.url + "/api/conversations/%s" % public, timeout=5).status_code == 200
    wait_for(lambda: public not in listed_ids(b), message="deleted on B")
    assert public not in listed_ids(a)


def test_rename_travels_and_bad_requests_get_clear_errors(cluster):
    a, b = cluster.start(), cluster.start()
    wait_for(lambda: fully_linked([a, b]), message="pair")
    conversation_id = new_conversation(a, "Draft")
    response = requests.patch(a.url + "/api/conversations/%s" % conversation_id, json={"title": "Final"}, timeout=5)
    assert response.status_code == 200 and response.json()["title"] == "Final"
    wait_for(lambda: any(r["title"] == "Final" for r in b.json("/api/conversations")), message="rename on B")

    bad_json = a.post("/api/conversations/%s/messages" % conversation_id, data=b"{oops",
                      headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    empty = a.post("/api/conversations/%s/messages" % conversation_id, json={"content": "  "})
    assert empty.status_code == 400 and "content" in empty.json()["error"]
    unknown = a.post("/api/conversations/nope/messages", json={"content": "hi"})
    assert unknown.status_code == 404 and "no conversation" in unknown.json()["error"]
    assert contents(a, conversation_id) == []


def test_events_stream_delivers_peer_up_and_new_message(cluster):
    a = cluster.start()
    seen = []
    ready = threading.Event()

    def listen():
        with requests.get(a.url + "/api/events", stream=True, timeout=(5, 20)) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            for line in response.iter_lines(chunk_size=1, decode_unicode=True):
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    seen.append(event)
                    if event["type"] == "hello":
                        ready.set()
                    if event["type"] == "message":
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(10), "no hello event"
    b = cluster.start()
    wait_for(lambda: any(e["type"] == "peer_up" and e["data"]["node_id"] == b.node_id for e in seen),
             message="peer_up event")
    conversation_id = new_conversation(b, "From B")
    say(b, conversation_id, "hello A")
    listener.join(10)
    message_events = [e for e in seen if e["type"] == "message"]
    assert message_events and message_events[0]["data"]["conversation_id"] == conversation_id


# -- the original NeuroMesh's files -----------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir(ORIGINAL_LAYOUT), reason="shared/data is not beside the checkout")
def test_import_of_the_original_files_and_export_round_trip(cluster, tmp_path):
    data_dir = tmp_path / "importer"
    result = run_cli("--data-dir", str(data_dir), "import", ORIGINAL_LAYOUT)
    assert result.returncode == 0, result.stderr
    again = run_cli("--data-dir", str(data_dir), "import", ORIGINAL_LAYOUT)
    assert again.returncode == 0, again.stderr
    node = cluster.start("importer", data_dir=data_dir)
    records = node.json("/api/conversations")
    counts = sorted(record["message_count"] for record in records)
    assert counts == [1, 2, 4, 4, 144]  # importing twice added nothing
    labels = {record["peer_label"] for record in records if record["peer_label"]}
    assert labels == {"10.33.241.183", "10.99.100.183", "192.168.25.37", "192.168.25.39"}
    assert set(node.json("/peers")) >= labels

    export_dir = tmp_path / "exported"
    exported = run_cli("--data-dir", str(data_dir), "export", str(export_dir))
    assert exported.returncode == 0, exported.stderr
    fresh = tmp_path / "fresh"
    assert run_cli("--data-dir", str(fresh), "import", str(export_dir)).returncode == 0
    second = cluster.start("fresh", data_dir=fresh, discovery=False)

    def shape(n):
        out = []
        for record in n.json("/api/conversations"):
            messages = n.json("/api/conversations/%s" % record["id"])["messages"]
            out.append(sorted((m["timestamp"], m["sender"], m["role"], m["content"]) for m in messages))
        return sorted(out)

    assert shape(second) == shape(node)


def test_import_of_a_bad_file_names_it_and_imports_nothing(tmp_path):
    layout = tmp_path / "broken"
    (layout / "conversations").mkdir(parents=True)
    (layout / "conversations" / "local.json").write_text('{"id": "local", "messages": [{"content": "hi"')
    result = run_cli("--data-dir", str(tmp_path / "node"), "import", str(layout))
    assert result.returncode == 2
    assert "local.json" in result.stderr and "Traceback" not in result.stderr
