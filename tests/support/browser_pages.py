"""The chat page in a real browser, for the browser tests: Debian's Chromium driven by Playwright,
pages that fail a test on a console error, a page error, a dialog or a request off 127.0.0.1, and
the few steps every browser test takes (ask, the finished answers). A test module that imports
this is skipped, saying why, where Playwright or /usr/bin/chromium is missing (never
`playwright install`: `apt-get install chromium`)."""

import json
import os
import re
from urllib.parse import urlsplit

import pytest

from conftest import ROOT

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("playwright is not installed (./install.sh --dev installs it into _vendor/)", allow_module_level=True)

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):  # pragma: no cover - depends on the machine
    pytest.skip("%s is missing: apt-get install chromium (never `playwright install`)" % CHROMIUM,
                allow_module_level=True)

ARTIFACTS = os.path.join(ROOT, "artifacts")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 10000
MODEL = "llama3.2:1b"
OTHER_MODEL = "qwen2.5:0.5b"
LLM_NAME = "LLM-Box"
PLAIN_NAME = "Plain-Box"
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}

expect.set_options(timeout=TIMEOUT_MS)


class Pages:
    """Opens guarded pages: records console errors, page errors, dialogs and every request."""

    def __init__(self, browser, test_name):
        self.browser = browser
        self.test_name = re.sub(r"[^\w.-]+", "_", test_name)
        self.contexts = []
        self.pages = []
        self.problems = []
        self.dialogs = []
        self.requested = []
        self.outside = []
        self.expected_console = []

    def allow_console(self, pattern):
        """Console errors matching ``pattern`` are expected (a refused fetch the test asked for)."""
        self.expected_console.append(re.compile(pattern))

    def _console(self, message):
        if message.type != "error" or any(p.search(message.text) for p in self.expected_console):
            return
        self.problems.append("console error: %s (%s)" % (message.text, message.location.get("url") or ""))

    def open(self, node, path="/", viewport=None, live=True, before=None, **context_options):
        """A new page on ``node``; ``before(page)`` runs before it loads, ``live``: wait for /api/events."""
        # Reduced motion by default: the particle background would only cost CPU here.
        context_options.setdefault("reduced_motion", "reduce")
        context = self.browser.new_context(viewport=viewport or {"width": 1280, "height": 800}, **context_options)
        self.contexts.append(context)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=node.url)
        context.route("**/*", self._route)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append("page error: %s" % error))
        page.on("dialog", self._dialog)
        self.pages.append(page)
        if before is not None:
            before(page)
        page.goto(node.url + path)
        if live:
            expect(page.locator("#live-dot")).to_have_class(re.compile(r"\blive\b"))  # /api/events is open
        return page

    def _route(self, route):
        url = route.request.url
        self.requested.append(url)
        if urlsplit(url).hostname != "127.0.0.1":
            self.outside.append(url)
            route.abort()
        else:
            route.continue_()

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def screenshot(self, page, label):
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "%s-%s.png" % (self.test_name, label)))

    def close(self):
        try:
            for index, page in enumerate(self.pages):
                if not page.is_closed():
                    self.screenshot(page, "end%d" % index)
        finally:
            for context in self.contexts:
                context.close()
        assert not self.outside, "requests left 127.0.0.1: %r" % self.outside
        assert not self.dialogs, "dialogs opened: %r" % self.dialogs
        assert not self.problems, "\n".join(self.problems)


def ask(page, text):
    """Types ``text`` in the composer and presses Enter."""
    prompt = page.get_by_label("Message", exact=True)
    prompt.fill(text)
    prompt.press("Enter")


def finished_answers(page):
    return page.locator("#messages .message.assistant[data-id]")


def expect_llm_known(page):
    expect(page.locator("#stat-llm")).to_have_text("1")
    expect(page.locator("#composer-notice")).to_be_hidden()


def json_reply(route, status, body, headers=None):
    route.fulfill(status=status, content_type="application/json", body=json.dumps(body), headers=headers or {})
