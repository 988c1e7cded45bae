"""Two guests in two browser contexts, run inside a network namespace by test_classroom_browser.py.

Usage: python guests_in_namespace.py URL CODE. The page's node is in another namespace, so the
browser is a real non-loopback client. Prints a JSON report of what each guest saw.
"""

import json
import sys

from playwright.sync_api import expect, sync_playwright

URL, CODE = sys.argv[1], sys.argv[2]
QUESTIONS = {"ana": "Ana asks about volcanoes.", "ben": "Ben asks about fractions."}


def main():
    report = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                             args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                                   "--no-first-run", "--disable-background-networking",
                                                   "--disable-component-update", "--disable-sync"])
        pages = {}
        for name in QUESTIONS:
            context = browser.new_context(reduced_motion="reduce")
            page = context.new_page()
            page.set_default_timeout(15000)
            page.goto(URL)
            code = page.get_by_label("Guest code", exact=True)
            code.fill(CODE)
            code.press("Enter")
            expect(page.locator(".app")).to_be_visible(timeout=15000)
            expect(page.locator("#stat-llm")).to_have_text("1", timeout=15000)
            pages[name] = page
        for name, page in pages.items():
            prompt = page.get_by_label("Message", exact=True)
            prompt.fill(QUESTIONS[name])
            prompt.press("Enter")
            expect(page.locator("#messages .message.assistant[data-id]")).to_contain_text(
                "Echo from", timeout=20000)
        for name, page in pages.items():
            page.reload()
            other = [n for n in QUESTIONS if n != name][0]
            expect(page.locator("#shared-list")).to_contain_text(QUESTIONS[other][:20], timeout=15000)
            report[name] = {
                "own": page.locator("#conversation-list").inner_text(),
                "shared": page.locator("#shared-list").inner_text(),
            }
        browser.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
