"""A catch-up stores each verified run in a few statements: what the batched
path stores must be what the entry-by-entry path stored. In-process, no network."""

import json

import pytest
from hypothesis import given, settings, strategies as st

import neuromesh as nm
from conftest import catch_up, keyed_store

CONVERSATION = "11111111-2222-3333-4444-555555555555"   # an imported one: no owner in its id


def imported(count):
    """The same imported conversation of ``count`` messages, as two nodes importing one file get it."""
    messages = [{"uid": "import:%064x" % index, "timestamp": "2024-01-01T00:00:%02d.000000Z" % index,
                 "data": {"role": "user", "content": "line %d" % index, "sender": "user",
                          "host_info": {"hostname": "Box", "ip_address": "", "is_llm_host": False}}}
                for index in range(count)]
    return [{"id": CONVERSATION, "title": "Imported", "peer_label": None, "messages": messages}]


def test_a_catch_up_in_batches_holds_everything_once(tmp_path):
    source, key = keyed_store(tmp_path / "source.db", "source")
    own = source.create_conversation("notes")["id"]
    for index in range(450):
        source.add_message(own, "user", "message %d" % index, "student")
    source.update_conversation(own, title="renamed notes")
    target, _ = keyed_store(tmp_path / "target.db", "target")
    catch_up(source, target, max_entries=200)
    assert target.version_vector()[key.node_id] == source.version_vector()[key.node_id] == 452
    record = target.get_conversation_record(own)
    assert record["title"] == "renamed notes" and record["message_count"] == 450
    assert record["updated_at"] == source.get_conversation_record(own)["updated_at"]
    assert [m["content"] for m in target.get_conversation(own)["messages"]] == \
        ["message %d" % index for index in range(450)]
    assert target.message_count() == 450


def test_a_message_id_two_origins_share_is_listed_once(tmp_path):
    first, key_first = keyed_store(tmp_path / "first.db", "first")
    second, key_second = keyed_store(tmp_path / "second.db", "second")
    first.import_conversations(imported(5))
    second.import_conversations(imported(5))
    target, _ = keyed_store(tmp_path / "target.db", "target")
    catch_up(first, target, max_entries=200)
    catch_up(second, target, max_entries=200)
    vector = target.version_vector()
    assert vector[key_first.node_id] == vector[key_second.node_id] == 6   # every slot filled
    assert [m["content"] for m in target.get_conversation(CONVERSATION)["messages"]] == \
        ["line %d" % index for index in range(5)]
    assert target.get_conversation_record(CONVERSATION)["message_count"] == 5


def test_a_batch_that_brings_nothing_new_changes_nothing(tmp_path):
    source, key = keyed_store(tmp_path / "source.db", "source")
    conversation = source.create_conversation("notes")["id"]
    source.add_message(conversation, "user", "one", "student")
    target, _ = keyed_store(tmp_path / "target.db", "target")
    payload = source.batches.missing({})
    forward, new = target.batches.apply(payload)
    assert len(new) == 2 and forward is not None
    again, new_again = target.batches.apply(payload)
    assert new_again == [] and again is None
    assert target.version_vector()[key.node_id] == 2 and target.message_count() == 1


def test_stored_timestamps_pass_unchanged_and_others_are_normalized():
    assert nm._normal_timestamp("2024-01-01T00:00:00.123456Z") == "2024-01-01T00:00:00.123456Z"
    assert nm._normal_timestamp("2024-01-01T00:00:00.1234567Z") == "2024-01-01T00:00:00.123456Z"
    assert nm._normal_timestamp("2024-01-01T01:00:00+01:00") == "2024-01-01T00:00:00.000000Z"
    for impossible in ("2024-13-01T00:00:00.000000Z", "2024-02-30T00:00:00.000000Z"):
        try:
            nm._normal_timestamp(impossible)
        except ValueError as error:
            assert "impossible timestamp" in str(error)
        else:
            raise AssertionError("%s was accepted" % impossible)


_texts = st.text(max_size=40) | st.sampled_from(["", "é ü 漢字 🙂", 'quote " back \\ tab \t nl \n', "a, b: c"])
_hosts = st.lists(st.fixed_dictionaries({"node_id": st.sampled_from(["a" * 32, "h1"]), "name": _texts,
                                         "tokens": st.integers(0, 1000)}), min_size=2, max_size=4)


