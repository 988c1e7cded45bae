"""The teacher's room in a real browser (Chromium at /usr/bin/chromium, Playwright):
the teacher pauses and a student's page shows it at once, keeping the draft; the teacher's
dashboard with 5 students; a student shows the teacher one chat. Screenshots go to artifacts/
at 1366x768 and 390x844. Every node runs on loopback; the only LLM is tests/support/fake_ollama.py."""

import re
from types import SimpleNamespace

import pytest

from conftest import Cluster, fully_linked, wait_for
from support.browser_pages import ARTIFACTS, MODEL, expect
from support.llm_mesh import hosts_of

WIDE, NARROW = {"width": 1366, "height": 768}, {"width": 390, "height": 844}
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    from support.fake_ollama import FakeOllama
    cluster = Cluster(tmp_path_factory.mktemp("teacher-room"))
    fake = FakeOllama(models=(MODEL,)).start()
    try:
        teacher = cluster.start("teacher", extra=["--name", "Ms Rivera", "teacher"])
        pin = ["--teacher", teacher.json("/api/room")["teacher"]]
        host = cluster.start("host", extra=["--name", "LLM-Box", "--ollama-url", fake.url, "--model", MODEL] + pin)
        names = ["Ana", "Ben", "Chloe", "Dev", "Eli"]
        students = [cluster.start(name.lower(), extra=["--name", name + "'s laptop"] + pin) for name in names]
        nodes = [teacher, host] + students
        wait_for(lambda: fully_linked(nodes), timeout=40, message="the room linked")
        for student in students:
            wait_for(lambda: hosts_of(student) == {host.node_id}, timeout=20, message="the host granted")
        yield SimpleNamespace(teacher=teacher, host=host, students=students, fake=fake)
    finally:
        cluster.close()
        fake.stop()


def chat(node, content):
    conversation = node.post("/api/conversations", json={"title": content[:30]}).json()["id"]
    reply = node.post("/api/conversations/%s/messages" % conversation, json={"content": content}, headers=JSON,
                      timeout=30)
    return conversation, reply


def test_the_teacher_pauses_and_a_students_page_shows_it_at_once_keeping_the_draft(room, pages):
    pages.allow_console(r"status of 403")
    student_page = pages.open(room.students[0], viewport=WIDE)
    narrow_page = pages.open(room.students[1], viewport=NARROW)
    expect(student_page.locator("#room-teacher")).to_contain_text("Teacher: Ms Rivera")
    prompt = student_page.get_by_label("Message", exact=True)
    prompt.fill("my half-written question about photosynthesis")

    teacher_page = pages.open(room.teacher, "/static/teacher.html", viewport=WIDE, live=False)
    teacher_page.locator("#reason").fill("Test until 10:40")
    teacher_page.locator("#pause-now").click()
    for page in (student_page, narrow_page):
        expect(page.locator("#room-paused")).to_contain_text("Test until 10:40", timeout=1000)
    expect(teacher_page.locator("#room-state")).to_have_text("Paused: Test until 10:40")
    prompt.press("Enter")  # refused on the page: the draft stays
    expect(prompt).to_have_value("my half-written question about photosynthesis")
    pages.screenshot(student_page, "paused-1366x768")
    pages.screenshot(narrow_page, "paused-390x844")
    pages.screenshot(teacher_page, "teacher-paused-1366x768")
    status = chat(room.students[2], "a chat from the API while paused")[1]
    assert status.status_code == 403 and "Test until 10:40" in status.json()["error"]

    teacher_page.locator("#resume-now").click()
    expect(student_page.locator("#room-paused")).to_have_count(0, timeout=1000)
    prompt.press("Enter")
    expect(student_page.locator("#messages .message.assistant[data-id]")).to_have_count(1)
    expect(prompt).to_have_value("")


def test_the_teachers_dashboard_with_five_students(room, pages):
    for student in room.students:
        assert chat(student, "what is a prime number, %s?" % student.label)[1].status_code == 201
    for viewport, label in ((WIDE, "1366x768"), (NARROW, "390x844")):
        page = pages.open(room.teacher, "/static/teacher.html", viewport=viewport, live=False)
        expect(page.locator("#count-online")).to_have_text("6")  # five students and the LLM host
        rows = page.locator("#student-rows tr")
        expect(rows).to_have_count(6)
        expect(page.locator("#student-rows")).to_contain_text("Ana's laptop")
        expect(page.locator("#count-hosts")).to_have_text("1")
        expect(page.locator("#host-rows")).to_contain_text("LLM-Box")
        wait_for(lambda: int(page.locator("#count-chats").text_content()) >= 5, timeout=10,
                 message="the chats counted")
        page_text = page.locator("body").inner_text()
        assert "prime number" not in page_text, "the dashboard shows counts, never a student's text"
        pages.screenshot(page, "dashboard-" + label)
        page.screenshot(path="%s/%s-dashboard-%s-full.png" % (ARTIFACTS, pages.test_name, label), full_page=True)


def test_a_student_shows_the_teacher_one_chat_and_takes_it_back(room, pages):
    student = room.students[3]
    shown, _reply = chat(student, "can you check my essay outline?")
    hidden, _reply = chat(student, "a chat I keep to myself")
    page = pages.open(student, "/#/chat/" + shown, viewport=WIDE)
    button = page.locator("#show-teacher")
    expect(button).to_have_text("Show my teacher")
    button.click()
    expect(button).to_have_text(re.compile("Shown to Ms Rivera"))
    pages.screenshot(page, "student-shared-1366x768")

    teacher_page = pages.open(room.teacher, "/static/teacher.html", viewport=WIDE, live=False)
    shared = teacher_page.locator("#shared-list button")
    expect(shared).to_have_count(1)
    shared.click()
    expect(teacher_page.locator("#shared-chat")).to_contain_text("can you check my essay outline?")
    expect(teacher_page.locator("#shared-chat")).to_contain_text("shared by Dev's laptop")
    assert "a chat I keep to myself" not in teacher_page.locator("body").inner_text()
    pages.screenshot(teacher_page, "teacher-shared-1366x768")
    narrow = pages.open(student, "/#/chat/" + shown, viewport=NARROW)
    pages.screenshot(narrow, "student-shared-390x844")

    button.click()
    expect(button).to_have_text("Show my teacher")
    expect(teacher_page.locator("#shared-list button")).to_have_count(0, timeout=5000)
    assert room.teacher.get("/api/teacher/shared/" + hidden).status_code == 404
