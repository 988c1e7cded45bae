"""The classroom experience, in a real browser (Chromium, Playwright) against real nodes.

Uses the browser fixtures (tests/browser/conftest.py) and guarded pages
(tests/support/browser_pages.py): every node is on loopback, the only LLM is
tests/support/fake_ollama.py, and a test fails on a console error, a dialog or a request off 127.0.0.1.
Screenshots go to artifacts/ (printed at the end of the session by conftest).
"""

import json
import os
import re

import pytest
import requests

from conftest import ROOT, wait_for
from support.browser_pages import (LLM_NAME, MODEL, PLAIN_NAME, ask, expect, expect_llm_known, finished_answers,
                                   json_reply)
from support.cli import closed_port


def conversation_with(node, title, *questions):
    conversation = node.post("/api/conversations", json={"title": title}).json()
    for question in questions:
        reply = node.post("/api/conversations/%s/messages" % conversation["id"], json={"content": question})
        assert reply.status_code == 201, reply.text
    return conversation


# ---- A. nothing lost ------------------------------------------------------------------------

def test_an_answer_cut_off_by_stop_is_kept_with_a_marker(pages, mesh):
    page = pages.open(mesh.llm)
    expect_llm_known(page)
    mesh.fake.token_delay = 0.2
    try:
        ask(page, "Tell me a long story about a mesh of computers that share one model.")
        page.locator("#messages .message.assistant.streaming .markdown").filter(has_text="Echo").wait_for()
        page.get_by_role("button", name="Stop").click()
        # The stored answer replaces the live one: it has an id and says it was cut off.
        stored = page.locator("#messages .message.assistant.cut-off[data-id]")
        expect(stored).to_have_count(1)
        expect(stored).to_contain_text("Cut off")
        expect(stored).to_contain_text("Echo from")
    finally:
        mesh.fake.token_delay = 0.04
    page.reload()
    stored = page.locator("#messages .message.assistant.cut-off[data-id]")
    expect(stored).to_contain_text("Cut off")
    conversation_id = page.evaluate("decodeURIComponent(location.hash.split('/')[2])")
    messages = mesh.llm.json("/api/conversations/" + conversation_id)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["cut_off"] is True and messages[1]["content"].startswith("Echo from")
    pages.screenshot(page, "cut-off")


