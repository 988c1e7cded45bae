"""Issue 23, a teacher's first lesson, in a real browser: the page's part (Chromium, Playwright).

The sidebar's list on a school laptop and a phone, search results that tell two look-alike
conversations apart, one answer (not two) after the page's node restarted mid-answer, Markdown
tables, plurals, and an invitation that says which code does what. Uses the guards of
test_browser.py (loopback only, no console error, no dialog) and leaves screenshots in artifacts/.
"""

import os
import re
from types import SimpleNamespace

import pytest

from conftest import Cluster, fully_linked, wait_for

try:
    from test_browser import MODEL, ask, browser, expect, fake, finished_answers, json_reply, pages  # noqa: F401
except ImportError as missing:  # pragma: no cover - playwright or chromium missing: test_browser says which
    pytest.skip(str(missing), allow_module_level=True)

STUDENT = "Ana's laptop"
LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
TOPICS = ["What is photosynthesis?", "Fractions with unlike denominators", "The water cycle", "Who was Ada Lovelace?",
          "Volcanoes and plates", "A haiku about rain", "Python lists", "Why do leaves change colour?",
          "Prime numbers below 50", "The French Revolution", "How do vaccines work?", "Newton's laws",
          "Spelling: necessary", "Kinds of triangles", "Map of Europe quiz"]


@pytest.fixture(scope="module")
def lesson(tmp_path_factory, fake):
    """The teacher's node (generic name, the LLM, 15 conversations) linked to a student's laptop."""
    cluster = Cluster(tmp_path_factory.mktemp("first-lesson"))
    try:
        teacher = cluster.start("teacher", extra=["--ollama-url", fake.url, "--model", MODEL])
        student = cluster.start("student", extra=["--name", STUDENT])
        wait_for(lambda: fully_linked([teacher, student]), timeout=20, message="the two nodes to link")
        for topic in TOPICS:
            with_question(teacher, topic, "Tell me about " + topic.lower())
        with_question(student, TOPICS[0], "Explain photosynthesis to a ten-year-old, with chlorophyll.")
        with_question(student, "Homework plan", "Plan my homework for the week.")
        wait_for(lambda: len(teacher.json("/api/conversations")) == len(TOPICS) + 2, timeout=20,
                 message="the student's conversations to reach the teacher")
        yield SimpleNamespace(teacher=teacher, student=student, cluster=cluster)
    finally:
        cluster.close()


def with_question(node, title, question):
    conversation = node.post("/api/conversations", json={"title": title}).json()
    reply = node.post("/api/conversations/%s/messages" % conversation["id"], json={"content": question, "answer": False})
    assert reply.status_code == 201, reply.text
    return conversation


def fully_visible_conversations(page):
    """How many conversation items lie wholly inside the viewport and the sidebar's visible part."""
    return page.evaluate("""() => {
        const sidebar = document.querySelector('#sidebar').getBoundingClientRect();
        const top = Math.max(0, sidebar.top), bottom = Math.min(innerHeight, sidebar.bottom);
        const right = Math.min(innerWidth, sidebar.right);
        let count = 0;
        for (const item of document.querySelectorAll('#sidebar .conversation')) {
            const box = item.getBoundingClientRect();
            if (!box.height) continue;
            let clip = item.parentElement, hidden = false;
            for (; clip && clip !== document.body; clip = clip.parentElement) {
                if (getComputedStyle(clip).overflowY === 'visible') continue;
                const c = clip.getBoundingClientRect();
                if (box.top < c.top - 0.5 || box.bottom > c.bottom + 0.5) hidden = true;
            }
            if (!hidden && box.top >= top - 0.5 && box.bottom <= bottom + 0.5 && box.left >= 0 && box.right <= right + 0.5)
                count += 1;
        }
        return count;
    }""")


# ---- item 2: the list is the sidebar's main part --------------------------------------------------

@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop-1366x768", "phone-390x844"])
def test_the_sidebar_shows_at_least_eight_conversations(pages, lesson, viewport):
    page = pages.open(lesson.teacher, viewport=viewport)
    expect(page.locator("#name-hint")).to_be_visible() if viewport is LAPTOP else None
    expect(page.locator("#conversation-list .conversation")).to_have_count(len(TOPICS))
    if viewport is PHONE:
        page.get_by_role("button", name="Open the sidebar").click()
        expect(page.locator("#sidebar")).to_be_visible()
        page.wait_for_timeout(300)  # the drawer slides in (no transition under reduced motion)
    pages.screenshot(page, "sidebar")
    assert fully_visible_conversations(page) >= 8
