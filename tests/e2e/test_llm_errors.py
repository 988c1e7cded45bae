"""Errors a student can act on. When the host's Ollama stops, the chat's
error is one sentence naming the computer, with no exception names and nothing said twice; the
backend is shown down at the first failed call (not at the next probe); this computer's stopped
LLM is told once; and a node that stops mid-answer says so in its log instead of blaming the host."""

import re
import threading

import requests

from conftest import fully_linked, wait_for
from support.fake_ollama import FakeOllama
from support.llm_mesh import read_sse

MODEL = "llama3.2:1b"
SLOW_PROBES = {"announce_interval": "60"}  # the LLM is probed at start, then not again in this test


def assert_one_actionable_sentence(text, computer):
    assert computer in text, text
    assert not re.search(r"\b[A-Z]\w*(Error|Exception|Timeout)\b", text), text
    for noise in ("no LLM could answer", "install Ollama", "%s: " % computer, "did not answer: "):
        assert noise not in text, text
    assert len(re.findall(r"[.!?](?:\s|$)", text.strip())) <= 1, text  # one sentence
    words = text.split()
    assert len(set(text.split(":"))) == len(text.split(":")), text  # no part said twice
    assert len(words) < 40, text


def stopped_host_mesh(cluster):
    fake = FakeOllama(models=(MODEL,)).start()
    host = cluster.start("host", settings=SLOW_PROBES, extra=["--ollama-url", fake.url, "--name", "ana-laptop"])
    student = cluster.start("student", extra=["--name", "ben-desk"])
    wait_for(lambda: fully_linked([host, student]), timeout=30, message="the mesh")
    wait_for(lambda: student.json("/api/models")["llm_hosts"] == 1, timeout=30, message="the LLM host is known")
    return fake, host, student


def ask_json(node):
    conversation = node.post("/api/conversations", json={}).json()["id"]
    return node.post("/api/conversations/%s/messages" % conversation, json={"content": "What is a cell?"},
                     headers={"Accept": "application/json"}, timeout=30)


def test_a_stopped_ollama_is_one_sentence_naming_the_computer_and_shown_down_at_once(cluster):
    fake, host, student = stopped_host_mesh(cluster)
    try:
        fake.set_fail("refuse")  # Ollama installed, and stopped
        reply = ask_json(student)
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert_one_actionable_sentence(error, "ana-laptop")
        assert "stopped" in error and "start it" in error
        # shown down at the failed call: the host's next probe is a minute away
        llm = host.health()["llm"]
        assert llm["available"] is False and llm["state"] == "stopped" and host.health()["has_llm"] is False
        wait_for(lambda: student.json("/api/models")["llm_hosts"] == 0, timeout=20,
                 message="the student's node hears that the host's LLM is down")
        conversation = student.post("/api/conversations", json={}).json()["id"]
        with requests.post(student.url + "/api/conversations/%s/messages" % conversation, stream=True, timeout=30,
                           json={"content": "And now?"}, headers={"Accept": "text/event-stream"}) as response:
            errors = [data for kind, data in read_sse(response) if kind == "error"]
        assert len(errors) == 1
        assert_one_actionable_sentence(errors[0]["error"], "ana-laptop")
        assert "not answering now" in errors[0]["error"]
        # the teacher at the host is told how to start it, once
        own = ask_json(host).json()["error"]
        assert own.startswith("Nothing answers at %s" % fake.url) and "start the LLM server there" in own, own
        assert "this computer's LLM" not in own.lower() and own.count("not running") <= 1
    finally:
        fake.stop()


def test_this_computers_stopped_llm_is_told_once(cluster):
    fake = FakeOllama(models=(MODEL,)).start()
    fake.stop()
    node = cluster.start("alone", extra=["--ollama-url", fake.url])
    problem = node.health()["llm"]["problem"]
    page_line = "This computer's LLM is stopped: %s." % problem  # how the page shows it
    assert problem == "nothing answers at %s: start the LLM server there" % fake.url
    assert page_line.lower().count("this computer") == 1 and "not running" not in page_line


def test_a_node_stopping_mid_answer_says_so_and_does_not_blame_the_host(cluster):
    fake = FakeOllama(models=(MODEL,), token_delay=0.2).start()
    try:
        host = cluster.start("host", extra=["--ollama-url", fake.url, "--name", "ana-laptop"])
        student = cluster.start("student", extra=["--name", "ben-desk"])
        wait_for(lambda: fully_linked([host, student]), timeout=30, message="the mesh")
        wait_for(lambda: student.json("/api/models")["llm_hosts"] == 1, timeout=30, message="the LLM host is known")
        tokens = threading.Event()

        def chat():
            try:
                with requests.post(student.url + "/api/chat", stream=True, timeout=60,
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "long " * 50}]}) \
                        as response:
                    for line in response.iter_lines():
                        if b'"content"' in line:
                            tokens.set()
            except requests.RequestException:
                pass  # the node went away: that is the point

        thread = threading.Thread(target=chat)
        thread.start()
        assert tokens.wait(30), "the answer started"
        student.stop(timeout=30)
        thread.join(30)
        log = student.log()
        assert "NeuroMesh stopped." in log
        assert "stopped answering mid-way" not in log and "failing over" not in log, log[-3000:]
        assert host.health()["status"] == "ok"
    finally:
        fake.stop()


def test_a_laptop_that_never_had_an_llm_is_told_how_to_add_one_not_that_one_stopped(cluster):
    fake = FakeOllama(models=(MODEL,)).start()
    fake.stop()  # nothing ever answered at its --ollama-url
    node = cluster.start("student", extra=["--ollama-url", fake.url, "--name", "ben-desk"])
    error = ask_json(node).json()["error"]
    assert "not answering now" not in error and "has stopped" not in error, error