def test_the_page_while_its_node_restarts_keeps_the_draft_and_reconnects(cluster, pages):
    port = closed_port()
    node = cluster.start("restarting", extra=["--http-port", str(port), "--name", "Restart-Box"])
    page = pages.open(node)
    pages.allow_console(r"net::ERR_CONNECTION_REFUSED|Failed to load resource")
    prompt = page.get_by_label("Message", exact=True)
    prompt.fill("A draft typed while the node restarts")
    node.stop()
    notice = page.locator("#offline-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("not answering")
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    prompt.press("Enter")  # blocked: nothing is lost
    expect(prompt).to_have_value("A draft typed while the node restarts")
    expect(page.locator("body")).not_to_contain_text("Failed to fetch")
    pages.screenshot(page, "node-down")
    node.start()
    expect(notice).to_be_hidden(timeout=20000)
    expect(page.locator("#live-dot")).to_have_class(re.compile(r"\blive\b"))
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(prompt).to_have_value("A draft typed while the node restarts")


def test_edit_and_resend_the_last_question(pages, mesh):
    conversation = conversation_with(mesh.plain, "Edit me", "Name a fruit.")
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"])
    expect(finished_answers(page)).to_have_count(1)
    edit = page.get_by_role("button", name="Edit this question")
    expect(edit).to_have_count(1)
    edit.click()
    box = page.get_by_label("Edit your question")
    expect(box).to_have_value("Name a fruit.")
    box.fill("Name a vegetable.")
    box.press("Enter")
    expect(finished_answers(page)).to_have_count(2)
    expect(finished_answers(page).nth(1)).to_contain_text("Echo from %s: Name a vegetable." % MODEL)
    expect(page.locator("#messages .message.user.replaced")).to_contain_text("Name a fruit.")
    expect(page.locator("#messages .message.user.replaced")).to_contain_text("Edited")
    # The LLM was not told the replaced question, nor its answer.
    chats = [body for path, body in mesh.fake.requests if path == "/api/chat" and body]
    last = chats[-1]["messages"]
    assert [m["content"] for m in last if m["role"] == "user"] == ["Name a vegetable."], last


# ---- B. names ------------------------------------------------------------------------------

def test_the_owner_names_the_node_from_the_page_and_peers_hear_it(cluster, pages):
    first = cluster.start("first")
    second = cluster.start("second")
    wait_for(lambda: first.connected_ids() == {second.node_id}, timeout=15, message="the nodes to link")
    page = pages.open(first)
    generic = "NeuroMesh-" + first.node_id[:4]
    expect(page.locator("#node-name")).to_have_text(generic)
    expect(page.locator("#name-hint")).to_be_visible()
    page.get_by_role("button", name="name it").click()
    field = page.get_by_label("Name of this computer")
    field.fill("Ana's laptop")
    field.press("Enter")
    expect(page.locator("#node-name")).to_have_text("Ana's laptop")
    expect(page.locator("#name-hint")).to_be_hidden()
    assert first.health()["name"] == "Ana's laptop"
    with open(os.path.join(first.data_dir, "name.txt"), encoding="utf-8") as handle:
        assert handle.read().strip() == "Ana's laptop"
    wait_for(lambda: [p["name"] for p in second.peers()] == ["Ana's laptop"], timeout=10,
             message="the peer to hear the new name")
    other = pages.open(second, "/#/mesh")
    expect(other.locator('#peer-rows tr[data-node-id="%s"]' % first.node_id)).to_contain_text("Ana's laptop")
    expect(other.locator("#peer-rows tr.this-computer")).to_contain_text("this computer")
    # Kept across a restart, without --name.
    pages.allow_console(r"net::ERR_CONNECTION_REFUSED|net::ERR_INCOMPLETE_CHUNKED_ENCODING")  # the node is stopped on purpose
    first.stop()
    first.start()
    assert first.health()["name"] == "Ana's laptop"


def test_a_students_display_name_is_asked_once_and_shown_to_others(pages, mesh):
    page = pages.open(mesh.plain)
    expect_llm_known(page)
    who = page.get_by_label("Your name, shown with your questions:")
    expect(who).to_be_visible()
    who.fill("Ana")
    who.press("Enter")
    expect(who).to_be_hidden()
    question = "Which planet is largest? %s" % os.getpid()
    ask(page, question)
    expect(finished_answers(page)).to_have_count(1)
    expect(finished_answers(page).locator(".answer-meta")).to_contain_text("answered by " + LLM_NAME)
    page.reload()
    expect(page.locator("#who")).to_be_hidden()  # asked once: the browser keeps it
    expect(page.locator("#sidebar-footer")).to_contain_text("You are Ana")
    other = pages.open(mesh.llm)
    other.locator("#shared-list").get_by_text(question[:30]).click()
    head = other.locator("#messages .message.user .message-head")
    expect(head).to_contain_text("Ana on " + PLAIN_NAME)
    # This computer answered: the answer says so on the LLM host's page.
    expect(other.locator("#messages .message.assistant .answer-meta")).to_contain_text("this computer")


# ---- C. the sidebar --------------------------------------------------------------------------

def test_search_finds_a_message(pages, mesh):
    word = "zebracrossing%d" % os.getpid()
    conversation = mesh.plain.post("/api/conversations", json={"title": "## Road *safety*"}).json()
    reply = mesh.plain.post("/api/conversations/%s/messages" % conversation["id"],
                            json={"content": "How wide is a %s in town?" % word, "answer": False})
    assert reply.status_code == 201, reply.text
    page = pages.open(mesh.plain)
    # The title is shown as words, without its Markdown.
    item = page.locator('#conversation-list .conversation[data-id="%s"]' % conversation["id"])
    expect(item.locator(".conversation-title")).to_have_text("Road safety")
    page.get_by_label("Search conversations").fill(word.upper())
    results = page.locator("#search-list")
    expect(results).to_contain_text("Road safety")
    expect(results.locator(".search-snippet")).to_contain_text("How wide is a " + word)
    expect(page.locator("#conversation-list")).to_be_hidden()
    pages.screenshot(page, "search")
    results.get_by_role("button", name=re.compile("Road safety")).click()
    expect(page.locator("#messages .message.user .bubble")).to_contain_text(word)
    page.get_by_label("Search conversations").fill("nothing-like-this-anywhere")
    expect(results).to_contain_text("Nothing found")
    page.get_by_label("Search conversations").press("Escape")
    expect(page.locator("#conversation-list")).to_be_visible()


def test_shared_conversations_are_grouped_by_machine(pages, mesh):
    title = "Grouped %d" % os.getpid()
    conversation_with(mesh.llm, title, "Hello from the LLM box.")
    page = pages.open(mesh.plain)
    group = page.locator("#shared-list details.machine-group").filter(has_text=LLM_NAME)
    expect(group).to_have_count(1)
    expect(group.locator("summary")).to_contain_text(LLM_NAME)
    expect(group.get_by_role("button", name=re.compile(title))).to_be_visible()
    group.locator("summary").click()  # collapse
    expect(group.get_by_role("button", name=re.compile(title))).to_be_hidden()
    group.locator("summary").press("Enter")  # and open again, from the keyboard
    expect(group.get_by_role("button", name=re.compile(title))).to_be_visible()


def test_a_long_conversation_loads_its_newest_messages_and_older_ones_on_scroll(pages, mesh):
    conversation = mesh.plain.post("/api/conversations", json={"title": "Long one"}).json()
    for index in range(130):
        mesh.plain.post("/api/conversations/%s/messages" % conversation["id"],
                        json={"content": "note %03d" % index, "answer": False})
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"])
    bubbles = page.locator("#messages .message.user .bubble")
    expect(bubbles).to_have_count(100)
    expect(bubbles.last).to_have_text("note 129")
    page.locator("#chat-scroll").evaluate("el => { el.scrollTop = 0; }")
    expect(bubbles).to_have_count(130)
    expect(bubbles.first).to_have_text("note 000")


# ---- D. the truth about this computer's LLM ----------------------------------------------------

def test_a_stopped_ollama_is_named_with_how_to_start_it_and_its_return_is_seen(cluster, pages, tmp_path,
                                                                                monkeypatch):
    from support.fake_ollama import FakeOllama
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ollama").write_text("#!/bin/sh\nexit 0\n")  # Ollama is installed...
    (bin_dir / "ollama").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    with FakeOllama(models=(MODEL,), token_delay=0.01) as server:
        server.set_fail("refuse")  # ...but stopped
        node = cluster.start("stopped-llm", extra=["--ollama-url", server.url, "--name", "Teacher-Box"])
        wait_for(lambda: "installed on this computer but not running" in node.log(), timeout=10,
                 message="the terminal to say Ollama is stopped")
        assert "LLM: this node uses the LLMs of the mesh for now" in node.log()
        assert "ollama serve" in node.log()
        health = node.health()["llm"]
        assert health["state"] == "stopped" and "ollama serve" in health["problem"]
        reply = node.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                             "stream": False})
        assert reply.status_code == 503 and "ollama serve" in reply.json()["error"], reply.text
        page = pages.open(node)
        notice = page.locator("#composer-notice")
        expect(notice).to_contain_text("not running")
        expect(notice).to_contain_text("ollama serve")
        page.goto(node.url + "/#/diagnostics")
        expect(page.locator("#diagnostics")).to_contain_text("ollama serve")
        page.goto(node.url + "/#/chat")
        server.heal()
        wait_for(lambda: "this computer's LLM is back" in node.log(), timeout=15,
                 message="the terminal to say Ollama is back")
        expect(notice).to_be_hidden(timeout=15000)
        expect(page.locator("#stat-llm")).to_have_text("1")


