"""The store room in-process: durable conversations and the sync entries that carry them.

What it covers: timestamps of every format the original program wrote; conversations written,
read, renamed and deleted on one node; an entry applied twice, or from two origins, counted
once; version vectors and bounded batches; two stores that exchange entries converge, in any
delivery order, with tombstones that stay dead, private conversations that stay home and
changes by a non-owner refused; nothing acknowledged is lost to a reopen, a SIGKILL or
concurrent writers; the original program's files imported and exported; garbage entries from
a peer skipped, never raised.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuromesh as nm

from conftest import ORIGINAL_LAYOUT_PEERS as SEED_PEERS

# Real files written by the original NeuroMesh, beside the repository when it is checked out
# in the project's workspace; the tests that need them skip elsewhere.
REAL_SEED = Path(__file__).resolve().parents[3] / "shared" / "data" / "original-neuromesh-layout"
needs_real_seed = pytest.mark.skipif(
    not REAL_SEED.is_dir(), reason="the original NeuroMesh's files (../shared/data/"
    "original-neuromesh-layout) are not beside this checkout")


# -- helpers -----------------------------------------------------------------

def store(node, name=None, path=":memory:"):
    return nm.Store(str(path), node, name or node.lower())


def pull(dst, src, **limits):
    """dst asks src for what it misses until nothing more comes; returns rounds."""
    rounds = 0
    while True:
        rounds += 1
        before = dst.version_vector()
        batch, more = src.entries_missing(before, **limits)
        dst.apply_entries(batch)
        if not more or dst.version_vector() == before:
            return rounds


def exchange(*stores):
    for _ in range(2):
        for a in stores:
            for b in stores:
                if a is not b:
                    pull(a, b)


def state(s):
    """Everything a user can see, minus the per-node `own` flag."""
    conversations = []
    for record in s.list_conversations():
        full = s.get_conversation(record["id"])
        full.pop("own")
        conversations.append(full)
    return sorted(conversations, key=lambda c: c["id"]), s.version_vector()


def contents(s, conversation_id):
    return [m["content"] for m in s.get_conversation(conversation_id)["messages"]]


@pytest.fixture
def seed_dir(original_layout):
    return original_layout


@pytest.fixture
def real_seed_dir(tmp_path):
    target = tmp_path / "seed"
    shutil.copytree(REAL_SEED, target)
    for root, dirs, files in os.walk(target):   # the original is read-only
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    return target


# -- timestamps ----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2025-03-25T13:56:00.304707400Z", "2025-03-25T13:56:00.304707Z"),
    ("2025-03-25T13:56:00.3047074Z", "2025-03-25T13:56:00.304707Z"),
    ("2025-03-25T13:56:00.304707Z", "2025-03-25T13:56:00.304707Z"),
    ("2025-03-25T13:56:00Z", "2025-03-25T13:56:00.000000Z"),
    ("2025-03-25T13:56:00.5", "2025-03-25T13:56:00.500000Z"),
    ("2025-03-25T15:56:00.1+02:00", "2025-03-25T13:56:00.100000Z"),
    ("0999-01-02T03:04:05.000006Z", "0999-01-02T03:04:05.000006Z"),
    (" 2025-03-25T13:56:00Z\n", "2025-03-25T13:56:00.000000Z"),
])
def test_timestamps_parse_and_format(text, expected):
    moment = nm.parse_timestamp(text)
    assert moment.utcoffset().total_seconds() == 0
    assert nm.format_timestamp(moment) == expected


@pytest.mark.parametrize("text", [
    "yesterday", "2025-13-01T00:00:00Z", "2025-03-25T13:56:00.1234567890Z",
    "2025-03-25", "", None, 17, "2025-02-30T00:00:00Z", "0001-01-01T00:00:00+01:00",
    "\u0662025-03-25T13:56:00Z",
])
def test_bad_timestamps_raise_value_error(text):
    with pytest.raises(ValueError):
        nm.parse_timestamp(text)


@needs_real_seed
def test_every_original_timestamp_parses():
    for path in REAL_SEED.rglob("*.json"):
        for message in json.loads(path.read_text(encoding="utf-8"))["messages"]:
            nm.parse_timestamp(message["timestamp"])


# -- local writes and reads ----------------------------------------------------

def test_local_conversation_lifecycle():
    a = store("nodeA", "alice")
    c = a.create_conversation("Plans")
    assert c["own"] and c["origin"] == "nodeA" and c["origin_name"] == "alice"
    entry = a.add_message(c["id"], "user", "hello", "alice",
                          {"hostname": "h", "ip_address": "10.0.0.1", "is_llm_host": False})
    assert entry["uid"] == "nodeA:%d" % entry["seq"] and entry["kind"] == "message"
    a.add_message(c["id"], "assistant", "hi!", "LLM", model="m", answered_by="nodeA",
                  answered_by_name="alice")
    full = a.get_conversation(c["id"])
    assert [m["role"] for m in full["messages"]] == ["user", "assistant"]
    assert full["messages"][1]["model"] == "m" and full["message_count"] == 2
    assert a.update_conversation(c["id"], title="Trip")["title"] == "Trip"
    assert a.message_count() == 2
    a.delete_conversation(c["id"])
    assert a.get_conversation(c["id"]) is None and a.list_conversations() == []
    for action in (lambda: a.add_message(c["id"], "user", "x", "alice"),
                   lambda: a.update_conversation(c["id"], title="again"),
                   lambda: a.delete_conversation(c["id"])):
        with pytest.raises(nm.StoreError):
            action()
    with pytest.raises(nm.StoreError):
        a.add_message("no-such-id", "user", "x", "alice")
    with pytest.raises(nm.StoreError):
        a.add_message(a.create_conversation()["id"], "robot", "x", "alice")


def test_default_conversation_is_stable_and_replaced_after_delete():
    a = store("nodeA")
    first = a.default_conversation()
    assert first["title"] == "Local chat" and a.default_conversation()["id"] == first["id"]
    assert store("nodeA").default_conversation()["id"] == first["id"]
    a.delete_conversation(first["id"])
    second = a.default_conversation()
    assert second["id"] != first["id"] and a.default_conversation()["id"] == second["id"]


def test_seed_shapes():
    a = store("nodeA", "alice")
    c = a.default_conversation()
    host = {"hostname": "Wasim", "ip_address": "192.168.1.8", "is_llm_host": False}
    a.add_message(c["id"], "user", "q", "user", host)
    a.add_message(c["id"], "assistant", "a", "LLM", dict(host, is_llm_host=True))
    seed = nm.seed_conversation(a.get_conversation(c["id"]))
    assert set(seed) == {"id", "messages", "host_info"} and seed["host_info"] == host
    assert [m["message_type"] for m in seed["messages"]] == ["Question", "Response"]
    assert set(seed["messages"][0]) == {"content", "timestamp", "sender", "message_type",
                                        "host_info"}


def test_local_writes_are_announced_after_commit():
    a = store("nodeA")
    heard = []

    def listener(entries):
        # Called outside the lock: reading the store here must not deadlock.
        heard.append([(e["kind"], a.is_shared(e), len(a.list_conversations())) for e in entries])
    a.writes.watch(listener)
    c = a.create_conversation("c")
    entry = a.add_message(c["id"], "user", "hi", "alice")
    assert a.messages.message_from_entry(entry) == a.get_conversation(c["id"])["messages"][0]
    a.update_conversation(c["id"], private=True)
    a.add_message(c["id"], "user", "secret", "alice")
    a.update_conversation(c["id"], private=False)
    assert heard == [[("conversation", True, 1)], [("message", True, 1)],
                     [("conversation", True, 1)], [("message", False, 1)],
                     [("message", True, 1), ("conversation", True, 1)]]
    a.writes.watch(lambda entries: 1 / 0)            # logged, the write still stands
    a.add_message(c["id"], "user", "kept", "alice")
    assert contents(a, c["id"])[-1] == "kept"
    b = store("nodeB")
    b.create_conversation("theirs")
    assert a.apply_entries(b.entries_missing({})[0])
    assert len(heard) == 6                           # the kept write; peers' entries are the caller's


# -- idempotence and vectors -------------------------------------------------------

def test_same_entry_twice_is_a_no_op():
    a, b = store("nodeA"), store("nodeB")
    c = a.create_conversation()
    a.add_message(c["id"], "user", "once", "alice")
    batch, _ = a.entries_missing({})
    assert len(b.apply_entries(batch)) == 2
    assert b.apply_entries(batch) == [] and b.apply_entries(batch + batch) == []
    assert contents(b, c["id"]) == ["once"] and b.version_vector() == {"nodeA": 2}


def test_same_uid_from_two_origins_is_listed_once():
    a, b = store("nodeA"), store("nodeB")
    c = a.create_conversation()
    (snapshot,), _ = a.entries_missing({})
    b.apply_entries([snapshot])
    uid = "import:" + "ab" * 32
    data = {"role": "user", "content": "same", "sender": "s",
            "host_info": {"hostname": "h", "ip_address": "", "is_llm_host": False},
            "model": None, "answered_by": None, "answered_by_name": None, "tokens_per_second": None}
    first = {"origin": "nodeX", "seq": 1, "kind": "message", "conversation_id": c["id"],
             "timestamp": "2025-01-01T00:00:00.000000Z", "uid": uid, "data": data}
    second = dict(first, origin="nodeY")
    assert b.apply_entries([first, second]) == [first]
    assert contents(b, c["id"]) == ["same"]
    # The repeated uid still fills nodeY's slot 1, so no gap stays open.
    assert b.version_vector() == {"nodeA": 1, "nodeX": 1, "nodeY": 1}
    assert len(b.entries_missing({})[0]) == 3


def test_vector_counts_only_the_contiguous_prefix():
    a, b = store("nodeA"), store("nodeB")
    c = a.create_conversation()
    for text in ("one", "two", "three"):
        a.add_message(c["id"], "user", text, "alice")
    entries, more = a.entries_missing({})
    assert [e["seq"] for e in entries] == [1, 2, 3, 4] and not more
    b.apply_entries([entries[0], entries[1], entries[3]])          # 1, 2, 4
    assert b.version_vector() == {"nodeA": 2}
    refill, _ = a.entries_missing(b.version_vector())
    assert [e["seq"] for e in refill] == [3, 4]
    assert [e["seq"] for e in b.apply_entries(refill)] == [3]
    assert b.version_vector() == {"nodeA": 4}
    assert contents(b, c["id"]) == ["one", "two", "three"]
    assert a.entries_missing(b.version_vector()) == ([], False)


def test_batches_are_bounded_and_looping_converges():
    a, b, c = store("nodeA"), store("nodeB"), store("nodeC")
    conversation = a.create_conversation()
    for i in range(60):
        a.add_message(conversation["id"], "user", "message %d " % i + "x" * 200, "alice")
    batch, more = a.entries_missing({}, max_entries=7)
    assert len(batch) == 7 and more
    batch, more = a.entries_missing({}, max_bytes=2000)
    assert more and 1 <= len(batch) < 10
    assert sum(len(json.dumps(e)) for e in batch) <= 2000
    assert pull(b, a, max_entries=7) == 9
    assert pull(c, a, max_bytes=3000) > 5
    assert state(a) == state(b) == state(c)
    # An entry bigger than max_bytes still travels, alone.
    a.add_message(conversation["id"], "user", "y" * 5000, "alice")
    batch, more = a.entries_missing(b.version_vector(), max_bytes=100)
    assert len(batch) == 1 and not more


def test_entries_missing_tolerates_a_bad_vector():
    a = store("nodeA")
    a.create_conversation()
    for vector in (None, [], {"nodeA": "x"}, {"nodeA": -3}, {"nodeA": True, 5: 1}):
        assert len(a.entries_missing(vector)[0]) == 1


# -- sync between stores -------------------------------------------------------

def test_two_stores_converge_to_identical_conversations():
    a, b = store("nodeA", "alice"), store("nodeB", "bob")
    ca, cb = a.create_conversation("A's"), b.create_conversation("B's")
    a.add_message(ca["id"], "user", "a1", "alice")
    b.add_message(cb["id"], "user", "b1", "bob")
    exchange(a, b)
    a.add_message(cb["id"], "user", "a-in-b", "alice")
    b.add_message(ca["id"], "assistant", "b-in-a", "LLM")
    b.update_conversation(cb["id"], title="B renamed")
    exchange(a, b)
    assert state(a) == state(b)
    assert contents(a, cb["id"]) == ["b1", "a-in-b"]
    listed = {r["id"]: r for r in b.list_conversations()}
    assert listed[ca["id"]]["origin_name"] == "alice" and not listed[ca["id"]]["own"]
    assert listed[cb["id"]]["title"] == "B renamed" and listed[cb["id"]]["message_count"] == 2


def test_chain_forwards_entries_from_any_origin():
    a, b, c = store("nodeA"), store("nodeB"), store("nodeC")
    conversation = a.create_conversation("from A")
    a.add_message(conversation["id"], "user", "hop", "alice")
    pull(b, a)
    pull(c, b)                                    # no A-C link
    assert contents(c, conversation["id"]) == ["hop"]
    c.add_message(conversation["id"], "user", "back", "carol")
    pull(b, c)
    pull(a, b)
    assert state(a) == state(b) == state(c)
    assert c.version_vector() == a.version_vector() == {"nodeA": 2, "nodeC": 1}


def test_tombstones_propagate_and_do_not_resurrect():
    a, b, c = store("nodeA"), store("nodeB"), store("nodeC")
    conversation = a.create_conversation("doomed")
    exchange(a, b, c)
    late = c.add_message(conversation["id"], "user", "written before the news", "carol")
    a.delete_conversation(conversation["id"])
    pull(b, a)
    assert b.get_conversation(conversation["id"]) is None and b.list_conversations() == []
    with pytest.raises(nm.StoreError):
        b.add_message(conversation["id"], "user", "too late", "bob")
    assert b.apply_entries([late]) == [late]      # stored, forwarded, never shown
    # Even a later snapshot from the owner claiming deleted=false keeps it dead.
    tombstone = a.entries_missing({})[0][-1]
    assert tombstone["data"]["deleted"]
    revived = dict(tombstone, seq=tombstone["seq"] + 1,
                   uid="nodeA:%d" % (tombstone["seq"] + 1),
                   data=dict(tombstone["data"], deleted=False, title="alive?"))
    b.apply_entries([revived])
    exchange(a, b, c)
    for s in (a, b, c):
        assert s.get_conversation(conversation["id"]) is None
        assert s.list_conversations() == [] and s.message_count() == 0


def test_changes_by_a_non_owner_are_refused():
    a, b, c = store("nodeA", "alice"), store("nodeB"), store("nodeC")
    conversation = a.create_conversation("mine")
    exchange(a, b, c)
    with pytest.raises(nm.StoreError, match="belongs to alice"):
        b.update_conversation(conversation["id"], title="stolen")
    with pytest.raises(nm.StoreError, match="belongs to alice"):
        b.delete_conversation(conversation["id"])
    snapshot = a.entries_missing({})[0][0]
    forged = [dict(snapshot, origin="nodeB", seq=1, uid="nodeB:1",
                   data=dict(snapshot["data"], title="stolen", deleted=True))]
    assert c.apply_entries(forged) == []
    assert c.get_conversation(conversation["id"])["title"] == "mine"
    assert c.version_vector()["nodeB"] == 1       # the slot is filled, no endless resend


def test_private_conversations_never_leave_their_node():
    a, b = store("nodeA"), store("nodeB")
    secret = a.create_conversation("secret", private=True)
    a.add_message(secret["id"], "user", "diary", "alice")
    shared = a.create_conversation("shared")
    a.add_message(shared["id"], "user", "before", "alice")
    exchange(a, b)
    assert set(a.version_vector()) == {"nodeA"}
    assert all(e["conversation_id"] != secret["id"] for e in a.entries_missing({})[0])
    assert b.get_conversation(secret["id"]) is None
    assert [r["id"] for r in a.list_conversations() if r["private"]] == [secret["id"]]

    a.update_conversation(shared["id"], private=True)
    a.add_message(shared["id"], "user", "hidden", "alice")
    a.update_conversation(shared["id"], title="hidden title")
    exchange(a, b)
    assert b.get_conversation(shared["id"]) is None
    assert shared["id"] not in [r["id"] for r in b.list_conversations()]
    wire = json.dumps(a.entries_missing({})[0])
    assert "hidden" not in wire and "diary" not in wire and "~" not in wire
    assert contents(a, shared["id"]) == ["before", "hidden"]

    for _ in range(2):                      # toggling again must not duplicate
        a.update_conversation(shared["id"], private=False)
        exchange(a, b)
        assert contents(a, shared["id"]) == contents(b, shared["id"]) == ["before", "hidden"]
        assert b.get_conversation(shared["id"])["title"] == "hidden title"
        a.update_conversation(shared["id"], private=True)
        exchange(a, b)
        assert b.get_conversation(shared["id"]) is None
    a.update_conversation(shared["id"], private=False)
    a.update_conversation(secret["id"], private=False)
    exchange(a, b)
    assert state(a) == state(b)
    assert contents(b, secret["id"]) == ["diary"]


# -- durability ------------------------------------------------------------------

def test_reopened_database_has_everything(tmp_path):
    path = tmp_path / "data" / "neuromesh.db"
    a = store("nodeA", path=path)
    conversation = a.create_conversation("kept")
    for i in range(5):
        a.add_message(conversation["id"], "user", "m%d" % i, "alice")
    peer = store("nodeB")
    peer.add_message(peer.create_conversation()["id"], "user", "remote", "bob")
    a.apply_entries(peer.entries_missing({})[0])
    # A second connection sees every acknowledged write before the first closes.
    assert state(store("nodeA", path=path)) == state(a)
    before = state(a)
    a.close()
    reopened = store("nodeA", path=path)
    assert state(reopened) == before
    reopened.add_message(conversation["id"], "user", "after", "alice")
    assert reopened.version_vector() == {"nodeA": 7, "nodeB": 2}
    reopened.close()
    with sqlite3.connect(str(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == nm.Store.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(nm.StoreError, match="belongs to node nodeA"):
        store("nodeZ", path=path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "neuromesh.db"
    store("nodeA", path=path).close()
    with sqlite3.connect(str(path)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(nm.StoreError, match="schema version 99"):
        store("nodeA", path=path)


def test_sigkill_after_acknowledgment_loses_nothing(tmp_path):
    path = tmp_path / "neuromesh.db"
    child = (
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location('m', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "s = m.Store(sys.argv[2], 'nodeK', 'k')\n"
        "c = s.default_conversation()\n"
        "for i in range(25):\n"
        "    s.add_message(c['id'], 'user', 'm%d' % i, 'k')\n"
        "print(c['id'], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", child, nm.__file__, str(path)],
                          stdout=subprocess.PIPE, timeout=60)
    assert done.returncode == -9
    conversation_id = done.stdout.decode().strip()
    assert contents(store("nodeK", path=path), conversation_id) == ["m%d" % i for i in range(25)]


def test_concurrent_writers_lose_nothing(tmp_path):
    a = store("nodeA", path=tmp_path / "neuromesh.db")
    conversation = a.default_conversation()
    errors = []

    def write(n):
        try:
            for i in range(40):
                a.add_message(conversation["id"], "user", "%d-%d" % (n, i), "t%d" % n)
        except Exception as error:      # pragma: no cover - reported below
            errors.append(error)
    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(contents(a, conversation["id"])) == sorted(
        "%d-%d" % (n, i) for n in range(8) for i in range(40))
    assert a.version_vector() == {"nodeA": 321}


# -- the original NeuroMesh's files ----------------------------------------------------

@pytest.mark.parametrize("layout", [
    "seed_dir", pytest.param("real_seed_dir", marks=needs_real_seed)])
def test_import_of_the_original_layout(layout, request):
    seed_dir = request.getfixturevalue(layout)
    a = store("nodeA", "alice")
    assert nm.SeedFiles(a).import_layout(str(seed_dir)) == {
        "conversations": 5, "messages": 155, "skipped": 0}
    listed = a.list_conversations()
    local = [r for r in listed if r["peer_label"] is None]
    assert len(local) == 1 and local[0]["message_count"] == 144
    assert local[0]["title"] == "Imported: local"
    peers = {r["peer_label"]: r for r in listed if r["peer_label"]}
    assert {p: r["message_count"] for p, r in peers.items()} == SEED_PEERS
    assert all(r["origin_name"] == p for p, r in peers.items())
    messages = a.get_conversation(local[0]["id"])["messages"]
    original = json.loads((seed_dir / "conversations" / "local.json").read_text())["messages"]
    assert messages[0]["content"] == "helllo" and messages[0]["role"] == "user"
    assert messages[0]["timestamp"] == "2025-03-25T13:56:00.304707Z"
    assert sorted(m["content"] for m in messages) == sorted(m["content"] for m in original)
    assert sum(m["role"] == "assistant" for m in messages) == 69
    before = state(a)
    assert nm.SeedFiles(a).import_layout(str(seed_dir)) == {
        "conversations": 0, "messages": 0, "skipped": 155}
    assert state(a) == before


def test_export_then_import_gives_the_same_conversations(seed_dir, tmp_path):
    a, b = store("nodeA", "alice"), store("nodeB", "../bob/..")
    nm.SeedFiles(a).import_layout(str(seed_dir))
    a.add_message(a.default_conversation()["id"], "user", "native", "alice")
    extra = a.create_conversation("Extra")
    a.add_message(extra["id"], "assistant", "answer", "LLM", model="m")
    hidden = a.create_conversation("Hidden", private=True)
    a.add_message(hidden["id"], "user", "private words", "alice")
    bobs = b.create_conversation("Bob's chat")
    b.add_message(bobs["id"], "user", "from bob", "bob")
    pull(a, b)
    out = tmp_path / "export"
    summary = nm.SeedFiles(a).export_layout(str(out))
    assert summary["private_skipped"] == 1
    assert sorted(p.name for p in (out / "received").iterdir()) == sorted(
        list(SEED_PEERS) + ["__bob__"])
    assert "private words" not in "".join(p.read_text() for p in out.rglob("*.json"))
    local = json.loads((out / "conversations" / "local.json").read_text())
    # local.json holds this node's own conversations, in time order, as the original's did.
    assert local["id"] == "local" and local["messages"][0]["content"] == "helllo"
    assert local["messages"][0]["timestamp"] == "2025-03-25T13:56:00.304707400Z"  # full precision
    assert {"native", "answer"} <= {m["content"] for m in local["messages"]}

    def shown(s):
        return sorted(
            (c["title"], c["origin_name"] if not c["own"] or c["peer_label"] else "",
             [(m["content"], m["sender"], m["role"], m["timestamp"]) for m in c["messages"]])
            for c in (s.get_conversation(r["id"]) for r in s.list_conversations())
            if not c["private"])

    fresh = store("nodeF", "fred")
    counts = nm.SeedFiles(fresh).import_layout(str(out))
    assert counts["messages"] == summary["messages"] == a.message_count() - 1
    assert shown(fresh) == shown(a)
    assert nm.SeedFiles(fresh).import_layout(str(out))["messages"] == 0
    # The original files hold nothing the export loses.
    assert {r["peer_label"]: r["message_count"] for r in fresh.list_conversations()
            if r["peer_label"] in SEED_PEERS} == SEED_PEERS


@pytest.mark.parametrize("damage, problem", [
    (lambda doc: "{not json", "not readable JSON"),
    (lambda doc: doc["messages"][3].pop("content") and doc, "message 4 has no 'content'"),
    (lambda doc: doc["messages"][1].update(timestamp="25/03/2025") or doc,
     "message 2: timestamp"),
    (lambda doc: doc["messages"][0].update(message_type="Shout") or doc, "message_type"),
    (lambda doc: doc["messages"][0].update(content=7) or doc, "content is not a string"),
    (lambda doc: [doc], 'a "messages" list'),
])
def test_a_bad_file_imports_nothing(seed_dir, damage, problem):
    bad = seed_dir / "received" / "192.168.25.39" / "local.json"
    document = damage(json.loads(bad.read_text()))
    bad.write_text(document if isinstance(document, str) else json.dumps(document))
    a = store("nodeA")
    with pytest.raises(nm.StoreError) as raised:
        nm.SeedFiles(a).import_layout(str(seed_dir))
    assert str(bad) in str(raised.value) and problem in str(raised.value)
    assert a.list_conversations() == [] and a.version_vector() == {}


def test_import_of_a_missing_or_empty_directory(tmp_path):
    a = store("nodeA")
    for directory in (tmp_path / "nope", tmp_path):
        with pytest.raises(nm.StoreError):
            nm.SeedFiles(a).import_layout(str(directory))


def test_safe_names():
    for text in ("../..", "a/b\\c", "", "..", ".hidden", "x" * 500, "ok-1.2_3", "ü ñ"):
        name = nm._safe_name(text)
        assert name and ".." not in name and "/" not in name and not name.startswith(".")
        assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
    assert nm._safe_name("ok-1.2_3") == "ok-1.2_3"


# -- peer input that is wrong --------------------------------------------------

def _valid_entries():
    a = store("nodeA")
    conversation = a.create_conversation()
    a.add_message(conversation["id"], "user", "fine", "alice")
    return a.entries_missing({})[0]


def test_garbage_entries_are_skipped():
    snapshot, message = _valid_entries()
    huge = dict(message, data=dict(message["data"], content="x" * (nm.MAX_CONTENT_BYTES + 1)))
    garbage = [
        None, 5, "entry", [], {}, dict(message, seq="2"), dict(message, seq=True),
        dict(message, seq=0), dict(message, seq=-1), dict(message, seq=2 ** 70),
        dict(message, kind="poem"), dict(message, origin=None), dict(message, origin="a/b"),
        dict(message, origin="nodeA~private", uid="nodeA~private:2"),
        dict(message, uid="nodeA:1"), dict(message, uid=None), dict(message, timestamp="now"),
        dict(message, conversation_id="../x"), dict(message, data=[]), huge,
        dict(message, data=dict(message["data"], role="god")),
        dict(message, data=dict(message["data"], content="\ud800")),
        dict(message, data=dict(message["data"], host_info="h")),
        dict(message, data=dict(message["data"], host_info={"is_llm_host": "yes"})),
        dict(snapshot, data=dict(snapshot["data"], private="no")),
        dict(snapshot, data=dict(snapshot["data"], title="t" * 5000)),
        dict(snapshot, data={}),
    ]
    b = store("nodeB")
    assert b.apply_entries(garbage) == []
    assert b.apply_entries("not a list") == [] and b.apply_entries(None) == []
    assert b.version_vector() == {} and b.list_conversations() == []
    assert len(b.apply_entries(garbage + [snapshot, message])) == 2
    assert b.message_count() == 1


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.lists(_json, max_size=4), field=st.sampled_from(
    ["origin", "seq", "kind", "conversation_id", "timestamp", "uid", "data"]),
    value=_json, data_field=st.text(max_size=12))
def test_fuzzed_entries_never_raise(garbage, field, value, data_field):
    b = store("nodeB")
    snapshot, message = _valid_entries()
    mutated = dict(message, **{field: value})
    mutated_data = dict(snapshot, data=dict(snapshot["data"], **{data_field: value}))
    b.apply_entries(garbage + [mutated, mutated_data])
    b.list_conversations()
    b.entries_missing({})


# -- convergence, whatever the delivery order ----------------------------------------

def _scenario():
    """All public entries of a small mesh history: three writers, messages in
    each other's conversations, a rename, a private spell, a delete."""
    a, b, c = store("nodeA", "alice"), store("nodeB", "bob"), store("nodeC", "carol")
    ca, cb, cc = (s.create_conversation("by " + s.node_name) for s in (a, b, c))
    for i in range(3):
        a.add_message(ca["id"], "user", "a%d" % i, "alice")
        b.add_message(cb["id"], "user", "b%d" % i, "bob")
    exchange(a, b, c)
    c.add_message(ca["id"], "assistant", "c answers a", "LLM")
    b.add_message(cc["id"], "user", "b in c", "bob")
    a.update_conversation(ca["id"], title="renamed")
    a.update_conversation(ca["id"], private=True)
    a.add_message(ca["id"], "user", "while private", "alice")
    a.update_conversation(ca["id"], private=False)
    b.delete_conversation(cb["id"])
    c.add_message(cc["id"], "user", "c1", "carol")
    exchange(a, b, c)
    assert state(a) == state(b) == state(c)
    return a.entries_missing({}, max_entries=10 ** 6)[0]


