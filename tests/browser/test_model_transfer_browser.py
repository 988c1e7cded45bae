"""The page's list of the room's models, in a real browser (Debian's Chromium, driven
by Playwright): who has each model and its size, and the "Get this model on this computer" button
with its progress, against real loopback nodes and fake Ollamas."""

import os
import re

import pytest

from conftest import fully_linked, wait_for
from support.model_store import start_node, write_store

MODEL = "tinyllama:1b"

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("playwright is not installed (./install.sh --dev installs it into _vendor/)", allow_module_level=True)

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):  # pragma: no cover - depends on the machine
    pytest.skip("%s is missing: apt-get install chromium" % CHROMIUM, allow_module_level=True)


def test_the_page_lists_who_has_a_model_and_gets_it_here_with_progress(cluster, fakes, tmp_path):
    write_store(tmp_path / "store-a", MODEL, 12 * 1024 * 1024)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a", extra=["--name", "Teacher-PC"])
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b", extra=["--name", "Ana-PC"])
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda route: (problems.append(route.request.url),
                                                                                   route.abort()))
            page.goto(puller.url + "/")
            heading = page.locator("#room-models-heading")  # folded by default: the conversations come first
            expect(heading).to_be_visible(timeout=15000)
            heading.click()
            entry = page.locator("#room-models .room-model", has_text=MODEL)
            expect(entry).to_contain_text("Has it: Teacher-PC", timeout=15000)
            expect(entry).to_contain_text("13 MB")
            entry.get_by_role("button", name="Get this model on this computer").click()
            expect(entry).to_contain_text("On this computer.", timeout=60000)
            expect(entry).to_contain_text(re.compile(r"Has it: (Teacher-PC, Ana-PC|Ana-PC, Teacher-PC)"), timeout=20000)
            expect(entry.get_by_role("button")).to_have_count(0)
            os.makedirs("artifacts", exist_ok=True)
            page.screenshot(path=os.path.join("artifacts", "room-models.png"))
            page.set_viewport_size({"width": 1366, "height": 768})
            page.screenshot(path=os.path.join("artifacts", "room-models-1366x768.png"))
        finally:
            browser.close()
    assert puller_llm.created and puller_llm.created[-1]["model"] == MODEL
    assert not problems, problems
