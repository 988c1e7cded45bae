"""One owner for every conversation: imported conversations, conversations
from before node keys, and ids an insider could compute before their owner uses them. The
insider has the room code and its own key, and sends correctly signed batches.

Network safety: in-process stores, and loopback only (127.0.0.0/8) for the live nodes (the
cluster fixture)."""

import json
import subprocess
import sys
import uuid

import pytest

import neuromesh as nm
from conftest import (ROOT, SCRIPT, catch_up, fully_linked, keyed_store, make_entry, signed_run, wait_for,
                      write_schema1_data_dir)


def seen(store):
    """What a user of ``store`` sees: every conversation with its messages, and the deleted ones."""
    rows = store._db.read(lambda: store._db.execute("SELECT id, owner, title, deleted FROM conversations"
                                                     " ORDER BY id").fetchall())
    return [(tuple(row), [(m["origin"], m["content"]) for m in
                          (store.get_conversation(row["id"]) or {}).get("messages", [])]) for row in rows]


def write_seed(directory, name="chat.json"):
    folder = directory / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"messages": [
        {"content": "first question", "timestamp": "2025-03-25T13:56:00.304707Z", "sender": "ana",
         "message_type": "Question", "host_info": {"hostname": "ana", "ip_address": "", "is_llm_host": False}},
        {"content": "an answer", "timestamp": "2025-03-25T13:56:09.000000Z", "sender": "LLM",
         "message_type": "Response", "host_info": {"hostname": "ana", "ip_address": "", "is_llm_host": True}},
    ]}))
    return directory


class Insider:
    """A room member with its own key that writes into conversations that are not its own."""

    def __init__(self):
        self.key = nm.NodeKey.generate()
        self.seq, self.prev = 0, nm.GENESIS

    def batch(self, conversation_id, change):
        """The next entry of its log, signed: a message, a rename or a delete."""
        kind = "message" if change == "message" else "conversation"
        entry = make_entry(self.key.node_id, self.seq + 1, conversation_id, kind, title="pwned",
                           deleted=change == "delete", content="spam from mallory")
        return signed_run(self.key, [entry], prev=self.prev)

    def sent(self, payload):
        """Chain the next entry on this one (it was stored somewhere)."""
        self.seq += 1
        self.prev = bytes.fromhex(payload["heads"][self.key.node_id]["hash"])

    def try_on(self, stores, conversation_id):
        """Each change tried on every store: refused (the batch rejected, or kept unlisted)."""
        for change in ("message", "rename", "delete"):
            payload = self.batch(conversation_id, change)
            rejected = 0
            for store in stores:
                try:
                    store.batches.apply(payload)
                except nm.BatchRejected as error:
                    assert error.origin == self.key.node_id
                    rejected += 1
            assert rejected in (0, len(stores)), "every node judges the same"
            if not rejected:
                self.sent(payload)


@pytest.fixture
def room():
    stores = [keyed_store(name=name) for name in ("alice", "carol")]
    yield stores, Insider()
    for store, _key in stores:
        store.close()


def attack_and_check(stores, insider, conversation_id):
    before = [seen(store) for store in stores]
    insider.try_on(stores, conversation_id)
    for store in stores:  # the refused entries travel on: nobody shows them either
        for other in stores:
            catch_up(other, store)
    assert [seen(store) for store in stores] == before
    for store in stores:
        record = store.get_conversation(conversation_id)
        assert record is not None and record["origin"] == stores[0].node_id and record["title"] != "pwned"
        assert "spam from mallory" not in [m["content"] for m in record["messages"]]


def test_an_imported_conversation_has_a_bound_id_and_no_one_else_writes_to_it(room, tmp_path):
    (a, _), (c, _) = room[0]
    insider = room[1]
    summary = nm.SeedFiles(a).import_layout(str(write_seed(tmp_path / "seed")))
    assert summary == {"conversations": 1, "messages": 2, "skipped": 0}
    cid = a.list_conversations()[0]["id"]
    assert nm.bound_owner(cid) == a.node_id
    catch_up(a, c)
    attack_and_check([a, c], insider, cid)
    assert nm.SeedFiles(a).import_layout(str(tmp_path / "seed"))["messages"] == 0, "importing twice adds nothing"


def test_a_plain_id_from_an_earlier_import_keeps_its_owner(room):
    """v0.1.0 gave imports plain uuid5 ids; what a node holds of them fixes their owner."""
    (a, _), (c, _) = room[0]
    insider = room[1]
    cid = str(uuid.uuid5(nm._UUID_NAMESPACE, "import/%s/conversations/old.json" % a.node_id))
    data = nm._clean_message_data({"role": "user", "content": "imported", "sender": "ana",
                                   "host_info": {"hostname": "ana", "ip_address": "", "is_llm_host": False}})
    a.import_conversations([{"id": cid, "title": "Imported: old", "peer_label": None, "messages": [
        {"uid": "import:" + "1" * 64, "timestamp": "2025-03-25T13:56:00.000000Z", "data": data}]}])
    assert nm.bound_owner(cid) is None
    catch_up(a, c)
    attack_and_check([a, c], insider, cid)
    a.add_message(cid, "user", "still mine", "alice")
    catch_up(a, c)
    assert [m["content"] for m in c.get_conversation(cid)["messages"]] == ["imported", "still mine"]