_POOL = _scenario()


def _deliver(entries, cuts):
    s = store("nodeR")
    start = 0
    for cut in sorted(cuts) + [len(entries)]:
        s.apply_entries(entries[start:cut])
        start = cut
    return s


_REFERENCE = state(_deliver(_POOL, []))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.permutations(range(len(_POOL))),
       repeats=st.lists(st.integers(0, len(_POOL) - 1), max_size=15),
       cuts=st.lists(st.integers(0, len(_POOL) + 15), max_size=6))
def test_any_delivery_order_with_duplicates_converges(order, repeats, cuts):
    delivery = [_POOL[i] for i in order]
    for n, i in enumerate(repeats):
        delivery.insert((n * 7) % (len(delivery) + 1), _POOL[i])
    assert state(_deliver(delivery, [min(c, len(delivery)) for c in cuts])) == _REFERENCE


def test_reference_state_of_the_scenario():
    conversations, vector = _REFERENCE
    titles = {c["title"]: c for c in conversations}
    assert set(titles) == {"renamed", "by carol"}            # bob's was deleted
    assert [m["content"] for m in titles["renamed"]["messages"]] == [
        "a0", "a1", "a2", "c answers a", "while private"]
    assert set(vector) == {"nodeA", "nodeB", "nodeC"}