def test_a_laptop_without_an_llm_is_not_a_problem_in_diagnostics(pages, mesh):
    page = pages.open(mesh.plain, "/#/diagnostics")
    panel = page.locator("#diagnostics .panel").filter(has_text="LLM backend")
    expect(panel).to_contain_text("no LLM: the LLMs of the mesh answer")
    expect(panel.locator(".error-text")).to_have_count(0)
    expect(panel).not_to_contain_text("Problem")


# ---- E. downloads -----------------------------------------------------------------------------

def test_the_markdown_download_of_a_conversation(pages, mesh):
    conversation = conversation_with(mesh.plain, "Rivers of Europe", "Name a long river.")
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"])
    expect(finished_answers(page)).to_have_count(1)
    with page.expect_download() as caught:
        page.get_by_role("link", name="Download .md (this conversation as Markdown)").click()
    download = caught.value
    assert download.suggested_filename == "Rivers-of-Europe.md"
    text = open(download.path(), encoding="utf-8").read()
    assert text.startswith("# Rivers of Europe\n")
    assert "Name a long river." in text and "Echo from %s: Name a long river." % MODEL in text
    assert "Answer by %s with %s" % (LLM_NAME, MODEL) in text
    with page.expect_download() as caught:
        page.get_by_role("link", name="Download .json (this conversation as JSON)").click()
    document = json.loads(open(caught.value.path(), encoding="utf-8").read())
    assert document["title"] == "Rivers of Europe" and len(document["messages"]) == 2


