"""The classroom without a browser: history of failed and edited questions, cut-off answers, naming,
search, paging, export/import round trips, the CLI's help and errors."""

import json
import os

import pytest

import neuromesh
from support.cli import run_cli


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
    app = stub_node.app()
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
    app = stub_node.app()
    found = _get(app, "/api/search", {"q": "blue"})
    by_id = {record["id"]: record for record in found}
    assert by_id[two["id"]]["match"] == "message" and "sky BLUE" in by_id[two["id"]]["snippet"]
    assert by_id[hidden["id"]]["match"] == "title"  # own private ones are found by their owner
    assert [r["id"] for r in _get(app, "/api/search", {"q": "volcano"})] == [one["id"]]
    assert _get(app, "/api/search", {"q": ""}) == []


# ---- E. export and import round trips ---------------------------------------------------------

def _store(tmp_path, name):
    return neuromesh.Store(str(tmp_path / (name + ".db")), (name * 32)[:32], name)


def _shown(store):
    return sorted((c["title"], c["peer_label"] or "", [(m["content"], m["role"], m["sender"], m["timestamp"])
                                                        for m in c["messages"]])
                  for c in store.get_all_conversations() if not c["private"])


def test_original_files_round_trip_without_duplicates_and_keep_nanoseconds(tmp_path, original_layout):
    a, b = _store(tmp_path, "a"), _store(tmp_path, "b")
    try:
        first = neuromesh.SeedFiles(a).import_layout(str(original_layout))
        assert first["messages"] == 155
        before = _shown(a)
        out = tmp_path / "export"
        summary = neuromesh.SeedFiles(a).export_layout(str(out))
        assert summary["messages"] == 155
        # Into the same data dir: nothing is added twice.
        again = neuromesh.SeedFiles(a).import_layout(str(out))
        assert again["messages"] == 0 and again["conversations"] == 0 and again["skipped"] == 155
        assert _shown(a) == before
        # Into another data dir: everything once, however often.
        assert neuromesh.SeedFiles(b).import_layout(str(out))["messages"] == 155
        assert neuromesh.SeedFiles(b).import_layout(str(out))["messages"] == 0
        assert _shown(b) == before
        # Timestamps keep the precision of the original files (nanoseconds).
        original = json.loads((original_layout / "conversations" / "local.json").read_text())
        exported = json.loads((out / "conversations" / "local.json").read_text())
        assert sorted(m["timestamp"] for m in exported["messages"]) == sorted(
            m["timestamp"] for m in original["messages"])
        assert any(len(m["timestamp"]) == len("2025-03-25T13:56:00.304707400Z") for m in exported["messages"])
        second = tmp_path / "export2"
        neuromesh.SeedFiles(b).export_layout(str(second))
        again = json.loads((second / "conversations" / "local.json").read_text())
        assert [m["timestamp"] for m in again["messages"]] == [m["timestamp"] for m in exported["messages"]]
    finally:
        a.close()
        b.close()


def test_own_conversations_round_trip_and_local_json_holds_them(tmp_path):
    a, b = _store(tmp_path, "a"), _store(tmp_path, "b")
    try:
        one = a.create_conversation("Photosynthesis")
        a.add_message(one["id"], "user", "What is chlorophyll?", "Ana")
        a.add_message(one["id"], "assistant", "A green pigment.", "LLM", model="m")
        two = a.create_conversation("Fractions")
        a.add_message(two["id"], "user", "Is 1/2 more than 1/3?", "Ben")
        secret = a.create_conversation("Secret", private=True)
        a.add_message(secret["id"], "user", "hidden", "Ana")
        out = tmp_path / "export"
        summary = neuromesh.SeedFiles(a).export_layout(str(out))
        assert summary == {"conversations": 2, "messages": 3, "private_skipped": 1}
        local = json.loads((out / "conversations" / "local.json").read_text())
        assert local["id"] == "local"
        assert [m["content"] for m in local["messages"]] == [
            "What is chlorophyll?", "A green pigment.", "Is 1/2 more than 1/3?"]
        assert [m["message_type"] for m in local["messages"]] == ["Question", "Response", "Question"]
        assert sorted(os.listdir(out / "conversations")) == ["local.json"]
        before = _shown(a)
        assert neuromesh.SeedFiles(a).import_layout(str(out)) == {"conversations": 0, "messages": 0, "skipped": 3}
        assert _shown(a) == before
        assert neuromesh.SeedFiles(b).import_layout(str(out))["messages"] == 3
        assert neuromesh.SeedFiles(b).import_layout(str(out))["messages"] == 0
        assert _shown(b) == [entry for entry in before]
    finally:
        a.close()
        b.close()


def test_the_cli_round_trip_into_another_data_dir(tmp_path, original_layout):
    first = run_cli("--data-dir", str(tmp_path / "one"), "import", str(original_layout))
    assert first.returncode == 0, first.stderr
    assert run_cli("--data-dir", str(tmp_path / "one"), "export", str(tmp_path / "out")).returncode == 0
    for _ in range(2):
        second = run_cli("--data-dir", str(tmp_path / "two"), "import", str(tmp_path / "out"))
        assert second.returncode == 0, second.stderr
    assert "0 messages" in second.stdout, second.stdout
    again = run_cli("--data-dir", str(tmp_path / "one"), "import", str(tmp_path / "out"))
    assert "0 messages" in again.stdout and "0 conversations" in again.stdout, again.stdout


# ---- F. the command line ------------------------------------------------------------------------

def test_help_lists_the_commands_and_import_has_its_own_help():
    main = run_cli("--help")
    assert main.returncode == 0
    for command in ("run", "export", "import"):
        assert "\n  %s " % command in main.stdout, main.stdout
    own = run_cli("import", "--help")
    assert own.returncode == 0
    assert own.stdout.startswith("python3 neuromesh.py import: read conversations from DIR")
    assert "--http-port" not in own.stdout


def test_a_bad_port_gets_a_sentence():
    bad = run_cli("--http-port", "abc")
    assert bad.returncode == 2
    assert bad.stderr.startswith("neuromesh.py: error: --http-port must be a port number from 0 to 65535, not 'abc'.")
    assert "invalid literal" not in bad.stderr and "usage:" not in bad.stderr


def test_a_title_match_shows_the_first_words_of_the_conversation(stub_node):
    """Two "What is photosynthesis?" are told apart by what was asked in each."""
    store = stub_node.store
    first = store.create_conversation("What is photosynthesis?")
    store.add_message(first["id"], "user", "Explain photosynthesis with chlorophyll, please.", "Ana")
    empty = store.create_conversation("What is photosynthesis? (2)")
    found = {r["id"]: r for r in _get(stub_node.app(), "/api/search", {"q": "photosynth"})}
    assert found[first["id"]]["match"] == "title"
    assert found[first["id"]]["snippet"] == "Explain photosynthesis with chlorophyll, please."
    assert found[empty["id"]]["snippet"] == "What is photosynthesis? (2)"  # nothing asked yet: the title
