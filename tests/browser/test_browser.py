"""The chat page in a real browser: Debian's Chromium, driven by Playwright, against real nodes.

Every node runs on loopback (conftest's Cluster) and the only LLM is tests/support/fake_ollama.py.
Each test fails on a console error, a page error, a dialog, or any request that leaves
127.0.0.1, and leaves a screenshot in artifacts/. Never run `playwright install`: these
tests use /usr/bin/chromium (`apt-get install chromium`).
"""

import json
import re
import uuid
from urllib.parse import urlsplit

import requests

from conftest import wait_for
from support.browser_pages import (LLM_NAME, MODEL, OTHER_MODEL, PHONE, PLAIN_NAME, TIMEOUT_MS, ask, expect,
                                   expect_llm_known, finished_answers, json_reply)

XSS = "<img src=x onerror=alert(1)>"
OPEN_ROOM = ("Open room: anyone on this network can join. "
             "To close it, start every node with --mesh-key <code>.")
# What the node answers a guest who has not entered the room code (its Gatekeeper).
GUEST_LOGIN_REQUIRED = {"error": "enter the guest code first (the chat page asks for it)", "guest_login": True}
# Chromium logs every refused fetch; the guest tests expect these.
REFUSED_FETCH = r"Failed to load resource: (the server responded with a status of (401|403|429)|net::ERR_[A-Z_]+)"


def test_page_is_served_with_a_content_security_policy_and_no_inline_code(mesh):
    response = requests.get(mesh.plain.url + "/", timeout=5)
    assert response.status_code == 200
    policy = response.headers.get("Content-Security-Policy", "")
    assert "default-src 'self'" in policy, "no CSP on /: %r" % policy
    html = response.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script> in index.html"
    assert "<style" not in html and not re.search(r"\son\w+=", html) and "style=" not in html
    for name, kind in (("app.js", "javascript"), ("markdown.js", "javascript"), ("app.css", "css")):
        asset = requests.get(mesh.plain.url + "/static/" + name, timeout=5)
        assert asset.status_code == 200 and kind in asset.headers["Content-Type"], name
        assert "innerHTML" not in asset.text and "insertAdjacentHTML" not in asset.text, name


def test_a_question_streams_in_and_names_the_node_that_answered(pages, mesh):
    page = pages.open(mesh.plain)  # the node without an LLM: the mesh answers
    expect_llm_known(page)
    expect(page.locator("#welcome")).to_be_visible()
    prompt = page.get_by_label("Message", exact=True)
    prompt.press_sequentially("two")
    prompt.press("Shift+Enter")  # a new line, not a send
    prompt.press_sequentially("lines")
    expect(prompt).to_have_value("two\nlines")
    expect(page.locator("#char-count")).to_have_text("9 / 262144")
    expect(page.locator("#messages .message")).to_have_count(0)
    question = "How do the computers of this room find each other?"
    ask(page, question)
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    # Part of the answer is on screen while the rest is still being written.
    page.wait_for_function("""() => {
        const answer = document.querySelector("#messages .message.assistant.streaming .markdown");
        return answer && answer.textContent.includes("Echo from") && !answer.textContent.includes("fake reply)");
    }""", timeout=TIMEOUT_MS)
    pages.screenshot(page, "streaming")
    answer = finished_answers(page)
    expect(answer).to_have_count(1)
    expect(answer).to_contain_text("Echo from %s: %s (this is a deterministic fake reply)" % (MODEL, question))
    meta = answer.locator(".answer-meta")
    expect(meta).to_contain_text("answered by " + LLM_NAME)
    expect(meta).to_contain_text(MODEL)
    expect(meta).to_contain_text("tokens/s")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(page.locator("#messages .message.user[data-id] .bubble")).to_have_text(question)
    expect(page.locator("#messages .message.user .message-head")).to_contain_text("You")
    expect(page.locator("#welcome")).to_be_hidden()
    expect(page.locator("#conversation-list")).to_contain_text(question[:40])
    expect(page.locator("#chat-title")).to_have_text(question)