@settings(max_examples=400, deadline=None)
@given(content=_texts, sender=_texts, hostname=_texts, model=st.none() | _texts, hosts=st.none() | _hosts,
       rate=st.none() | st.floats(0, 1e6), marks=st.dictionaries(
           st.sampled_from(["cut_off", "replaces", "waited_s", "original_timestamp"]),
           st.sampled_from([True, "x", 1.5, "2024-01-01"])), seq=st.integers(1, 1 << 40))
def test_the_size_check_counts_the_bytes_json_dumps_writes(content, sender, hostname, model, hosts, rate,
                                                           marks, seq):
    """A received entry is encoded once (for its hash and row); the size its check counts is still
    exactly what json.dumps(entry) takes, so the limit holds to the byte."""
    data = dict(marks, role="assistant", content=content, sender=sender, model=model, tokens_per_second=rate,
                host_info={"hostname": hostname, "ip_address": "10.0.0.1", "is_llm_host": True},
                answered_by_hosts=hosts)
    raw = {"origin": "nodeA", "seq": seq, "kind": "message", "conversation_id": CONVERSATION,
           "timestamp": "2024-01-01T00:00:00.000000Z", "uid": "nodeA:%d" % seq, "data": data}
    try:
        clean, text = nm._clean_entry_text(raw)
    except ValueError:
        return  # a surrogate or a bad field: refused before any size is counted
    assert text == nm.data_text(clean["data"]) and clean == nm._clean_entry(raw)
    assert nm._entry_bytes(clean, text) == len(json.dumps(clean, ensure_ascii=False).encode("utf-8"))


def test_an_entry_one_byte_over_the_limit_is_refused_and_one_at_it_kept():
    """Content is bounded in UTF-8 bytes, the entry in JSON bytes: control characters (six bytes
    each once escaped) reach the entry's limit, counted to the byte."""
    raw = {"origin": "nodeA", "seq": 7, "kind": "message", "conversation_id": CONVERSATION,
           "timestamp": "2024-01-01T00:00:00.000000Z", "uid": "nodeA:7",
           "data": {"role": "user", "content": "", "sender": "é" * 500,
                    "host_info": {"hostname": "h", "ip_address": "", "is_llm_host": False}}}
    room = nm.MAX_ENTRY_BYTES - len(json.dumps(nm._clean_entry(raw), ensure_ascii=False).encode("utf-8"))
    escaped, plain = divmod(room, 6)
    at_limit = dict(raw, data=dict(raw["data"], content="\x01" * escaped + "x" * plain))
    assert len(json.dumps(nm._clean_entry(at_limit), ensure_ascii=False).encode("utf-8")) == nm.MAX_ENTRY_BYTES
    with pytest.raises(ValueError, match="larger than"):
        nm._clean_entry(dict(raw, data=dict(raw["data"], content="\x01" * escaped + "x" * (plain + 1))))


def test_a_batch_of_new_messages_tells_the_page_once_per_conversation(tmp_path):
    """A catch-up batch of a thousand messages is one page event per conversation (the last
    message), so an SSE client's bounded queue is not flooded; conversation changes stay one each."""
    source, _key = keyed_store(tmp_path / "source.db", "source")
    first, second = source.create_conversation("one")["id"], source.create_conversation("two")["id"]
    for index in range(300):
        source.add_message(first if index % 3 else second, "user", "message %d" % index, "student")
    source.add_message(first, "assistant", "the last word", "llm")
    target, _ = keyed_store(tmp_path / "target.db", "target")
    _forward, new = target.batches.apply(source.batches.missing(target.version_vector()))
    assert len(new) == 303
    bus = nm.EventBus()
    inbox = bus.subscribe()
    nm.publish_entries(bus, new)
    events = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert [event["type"] for event in events] == ["conversation", "conversation", "message", "message"]
    by_conversation = {event["data"]["conversation_id"]: event["data"] for event in events[2:]}
    assert by_conversation[first]["role"] == "assistant" and by_conversation[first]["seq"] == 303
    assert by_conversation[second]["seq"] == max(entry["seq"] for entry in new if entry["conversation_id"] == second)
