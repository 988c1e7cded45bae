"""The room policy's trust, written as the attacker: a student with the room code and
their own key tries to act as the teacher. Each forgery is refused and changes no node's state;
only the pinned teacher's signed, newest record governs (the patterns of test_store_signed_origins.py)."""

import json

import pytest
from hypothesis import given, settings, strategies as st

import neuromesh as nm
from conftest import keyed_store, signed_run

PAUSE = {"paused": True, "reason": "Test until 10:40"}


def policy_cid(origin):
    return "%s.%s" % (origin, nm.POLICY_SUFFIX)


@pytest.fixture
def room():
    """(teacher store, teacher key, student store pinned to that teacher, its RoomRules)."""
    node_key, teacher_key = nm.NodeKey.generate(), nm.NodeKey.generate()
    teacher = nm.Store(":memory:", node_key.node_id, "Ms Rivera", node_key, teacher_key)
    student, _key = keyed_store(name="student")
    yield teacher, teacher_key, student, nm.RoomRules(student, teacher_key.node_id)
    teacher.close()
    student.close()


def teach(teacher, teacher_key, student, **policy):
    """The teacher writes ``policy``; the student syncs it. Returns the FILE: payload."""
    teacher.write_control(teacher_key.node_id, policy_cid(teacher_key.node_id), {"policy": policy})
    payload = teacher.batches.missing(student.version_vector())
    student.batches.apply(payload)
    return payload


def state(store, rules):
    return store.version_vector(), rules.policy()


def refused_chat(rules, tag="owner"):
    with pytest.raises(nm.LLMError) as refused:
        rules.admit(nm.Requester("a" * 32, tag), "m1")
    return str(refused.value)


def test_the_pinned_teachers_signed_policy_governs(room):
    teacher, teacher_key, student, rules = room
    assert rules.policy() is None
    teach(teacher, teacher_key, student, **PAUSE)
    assert rules.policy()["paused"] and "Test until 10:40" in refused_chat(rules)
    teach(teacher, teacher_key, student, paused=False)
    rules.admit(nm.Requester("a" * 32, "owner"), "m1")
    assert not student.list_conversations(), "the policy record is no chat anyone sees"


def test_a_policy_signed_by_a_students_key_is_refused(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, paused=False)
    before = state(student, rules)
    mallory, mallory_key = keyed_store(name="mallory")
    # into the teacher's policy record: refused outright, nothing stored
    mallory.write_control(mallory_key.node_id, policy_cid(teacher_key.node_id), {"policy": PAUSE})
    with pytest.raises(nm.BatchRejected):
        student.batches.apply(mallory.batches.missing({}))
    assert state(student, rules) == before
    # signed as the teacher's origin with her own key: refused
    held = teacher.batches.missing({})["entries"][-1]
    seq = held["seq"] + 1
    entry = dict(held, seq=seq, uid="%s:%d" % (teacher_key.node_id, seq),
                 data=dict(held["data"], content=json.dumps({"neuromesh_room": 1, "policy": PAUSE})))
    prev = student.batches._chain.head(teacher_key.node_id)[1]
    for head_key in (mallory_key.public, teacher_key.public):
        with pytest.raises(nm.BatchRejected):
            student.batches.apply(signed_run(mallory_key, [entry], prev=prev, head_key=head_key))
    assert state(student, rules) == before
    mallory.close()


def test_a_policy_from_an_unpinned_key_governs_no_one(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, paused=False)
    before = rules.policy()
    stranger_key = nm.NodeKey.generate()
    stranger = nm.Store(":memory:", nm.NodeKey.generate().node_id, "Not the teacher", None, stranger_key)
    stranger.write_control(stranger_key.node_id, policy_cid(stranger_key.node_id), {"policy": PAUSE})
    student.batches.apply(stranger.batches.missing(student.version_vector()))  # a valid log of its own
    assert rules.policy() == before
    rules.admit(nm.Requester("a" * 32, "owner"), "m1")
    unpinned = nm.RoomRules(student, None)  # a node without a teacher obeys no one's policy
    assert unpinned.policy() is None
    unpinned.admit(nm.Requester("a" * 32, "owner"), "m1")
    stranger.close()


def test_a_replayed_old_policy_changes_nothing(room):
    teacher, teacher_key, student, rules = room
    old = teach(teacher, teacher_key, student, **PAUSE)
    teach(teacher, teacher_key, student, paused=False)
    before = state(student, rules)
    assert student.batches.apply(old) == (None, [])
    assert state(student, rules) == before and not before[1]["paused"]
    fresh, _key = keyed_store(name="late")  # a node that joins late gets the whole chain: the newest wins
    fresh.batches.apply(teacher.batches.missing({}))
    assert nm.RoomRules(fresh, teacher_key.node_id).policy() == before[1]
    fresh.close()


