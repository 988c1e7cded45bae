"""Issue 12 without a browser: history of failed and edited questions, cut-off answers, naming,
search, paging, export/import round trips, the CLI's help and errors."""

import json
import os
import subprocess
import sys

import pytest

import neuromesh
from conftest import ROOT, SCRIPT


def msg(role, content, id_=None, **extra):
    return dict({"role": role, "content": content, "id": id_ or content}, **extra)


def test_a_failed_question_is_not_history_unless_it_is_the_last():
    messages = [msg("user", "failed"), msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")]
    history = neuromesh.ChatService.history_of(messages)
    assert [m["content"] for m in history] == ["q1", "a1", "q2"]


def test_an_edited_question_replaces_the_old_one_and_its_answers_in_history():
    messages = [msg("user", "q1"), msg("assistant", "a1"), msg("user", "old"), msg("assistant", "a-old"),
                msg("user", "new", replaces="old")]
    history = neuromesh.ChatService.history_of(messages)
    assert [m["content"] for m in history] == ["q1", "a1", "new"]


def test_marks_are_kept_only_when_set(tmp_path):
    store = neuromesh.Store(str(tmp_path / "db.sqlite"), "a" * 32, "Box")
    try:
        conversation = store.create_conversation("t")
        plain = store.add_message(conversation["id"], "user", "q", "user")
        assert "cut_off" not in plain["data"] and "replaces" not in plain["data"]
        cut = store.add_message(conversation["id"], "assistant", "half", "LLM", cut_off=True)
        assert cut["data"]["cut_off"] is True
    finally:
        store.close()


# ---- C. search and paging --------------------------------------------------------------------

def _long_conversation(store, count):
    messages = []
    for index in range(count):
        data = {"role": "user" if index % 2 == 0 else "assistant", "content": "line %05d" % index,
                "sender": "user", "host_info": {"hostname": "Box", "ip_address": "", "is_llm_host": False}}
        messages.append({"uid": "import:%064x" % index, "data": data,
                         "timestamp": "2024-01-01T00:%02d:%02d.%06dZ" % (index // 3600, index // 60 % 60, index)})
    store.import_conversations([{"id": "11111111-2222-3333-4444-555555555555", "title": "**Long** chat",
                                 "peer_label": None, "messages": messages}])
    return "11111111-2222-3333-4444-555555555555"


def test_ten_thousand_messages_are_sent_in_pages(stub_node):
    from conftest import wsgi_call
    conversation_id = _long_conversation(stub_node.store, 10000)
    app = neuromesh.build_app(stub_node)
    first = wsgi_call(app, "GET", "/api/conversations/" + conversation_id)
    assert first.status == 200
    body = first.json()
    assert len(body["messages"]) == neuromesh.PageApi.page_default and body["has_more"] is True
    assert body["messages"][-1]["content"] == "line 09999"
    assert body["message_count"] == 10000
    seen, before = [m["content"] for m in body["messages"]], body["messages"][0]["id"]
    while True:
        page = _get(app, "/api/conversations/" + conversation_id, {"limit": 1000, "before": before})
        seen = [m["content"] for m in page["messages"]] + seen
        if not page["has_more"]:
            break
        before = page["messages"][0]["id"]
    assert seen == ["line %05d" % i for i in range(10000)]
    bad = _get(app, "/api/conversations/" + conversation_id, {"limit": "all"}, status=400)
    assert "limit" in bad["error"]


def _get(app, path, query, status=200):
    from io import BytesIO
    from urllib.parse import urlencode
    from wsgiref.util import setup_testing_defaults
    environ = {}
    setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": urlencode(query),
                    "REMOTE_ADDR": "127.0.0.1", "wsgi.input": BytesIO(b""), "CONTENT_LENGTH": "0"})
    started = {}
    result = app(environ, lambda s, h, e=None: started.update(status=s))
    data = b"".join(result)
    assert int(started["status"].split()[0]) == status, data
    return json.loads(data)


def test_search_finds_titles_and_message_text(stub_node):
    store = stub_node.store
    one = store.create_conversation("Volcanoes")
    two = store.create_conversation("Other")
    store.add_message(two["id"], "user", "Why is the sky BLUE at noon?", "Ana")
    hidden = store.create_conversation("Secret blue notes", private=True)
    app = neuromesh.build_app(stub_node)
    found = _get(app, "/api/search", {"q": "blue"})
    by_id = {record["id"]: record for record in found}
    assert by_id[two["id"]]["match"] == "message" and "sky BLUE" in by_id[two["id"]]["snippet"]
    assert by_id[hidden["id"]]["match"] == "title"  # own private ones are found by their owner
    assert [r["id"] for r in _get(app, "/api/search", {"q": "volcano"})] == [one["id"]]
    assert _get(app, "/api/search", {"q": ""}) == []
