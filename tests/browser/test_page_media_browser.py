"""Pictures and thinking on the page, in a real browser (Debian's Chromium, guarded as in
tests/support/browser_pages.py): a picture attached on a phone-size page for a vision model and
answered; a reasoning model's thinking in a collapsed "Thinking…" section, streamed live apart
from the answer and kept with it; the model picker tells each model's capabilities. The only
LLM is the fake Ollama, on another node."""

import base64
import re
import struct
import zlib
from types import SimpleNamespace

import pytest

from conftest import Cluster, fully_linked, wait_for
from support.fake_ollama import FakeOllama, thinking_for
from support.browser_pages import LLM_NAME, PHONE, ask, expect, finished_answers

MODEL, SEER, THINKER = "llama3.2:1b", "llava:7b", "qwen3:0.6b"


def png(width, height):
    """A real PNG of ``width`` x ``height`` pixels (a gradient), as a phone camera would give a big one."""
    ramp = bytes(v for x in range(width) for v in (x * 255 // width, 0, 128))
    rows = b"".join(b"\x00" + ramp[:1] + bytes([y * 255 // height]) + ramp[2:] for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def media_mesh(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("media-mesh"))
    with FakeOllama(models=(MODEL, SEER, THINKER), token_delay=0.05) as fake:
        try:
            llm = cluster.start("llm", extra=["--name", LLM_NAME, "--ollama-url", fake.url, "--model", MODEL])
            plain = cluster.start("plain", extra=["--ollama-url", "none"])
            wait_for(lambda: fully_linked([llm, plain]), timeout=15, message="the two nodes to link")
            wait_for(lambda: len(plain.json("/api/models")["models"]) == 3, timeout=15, message="the models")
            yield SimpleNamespace(llm=llm, plain=plain, fake=fake)
        finally:
            cluster.close()


def test_a_picture_attached_on_a_phone_is_downscaled_sent_and_answered(pages, media_mesh, tmp_path):
    picture = tmp_path / "homework.png"
    picture.write_bytes(png(1600, 1200))
    page = pages.open(media_mesh.plain, **PHONE)
    picker = page.locator("#model-picker")
    expect(picker.locator("option[value='%s']" % SEER)).to_have_text(re.compile(r"vision"))
    expect(picker.locator("option[value='%s']" % THINKER)).to_have_text(re.compile(r"thinking"))
    picker.select_option(MODEL)
    expect(page.locator("#attach-button")).to_be_hidden()  # this model cannot see: no way to attach
    picker.select_option(SEER)
    expect(page.locator("#attach-button")).to_be_visible()
    page.locator("#attach-input").set_input_files(str(picture))
    expect(page.locator("#attachments img")).to_have_count(1)
    pages.screenshot(page, "attached")
    ask(page, "What is in this picture?")
    answer = finished_answers(page)
    expect(answer).to_contain_text("saw 1 image(s)")
    expect(page.locator("#messages .message.user .message-images img")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)
    sent = media_mesh.fake.requests_to("/api/chat")[-1]["messages"][-1]["images"][0]
    raw = base64.b64decode(sent)
    assert raw[:2] == b"\xff\xd8" and len(sent) <= 200 * 1024  # a JPEG, made small enough in the browser
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    pages.screenshot(page, "answered")
    page.reload()
    expect(page.locator("#messages .message.user .message-images img")).to_have_count(1)  # kept with the message


def test_a_thinking_models_thoughts_stream_in_a_collapsed_section_apart_from_the_answer(pages, media_mesh):
    page = pages.open(media_mesh.plain)
    page.locator("#model-picker").select_option(THINKER)
    ask(page, "Why is the sky blue?")
    live = page.locator("#messages .message.assistant.streaming details.thinking")
    expect(live).to_have_count(1)  # while the model still thinks
    expect(live.locator("summary")).to_have_text("Thinking…")
    answer = finished_answers(page)
    expected = media_mesh.fake.answer_for([{"role": "user", "content": "Why is the sky blue?"}], THINKER)
    expect(answer.locator(".markdown")).to_have_text(expected)
    section = answer.locator("details.thinking")
    expect(section).not_to_have_attribute("open", "")
    expect(section.locator(".thinking-text")).to_be_hidden()
    pages.screenshot(page, "collapsed")
    section.locator("summary").click()
    expect(section.locator(".thinking-text")).to_have_text(thinking_for(expected))
    pages.screenshot(page, "expanded")
    page.reload()
    kept = finished_answers(page).locator("details.thinking")
    expect(kept).to_have_count(1)
    expect(kept.locator(".thinking-text")).to_have_text(thinking_for(expected), use_inner_text=False)
