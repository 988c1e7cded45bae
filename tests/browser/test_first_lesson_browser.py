"""A teacher's first lesson, in a real browser: the page's part (Chromium, Playwright).

The sidebar's list on a school laptop and a phone, search results that tell two look-alike
conversations apart, one answer (not two) after the page's node restarted mid-answer, Markdown
tables, plurals, and an invitation that says which code does what. Uses the guarded
pages of tests/support/browser_pages.py (loopback only, no console error, no dialog) and leaves
screenshots in artifacts/.
"""

import re
from types import SimpleNamespace

import pytest

from conftest import Cluster, fully_linked, wait_for

from support.browser_pages import MODEL, ask, expect, finished_answers, json_reply
from support.cli import closed_port

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
    reply = node.post("/api/conversations/%s/messages" % conversation["id"],
                      json={"content": question, "answer": False})
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

@pytest.mark.parametrize("viewport", [LAPTOP, {"width": 1280, "height": 800}, PHONE],
                         ids=["laptop-1366x768", "laptop-1280x800", "phone-390x844"])
def test_the_sidebar_shows_at_least_eight_conversations(pages, lesson, viewport):
    page = pages.open(lesson.teacher, viewport=viewport)
    expect(page.locator("#conversation-list .conversation")).to_have_count(len(TOPICS))
    if viewport is PHONE:
        page.get_by_role("button", name="Open the sidebar").click()
        expect(page.locator("#sidebar")).to_have_class(re.compile(r"\bopen\b"))
    expect(page.locator("#name-hint")).to_be_visible()  # the teacher's node has no name yet
    expect(page.locator("#room-status")).to_be_visible()
    expect(page.get_by_role("link", name="Diagnostics")).to_be_visible()
    pages.screenshot(page, "sidebar")
    visible = fully_visible_conversations(page)
    print("conversations wholly visible at %(width)dx%(height)d: " % viewport + str(visible))
    assert visible >= 8
    # What folded away is one click from there: the room's whole notice, the settings.
    more = page.get_by_role("button", name="more", exact=True)
    more.click()
    expect(page.get_by_role("button", name="less", exact=True)).to_have_attribute("aria-expanded", "true")
    page.get_by_text("Settings and details").click()
    expect(page.get_by_role("button", name=re.compile("Animated background"))).to_be_visible()
    expect(page.locator("#sidebar-footer")).to_contain_text("HTTP :")
    pages.screenshot(page, "sidebar-unfolded")


# ---- item 7: Markdown tables and plurals ------------------------------------------------------------

TREE = """source => {
    const tree = node => node.nodeType === 3 ? node.data
        : [node.nodeName.toLowerCase(), node.className || "", ...[...node.childNodes].map(tree)];
    return [...window.NeuroMarkdown.render(source).childNodes].map(tree);
}"""