def test_regenerate_gives_a_second_answer(pages, mesh):
    conversation = mesh.plain.post("/api/conversations", json={"title": "Regenerate me"}).json()
    reply = mesh.plain.post("/api/conversations/%s/messages" % conversation["id"], json={"content": "Name a colour."})
    assert reply.status_code == 201, reply.text
    page = pages.open(mesh.plain, "/#/chat/" + conversation["id"])
    expect(finished_answers(page)).to_have_count(1)
    expect(finished_answers(page)).to_contain_text("Echo from %s: Name a colour." % MODEL)
    regenerate = page.get_by_role("button", name="Regenerate the answer")
    expect(regenerate).to_have_count(1)
    page.get_by_label("Model").select_option(OTHER_MODEL)  # a second opinion, from another model
    regenerate.click()
    expect(finished_answers(page)).to_have_count(2)
    second = finished_answers(page).nth(1)
    expect(second).to_contain_text("Echo from %s: Name a colour." % OTHER_MODEL)
    expect(second.locator(".answer-meta")).to_contain_text(LLM_NAME)
    expect(second.locator(".answer-meta")).to_contain_text(OTHER_MODEL)
    expect(regenerate).to_have_count(1)  # only on the last answer
    stored = mesh.plain.json("/api/conversations/" + conversation["id"])["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "assistant"]


def test_stop_cancels_the_answer(pages, mesh):
    page = pages.open(mesh.llm)
    expect_llm_known(page)
    mesh.fake.token_delay = 0.25
    try:
        ask(page, "Tell me a long story about a mesh of computers that share one model.")
        page.locator("#messages .message.assistant.streaming .markdown").filter(has_text="Echo").wait_for()
        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#messages .message.assistant.stopped")).to_contain_text("Stopped.")
        wait_for(lambda: mesh.fake.aborted >= 1, timeout=10, message="the fake LLM to see the answer cancelled")
    finally:
        mesh.fake.token_delay = 0.04
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_a_second_question_shows_its_place_in_the_queue(pages, mesh):
    first = pages.open(mesh.llm)
    second = pages.open(mesh.plain)
    expect_llm_known(second)
    mesh.fake.token_delay = 0.15  # the first answer takes about two seconds...
    try:
        ask(first, "First in line, please wait for me.")
        first.locator("#messages .message.assistant.streaming .markdown").filter(has_text="Echo").wait_for()
        ask(second, "Second in line.")
        expect(second.locator("#messages .message.assistant.streaming .answer-status")).to_contain_text(
            re.compile(r"queue of %s: position 1" % LLM_NAME))
        pages.screenshot(second, "queued")
    finally:
        mesh.fake.token_delay = 0.04  # ...then both finish quickly
    expect(finished_answers(second)).to_contain_text("Echo from %s: Second in line." % MODEL)
    expect(finished_answers(first)).to_have_count(1)


def test_a_new_conversation_appears_on_the_other_nodes_page_without_a_reload(pages, mesh):
    other = pages.open(mesh.plain)
    other.evaluate("window.__notReloaded = true")
    page = pages.open(mesh.llm)
    topic = "Field trip plan %s" % uuid.uuid4().hex[:6]
    page.get_by_role("button", name="New chat").click()
    ask(page, topic)
    expect(page.locator("#conversation-list")).to_contain_text(topic)
    shared = other.locator("#shared-list")
    expect(shared).to_contain_text(topic)
    expect(shared).to_contain_text("from " + LLM_NAME)
    assert other.evaluate("window.__notReloaded") is True
    # Opened on the other node it is read-only, and its answer arrives there live too.
    shared.get_by_role("button", name=re.compile(re.escape(topic))).click()
    expect(other.locator("#messages .message.user .bubble")).to_have_text(topic)
    expect(finished_answers(other)).to_contain_text("Echo from %s: %s" % (MODEL, topic))
    expect(other.locator("#composer")).to_be_hidden()
    expect(other.locator("#chat-subtitle")).to_contain_text("read-only")


def test_the_mesh_page_shows_a_peer_appear_and_disappear(cluster, pages):
    watcher = cluster.start("watcher", extra=["--name", "Watcher", "--ollama-url", "none"])
    page = pages.open(watcher, "/#/mesh")
    page.evaluate("window.__notReloaded = true")
    expect(page.locator("#mesh-graph g.node.self")).to_contain_text("Watcher")
    expect(page.locator("#mesh-graph g.node.peer")).to_have_count(0)
    visitor = cluster.start("visitor", extra=["--name", "Visitor", "--ollama-url", "none"])
    node = page.locator('#mesh-graph g.node.peer[data-node-id="%s"]' % visitor.node_id)
    expect(node).to_have_count(1)
    expect(node).to_contain_text("Visitor")
    expect(page.locator("#mesh-graph line.link")).to_have_count(1)
    row = page.locator('#peer-rows tr[data-node-id="%s"]' % visitor.node_id)
    expect(row).to_contain_text("linked")
    expect(row).to_contain_text("127.0.0.1:%d" % visitor.info["http_port"])
    expect(page.locator("#stat-peers")).to_have_text("1")
    pages.screenshot(page, "peer-up")
    visitor.stop()
    expect(node).to_have_count(0)
    expect(page.locator("#mesh-graph line.link")).to_have_count(0)
    expect(row).to_contain_text("offline")
    expect(page.locator("#stat-peers")).to_have_text("0")
    assert page.evaluate("window.__notReloaded") is True


def test_html_in_a_message_is_shown_as_text(pages, mesh):
    mesh.llm.post("/api/conversations", json={"title": XSS})
    page = pages.open(mesh.llm)
    expect_llm_known(page)
    expect(page.locator("#conversation-list")).to_contain_text(XSS)
    page.get_by_role("button", name="New chat").click()
    ask(page, XSS)
    expect(page.locator("#messages .message.user .bubble")).to_have_text(XSS)
    expect(finished_answers(page)).to_contain_text("Echo from %s: %s" % (MODEL, XSS))
    expect(page.locator("#chat-title")).to_have_text(XSS)
    assert page.locator("main img, #sidebar img").count() == 0
    assert not [url for url in pages.requested if urlsplit(url).path == "/x"], "the browser fetched the <img>"
    # The dialog listener (in Pages) fails the test if alert() ran.


def test_markdown_answers_render_code_lists_and_safe_links(pages, mesh):
    page = pages.open(mesh.llm)
    expect_llm_known(page)
    source = ("Here is the plan:\n```python\nprint(\"hi <b>\")\n```\n- first item\n- second with **bold**\n\n"
              "Read [the docs](https://example.com/docs) but not [this](javascript:alert(1)) and `x < y`")
    ask(page, source)
    answer = finished_answers(page)
    expect(answer).to_have_count(1)
    code = answer.locator(".code-block pre code")
    expect(code).to_have_text('print("hi <b>")')
    expect(answer.locator(".code-block .code-language")).to_have_text("python")
    expect(answer.locator("ul li")).to_have_count(2)
    expect(answer.locator("ul li strong")).to_have_text("bold")
    link = answer.get_by_role("link", name="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("rel", re.compile(r"\bnoopener\b"))
    expect(link).to_have_attribute("target", "_blank")
    assert answer.locator('a[href^="javascript"]').count() == 0
    expect(answer.locator("p code")).to_have_text("x < y")
    copy = answer.get_by_role("button", name="Copy python to the clipboard")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == 'print("hi <b>")'


def test_conversations_are_renamed_made_private_and_deleted_from_the_sidebar(pages, mesh):
    record = mesh.llm.post("/api/conversations", json={"title": "Old title"}).json()
    stored = lambda: mesh.llm.json("/api/conversations/" + record["id"])  # noqa: E731
    page = pages.open(mesh.llm)
    item = page.locator('#conversation-list li[data-id="%s"]' % record["id"])
    item.get_by_role("button", name=re.compile("^Old title")).focus()
    page.keyboard.press("Tab")  # to Rename, by keyboard
    expect(item.get_by_role("button", name="Rename Old title")).to_be_focused()
    page.keyboard.press("Enter")
    field = page.get_by_label("New title for Old title")
    expect(field).to_be_focused()
    field.fill("New title")
    field.press("Enter")
    expect(item).to_contain_text("New title")
    wait_for(lambda: stored()["title"] == "New title", timeout=5, message="the new title stored")
    item.get_by_role("button", name=re.compile(r"^Private \(keep")).click()
    expect(item.get_by_role("button", name=re.compile(r"^Private \(keep"))).to_have_attribute("aria-pressed", "true")
    wait_for(lambda: stored()["private"] is True, timeout=5, message="the conversation made private")
    item.get_by_role("button", name="Delete New title").click()
    item.get_by_role("button", name=re.compile("^Confirm: delete")).click()
    expect(item).to_have_count(0)
    listed = lambda: [c["id"] for c in mesh.llm.json("/api/conversations") if not c["deleted"]]  # noqa: E731
    wait_for(lambda: record["id"] not in listed(), timeout=5, message="the conversation deleted")


def test_the_chat_is_usable_on_a_phone(pages, mesh):
    page = pages.open(mesh.plain, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    expect_llm_known(page)
    expect(page.locator("#sidebar")).to_be_hidden()
    menu = page.get_by_role("button", name="Open the sidebar")
    expect(menu).to_be_visible()
    prompt = page.get_by_label("Message", exact=True)
    expect(prompt).to_be_visible()
    box = prompt.bounding_box()
    assert box and box["y"] + box["height"] <= 844 and box["x"] >= 0 and box["x"] + box["width"] <= 390
    ask(page, "Is this readable on a phone?")
    answer = finished_answers(page)
    expect(answer).to_contain_text("Is this readable on a phone?")
    expect(answer.locator(".answer-meta")).to_contain_text(LLM_NAME)
    answer_box = answer.bounding_box()
    assert answer_box["x"] >= 0 and answer_box["x"] + answer_box["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    menu.click()
    expect(page.locator("#sidebar")).to_be_visible()
    expect(page.locator("#conversation-list")).to_contain_text("Is this readable on a phone?")
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()


def test_without_an_llm_the_input_says_why_and_errors_offer_retry(cluster, pages):
    alone = cluster.start("alone", discovery=False, extra=["--name", "Alone", "--ollama-url", "none"])
    page = pages.open(alone)
    notice = page.locator("#composer-notice")
    expect(notice).to_contain_text("No LLM on the mesh")
    expect(page.locator("#stat-llm")).to_have_text("0")
    ask(page, "Is anyone there?")
    expect(page.locator("#messages .message.user[data-id]")).to_have_count(1)  # stored all the same
    error = page.locator("#messages .inline-error")
    expect(error).to_contain_text("Ollama")
    page.get_by_role("button", name="Retry").click()
    expect(error).to_have_count(1)
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    expect(page.locator("#messages .message.user")).to_have_count(1)


def test_diagnostics_and_mesh_overview_show_this_node(pages, mesh):
    page = pages.open(mesh.llm, "/#/diagnostics", reduced_motion="no-preference")
    diagnostics = page.locator("#diagnostics")
    expect(diagnostics).to_contain_text(mesh.llm.node_id)
    expect(diagnostics).to_contain_text(mesh.fake.url)
    expect(diagnostics).to_contain_text(MODEL)
    expect(diagnostics).to_contain_text(str(mesh.llm.info["http_port"]))
    expect(diagnostics).to_contain_text("127.0.0.1")  # the loopback interface
    expect(diagnostics).to_contain_text("127.255.255.255")
    expect(page.locator("#particles")).to_have_attribute("data-running", "true")
    page.get_by_role("link", name="Mesh").click()
    expect(page.locator("#mesh-overview")).to_contain_text("LLM host on the mesh")  # one host: singular
    expect(page.locator("#mesh-graph g.node.self.llm")).to_have_count(1)
    expect(page.locator('#mesh-graph g.node.peer[data-node-id="%s"]' % mesh.plain.node_id)).to_contain_text(PLAIN_NAME)
    expect(page.locator('#peer-rows tr[data-node-id="%s"]' % mesh.plain.node_id)).to_contain_text("linked")
    calm = pages.open(mesh.llm)  # with prefers-reduced-motion: reduce
    expect(calm.locator("#particles")).to_have_attribute("data-running", "false")


# ---- the room: its status, the owner's invitation, a guest's sign-in ------------------------




class GuestNode:
    """Answers a page's /api/ calls as a node started with --guests answers a guest's browser.

    The browsers of these tests reach only loopback, which is the node's owner; so the replies a
    guest gets are played here, and once signed in the calls go on to the real node.
    """

    CODE = "K7PQ-M4XZ"

    def __init__(self):
        self.signed_in = False
        self.offline = False  # the login request fails on the network
        self.limited = 0  # answer the next login with 429 and this Retry-After
        self.logins = []  # (code, Content-Type) of each POST /api/guest/login

    def __call__(self, route):
        request = route.request
        path = urlsplit(request.url).path
        if path == "/api/health":
            return route.fallback()  # open to everyone: a guest's page may show the node's name
        if path == "/api/guest/login" and request.method == "POST":
            code = json.loads(request.post_data or "{}").get("code")
            self.logins.append((code, request.headers.get("content-type")))
            if self.offline:
                return route.abort("connectionrefused")
            if self.limited:
                wait, self.limited = self.limited, 0
                return json_reply(route, 429, {"error": "too many wrong codes: try again in %d seconds" % wait},
                                  {"Retry-After": str(wait)})
            if code != self.CODE:
                return json_reply(route, 403, {"error": "wrong guest code: ask the teacher for the guest code shown "
                                                        "on the NeuroMesh computer"})
            self.signed_in = True
            return json_reply(route, 200, {"role": "guest", "guest": "guest-0123456789abcdef"})
        if not self.signed_in:
            return json_reply(route, 401, GUEST_LOGIN_REQUIRED)
        if path == "/api/guests":
            return json_reply(route, 403, {"error": "only this computer's owner may see the room code"})
        return route.fallback()


def open_as_guest(pages, node, **options):
    guest = GuestNode()
    pages.allow_console(REFUSED_FETCH)
    page = pages.open(node, live=False, before=lambda page: page.route("**/api/**", guest), **options)
    return page, guest


def expect_no_raw_errors(locator):
    for raw in ("Failed to fetch", "HTTP ", "401", "403", "429", "NetworkError", "undefined"):
        expect(locator).not_to_contain_text(raw)


def test_the_owner_page_says_the_room_is_open(pages, mesh):
    page = pages.open(mesh.llm)
    status = page.locator("#room-status")
    expect(status).to_have_text(OPEN_ROOM)
    expect(status.locator("code")).to_have_text("--mesh-key <code>")
    expect(page.get_by_role("button", name="Invite guests")).to_be_hidden()  # not started with --guests
    pages.screenshot(page, "open-room")
    page.get_by_role("link", name="Diagnostics").click()
    expect(page.locator("#diagnostics")).to_contain_text(OPEN_ROOM)
    phone = pages.open(mesh.llm, **PHONE)
    phone.get_by_role("button", name="Open the sidebar").click()
    expect(phone.locator("#room-status")).to_be_visible()
    box = phone.locator("#room").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    pages.screenshot(phone, "open-room-phone")


def test_a_closed_room_shows_the_hash_of_its_key(pages, mesh):
    def closed_room(route):
        reply = route.fetch()
        health = reply.json()
        health["room"] = {"closed": True, "key_hash": "1a2b3c4d"}
        route.fulfill(response=reply, json=health)

    page = pages.open(mesh.llm, before=lambda page: page.route("**/api/health", closed_room))
    expect(page.locator("#room-status")).to_have_text("Room closed by a code (key 1a2b3c4d)")
    expect(page.locator("#room-status")).not_to_contain_text("Open room")


def test_with_guests_the_owner_sees_the_address_and_code_to_give_out(cluster, pages):
    host = cluster.start("host", discovery=False, extra=["--name", "Teacher", "--guests"])
    code = host.json("/api/guests")["code"]
    assert code
    page = pages.open(host)
    expect(page.locator("#room-status")).to_contain_text("Open room")
    invite = page.get_by_role("button", name="Invite guests")
    invite.focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Invite guests")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#invite-code")).to_have_text(code)
    copy = dialog.get_by_role("button", name="Copy the guest code")
    expect(copy).to_be_focused()
    # --host 127.0.0.1: no address another device could open, and the dialog says how to get one
    expect(dialog.locator("#invite-urls")).to_contain_text("--host 0.0.0.0")
    pages.screenshot(page, "invite")
    copy.click()
    expect(copy).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == code
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(invite).to_be_focused()


def test_the_invitation_lists_the_addresses_to_open_on_a_phone(pages, mesh):
    reply = {"guests": True, "urls": ["http://192.168.1.20:8080/", "http://10.0.0.5:8080/"],
             "code": "K7PQ-M4XZ", "code_is_mesh_key": False}
    page = pages.open(mesh.plain, before=lambda page: page.route(
        "**/api/guests", lambda route: json_reply(route, 200, reply)), **PHONE)
    page.get_by_role("button", name="Open the sidebar").click()
    page.get_by_role("button", name="Invite guests").click()
    dialog = page.get_by_role("dialog", name="Invite guests")
    expect(dialog.locator(".invite-url")).to_have_text(reply["urls"])
    expect(dialog.locator("#invite-code")).to_have_text("K7PQ-M4XZ")
    expect(dialog).to_contain_text("This code opens this computer only")
    box = dialog.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    pages.screenshot(page, "invite-phone")
    dialog.get_by_role("button", name="Copy the address http://10.0.0.5:8080/").click()
    assert page.evaluate("navigator.clipboard.readText()") == "http://10.0.0.5:8080/"
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()


def test_a_guest_enters_the_room_code_before_the_chat(pages, mesh):
    page, guest = open_as_guest(pages, mesh.llm)
    form = page.get_by_role("form", name="Join the room")
    expect(form).to_be_visible()
    expect(form).to_contain_text("Enter the guest code your teacher gave you.")
    expect(page.locator(".app")).to_be_hidden()
    code = page.get_by_label("Guest code", exact=True)
    expect(code).to_be_focused()
    pages.screenshot(page, "signin")
    error = page.locator("#signin-error")

    code.press("Enter")  # nothing typed: said so, nothing sent
    expect(error).to_contain_text("Enter the guest code first")
    assert guest.logins == []

    code.fill("WRONG-1")
    code.press("Enter")
    expect(error).to_have_text("That code is not right. Check it with your teacher and try again.")
    expect(code).to_have_attribute("aria-invalid", "true")
    expect(code).to_be_focused()
    pages.screenshot(page, "signin-wrong")

    guest.offline = True
    code.fill("WRONG-2")
    page.get_by_role("button", name="Join").click()
    expect(error).to_contain_text("The NeuroMesh computer does not answer.")
    guest.offline = False

    guest.limited = 2
    code.fill("WRONG-3")
    code.press("Enter")
    expect(error).to_have_text("Too many tries from this device. Wait 2 seconds, then try again.")
    expect(page.locator("#signin-submit")).to_be_disabled()
    expect(page.locator("#signin-submit")).to_contain_text("Wait")
    pages.screenshot(page, "signin-limited")
    expect(page.get_by_role("button", name="Join")).to_be_enabled()  # after the wait
    expect_no_raw_errors(form)

    code.fill(" " + GuestNode.CODE + " ")
    code.press("Enter")
    expect(form).to_be_hidden()
    expect(page.locator("#live-dot")).to_have_class(re.compile(r"\blive\b"))
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    expect(page.locator("#sidebar-footer")).to_contain_text("Signed in as a guest")
    expect(page.locator("#room")).to_be_hidden()  # the room's status and invitation are the owner's
    expect(page.get_by_role("button", name="Invite guests")).to_be_hidden()
    expect(page.locator("#shared-heading")).to_have_text("Shared in the room")
    assert [login[0] for login in guest.logins] == ["WRONG-1", "WRONG-2", "WRONG-3", GuestNode.CODE]
    assert all(login[1] == "application/json" for login in guest.logins)
    pages.screenshot(page, "signed-in")

    # The node forgets the session (it restarted): the next call asks for the code again.
    guest.signed_in = False
    ask(page, "Are you still there?")
    expect(form).to_be_visible()
    expect(page.locator("#signin-reason")).to_contain_text("Your sign-in has ended")
    expect(code).to_be_focused()
    pages.screenshot(page, "signin-again")
    code.fill(GuestNode.CODE)
    code.press("Enter")
    expect(form).to_be_hidden()
    retry = page.get_by_role("button", name="Retry")
    expect(page.locator("#messages .inline-error")).to_contain_text("enter the guest code again")
    retry.click()
    expect(finished_answers(page)).to_contain_text("Echo from %s: Are you still there?" % MODEL)


def test_the_room_code_form_fits_a_phone(pages, mesh):
    page, guest = open_as_guest(pages, mesh.plain, **PHONE)
    code = page.get_by_label("Guest code", exact=True)
    expect(code).to_be_visible()
    for locator in (code, page.get_by_role("button", name="Join")):
        box = locator.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    code.fill("nope")
    code.press("Enter")
    expect(page.locator("#signin-error")).to_contain_text("That code is not right")
    pages.screenshot(page, "signin-phone")
    code.fill(GuestNode.CODE)
    page.get_by_role("button", name="Join").tap()
    expect(page.get_by_label("Message", exact=True)).to_be_visible()
    expect(page.locator("#sidebar")).to_be_hidden()
    pages.screenshot(page, "signed-in-phone")


def test_the_owner_sees_whom_the_llm_serves_pauses_sharing_and_sees_the_queues(pages, mesh):
    page = pages.open(mesh.llm)  # the owner of the computer with the LLM
    sharing = page.get_by_role("switch", name="Share this computer's LLM with the room")
    expect(sharing).to_have_attribute("aria-checked", "true")
    expect(page.locator("#sharing-text")).to_have_text("Sharing with 1 student")  # the plain node
    try:
        sharing.click()
        expect(sharing).to_have_attribute("aria-checked", "false")
        expect(page.locator("#sharing-text")).to_contain_text("Sharing paused")
        wait_for(lambda: mesh.plain.json("/api/models")["llm_hosts"] == 0, timeout=10,
                 message="the plain node stops placing chats on the paused host")
        pages.screenshot(page, "paused")
        sharing.click()
        expect(sharing).to_have_attribute("aria-checked", "true")
    finally:
        requests.patch(mesh.llm.url + "/api/node", json={"sharing_paused": False}, timeout=5)
        wait_for(lambda: mesh.plain.json("/api/models")["llm_hosts"] == 1, timeout=10, message="sharing again")
    page.goto(mesh.llm.url + "/#/mesh")
    row = page.locator("#queue-rows tr.queue-row").first
    expect(row).to_contain_text(LLM_NAME)
    expect(row).to_contain_text("0 of 1")
    pages.screenshot(page, "queues")
    plain = pages.open(mesh.plain)
    expect(plain.locator("#sharing")).to_be_hidden()  # no LLM here: nothing to share