# ---- screenshots of every view, on a laptop and a phone ----------------------------------------

SCREENS = os.path.join(ROOT, "artifacts", "views")


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_screenshots_of_chat_mesh_and_diagnostics(pages, mesh, size):
    os.makedirs(SCREENS, exist_ok=True)
    conversation = conversation_with(mesh.plain, "Why is the sky blue?", "Why is the sky blue?")
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"], viewport={"width": size[0], "height": size[1]})
    expect(finished_answers(page)).to_have_count(1)
    expect(page.locator("#model-picker")).to_be_visible()
    box = page.locator("#model-picker").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= size[0], box  # the picker is not cut off
    for view in ("chat", "mesh", "diagnostics"):
        if view != "chat":
            page.goto(mesh.plain.url + "/#/" + view)
            expect(page.locator("#view-" + view)).to_be_visible()
        page.wait_for_timeout(300)
        path = os.path.join(SCREENS, "%s-%dx%d.png" % (view, size[0], size[1]))
        page.screenshot(path=path)
    print("screenshots in %s" % SCREENS)


# ---- G. accessibility: axe-core in the page --------------------------------------------------

@pytest.fixture(scope="module")
def axe_script(tmp_path_factory):
    """axe-core from the npm registry, installed for this run into a temp dir (npm's only traffic)."""
    import shutil
    import subprocess
    if shutil.which("npm") is None:
        pytest.skip("npm is missing: the accessibility scan needs it to install axe-core")
    prefix = tmp_path_factory.mktemp("axe")
    result = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                             "--loglevel=error", "axe-core@4"], capture_output=True, text=True, timeout=300)
    script = prefix / "node_modules" / "axe-core" / "axe.min.js"
    if result.returncode != 0 or not script.exists():
        pytest.skip("npm could not install axe-core (offline?): %s" % result.stderr.strip()[-300:])
    return str(script)


def axe_violations(page, script):
    page.add_script_tag(path=script)
    results = page.evaluate("""async () => {
        const r = await axe.run(document, {runOnly: {type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.slice(0, 5).map(n => n.target.join(" ") + " :: " + n.failureSummary)}));
    }""")
    return [v for v in results if v["impact"] in ("serious", "critical")]


def test_no_serious_accessibility_violation_on_chat_mesh_and_diagnostics(pages, mesh, axe_script):
    conversation = conversation_with(mesh.plain, "Accessible chat", "Is this page accessible?")
    # The page's CSP allows no inline script: this context lets the test add axe to it.
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"], bypass_csp=True)
    expect(finished_answers(page)).to_have_count(1)
    found = {}
    for view in ("chat", "mesh", "diagnostics"):
        if view != "chat":
            page.goto(mesh.plain.url + "/#/" + view)
            expect(page.locator("#view-" + view)).to_be_visible()
            page.wait_for_timeout(300)
        found[view] = axe_violations(page, axe_script)
    assert not any(found.values()), json.dumps(found, indent=1)