def test_a_conversation_from_before_node_keys_keeps_its_owner(tmp_path):
    _old_id, written = write_schema1_data_dir(tmp_path / "old")
    key = nm.load_node_key(str(tmp_path / "old"))
    a = nm.Store(str(tmp_path / "old" / nm.DATABASE_FILE), key.node_id, "alice", key)
    c, _ = keyed_store(name="carol")
    insider = Insider()
    try:
        cid = sorted(written)[0]
        assert a.get_conversation(cid)["origin"] == a.node_id
        catch_up(a, c)  # a signed one snapshot of it when its key came: c learns the owner
        assert c.get_conversation(cid)["title"] == a.get_conversation(cid)["title"]
        assert c.get_conversation(cid)["title"].startswith("old chat") and c.get_conversation(cid)["own"] is False
        attack_and_check([a, c], insider, cid)
        assert [m["content"] for m in a.get_conversation(cid)["messages"]] == written[cid]
        a.close()
        a = nm.Store(str(tmp_path / "old" / nm.DATABASE_FILE), key.node_id, "alice", key)
        assert a.batches.missing(c.version_vector())["entries"] == [], "the snapshot is signed once"
    finally:
        a.close()
        c.close()


def test_the_id_of_a_future_import_cannot_be_claimed_first(room, tmp_path):
    (a, _), (c, _) = room[0]
    insider = room[1]
    derived = uuid.uuid5(nm._UUID_NAMESPACE, "import/%s/conversations/chat.json" % a.node_id)
    bound = "%s.%s" % (a.node_id, derived.hex)
    for store in (a, c):
        with pytest.raises(nm.BatchRejected):  # the bound id names a, not the insider
            store.batches.apply(insider.batch(bound, "delete"))
    plain = insider.batch(str(derived), "delete")  # the plain id earlier versions gave it: its own now
    a.batches.apply(plain)
    insider.sent(plain)
    summary = nm.SeedFiles(a).import_layout(str(write_seed(tmp_path / "seed")))
    assert summary == {"conversations": 1, "messages": 2, "skipped": 0}
    record = a.get_conversation(bound)
    assert record["own"] and not record["deleted"] and len(record["messages"]) == 2
    catch_up(a, c)
    assert c.get_conversation(bound)["origin"] == a.node_id


def test_both_doors_refuse_a_write_into_an_imported_conversation(cluster, linked_peer, tmp_path):
    """The issue's room: a imported a file, c holds it; an insider linked to c tries the sync
    door, and c's page tries the HTTP door. Both refuse, and a's own page still shows only a's."""
    imported = subprocess.run([sys.executable, SCRIPT, "--data-dir", str(tmp_path / "a"), "import",
                               str(write_seed(tmp_path / "seed"))], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert imported.returncode == 0 and "1 conversations, 2 messages" in imported.stdout + imported.stderr, imported
    a = cluster.start("a", data_dir=tmp_path / "a")
    c = cluster.start("c")
    wait_for(lambda: fully_linked([a, c]), message="a and c linked")
    cid = a.json("/api/conversations")[0]["id"]
    wait_for(lambda: len(c.get("/api/conversations/%s" % cid).json().get("messages", [])) == 2,
             message="a's import on c")
    insider = Insider()
    evil = linked_peer(c, name="mallory", key=insider.key)
    wait_for(lambda: evil.node_id in c.connected_ids(), message="the insider linked to c")
    evil.send(nm.FILE, insider.batch(cid, "message"))
    assert evil.closed_by_node(), "c unlinks the insider"
    refused = c.post("/api/conversations/%s/messages" % cid, json={"content": "from c", "sender": "c",
                                                                   "answer": False})
    assert refused.status_code == 403
    for node in (a, c):
        record = node.get("/api/conversations/%s" % cid).json()
        assert [m["content"] for m in record["messages"]] == ["first question", "an answer"]
        assert record["origin"] == a.node_id and not record["deleted"]


def test_a_file_imported_by_the_previous_version_is_not_imported_again(room, tmp_path, monkeypatch):
    (a, _), _c = room[0]
    seed = write_seed(tmp_path / "seed")
    with monkeypatch.context() as patch:  # v0.1.0's ids: the plain uuid5 of the file
        patch.setattr(nm.SeedFiles, "_conversation_id", lambda self, derived: str(derived))
        assert nm.SeedFiles(a).import_layout(str(seed))["messages"] == 2
    assert nm.SeedFiles(a).import_layout(str(seed)) == {"conversations": 0, "messages": 0, "skipped": 2}
    assert len(a.list_conversations()) == 1
