"""The teacher's room, with real nodes on loopback: a teacher node (`neuromesh.py
teacher`), one LLM host with a fake Ollama, and students pinned to the teacher. The teacher's
signed policy reaches every node; hosts enforce it on every chat they answer, relayed ones too.

Network safety: loopback only (127.0.0.0/8); nodes bind 127.0.0.1 (the cluster fixture)."""

import sys
import time

import pytest
import requests

from conftest import API_MODEL as MODEL, NodeProcess, fully_linked, wait_for
from support.llm_mesh import hosts_of
from support.previous_release import previous_release

JSON = {"Accept": "application/json"}


class Room:
    """The nodes of one class: ``teacher``, ``host`` (the LLM), ``students`` and ``fake``."""

    def __init__(self, cluster, fakes, students=3, quota=None):
        self.fake = fakes()
        self.teacher = cluster.start("teacher", extra=["--name", "Ms Rivera", "teacher"])
        self.fingerprint = self.teacher.json("/api/room")["teacher"]
        pin = ["--teacher", self.fingerprint]
        self.host = cluster.start("host", extra=["--ollama-url", self.fake.url] + pin)
        self.students = [cluster.start("s%d" % n, extra=pin + ["--name", "s%d" % n]) for n in range(1, students + 1)]
        self.nodes = [self.teacher, self.host] + self.students
        wait_for(lambda: fully_linked(self.nodes), timeout=30, message="the room linked")
        for student in self.students:
            wait_for(lambda: hosts_of(student) == {self.host.node_id}, timeout=20, message="the host granted")

    def set_policy(self, **policy):
        reply = self.teacher.post("/api/teacher/policy", json=policy)
        assert reply.status_code == 200, reply.text
        return reply.json()


@pytest.fixture
def room(cluster, fakes):
    return Room(cluster, fakes)


def ask(node, content="what is 6 times 7?"):
    """A chat on ``node``'s page; (status, reply JSON)."""
    conversation = node.post("/api/conversations", json={}).json()["id"]
    reply = node.post("/api/conversations/%s/messages" % conversation, json={"content": content, "model": MODEL},
                      headers=JSON, timeout=30)
    return reply.status_code, reply.json()


def paused_on(node):
    policy = node.json("/api/room")["policy"]
    return bool(policy and policy["paused"])


def test_the_teachers_pause_reaches_every_node_and_every_host_refuses_with_the_reason(room, cluster):
    assert ask(room.students[0])[0] == 201
    started = time.monotonic()
    room.set_policy(paused=True, reason="Test until 10:40")
    arrived = {}
    wait_for(lambda: all(arrived.setdefault(n.label, time.monotonic() - started) if paused_on(n) else False
                         for n in room.nodes), timeout=5, interval=0.01, message="the pause everywhere")
    print("pause reached the 5 nodes in %.3f s (slowest)" % max(arrived.values()))
    assert max(arrived.values()) < 1.0, arrived
    for node in room.students + [room.host]:
        room_view = node.json("/api/room")
        assert room_view["teacher_name"] == "Ms Rivera" and room_view["policy"]["reason"] == "Test until 10:40"
    for student in room.students:
        status, reply = ask(student)
        assert status == 403 and "Test until 10:40" in reply["error"], reply

    # A student who removes the pin (or runs a modified node) is not governed at home, and the
    # host still refuses the chat it relays.
    rogue = cluster.start("rogue")
    wait_for(lambda: hosts_of(rogue) == {room.host.node_id}, timeout=20, message="the host granted the rogue")
    assert rogue.json("/api/room")["message"] == "no teacher in this room"
    before = len(room.fake.requests_to("/api/chat"))
    status, reply = ask(rogue)
    assert status in (403, 503) and "Test until 10:40" in reply["error"], reply
    assert len(room.fake.requests_to("/api/chat")) == before, "no paused chat reached the LLM"
    for node in (room.students[0], rogue):  # the Ollama API of a student's computer too
        reply = requests.post(node.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False},
                              timeout=30)
        assert reply.status_code in (403, 503) and "Test until 10:40" in reply.text, reply.text
    assert not room.fake.requests_to("/api/generate")

    room.set_policy(paused=False)
    wait_for(lambda: not any(paused_on(n) for n in room.nodes), message="the resume everywhere")
    for node in room.students + [rogue]:
        assert ask(node)[0] == 201


