"""Signed origins: node keys, the HELO key proof, signed hash-chained logs, ownership
by key, relayed history, a signed catch-up, and data dirs from before keys.

Network safety: loopback only (127.0.0.0/8); nodes bind 127.0.0.1 (the cluster fixture)."""

import os
import stat
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh as nm
from conftest import fully_linked, keyed_store, make_entry, signed_run, wait_for, write_schema1_data_dir


@pytest.fixture
def honest():
    """A (store, key) with a conversation of two messages, and a peer store that synced it."""
    a, key_a = keyed_store(name="alice")
    b, _key_b = keyed_store(name="bob")
    conversation = a.create_conversation("Alice's notes")
    a.add_message(conversation["id"], "user", "one", "alice")
    a.add_message(conversation["id"], "user", "two", "alice")
    payload = a.batches.missing(b.version_vector())
    b.batches.apply(payload)
    yield a, key_a, b, conversation["id"], payload
    a.close()
    b.close()


def contents(store, conversation_id):
    return [message["content"] for message in store.get_conversation(conversation_id)["messages"]]


def assert_intact(store, conversation_id):
    record = store.get_conversation(conversation_id)
    assert record["title"] == "Alice's notes" and not record["deleted"]
    assert contents(store, conversation_id) == ["one", "two"]


# -- identity -----------------------------------------------------------------------------------


def test_the_key_is_private_and_the_node_id_is_its_hash(tmp_path):
    key = nm.load_node_key(str(tmp_path))
    path = tmp_path / nm.KEY_FILE
    if os.name != "nt":
        assert stat.S_IMODE(os.stat(str(path)).st_mode) == 0o600
    assert key.node_id == nm.node_id_from_key(key.public) and len(key.node_id) == 32
    nm.Store(str(tmp_path / nm.DATABASE_FILE), key.node_id, "A", key).close()
    assert nm.load_node_key(str(tmp_path)).node_id == key.node_id
    path.write_text("damaged")
    with pytest.raises(nm.ConfigError):
        nm.load_node_key(str(tmp_path))
    assert "seed" not in repr(key) and key.public.hex() not in repr(key)


# -- forgeries rejected, honest data intact --------------------------------------------------------


def test_a_message_forged_as_another_node_is_rejected(honest):
    a, _key_a, b, cid, _payload = honest
    forger = nm.NodeKey.generate()
    entry = make_entry(a.node_id, 4, cid, content="I did not write this")
    for head_key in (forger.public, a.batches._chain.public_key(a.node_id)):  # its own key, or A's named
        with pytest.raises(nm.BatchRejected) as rejected:
            b.batches.apply(signed_run(forger, [entry], prev=b.batches._chain.head(a.node_id)[1],
                                       head_key=head_key))
        assert rejected.value.origin == a.node_id
    assert_intact(b, cid)


@pytest.mark.parametrize("change", ["delete", "rename", "message"])
def test_a_change_to_another_nodes_conversation_is_rejected(honest, change):
    a, _key_a, b, cid, _payload = honest
    mallory, key_m = keyed_store(name="mallory")
    entry = make_entry(key_m.node_id, 1, cid, "message" if change == "message" else "conversation",
                       title="pwned", deleted=change == "delete", content="spam")
    with pytest.raises(nm.BatchRejected) as rejected:
        b.batches.apply(signed_run(key_m, [entry]))  # correctly signed, but not its conversation
    assert rejected.value.origin == key_m.node_id
    assert_intact(b, cid)
    assert b.version_vector().get(key_m.node_id) is None, "nothing of the batch was stored"
    mallory.close()


def test_a_replayed_head_with_altered_entries_is_rejected(honest):
    a, _key_a, b, cid, payload = honest
    altered = dict(payload, entries=[dict(entry) for entry in payload["entries"]])
    last = altered["entries"][-1]
    last["data"] = dict(last["data"], content="altered")
    fresh, _ = keyed_store(name="carol")
    with pytest.raises(nm.BatchRejected, match="broken chain"):
        fresh.batches.apply(altered)  # a node that never saw the log
    with pytest.raises(nm.BatchRejected, match="forked log"):
        b.batches.apply(altered)  # a node that holds the real entries
    assert_intact(b, cid)
    assert fresh.version_vector() == {}
    fresh.close()


def test_a_gap_waits_and_a_held_batch_is_a_no_op(honest):
    a, _key_a, b, cid, payload = honest
    assert b.batches.apply(payload) == (None, [])
    a.add_message(cid, "user", "three", "alice")
    entry = a.add_message(cid, "user", "four", "alice")
    push = a.batches.payload([entry])
    assert push["heads"][a.node_id]["seq"] == entry["seq"]
    assert b.batches.apply(push) == (None, []), "a push past a gap waits for SYNC"
    b.batches.apply(a.batches.missing(b.version_vector()))
    assert contents(b, cid) == ["one", "two", "three", "four"]