@pytest.fixture(scope="module")
def markdown_page(browser, lesson):
    """One page of the teacher's node, for rendering Markdown through markdown.js."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(lesson.teacher.url + "/")
        page.wait_for_function("window.NeuroMarkdown !== undefined")
        yield page
    finally:
        context.close()


def render(page, source):
    return page.evaluate(TREE, source)


def table_of(header, rows, aligns):
    cell = lambda tag, text, align: [tag, "align-" + align if align else ""] + ([text] if text else [])  # noqa: E731
    head = ["thead", "", ["tr", ""] + [cell("th", text, align) for text, align in zip(header, aligns)]]
    body = ["tbody", ""] + [["tr", ""] + [cell("td", text, align) for text, align in zip(row, aligns)] for row in rows]
    return ["div", "table-scroll", ["table", "", head] + ([body] if rows else [])]


def test_the_markdown_table_parser(markdown_page):
    page = markdown_page
    gfm = "| Planet | Moons | Rings |\n|:-------|:-----:|------:|\n| Earth | 1 | no |\n| Saturn | 146 | yes |"
    assert render(page, gfm) == [table_of(["Planet", "Moons", "Rings"], [["Earth", "1", "no"], ["Saturn", "146", "yes"]],
                                          ["left", "center", "right"])]
    # Without outer pipes, short rows padded, long rows cut, \| kept as a pipe, a paragraph before and after.
    source = "Compare:\na | b\n--- | ---\n1\n2 | 3 | 4\nx \\| y | z\n\nThat is all."
    assert render(page, source) == [["p", "", "Compare:"],
                                    table_of(["a", "b"], [["1", ""], ["2", "3"], ["x | y", "z"]], ["", ""]),
                                    ["p", "", "That is all."]]
    # Inline Markdown in cells; HTML stays text.
    assert render(page, "| **bold** | <img src=x onerror=alert(1)> |\n|---|---|") == [
        ["div", "table-scroll", ["table", "", ["thead", "", ["tr", "", ["th", "", ["strong", "", "bold"]],
                                                             ["th", "", "<img src=x onerror=alert(1)>"]]]]]]
    # Not tables: a header and delimiter of different widths, no delimiter row, a rule under a line.
    assert render(page, "| a | b |\n|---|") == [["p", "", "| a | b |", ["br", ""], "|---|"]]
    assert render(page, "a | b\nc | d") == [["p", "", "a | b", ["br", ""], "c | d"]]
    assert render(page, "| a | b |") == [["p", "", "| a | b |"]]
    # A table ends where another block starts.
    assert render(page, "|a|\n|-|\n|1|\n- item")[1] == ["ul", "", ["li", "", "item"]]


def test_hostile_markdown_renders_quickly_and_only_as_allowed_elements(markdown_page):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    allowed = {"p", "br", "strong", "em", "code", "pre", "a", "ul", "ol", "li", "blockquote", "hr", "h3", "h4", "h5",
               "h6", "div", "span", "button", "table", "thead", "tbody", "tr", "th", "td"}
    pieces = st.sampled_from(["|", "-", ":", " ", "\n", "\\", "`", "*", "a", "<b>", "---", "| x |", "\\|", "> ", "1. "])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(pieces, max_size=60).map("".join))
    def check(source):
        tags = markdown_page.evaluate("""source => {
            const box = document.createElement("div");
            box.append(window.NeuroMarkdown.render(source));
            return [...box.querySelectorAll("*")].map(e => e.nodeName.toLowerCase()
                + [...e.attributes].filter(a => a.name.startsWith("on") || a.name === "style").map(a => "@" + a.name).join(""));
        }""", source)
        assert set(tags) <= allowed, (source, tags)

    check()
    # Long hostile lines stay fast (a backtracking pattern would take minutes here).
    for source in ("-" + " " * 50000 + "x\n| a |", "| a " * 20000 + "|\n" + "|-" * 20000 + "|", "|\n" * 20000):
        elapsed = markdown_page.evaluate("s => { const t = performance.now(); window.NeuroMarkdown.render(s);"
                                         " return performance.now() - t; }", source)
        print("render of %d hostile characters: %.0f ms" % (len(source), elapsed))


def test_an_answer_with_a_table_shows_a_table_and_counts_read_as_words(pages, lesson):
    page = pages.open(lesson.teacher, viewport=LAPTOP)
    expect(page.locator("#stat-llm")).to_have_text("1")
    expect(page.locator(".live-counts")).to_have_text(re.compile(r"^\s*1 peer linked\s+1 LLM host\s*$"))
    ask(page, "Make a table:\n\n| Planet | Moons |\n|:--|--:|\n| Earth | 1 |\n| Mars | 2 |\n\nThanks.")
    answer = finished_answers(page).last
    table = answer.locator("table")
    expect(table).to_have_count(1)
    expect(table.locator("thead th")).to_have_text(["Planet", "Moons"])
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tbody tr").nth(1).locator("td")).to_have_text(["Mars", "2"])
    assert table.locator("tbody td").nth(1).evaluate("td => getComputedStyle(td).textAlign") == "right"
    expect(answer).not_to_contain_text("|:--|")
    pages.screenshot(page, "table")
    page.get_by_role("link", name="Mesh").click()
    expect(page.locator("#mesh-overview")).to_contain_text("1peer linked")
    expect(page.locator("#mesh-overview")).to_contain_text("1LLM host on the mesh")
    pages.screenshot(page, "mesh-counts")


# ---- item 4: one answer, not two, after the node restarted mid-answer ----------------------------

def test_after_the_node_restarts_mid_answer_one_stored_answer_shows_and_no_stale_retry(cluster, pages, fake):
    port = closed_port()
    node = cluster.start("restarting", extra=["--http-port", str(port), "--name", "Teacher-PC",
                                             "--ollama-url", fake.url, "--model", MODEL])
    page = pages.open(node, viewport=LAPTOP)
    pages.allow_console(r"net::ERR_CONNECTION_REFUSED|Failed to load resource|net::ERR_")
    expect(page.locator("#stat-llm")).to_have_text("1")
    fake.token_delay = 0.2
    try:
        ask(page, "Tell me a long story about photosynthesis.")
        page.locator("#messages .message.assistant.streaming .markdown").filter(has_text="Echo").wait_for()
        node.stop()
    finally:
        fake.token_delay = 0.04
    stale = page.locator("#messages .message.assistant:not([data-id])")
    expect(stale.get_by_role("button", name="Retry")).to_be_visible()
    expect(stale).not_to_contain_text("network error")  # said in words
    pages.screenshot(page, "node-down-mid-answer")
    node.start()
    expect(page.locator("#live-dot")).to_have_class(re.compile(r"\blive\b"), timeout=20000)
    answers = page.locator("#messages .message.assistant")
    expect(answers).to_have_count(1)
    expect(page.locator("#messages .message.assistant[data-id]")).to_contain_text("Cut off")
    expect(page.get_by_role("button", name="Retry")).to_have_count(0)
    expect(page.locator("#messages .message.user")).to_have_count(1)
    conversation_id = page.evaluate("decodeURIComponent(location.hash.split('/')[2])")
    stored = node.json("/api/conversations/" + conversation_id)["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["cut_off"] is True
    expect(answers).to_have_attribute("data-id", stored[1]["id"])
    pages.screenshot(page, "reconnected")


# ---- item 2: search results tell look-alike conversations apart ----------------------------------

def test_search_results_show_the_words_around_the_match_and_the_computer(pages, lesson):
    teacher_name = lesson.teacher.health()["name"]
    page = pages.open(lesson.teacher, viewport=LAPTOP)
    search = page.get_by_label("Search conversations")
    search.fill("photosynth")
    results = page.locator("#search-list .conversation")
    expect(results).to_have_count(2)
    expect(results.locator(".conversation-title")).to_have_text([TOPICS[0], TOPICS[0]])
    origins = sorted(results.locator(".conversation-meta").all_inner_texts())
    assert origins[0].startswith("on " + STUDENT + " · ") and origins[1].startswith("on %s (this computer) · " % teacher_name), origins
    expect(results.locator(".conversation-title mark")).to_have_text(["photosynth", "photosynth"])
    # Each says what was asked in it: the student's question and the teacher's differ.
    snippets = sorted(results.locator(".search-snippet").all_inner_texts())
    assert snippets == ["Explain photosynthesis to a ten-year-old, with chlorophyll.",
                        "Tell me about what is photosynthesis?"], snippets
    pages.screenshot(page, "search-title")
    search.fill("CHLOROPHYLL")
    expect(results).to_have_count(1)
    expect(results.locator(".search-snippet")).to_contain_text("to a ten-year-old, with chlorophyll.")
    expect(results.locator(".search-snippet mark")).to_have_text("chlorophyll")
    expect(results.locator(".conversation-meta")).to_contain_text("on " + STUDENT)
    pages.screenshot(page, "search-message")
    phone = pages.open(lesson.teacher, viewport=PHONE)
    phone.get_by_role("button", name="Open the sidebar").click()
    phone.get_by_label("Search conversations").fill("photosynth")
    expect(phone.locator("#search-list .conversation .search-snippet")).to_have_count(2)
    pages.screenshot(phone, "search-phone")


# ---- item 5: the invitation says which code does what ----------------------------------------------

def test_the_invitation_says_the_guest_code_is_for_browsers_and_the_room_code_for_computers(cluster, pages):
    host = cluster.start("host", discovery=False, extra=["--name", "Teacher-PC", "--guests"])
    code = host.json("/api/guests")["code"]
    page = pages.open(host, viewport=LAPTOP)
    page.get_by_role("button", name="Invite guests").click()
    dialog = page.get_by_role("dialog", name="Invite guests")
    expect(dialog.locator("#invite-code")).to_have_text(code)
    expect(dialog).to_contain_text("Enter the guest code")
    notes = dialog.locator("#invite-note li")
    expect(notes).to_have_count(2)
    expect(notes.nth(0)).to_contain_text("Guest code (above): lets a browser chat here as a guest")
    expect(notes.nth(0)).to_contain_text("This code opens this computer only.")
    expect(notes.nth(1)).to_contain_text("Room code (--mesh-key): lets a computer join the mesh as a node. You keep it")
    assert code not in notes.nth(1).inner_text()
    pages.screenshot(page, "invite")


def test_when_the_guest_code_is_the_room_code_the_invitation_warns(pages, lesson):
    invitation = {"guests": True, "code": "BLUEFOX-42", "code_is_mesh_key": True, "urls": ["http://192.168.1.20:8080/"]}
    page = pages.open(lesson.teacher, viewport=PHONE, before=lambda page: page.route(
        "**/api/guests", lambda route: json_reply(route, 200, invitation)))
    page.get_by_role("button", name="Open the sidebar").click()
    page.get_by_role("button", name="Invite guests").click()
    warning = page.get_by_role("dialog", name="Invite guests").locator("#invite-note .invite-warning")
    expect(warning).to_contain_text("here the same code, so whoever has it can also join a computer to the mesh as a node")
    pages.screenshot(page, "invite-same-code")