def test_a_policy_frame_under_the_teachers_origin_without_its_signature_is_refused(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, paused=False)
    before = state(student, rules)
    teacher.write_control(teacher_key.node_id, policy_cid(teacher_key.node_id), {"policy": PAUSE})
    payload = teacher.batches.missing(student.version_vector())
    head = payload["heads"][teacher_key.node_id]
    for heads in ({}, {teacher_key.node_id: dict(head, sig="")}, {teacher_key.node_id: dict(head, sig="00" * 64)},
                  {teacher_key.node_id: {k: v for k, v in head.items() if k != "sig"}}):
        with pytest.raises(nm.BatchRejected):
            student.batches.apply(dict(payload, heads=heads))
        assert state(student, rules) == before


def test_the_quota_counts_each_student_apart(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, quota=2)
    ana, ben = nm.Requester("a" * 32, "owner"), nm.Requester("b" * 32, "owner")
    rules.admit(ana, "m1")
    rules.admit(ana, "m1")
    assert rules.quota_left(ana) == 0 and rules.quota_left(ben) == 2
    assert "2 chats an hour" in refused_chat(rules)
    rules.admit(ben, "m1")


def test_models_guests_and_the_teachers_own_chats(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, models=["m2"], guests=False, teacher_node="c" * 32, **PAUSE)
    assert "paused" in refused_chat(rules)
    rules.admit(nm.Requester("c" * 32, "owner"), "m1")  # the teacher's own computer is not governed
    teach(teacher, teacher_key, student, models=["m2"], guests=False)
    assert "only m2" in refused_chat(rules)
    rules.admit(nm.Requester("a" * 32, "owner"), "m2")
    with pytest.raises(nm.LLMError, match="guests"):
        rules.admit(nm.Requester("a" * 32, "guest-0123456789abcdef"), "m2")


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=8), max_leaves=30))
def test_any_policy_record_cleans_to_a_policy_and_never_raises(raw):
    for value in (raw, {"paused": raw, "reason": raw, "models": raw, "quota": raw, "teacher_node": raw}):
        policy = nm.clean_policy(value)
        assert isinstance(policy["paused"], bool) and isinstance(policy["reason"], str)
        assert policy["quota"] is None or 0 < policy["quota"] < 10000
        assert policy["models"] is None or all(isinstance(m, str) for m in policy["models"])


def test_clear_guests_chats_deletes_only_the_guests_chats_once_and_the_count_reaches_the_teacher(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, paused=False)
    guest_chats = [student.create_conversation("guest chat %d" % n)["id"] for n in range(3)]
    for cid in guest_chats:
        student.guests.record(cid, "guest-0123456789abcdef")
    own = student.create_conversation("the owner's own chat")["id"]
    rules.write_own(guest_chats=len(rules.guest_chats()))
    teacher.batches.apply(student.batches.missing(teacher.version_vector()))
    assert nm.RoomRules(teacher, teacher_key.node_id).guest_chat_counts() == {student.node_id: 3}

    assert rules.clear_guests() == 0, "nothing is cleared before the teacher asks"
    teach(teacher, teacher_key, student, paused=False, clear_guests=nm.utc_now())
    assert rules.clear_guests() == 3
    assert [c["id"] for c in student.list_conversations()] == [own]
    assert rules.clear_guests() == 0, "one request clears once"
    teacher.batches.apply(student.batches.missing(teacher.version_vector()))
    assert nm.RoomRules(teacher, teacher_key.node_id).guest_chat_counts() == {}
    assert all(teacher.get_conversation(cid) is None for cid in guest_chats), "the deletions reach every node"


def test_instructions_go_first_in_a_chat_and_a_generation(room):
    teacher, teacher_key, student, rules = room
    teach(teacher, teacher_key, student, instructions="Hints only.", teacher_node="c" * 32)
    ana = nm.Requester("a" * 32, "owner")
    chat = rules.instruct_body(ana, "/api/chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat["messages"][0] == {"role": "system", "content": "Hints only."}
    assert rules.instruct_body(ana, "/api/generate", {"prompt": "hi", "system": "Be brief."})["system"] == \
        "Hints only.\n\nBe brief."
    own = nm.Requester("c" * 32, "owner")  # the teacher's own computer
    assert rules.instruct_body(own, "/api/generate", {"prompt": "hi"}) == {"prompt": "hi"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.builds(lambda v: json.dumps({"content": v}), st.text(max_size=60))
       | st.builds(lambda v: json.dumps({"content": json.dumps(v)}), st.dictionaries(
           st.sampled_from(["neuromesh_room", "policy", "shown_to_teacher", "guest_chats"]),
           st.none() | st.integers() | st.text(max_size=10) | st.lists(st.text(max_size=5)), max_size=4)))
def test_any_stored_message_reads_as_a_control_record_or_none_and_never_raises(text):
    record = nm.RoomRecords._control_data(text)
    assert record is None or record["neuromesh_room"] == 1