def test_a_helo_with_another_nodes_id_closes_the_link(cluster, linked_peer):
    a, b = cluster.start("a"), cluster.start("b")
    wait_for(lambda: fully_linked([a, b]), message="a and b linked")
    impostor = linked_peer(a, name="impostor", node_id=b.node_id)
    assert impostor.closed_by_node(), "a HELO whose id is not its key's closes the link"
    assert "not its key's" in a.log()
    honest_peer = linked_peer(a, name="honest")
    wait_for(lambda: honest_peer.node_id in a.connected_ids(), message="a peer with its own key links")
    assert b.node_id in a.connected_ids() and a.node_id in b.connected_ids()


def test_a_live_forger_is_unlinked_and_the_data_stays(cluster, linked_peer):
    a, b = cluster.start("a"), cluster.start("b")
    wait_for(lambda: fully_linked([a, b]), message="a and b linked")
    cid = b.post("/api/conversations", json={"title": "Alice's notes"}).json()["id"]
    b.post("/api/conversations/%s/messages" % cid, json={"content": "one", "sender": "b", "answer": False})
    wait_for(lambda: len(a.get("/api/conversations/%s" % cid).json().get("messages", [])) == 1,
             message="the message on a")
    evil = linked_peer(a, name="evil")
    wait_for(lambda: evil.node_id in a.connected_ids(), message="the forger linked")
    tombstone = make_entry(evil.node_id, 1, cid, "conversation", deleted=True)
    evil.send(nm.FILE, signed_run(evil.key, [tombstone]))
    assert evil.closed_by_node(), "the forger is unlinked"
    wait_for(lambda: "rejected a batch" in a.log(), message="the rejection logged")
    record = a.get("/api/conversations/%s" % cid)
    assert record.status_code == 200 and record.json()["title"] == "Alice's notes"
    assert b.node_id in a.connected_ids()


# -- relayed history ---------------------------------------------------------------------------


def test_c_verifies_as_entries_that_came_through_b(cluster):
    a = cluster.start("a", discovery=False)
    cid = a.post("/api/conversations", json={"title": "from a"}).json()["id"]
    for index in range(5):
        a.post("/api/conversations/%s/messages" % cid, json={"content": "m%d" % index, "sender": "a",
                                                            "answer": False})
    b = cluster.start("b", discovery=False, extra=["--peer", "127.0.0.1:%d" % a.tcp_port])
    wait_for(lambda: len((b.get("/api/conversations/%s" % cid).json() or {}).get("messages", [])) == 5,
             message="a's messages on b")
    a.stop()  # from now on, only b holds a's log
    c = cluster.start("c", discovery=False, extra=["--peer", "127.0.0.1:%d" % b.tcp_port])
    wait_for(lambda: len((c.get("/api/conversations/%s" % cid).json() or {}).get("messages", [])) == 5,
             message="a's messages on c, through b")
    record = c.get("/api/conversations/%s" % cid).json()
    assert record["origin"] == a.node_id and record["title"] == "from a"
    assert "rejected a batch" not in c.log() and "rejected a batch" not in b.log()


def test_a_relay_with_a_smaller_budget_still_sends_signed_runs():
    a, _ = keyed_store(name="a")
    b, _ = keyed_store(name="b")
    c, _ = keyed_store(name="c")
    cid = a.create_conversation("relay")["id"]
    for index in range(40):
        a.add_message(cid, "user", "m%d" % index, "a")
    while True:
        payload = a.batches.missing(b.version_vector(), max_entries=15)
        if not payload["entries"]:
            break
        b.batches.apply(payload)
    rounds = 0
    while rounds < 50:
        payload = b.batches.missing(c.version_vector(), max_entries=4)  # cuts between b's signatures
        if not payload["entries"]:
            break
        c.batches.apply(payload)
        rounds += 1
    assert c.version_vector() == a.version_vector() and len(contents(c, cid)) == 40


# -- catch-up ------------------------------------------------------------------------------------


def _catch_up(source, target, signed):
    while True:
        if signed:
            payload = source.batches.missing(target.version_vector())
            if not payload["entries"]:
                return
            target.batches.apply(payload)
        else:
            entries, _more = source.entries_missing(target.version_vector())
            if not entries:
                return
            target.apply_entries(entries)


