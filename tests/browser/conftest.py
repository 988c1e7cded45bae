"""Fixtures of the browser tests: Chromium, a fake Ollama and a two-node mesh for each test module,
and guarded pages for each test. Their helpers are tests/support/browser_pages.py, imported when a
fixture first runs (a test module without Playwright or Chromium is skipped before that)."""

from types import SimpleNamespace

import pytest

from conftest import Cluster, fully_linked, wait_for
from support.fake_ollama import FakeOllama


@pytest.fixture(scope="module")
def browser():
    """Chromium, headless, for one test module."""
    from playwright.sync_api import sync_playwright
    from support.browser_pages import CHROMIUM, LAUNCH_ARGS
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def fake():
    """The fake Ollama of a test module's mesh, with MODEL and OTHER_MODEL."""
    from support.browser_pages import MODEL, OTHER_MODEL
    # Slow enough tokens that a half-written answer is visible, fast enough for a short suite.
    with FakeOllama(models=(MODEL, OTHER_MODEL), token_delay=0.04) as server:
        yield server


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, fake):
    """Two linked nodes shared by the tests that do not change the mesh: one has the LLM."""
    from support.browser_pages import LLM_NAME, MODEL, PLAIN_NAME
    cluster = Cluster(tmp_path_factory.mktemp("browser-mesh"))
    try:
        llm = cluster.start("llm", extra=["--name", LLM_NAME, "--ollama-url", fake.url, "--model", MODEL])
        plain = cluster.start("plain", extra=["--name", PLAIN_NAME, "--ollama-url", "none"])
        wait_for(lambda: fully_linked([llm, plain]), timeout=15, message="the two nodes to link")
        wait_for(lambda: plain.json("/api/models")["llm_hosts"] == 1, timeout=10,
                 message="the plain node to see the LLM of the other")
        yield SimpleNamespace(llm=llm, plain=plain, fake=fake)
    finally:
        cluster.close()


@pytest.fixture
def pages(browser, request):
    """Guarded pages (support/browser_pages.py's Pages), checked when the test ends."""
    from support.browser_pages import Pages
    guard = Pages(browser, request.node.name)
    try:
        yield guard
    finally:
        guard.close()