def test_the_keyboard_reaches_the_chat_and_focus_is_visible(pages, mesh):
    page = pages.open(mesh.plain)
    expect_llm_known(page)
    page.keyboard.press("Tab")  # the skip link
    expect(page.locator(".skip-link")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    page.keyboard.press("Enter")
    prompt = page.get_by_label("Message", exact=True)
    for _ in range(40):
        if page.evaluate("document.activeElement && document.activeElement.id") == "prompt":
            break
        page.keyboard.press("Tab")
        # A text field shows focus on its frame (the composer, the search box): :focus-within.
        style = page.evaluate("""() => { const el = document.activeElement;
            const s = getComputedStyle(el.closest(".composer, .search-box") || el);
            return [s.outlineStyle, s.outlineWidth, s.boxShadow]; }""")
        assert style[0] != "none" or style[2] != "none", (page.evaluate("document.activeElement.outerHTML"), style)
    expect(prompt).to_be_focused()
    page.keyboard.type("Keyboard only, please.")
    page.keyboard.press("Enter")
    expect(finished_answers(page)).to_contain_text("Keyboard only, please.")


# ---- H. the invitation's QR code, drawn by the page ---------------------------------------------

def test_the_invitation_shows_a_qr_code_of_the_address(pages, mesh):
    invitation = {"guests": True, "code": "QR42-ROOM", "code_is_mesh_key": True,
                  "urls": ["http://192.168.1.20:8080/"]}

    def answer_guests(page):
        page.route("**/api/guests", lambda route: json_reply(route, 200, invitation))
    page = pages.open(mesh.plain, before=answer_guests)
    page.locator("#invite-open").click()
    dialog = page.get_by_role("dialog", name="Invite guests")
    qr = dialog.get_by_role("img", name="QR code of the address http://192.168.1.20:8080/")
    expect(qr).to_be_visible()
    expect(qr).to_have_attribute("data-version", "2")
    expect(dialog.locator("#invite-qr-caption")).to_contain_text("then enter the guest code")
    assert qr.bounding_box()["width"] >= 120
    pages.screenshot(page, "invite-qr")


def test_the_qr_encoder_matches_a_reference_encoder():
    """qr.js against a matrix from segno (a reference encoder), same text, version 2, level M, mask 3."""
    import hashlib
    import shutil
    import subprocess
    if shutil.which("node") is None:
        pytest.skip("node is missing: the browser test above still draws the code")
    script = os.path.join(ROOT, "neuromesh_static", "qr.js")
    program = ("const q = require(%s); const c = q.encode('http://192.168.1.20:8080/?', 3);"
               "console.log(JSON.stringify([c.version, c.modules.map(r => r.map(v => v ? '1' : '0').join(''))]))"
               % json.dumps(script))
    version, rows = json.loads(subprocess.run(["node", "-e", program], capture_output=True, text=True,
                                              timeout=30, check=True).stdout)
    assert version == 2 and len(rows) == 25
    assert hashlib.sha256("\n".join(rows).encode()).hexdigest() == (
        "4f6a862a599e29c0e6d96040c28f5780cad47324d540f3ad11b6d05fcdb3a826")


# ---- H. two guests in browsers, from another machine (a network namespace) ----------------------

def test_two_guests_in_browsers_each_see_their_own_chats_and_get_answers(tmp_path):
    import subprocess
    import sys
    from support.namespaces import Namespaces, namespaces_missing
    from conftest import NodeProcess, ROOT
    reason = namespaces_missing()
    if reason:
        pytest.skip(reason)
    spaces = Namespaces(count=2)
    host, visitor = spaces.hosts
    fake = node = None
    try:
        spaces.create()
        # The LLM runs beside the node, on the host namespace's own loopback.
        fake = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, os.path.join(ROOT, "tests", "support", "fake_ollama.py"),
                                 "--port", "11434", "--models", MODEL, "--token-delay", "0.01", "--max-seconds", "300"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        node = NodeProcess(tmp_path / host, ["--guests", "--no-discovery", "--ollama-url", "http://127.0.0.1:11434",
                                             "--model", MODEL, "--log-level", "debug"], host,
                           prefix=["ip", "netns", "exec", host]).start()
        port = node.info["http_port"]
        wait_for(lambda: spaces.fetch_json(host, "http://127.0.0.1:%d/api/models" % port)["llm_hosts"] == 1,
                 timeout=15, message="the node to find its LLM")
        code = spaces.fetch_json(host, "http://127.0.0.1:%d/api/guests" % port)["code"]
        url = "http://%s.1:%d/" % (spaces.subnet, port)
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "_vendor"))
        run = subprocess.run(["ip", "netns", "exec", visitor, sys.executable,
                              os.path.join(ROOT, "tests", "support", "guests_in_namespace.py"), url, code],
                             capture_output=True, text=True, timeout=180, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + node.log()
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert "Ana asks" in seen["ana"]["own"] and "Ben asks" not in seen["ana"]["own"], seen
        assert "Ben asks" in seen["ben"]["own"] and "Ana asks" not in seen["ben"]["own"], seen
        assert "Ben asks" in seen["ana"]["shared"] and "Ana asks" in seen["ben"]["shared"], seen
    finally:
        if node is not None:
            node.kill()
        if fake is not None:
            fake.kill()
            fake.wait(10)
        spaces.delete()


# ---- F. polish found by looking --------------------------------------------------------------

def test_background_motion_switch_peer_names_and_latency_labels(pages, mesh):
    page = pages.open(mesh.plain, reduced_motion="no-preference")
    canvas = page.locator("#particles")
    expect(canvas).to_have_attribute("data-running", "true")
    page.get_by_text("Settings and details").click()  # the switch is folded away with the settings
    switch = page.get_by_role("button", name=re.compile("Animated background"))
    expect(switch).to_have_attribute("aria-pressed", "true")
    switch.click()
    expect(switch).to_have_attribute("aria-pressed", "false")
    expect(canvas).to_have_attribute("data-running", "false")
    page.reload()
    expect(page.locator("#particles")).to_have_attribute("data-running", "false")  # kept in this browser
    reduced = pages.open(mesh.plain)  # prefers-reduced-motion: reduce
    expect(reduced.locator("#particles")).to_have_attribute("data-running", "false")
    page.goto(mesh.plain.url + "/#/mesh")
    row = page.locator('#peer-rows tr[data-node-id="%s"] th' % mesh.llm.node_id)
    expect(row).to_contain_text(LLM_NAME)
    assert row.evaluate("el => getComputedStyle(el).textTransform") == "none"
    label = page.locator("#mesh-graph .link-label").first
    expect(label).to_be_visible()
    line = page.locator("#mesh-graph line.link").first
    # The label is beside its line: the line does not cross the label's box.
    crossing = page.evaluate("""([l, t]) => {
        const line = document.querySelector(l), text = document.querySelector(t);
        const b = text.getBBox();
        const [x1, y1, x2, y2] = ["x1", "y1", "x2", "y2"].map(k => +line.getAttribute(k));
        for (let i = 0; i <= 100; i++) {
            const x = x1 + (x2 - x1) * i / 100, y = y1 + (y2 - y1) * i / 100;
            if (x >= b.x && x <= b.x + b.width && y >= b.y && y <= b.y + b.height) return true;
        }
        return false;
    }""", ["#mesh-graph line.link", "#mesh-graph .link-label"])
    assert crossing is False


def test_a_failed_question_is_kept_marked_and_not_sent_as_history(pages, mesh):
    conversation = mesh.plain.post("/api/conversations", json={"title": "Failed first"}).json()
    mesh.plain.post("/api/conversations/%s/messages" % conversation["id"],
                    json={"content": "This one never got an answer.", "answer": False})
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"])
    expect_llm_known(page)
    ask(page, "And this one does.")
    expect(finished_answers(page)).to_contain_text("Echo from %s: And this one does." % MODEL)
    first = page.locator("#messages .message.user.unanswered")
    expect(first).to_contain_text("This one never got an answer.")
    expect(first).to_contain_text("Not answered")
    chats = [body for path, body in mesh.fake.requests if path == "/api/chat" and body]
    assert [m["content"] for m in chats[-1]["messages"] if m["role"] == "user"] == ["And this one does."]
