"""Mixed versions in one room: an entry's hash covers its data as it came, so
fields a node does not know are verified, stored and forwarded unchanged; and the previous
release, run as a real peer process, and this code see each other's messages.

Network safety: loopback only (127.0.0.0/8); nodes bind 127.0.0.1 (the cluster fixture)."""

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh as nm
from conftest import NodeProcess, keyed_store, wait_for
from support.previous_release import previous_release

NEWER = {"mood": {"emoji": "🙂", "scores": [1, 2.5, None, True]}, "z_field": "kept as it came"}


def rows(store, origin):
    """(seq, canonical data text, chain hash) of every held entry of ``origin``."""
    return store._db.read(lambda: [(row[0], nm.data_text(json.loads(row[1])), row[2]) for row in store._db.execute(
        "SELECT seq, data, hash FROM entries WHERE origin = ? ORDER BY seq", (origin,))])


def write_newer(store, key, conversation_id, content):
    """A message as a newer version writes it: this version's fields and two it does not know."""
    data = dict(nm._clean_message_data({"role": "user", "content": content, "sender": "ana", "host_info": {
        "hostname": "a", "ip_address": "", "is_llm_host": False}}), **NEWER)
    return store._db.write(lambda: store._log.append(key.node_id, "message", conversation_id, data))


def test_fields_a_node_does_not_know_cross_three_nodes_unchanged():
    (a, key_a), (b, _), (c, _) = keyed_store(name="a"), keyed_store(name="b"), keyed_store(name="c")
    cid = a.create_conversation("mixed")["id"]
    a.add_message(cid, "user", "plain", "ana")
    write_newer(a, key_a, cid, "with more")
    forward, new = b.batches.apply(a.batches.missing(b.version_vector()))
    assert len(new) == 3 and forward["entries"][-1]["data"]["mood"] == NEWER["mood"], "b forwards them as they came"
    c.batches.apply(b.batches.missing(c.version_vector()))  # c has only b to hear a from
    assert rows(a, key_a.node_id) == rows(b, key_a.node_id) == rows(c, key_a.node_id), "the same bytes, the same hashes"
    shown = c.get_conversation(cid)["messages"]
    assert [m["content"] for m in shown] == ["plain", "with more"]
    assert not set(NEWER) & set(shown[1]), "the page shows the fields this version knows"
    for store in (a, b, c):
        store.close()


def test_entries_this_version_writes_hash_as_data_text_of_their_clean_data():
    """What v0.1.0 hashes (its data cleaned) is what this version hashes (its data as it came)."""
    a, key = keyed_store(name="a")
    cid = a.create_conversation("same")["id"]
    a.add_message(cid, "assistant", "answer", "LLM", model="m", tokens_per_second=12.345, cut_off=True)
    a.update_conversation(cid, title="renamed")
    for entry in a.batches.missing({})["entries"]:
        clean = (nm._clean_message_data if entry["kind"] == "message" else nm._clean_conversation_data)(entry["data"])
        assert nm.data_text(clean) == nm.data_text(entry["data"])
    a.close()


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=20)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in nm._MESSAGE_MARKS),
                             _JSON, max_size=4))
def test_fuzz_unknown_fields_are_kept_or_the_entry_is_refused(extra):
    a, key = keyed_store(name="a")
    b, _ = keyed_store(name="b")
    cid = a.create_conversation("fuzz")["id"]
    try:
        write_newer(a, key, cid, "x")  # a valid entry for the chain to go on from
        data = dict(a.batches.missing({})["entries"][-1]["data"], **extra)
        try:
            a._db.write(lambda: a._log.append(key.node_id, "message", cid, data))
        except nm.StoreError:
            return  # this version refuses to write it: nothing to send
        b.batches.apply(a.batches.missing({}))
        assert rows(b, key.node_id) == rows(a, key.node_id)
        assert len(b.get_conversation(cid)["messages"]) == 2
    finally:
        a.close()
        b.close()


