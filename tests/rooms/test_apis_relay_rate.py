"""Relayed chats are rate-limited on the host, per requester and per node.

The attacker is an insider node holding a valid relay token, sending straight to the host's
two relay doors (/relay/chat and /relay/forward) and making up a new requester tag whenever
it is refused. The host's LLM is the in-process fake Ollama on loopback.
"""

import pytest

import neuromesh
from conftest import OTHER_MACHINE, StubNode, scripted_router, wsgi_call
from support.fake_ollama import FakeOllama

ROGUE, HONEST = "r" * 32, "h" * 32
MODEL = "m1"


@pytest.fixture
def relay_host(tmp_path):
    """A host whose LLM is a fake Ollama, tokens for a rogue node and an honest one, and its relay
    with small limits: 3 chats a minute per requester, 6 per node."""
    with FakeOllama(models=(MODEL,)) as fake:
        router = scripted_router()
        router.local = [neuromesh.OllamaBackend(fake.url, router.node_id, "host")]
        router.local[0].refresh()
        router.tokens.issued.update({ROGUE: "rogue-token", HONEST: "honest-token"})
        node = StubNode(tmp_path, router)
        gate = neuromesh.Gatekeeper(node.config, relay_rate=3, relay_node_rate=6)
        app = neuromesh.RelayApi(router, neuromesh.ChatService(router, node.store, node.host_info), gate).build()
        yield app, fake
        node.store.close()


def relay(app, door, token, tag):
    """One relayed chat through ``door`` ("chat" or "forward"), as the peer holding ``token`` sends it."""
    messages = [{"role": "user", "content": "hi from " + tag}]
    if door == "chat":
        path, body = neuromesh.RELAY_PATH, {"model": MODEL, "messages": messages, "requester": tag}
    else:
        path = neuromesh.RELAY_FORWARD_PATH
        body = {"path": "/api/chat", "requester": tag,
                "body": {"model": MODEL, "messages": messages, "stream": False}}
    peer = {"rogue-token": ROGUE, "honest-token": HONEST}[token]  # RelayServer: the TLS connection's peer
    return wsgi_call(app, "POST", path, body, headers={"Authorization": "Bearer " + token}, remote=OTHER_MACHINE,
                     environ={neuromesh.RelayServer.PEER_KEY: peer})


def answered(reply):
    if reply.status != 200:
        return False
    lines = reply.lines()
    return lines[-1].get("done") is True and "error" not in lines[-1]


def refused(reply, words):
    return reply.status == 429 and int(reply.headers["Retry-After"]) >= 1 and words in reply.json()["error"]


def test_a_rogue_node_is_held_at_both_doors_whatever_tags_it_makes_up(relay_host):
    app, fake = relay_host
    assert all(answered(relay(app, "chat", "rogue-token", "guest-1")) for _ in range(3))
    # the 4th chat of one requester: refused at both doors
    assert refused(relay(app, "chat", "rogue-token", "guest-1"), "at most 3 a minute")
    assert refused(relay(app, "forward", "rogue-token", "guest-1"), "at most 3 a minute")
    # a new tag passes its own limit, until the node's ceiling (6, counting the 2 refused above)
    assert answered(relay(app, "forward", "rogue-token", "guest-2"))
    tags = ["made-up-%d" % index for index in range(20)]
    for door in ("chat", "forward"):
        for tag in tags:
            assert refused(relay(app, door, "rogue-token", tag), "at most 6 a minute for all its users"), (door, tag)
    assert len(fake.requests_to("/api/chat")) == 4  # the host's LLM saw only the admitted chats
    # another node's chats are answered at both doors
    assert answered(relay(app, "chat", "honest-token", "guest-1"))
    assert answered(relay(app, "forward", "honest-token", "guest-1"))
    assert len(fake.requests_to("/api/chat")) == 6


def test_the_default_limits_are_the_clients_rate_and_a_class_of_it_per_node():
    gate = neuromesh.Gatekeeper(neuromesh.Config())
    assert gate.relay_rate.limit == neuromesh.Config().chat_rate == 100
    assert gate.relay_node_rate.limit == 3200  # 30 guests, the teacher and one spare at 100 a minute


def test_a_valid_token_on_the_http_port_is_refused_at_both_doors(relay_host):
    """An insider holding a real relay token sends to the HTTP port (plain text on the LAN), not
    on a TLS relay connection: refused before the token is looked at, and no LLM is asked."""
    app, fake = relay_host
    for path in (neuromesh.RELAY_PATH, neuromesh.RELAY_FORWARD_PATH):
        reply = wsgi_call(app, "POST", path, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                          headers={"Authorization": "Bearer honest-token"}, remote=OTHER_MACHINE)
        assert reply.status == 403 and "never over plain HTTP" in reply.json()["error"], (path, reply.status)
    assert fake.requests_to("/api/chat") == []
