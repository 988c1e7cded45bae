"""One message limit, MAX_CONTENT_BYTES (256 KiB of UTF-8), the same at every door.

A message one byte over it gets the same 413 (in each API's error shape) from the page API,
the Ollama and OpenAI APIs and both relay doors, and a peer's synced entry holding it is
refused; a message at the limit is accepted everywhere. The texts are two-byte characters,
so a count of characters would let the over-limit one through.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh
from conftest import OTHER_MACHINE, StubNode, as_relay_peer, scripted_router, wsgi_call
from support.fake_ollama import FakeOllama

MODEL = "m1"
LIMIT = neuromesh.MAX_CONTENT_BYTES
AT_LIMIT = "é" * (LIMIT // 2)  # 262,144 bytes, 131,072 characters
OVER = AT_LIMIT + "!"
REFUSAL = "message is 262145 bytes, over the limit of 262144 bytes (256 KiB): shorten it"
RELAY = {"Authorization": "Bearer peer-token"}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The whole app of a node whose LLM is a fake Ollama, and a peer holding its relay token."""
    with FakeOllama(models=(MODEL,)) as fake:
        router = scripted_router()
        router.local = [neuromesh.OllamaBackend(fake.url, router.node_id, "host")]
        router.local[0].refresh()
        router.tokens.issued["p" * 32] = "peer-token"
        node = StubNode(tmp_path_factory.mktemp("limit"), router)
        app = as_relay_peer(node.app(), "p" * 32)  # the relay's doors as the peer's relay connection asks
        conversation = wsgi_call(app, "POST", "/api/conversations", {"title": "limit"}).json()["id"]
        yield app, conversation
        node.store.close()


def doors(conversation, text):
    """``(name, path, body, headers, remote, error shape)`` of each door, asked with ``text``."""
    user = [{"role": "user", "content": text}]
    return [
        ("page", "/api/conversations/%s/messages" % conversation, {"content": text}, None, "127.0.0.1", "json"),
        ("ollama chat", "/api/chat", {"model": MODEL, "messages": user, "stream": False}, None, "127.0.0.1", "json"),
        ("ollama generate", "/api/generate", {"model": MODEL, "prompt": text, "stream": False}, None, "127.0.0.1",
         "json"),
        ("original chat", "/api/chat", {"message": text}, None, "127.0.0.1", "json"),
        ("openai completion", "/v1/completions", {"model": MODEL, "prompt": [text]}, None, "127.0.0.1", "openai"),
        ("openai chat", "/v1/chat/completions", {"model": MODEL, "messages": user}, None, "127.0.0.1", "openai"),
        ("openai text parts", "/v1/chat/completions",
         {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}, None,
         "127.0.0.1", "openai"),
        ("relay chat", neuromesh.RELAY_PATH, {"model": MODEL, "messages": user}, RELAY, OTHER_MACHINE, "json"),
        ("relay forward", neuromesh.RELAY_FORWARD_PATH,
         {"path": "/api/chat", "body": {"model": MODEL, "messages": user, "stream": False}}, RELAY, OTHER_MACHINE,
         "json"),
    ]


def test_a_message_one_byte_over_gets_the_same_413_at_every_door(host):
    app, conversation = host
    assert len(OVER.encode("utf-8")) == LIMIT + 1 and len(OVER) < 140000
    for name, path, body, headers, remote, shape in doors(conversation, OVER):
        reply = wsgi_call(app, "POST", path, body, headers=headers, remote=remote)
        assert reply.status == 413, (name, reply.text[:200])
        if shape == "openai":
            assert reply.json()["error"]["message"] == REFUSAL and \
                reply.json()["error"]["type"] == "invalid_request_error", name
        else:
            assert reply.json() == {"error": REFUSAL}, name


def test_a_message_at_the_limit_is_accepted_at_every_door(host):
    app, conversation = host
    for name, path, body, headers, remote, _shape in doors(conversation, AT_LIMIT):
        reply = wsgi_call(app, "POST", path, dict(body, answer=False) if name == "page" else body,
                          headers=headers, remote=remote)
        assert reply.status in (200, 201), (name, reply.status, reply.text[:200])
        last = reply.lines()[-1]
        assert "error" not in last, name
    stored = wsgi_call(app, "GET", "/api/conversations/" + conversation).json()["messages"]
    assert stored[-1]["content"] == AT_LIMIT


def test_history_of_several_messages_at_the_limit_fits_the_request_body_limit(host):
    app, _conversation = host
    history = [{"role": role, "content": "x" * LIMIT} for role in ("user", "assistant") * 3] + \
        [{"role": "user", "content": "and now?"}]
    for path, headers, remote in (("/v1/chat/completions", None, "127.0.0.1"),
                                  (neuromesh.RELAY_PATH, RELAY, OTHER_MACHINE)):
        reply = wsgi_call(app, "POST", path, {"model": MODEL, "messages": history}, headers=headers, remote=remote)
        assert reply.status == 200, (path, reply.text[:200])


def test_a_synced_entry_over_the_limit_is_refused_and_one_at_it_is_kept():
    source = neuromesh.Store(":memory:", "nodeA", "alice")
    conversation = source.create_conversation("t")["id"]
    source.add_message(conversation, "user", AT_LIMIT, "alice")
    with pytest.raises(neuromesh.StoreError):
        source.add_message(conversation, "user", OVER, "alice")
    snapshot, at_limit = source.entries_missing({})[0]
    over = dict(at_limit, seq=3, uid="nodeA:3", data=dict(at_limit["data"], content=OVER))
    target = neuromesh.Store(":memory:", "nodeB", "bob")
    assert len(target.apply_entries([snapshot, at_limit, over])) == 2
    assert target.version_vector() == {"nodeA": 2}
    assert [m["content"] for m in target.get_conversation(conversation)["messages"]] == [AT_LIMIT]
    source.close()
    target.close()


def test_the_page_counts_and_limits_bytes_with_the_same_number():
    with open(os.path.join(neuromesh.STATIC_DIR, "composer.js"), encoding="utf-8") as handle:
        script = handle.read()
    with open(os.path.join(neuromesh.STATIC_DIR, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    assert "const MAX_BYTES = %d;" % LIMIT in script and "TextEncoder" in script
    assert 'maxlength="%d"' % LIMIT in page and "0 / %d<" % LIMIT in page


TEXTS = st.sampled_from(["", "hi", AT_LIMIT, OVER, "\ud800" * (LIMIT // 3 + 1)]) | st.text(max_size=8)
LEAVES = st.none() | st.booleans() | st.integers() | TEXTS
PARTS = st.lists(st.dictionaries(st.sampled_from(["type", "text"]), LEAVES, max_size=2) | LEAVES, max_size=3)
MESSAGES = st.lists(st.dictionaries(st.sampled_from(["role", "content"]), LEAVES | PARTS, max_size=2) | LEAVES,
                    max_size=3)
BODIES = st.fixed_dictionaries({}, optional={"messages": MESSAGES | LEAVES, "prompt": LEAVES | st.lists(LEAVES),
                                             "system": LEAVES})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_any_body_passes_the_size_check_or_gets_the_413(body):
    try:
        neuromesh.check_message_sizes(body)
    except neuromesh.HTTPFailure as exc:
        assert exc.status == 413 and str(exc).startswith("message is ") and str(exc).endswith("shorten it")
