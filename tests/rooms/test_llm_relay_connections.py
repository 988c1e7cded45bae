"""Relayed chats go over kept-alive http.client connections (RelayConnections).
A scripted relay on loopback (TLS, proven as a node's mesh port proves a relay connection)
answers each request with bytes the test chose."""
import json
import socket
import types

import pytest
from hypothesis import given, settings, strategies as st

import neuromesh
from conftest import TLSRelay, relay_dial

MESSAGES = [{"role": "user", "content": "hi"}]


def chunked(*pieces):
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def answer(*tokens):
    lines = [json.dumps({"message": {"role": "assistant", "content": t}, "done": False}).encode() + b"\n"
             for t in tokens]
    lines.append(json.dumps({"done": True, "eval_count": len(tokens)}).encode() + b"\n")
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(*lines))


class ScriptedRelay:
    """A relay on 127.0.0.1 that answers each request with the next scripted reply;
    ``close_after`` closes the connection after its reply. Counts connections and requests."""

    def __init__(self, replies, close_after=False):
        self.replies, self.close_after = list(replies), close_after
        self.requests = 0
        self.bodies = []
        self._relay = TLSRelay(self._answer)

    @property
    def connections(self):
        return self._relay.connections

    def _answer(self, sock):
        try:
            sock.settimeout(5)
            reader = sock.makefile("rb")
            while self.replies:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0]
                             .split(b":")[1])
                self.bodies.append(json.loads(reader.read(length)))
                self.requests += 1
                sock.sendall(self.replies.pop(0))
                if self.close_after:
                    return
        except OSError:
            pass
        finally:
            sock.close()

    def backend(self):
        peer = types.SimpleNamespace(node_id=self._relay.node_id, name="relay-host", models=["m1"], link=None)
        return self._relay.peer_backend(peer, "t0ken")

    def close(self):
        self._relay.close()


@pytest.fixture
def relay():
    made = []

    def make(replies, close_after=False):
        made.append(ScriptedRelay(replies, close_after))
        return made[-1]
    yield make
    for server in made:
        server.close()


def tokens(events):
    return "".join(e["content"] for e in events if e["type"] == "token")


def test_relayed_chats_share_one_kept_alive_connection(relay):
    server = relay([answer("Hel", "lo"), answer("again")])
    backend = server.backend()
    first = list(backend._stream("m1", MESSAGES, {}, None))
    second = list(backend._stream("m1", MESSAGES, {}, None))
    assert tokens(first) == "Hello" and first[-1]["type"] == "done" and tokens(second) == "again"
    assert (server.connections, server.requests) == (1, 2) and backend.connections.idle() == 1
    assert server.bodies[0]["messages"] == MESSAGES and server.bodies[0]["model"] == "m1"


def test_a_connection_the_host_closed_while_idle_is_replaced(relay):
    server = relay([answer("one"), answer("two")], close_after=True)
    backend = server.backend()
    assert tokens(backend._stream("m1", MESSAGES, {}, None)) == "one"
    assert tokens(backend._stream("m1", MESSAGES, {}, None)) == "two"
    assert (server.connections, server.requests) == (2, 2)


def test_a_relay_refusal_tells_its_status_and_reason(relay):
    body = json.dumps({"error": "model m1 is not here"}).encode()
    server = relay([b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)])
    with pytest.raises(neuromesh.LLMError) as refused:
        list(server.backend()._stream("m1", MESSAGES, {}, None))
    assert refused.value.status == 404 and "model m1 is not here" in str(refused.value)


def test_an_answer_cut_mid_way_is_a_partial_failure(relay):
    line = json.dumps({"message": {"role": "assistant", "content": "par"}, "done": False}).encode() + b"\n"
    broken = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(line), line)
              + b"zz\r\nnot a chunk")
    server = relay([broken], close_after=True)
    events = []
    with pytest.raises(neuromesh.LLMError) as failed:
        for event in server.backend()._stream("m1", MESSAGES, {}, None):
            events.append(event)
    assert failed.value.partial and tokens(events) == "par"


def test_a_host_that_is_gone_is_refused_at_once():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    peer = types.SimpleNamespace(node_id="h" * 32, name="gone-host", models=["m1"], link=None)
    backend = neuromesh.PeerBackend(peer, {"llm_host": "127.0.0.1", "llm_port": port, "token": "t"},
                                    relay_dial(port, peer.node_id))
    with pytest.raises(neuromesh.LLMError) as refused:
        list(backend._stream("m1", MESSAGES, {}, None))
    assert "gone-host did not answer" in str(refused.value) and not refused.value.partial


@given(st.binary(max_size=400))
@settings(max_examples=60, deadline=None)
def test_any_bytes_from_a_relay_end_in_an_answer_or_a_clear_failure(reply):
    server = ScriptedRelay([reply], close_after=True)
    try:
        try:
            events = list(server.backend()._stream("m1", MESSAGES, {}, None))
        except neuromesh.LLMError as exc:
            assert str(exc).startswith("relay-host")
        else:
            assert all(event["type"] in ("start", "token", "done", "queued") for event in events)
    finally:
        server.close()
