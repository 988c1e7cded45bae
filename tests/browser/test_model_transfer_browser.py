"""The page's list of the room's models, in a real browser (Debian's Chromium, driven
by Playwright): who has each model and its size, and the "Get this model on this computer" button
with its progress, against real loopback nodes and fake Ollamas."""

import re

from conftest import fully_linked, wait_for
from support.browser_pages import expect
from support.model_store import start_node, write_store

MODEL = "tinyllama:1b"


def test_the_page_lists_who_has_a_model_and_gets_it_here_with_progress(cluster, fakes, tmp_path, pages):
    write_store(tmp_path / "store-a", MODEL, 12 * 1024 * 1024)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a", extra=["--name", "Teacher-PC"])
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b", extra=["--name", "Ana-PC"])
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")
    page = pages.open(puller, viewport={"width": 1280, "height": 900})
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
    pages.screenshot(page, "room-models")
    page.set_viewport_size({"width": 1366, "height": 768})
    pages.screenshot(page, "room-models-1366x768")
    assert puller_llm.created and puller_llm.created[-1]["model"] == MODEL