def test_the_instructions_reach_the_llm_of_every_chat_relayed_or_not(room, cluster):
    words = "Give hints and questions, not finished answers."
    room.set_policy(instructions=words)
    wait_for(lambda: all((n.json("/api/room")["policy"] or {}).get("instructions") == words for n in room.nodes),
             message="the instructions everywhere")
    assert room.students[0].json("/api/room")["policy"]["instructions"] == words  # students see them
    rogue = cluster.start("rogue")  # no pin: only the host adds them
    wait_for(lambda: hosts_of(rogue) == {room.host.node_id}, timeout=20, message="the host granted the rogue")
    room.fake.clear_requests()
    for node in room.students + [rogue]:
        assert ask(node)[0] == 201
    asked = room.fake.requests_to("/api/chat")
    assert len(asked) == 4
    for body in asked:
        assert body["messages"][0] == {"role": "system", "content": words}
        assert sum(1 for m in body["messages"] if m["role"] == "system") == 1
    # the Ollama API of a student's computer, relayed to the host, too
    room.fake.clear_requests()
    for node in (room.students[0], rogue):
        reply = requests.post(node.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                                "system": "be brief"}, timeout=30)
        assert reply.status_code == 200, reply.text
        reply = requests.post(node.url + "/api/chat", timeout=30, json={
            "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
    asked = room.fake.requests_to("/api/chat") + room.fake.requests_to("/api/generate")
    assert len(asked) == 4
    for body in asked:  # the teacher's words first, the student's own system prompt after them
        assert body["messages"][0] == {"role": "system", "content": words} if "messages" in body else \
            body["system"].startswith(words)


def test_the_quota_refuses_one_student_clearly_and_no_other(room):
    room.set_policy(quota=2)
    wait_for(lambda: all((n.json("/api/room")["policy"] or {}).get("quota") == 2 for n in room.nodes),
             message="the quota everywhere")
    first, second = room.students[:2]
    assert [ask(first)[0] for _ in range(2)] == [201, 201]
    assert first.json("/api/room")["quota_left"] == 0
    status, reply = ask(first)
    assert status == 429 and "2 chats an hour" in reply["error"], reply
    assert ask(second)[0] == 201 and second.json("/api/room")["quota_left"] == 1


def test_show_my_teacher_shares_exactly_one_chat_and_taking_it_back_removes_it(room):
    student, other = room.students[:2]
    secret = "my other chat the teacher must never read"
    chats = []
    for content in ("show this one to the teacher", secret):
        conversation = student.post("/api/conversations", json={"title": content[:20]}).json()["id"]
        student.post("/api/conversations/%s/messages" % conversation, json={"content": content, "answer": False})
        chats.append(conversation)
    other_chat = other.post("/api/conversations", json={}).json()["id"]
    other.post("/api/conversations/%s/messages" % other_chat, json={"content": secret, "answer": False})
    wait_for(lambda: room.teacher.json("/api/health") and all(
        requests.get(room.host.url + "/api/conversations/" + c, timeout=5).ok for c in chats + [other_chat]),
        message="the chats synced")

    reply = student.post("/api/room/share", json={"conversation_id": chats[0], "shown": True})
    assert reply.status_code == 200 and reply.json()["shown"] == [chats[0]]
    wait_for(lambda: room.teacher.json("/api/teacher")["shared"], message="the share reached the teacher")
    shared = room.teacher.json("/api/teacher")["shared"]
    assert [(s["id"], s["shared_by"]) for s in shared] == [(chats[0], "s1")]
    shown = room.teacher.json("/api/teacher/shared/" + chats[0])
    assert shown["messages"][0]["content"] == "show this one to the teacher" and shown["shared_by"] == "s1"
    assert_no_student_text_served(room.teacher, secret, chats[1:] + [other_chat])

    student.post("/api/room/share", json={"conversation_id": chats[0], "shown": False})
    wait_for(lambda: not room.teacher.json("/api/teacher")["shared"], message="the share taken back")
    assert room.teacher.get("/api/teacher/shared/" + chats[0]).status_code == 404
    assert_no_student_text_served(room.teacher, "show this one", chats)


def assert_no_student_text_served(teacher, text, hidden):
    """Nothing of ``text`` on any page or API route the teacher's page reads."""
    for path in ("/api/teacher", "/api/conversations", "/api/search?q=" + text.split()[0], "/peers",
                 "/api/room", "/api/health", "/api/peers"):
        reply = teacher.get(path)
        assert text not in reply.text, path
    for conversation in hidden:
        for path in ("/api/conversations/" + conversation, "/api/teacher/shared/" + conversation,
                     "/api/conversations/%s/download" % conversation):
            reply = teacher.get(path)
            assert reply.status_code == 404 and text not in reply.text, path


def test_the_room_file_from_the_teachers_page_runs_with_python_I_and_pins_teacher_and_code(cluster, tmp_path):
    code = ["--mesh-key", "PHOTOSYNTHESIS-7"]
    teacher = cluster.start("teacher", extra=["--name", "Ms Rivera", "teacher"] + code)
    fingerprint = teacher.json("/api/room")["teacher"]
    reply = teacher.get("/api/teacher/room.pyz", timeout=60)
    assert reply.status_code == 200 and "neuromesh-room.pyz" in reply.headers["Content-Disposition"]
    room_file = tmp_path / "neuromesh-room.pyz"
    room_file.write_bytes(reply.content)
    student = NodeProcess(tmp_path / "student", cluster.node_args(), "room-file",
                          program=[sys.executable, "-I", str(room_file)])
    cluster.nodes.append(student)
    student.start(timeout=60)
    room = student.json("/api/room")
    assert room["teacher"] == fingerprint and not room["is_teacher"]
    # the room is closed by a code the student never typed: linking proves the file holds it
    wait_for(lambda: fully_linked([teacher, student]), timeout=20, message="the room file's node joined the closed room")
    wait_for(lambda: student.json("/api/room")["teacher_name"] == "Ms Rivera", message="the teacher's name")


def test_a_student_computer_cannot_use_the_teachers_api(room):
    student = room.students[0]
    for method, path in (("GET", "/api/teacher"), ("POST", "/api/teacher/policy"), ("GET", "/api/teacher/room.pyz")):
        reply = requests.request(method, student.url + path, json={"paused": True}, timeout=5)
        assert reply.status_code == 403 and "teacher's own computer" in reply.json()["error"]
    assert not paused_on(room.host)


def test_clear_guests_chats_needs_the_count_the_teacher_confirmed(room):
    assert room.teacher.json("/api/teacher")["guest_chats"] == 0
    reply = room.teacher.post("/api/teacher/clear-guests", json={"count": 4})
    assert reply.status_code == 409 and "0 guests' chats now" in reply.json()["error"]
    assert room.teacher.post("/api/teacher/clear-guests", json={"count": 0}).json() == {"clearing": 0}
    wait_for(lambda: all((n.json("/api/room")["policy"] or {}).get("clear_guests") for n in room.nodes),
             message="the request everywhere")


def test_the_previous_release_keeps_and_forwards_the_policy_and_shows_nothing(cluster, tmp_path):
    import neuromesh as nm
    tag, _version, protocol, program = previous_release(tmp_path)
    if protocol != nm.PROTOCOL_VERSION:
        pytest.skip("%s speaks another wire: it never links to this version" % tag)
    old = NodeProcess(tmp_path / "old", cluster.node_args(discovery=False), "old " + tag,
                      program=[sys.executable, program])
    cluster.nodes.append(old)
    old.start()
    via_old = ["--peer", "127.0.0.1:%d" % old.tcp_port]
    teacher = cluster.start("teacher", discovery=False, extra=["--name", "Ms Rivera", "teacher"] + via_old)
    wait_for(lambda: fully_linked([teacher, old]), timeout=20, message="the old node linked")
    teacher.post("/api/teacher/policy", json={"paused": True, "reason": "Quiz"})
    wait_for(lambda: len(old.json("/api/peers")) and teacher.json("/api/room")["policy"]["paused"], message="paused")
    student = cluster.start("student", discovery=False,
                            extra=["--teacher", teacher.json("/api/room")["teacher"]] + via_old)
    wait_for(lambda: (student.json("/api/room")["policy"] or {}).get("reason") == "Quiz", timeout=20,
             message="the pause reached the late student")
    assert old.json("/api/conversations") == [], "an old node keeps the record as a deleted chat: it shows nothing"
    for failure in ("rejected a batch", "failed verification", "invalid entr"):
        assert failure not in old.log() + student.log()
