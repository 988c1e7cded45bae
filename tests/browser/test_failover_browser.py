"""Mid-answer failover on the chat page, in a real browser (Chromium, Playwright):
the host answering a student dies, the answer goes on and says which host continued it.

Uses the browser fixtures (tests/browser/conftest.py) and guarded pages
(tests/support/browser_pages.py): every node is on loopback, the only LLMs are
tests/support/fake_ollama.py, and a test fails on a console error, a dialog or a request off 127.0.0.1.
"""

import re
import signal

from conftest import wait_for
from support.browser_pages import MODEL, ask, expect, finished_answers
from support.fake_ollama import FakeOllama
from support.llm_mesh import LONG_QUESTION as QUESTION


def test_the_page_shows_an_answer_continued_on_another_host(cluster, pages):
    fakes = [FakeOllama(models=(MODEL,), token_delay=0.08).start() for _ in range(2)]
    try:
        hosts = [cluster.start("h%d" % n, extra=["--name", "Laptop-%d" % n, "--ollama-url", fake.url])
                 for n, fake in enumerate(fakes, 1)]
        student = cluster.start("student", extra=["--name", "Student-Box"])
        wait_for(lambda: student.json("/api/models")["llm_hosts"] == 2, timeout=15, message="both hosts shared")
        page = pages.open(student)
        ask(page, QUESTION)
        live = page.locator("#messages .message.assistant.streaming .markdown")
        live.filter(has_text="w5").wait_for()
        answering = [n for n, fake in enumerate(fakes) if fake.requests_to("/api/chat")]
        assert len(answering) == 1
        lost, other = hosts[answering[0]], hosts[1 - answering[0]]
        lost.process.send_signal(signal.SIGKILL)

        answer = finished_answers(page)
        expect(answer).to_have_count(1)
        expected = fakes[0].answer_for([{"role": "user", "content": QUESTION}], MODEL)
        expect(answer.locator(".markdown")).to_have_text(expected)
        meta = answer.locator(".answer-meta")
        lost_name, other_name = "Laptop-%d" % (answering[0] + 1), "Laptop-%d" % (2 - answering[0])
        expect(meta).to_contain_text("answered by %s" % lost_name)
        expect(meta.locator(".continued")).to_have_text("continued on %s" % other_name)
        expect(answer).not_to_have_class(re.compile(r"\bcut-off\b"))

        page.reload()  # the stored answer says the same
        expect(finished_answers(page).locator(".answer-meta .continued")).to_have_text("continued on %s" % other_name)
        pages.screenshot(page, "continued")
        assert other.alive
    finally:
        for fake in fakes:
            fake.stop()