def test_a_new_peer_catches_up_and_verifies_everything(tmp_path):
    source, key = keyed_store(tmp_path / "source.db", "source")
    cid = source.create_conversation("long")["id"]
    source._db.write(lambda: [source._log.append(key.node_id, "message", cid, {
        "role": "user", "content": "message %d" % index, "sender": "s",
        "host_info": {"hostname": "h", "ip_address": "", "is_llm_host": False}}) for index in range(2000)])
    times = {}
    for signed in (False, True):
        target, _ = keyed_store(tmp_path / ("signed.db" if signed else "plain.db"), "new")
        started = time.perf_counter()
        _catch_up(source, target, signed)
        times[signed] = time.perf_counter() - started
        assert target.version_vector()[key.node_id] == 2001 and target.message_count() == 2000
        target.close()
    print("catch-up of 2,000: unsigned %.2f s, signed %.2f s, ratio %.2f" % (
        times[False], times[True], times[True] / times[False]))
    assert times[True] < 4 * times[False] + 1.0  # a loose bound: the benchmark measures (goal 1.5x)


# -- data dirs from before keys ------------------------------------------------------------------


def test_an_upgraded_data_dir_keeps_its_conversations_and_syncs(cluster, tmp_path):
    data_dir = tmp_path / "old"
    old_id, written = write_schema1_data_dir(data_dir)
    old = cluster.start("old", data_dir=data_dir)
    assert old.node_id != old_id and old.node_id == nm.node_id_from_key(nm.load_node_key(str(data_dir)).public)
    records = {record["id"]: record for record in old.json("/api/conversations")}
    assert set(written) <= set(records)
    for cid, messages in written.items():
        assert [m["content"] for m in old.get("/api/conversations/%s" % cid).json()["messages"]] == messages
        assert records[cid]["own"] is True
    cid = next(iter(written))
    reply = old.post("/api/conversations/%s/messages" % cid, json={"content": "after", "sender": "s",
                                                                   "answer": False})
    assert reply.status_code == 201, reply.text
    new = cluster.start("new")
    wait_for(lambda: fully_linked([old, new]), message="the upgraded node links with a new one")
    mine = old.post("/api/conversations", json={"title": "since the upgrade"}).json()["id"]
    theirs = new.post("/api/conversations", json={"title": "from the new node"}).json()["id"]
    wait_for(lambda: theirs in {r["id"] for r in old.json("/api/conversations")}, message="new -> upgraded")
    wait_for(lambda: mine in {r["id"] for r in new.json("/api/conversations")}, message="upgraded -> new")
    assert "rejected a batch" not in old.log() + new.log()
    old.stop()
    again = cluster.start("old", data_dir=data_dir)  # a second start does not migrate again
    assert again.node_id == old.node_id and set(written) <= {r["id"] for r in again.json("/api/conversations")}


# -- fuzz ----------------------------------------------------------------------------------------


_FUZZ_SOURCE, _FUZZ_KEY = keyed_store(name="fuzz-source")
_FUZZ_CID = _FUZZ_SOURCE.create_conversation("fuzz")["id"]
for _index in range(6):
    _FUZZ_SOURCE.add_message(_FUZZ_CID, "user", "m%d" % _index, "s")
_FUZZ_PAYLOAD = _FUZZ_SOURCE.batches.missing({})

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 2 ** 64), st.text(max_size=80),
                  st.sampled_from(["00" * 32, "11" * 64, _FUZZ_KEY.node_id, _FUZZ_CID]),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_the_batch_verifier_only_rejects(data):
    payload = {"entries": [dict(entry) for entry in _FUZZ_PAYLOAD["entries"]],
               "heads": {origin: dict(head) for origin, head in _FUZZ_PAYLOAD["heads"].items()}, "more": False}
    entries, head = payload["entries"], payload["heads"][_FUZZ_KEY.node_id]
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["field", "data", "drop", "swap", "head", "heads", "entries"]))
        objects = [entry for entry in entries if isinstance(entry, dict) and entry]  # {} has no field to junk
        if action == "field" and objects:
            entry = data.draw(st.sampled_from(objects))
            entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(_JUNK)
        elif action == "data" and objects:
            entry = data.draw(st.sampled_from(objects))
            entry["data"] = dict(entry["data"]) if isinstance(entry.get("data"), dict) else {}
            entry["data"][data.draw(st.sampled_from(["content", "role", "title", "deleted", "x"]))] = data.draw(_JUNK)
        elif action == "drop" and entries:
            del entries[data.draw(st.integers(0, len(entries) - 1))]
        elif action == "swap" and len(entries) > 1:
            i, j = data.draw(st.integers(0, len(entries) - 1)), data.draw(st.integers(0, len(entries) - 1))
            entries[i], entries[j] = entries[j], entries[i]
        elif action == "head":
            head[data.draw(st.sampled_from(["seq", "hash", "sig", "key"]))] = data.draw(_JUNK)
        elif action == "heads":
            payload["heads"] = data.draw(_JUNK)
        elif action == "entries":
            entries.append(data.draw(_JUNK))
    target, _ = keyed_store(name="fuzz-target")
    try:
        target.batches.apply(payload)
    except nm.BatchRejected:
        assert target.version_vector() == {}, "a rejected batch stores nothing"
    finally:
        target.close()