def test_deep_or_broken_unknown_fields_are_refused_not_raised():
    entry = {"origin": "o", "seq": 1, "kind": "message", "conversation_id": "c", "uid": "o:1",
             "timestamp": "2026-11-25T12:00:00.000000Z",
             "data": {"role": "user", "content": "x", "sender": "s",
                      "host_info": {"hostname": "h", "ip_address": "", "is_llm_host": False}}}
    deep = []
    for _ in range(5000):
        deep = [deep]
    for bad in ({"x": deep}, {"x": "\ud800"}, {"x": "a" * (nm.MAX_ENTRY_BYTES + 1)}):
        with pytest.raises(ValueError):
            nm._clean_entry(dict(entry, data=dict(entry["data"], **bad)))


# -- the previous release as a real peer ------------------------------------------------------


def write(node, cid, count, who):
    for index in range(count):
        reply = node.post("/api/conversations/%s/messages" % cid,
                          json={"content": "%s %d" % (who, index), "sender": who, "answer": False})
        assert reply.status_code == 201, reply.text


def contents(node, cid):
    reply = node.get("/api/conversations/%s" % cid)
    return [m["content"] for m in reply.json()["messages"]] if reply.status_code == 200 else []


def test_the_previous_release_and_this_code_share_a_room(cluster, tmp_path):
    tag, version, protocol, program = previous_release(tmp_path)
    old = NodeProcess(tmp_path / "old", cluster.node_args(discovery=False), "old " + tag, program=[sys.executable, program])
    cluster.nodes.append(old)
    old.start()
    new = cluster.start("new", discovery=False, extra=["--peer", "127.0.0.1:%d" % old.tcp_port])
    theirs = old.post("/api/conversations", json={"title": "from %s" % version}).json()["id"]
    mine = new.post("/api/conversations", json={"title": "from %s" % nm.__version__}).json()["id"]
    write(old, theirs, 3, "old")
    write(new, mine, 3, "new")
    if protocol != nm.PROTOCOL_VERSION:  # another wire: the refusal must say what to do
        wait_for(lambda: "upgrade" in new.log() + old.log(), message="a clear refusal naming the upgrade")
        assert contents(new, theirs) == [] and contents(old, mine) == []
        return
    wait_for(lambda: contents(new, theirs) == ["old 0", "old 1", "old 2"], message="%s's messages on the new node" % tag)
    wait_for(lambda: contents(old, mine) == ["new 0", "new 1", "new 2"], message="the new node's messages on " + tag)
    write(new, mine, 1, "later")  # a live push, not only the catch-up
    wait_for(lambda: contents(old, mine)[-1:] == ["later 0"], message="a live push to " + tag)
    logs = new.log() + old.log()
    for failure in ("rejected a batch", "failed verification", "invalid entr"):
        assert failure not in logs
    assert ("runs an older NeuroMesh (%s): upgrade it" % version) in new.log()
    record = [peer for peer in new.peers() if peer["node_id"] == old.node_id][0]
    assert record["outdated"] is True and record["version"] == version
    assert json.dumps(new.peers()).count("outdated") == len(new.peers())


def test_a_peer_of_another_version_is_named_once(caplog):
    newer = nm.Peer(node_id="b" * 32, name="Ben's laptop", version="9.0.0", protocol_version=nm.PROTOCOL_VERSION)
    older = nm.Peer(node_id="c" * 32, name="Cleo's laptop", version="0.1.0", protocol_version=nm.PROTOCOL_VERSION)
    same = nm.Peer(node_id="d" * 32, name="Dan's laptop", version=nm.__version__, protocol_version=nm.PROTOCOL_VERSION)
    with caplog.at_level("WARNING", logger="neuromesh"):
        for _ in range(3):  # relinks: still one line each
            for peer in (newer, older, same):
                nm.tell_versions(peer)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["Ben's laptop runs a newer NeuroMesh (9.0.0): upgrade this computer (it runs %s)" % nm.__version__,
                     "Cleo's laptop runs an older NeuroMesh (0.1.0): upgrade it"]
    assert [peer.to_dict()["outdated"] for peer in (newer, older, same)] == [False, True, False]
