"""Relay tokens across link changes, with real nodes on loopback: a link lost
on the host's side only must not leave the client holding a token the host dropped.

The race, provoked with a held link instead of load: the client has two links to the host
(here both dialed by it, as when a --peer address and a discovered one name the same node).
The newer one's HELO reaches the client first, so the client retires the older one quietly
(not a loss: it is still linked). The host reads the older link's close before the newer
link's HELO, so to the host the client went down, and it forgot the client's relay token. A
moment later the newer link is up on both sides: the client kept its grant, and the host must
still honour it."""

import socket
import struct
import threading
import types

import neuromesh
from conftest import API_MODEL as MODEL, scripted_router, wait_for
from support.llm_mesh import hosts_of

TLS_RECORD = struct.Struct(">BHH")  # content type, version, length
APPLICATION_DATA = 23


class HeldLink:
    """A loopback TCP relay in front of a node's link port that holds back the second half of
    a link. Each connection is passed on once ``opened`` is set: everything the far end sends,
    and the dialer's TLS records up to its key proof (TLS 1.3: its Finished, HI!!: and AUTH:
    are its first three encrypted records); what the dialer sends after that (its HELO: on) is
    held until ``released`` is set."""

    passed_frames = 3

    def __init__(self, far_port):
        self.far = ("127.0.0.1", far_port)
        self.opened, self.released, self._stop = threading.Event(), threading.Event(), threading.Event()
        self._sockets = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._threads = [self._spawn(self._accept)]

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, name="test-held-link", daemon=True)
        thread.start()
        return thread

    def _accept(self):
        while True:
            try:
                dialer, _address = self._listener.accept()
            except OSError:  # closed by close()
                return
            self._sockets.append(dialer)
            self._threads.append(self._spawn(self._serve, dialer))

    def _serve(self, dialer):
        while not self.opened.wait(0.1):
            if self._stop.is_set():
                return
        try:
            far = socket.create_connection(self.far, timeout=5)
        except OSError:
            dialer.close()
            return
        far.settimeout(None)
        self._sockets.append(far)
        self._threads.append(self._spawn(self._pump, far, dialer))
        self._pump(dialer, far, hold_after=self.passed_frames)

    def _pump(self, source, sink, hold_after=None):
        held = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if hold_after is None:
                    sink.sendall(data)
                    continue
                held += data
                while hold_after and len(held) >= TLS_RECORD.size:
                    kind, _version, length = TLS_RECORD.unpack_from(held)
                    size = TLS_RECORD.size + length
                    if len(held) < size:
                        break
                    sink.sendall(held[:size])
                    held, hold_after = held[size:], hold_after - (kind == APPLICATION_DATA)
                if not hold_after:
                    while not self.released.wait(0.1):
                        if self._stop.is_set():
                            return
                    sink.sendall(held)
                    hold_after = None
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self._listener.close()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)


def links_settled(host, client):
    """Each node lists the other as linked and holds exactly one link."""
    return (client.node_id in host.connected_ids() and host.node_id in client.connected_ids()
            and host.health()["counters"]["links"] == 1 and client.health()["counters"]["links"] == 1)


def test_a_link_lost_on_the_host_side_only_keeps_the_clients_relay_token(cluster, fakes):
    fake = fakes()
    settings = {"peer_timeout": "20"}  # no heartbeat closes the held link meanwhile, however busy the machine
    host = cluster.start("host", discovery=False, settings=settings, extra=["--ollama-url", fake.url])
    held = HeldLink(host.tcp_port)
    try:
        client = cluster.start("client", discovery=False, settings=settings, extra=[
            "--peer", "127.0.0.1:%d" % host.tcp_port, "--peer", "127.0.0.1:%d" % held.port])
        wait_for(lambda: hosts_of(client) == {host.node_id}, message="LLM access granted on the first link")
        held.opened.set()  # the second link: the host's HELO reaches the client, the client's is held
        wait_for(lambda: client.node_id not in host.connected_ids(), message="the host to lose the first link")
        assert host.node_id in client.connected_ids(), "the client retired the first link for the second, quietly"
        held.released.set()
        wait_for(lambda: links_settled(host, client), timeout=20, message="one link, up on both sides")
        assert client.health()["counters"].get("peers_lost", 0) == 0, "the loss was the host's alone"
        assert host.health()["counters"]["peers_lost"] >= 1

        question = [{"role": "user", "content": "are you still there?"}]
        reply = client.post("/api/chat", timeout=60, json={"model": MODEL, "stream": False, "messages": question})
        assert reply.status_code == 200, (reply.text, host.log(), client.log())
        assert reply.json()["message"]["content"] == fake.answer_for(question, MODEL)
        assert len(fake.requests_to("/api/chat")) == 1
    finally:
        held.close()


def test_a_token_is_refused_while_its_holder_is_unlinked_and_honoured_once_it_links_again(monkeypatch):
    """The host side of the race above in-process: the token outlives a link loss, usable only while linked."""
    monkeypatch.setattr(neuromesh.IssuedTokens, "limit", 2)
    router = scripted_router()
    sent = []
    router.access.mesh = types.SimpleNamespace(send=lambda node_id, marker, payload: sent.append((node_id, payload)))
    students = [types.SimpleNamespace(node_id=label * 32, name=label, address="127.0.0.1", link=None,
                                      has_llm=False, shares_models=False) for label in "abc"]
    student = students[0]
    router.access.handle_request(student, {"peer_name": "a"})
    token = sent[-1][1]["token"]
    assert router.tokens.holder(token) == student.node_id
    router.access.peer_down(student)
    assert router.tokens.holder(token) is None, "no relay for a peer that is not linked (e.g. unlinked for bad data)"
    router.access.peer_changed(student, relinked=True)
    assert router.tokens.holder(token) == student.node_id
    router.access.handle_request(student, {"peer_name": "a"})
    assert sent[-1][1]["token"] == token, "asking again on a new link gives the same token"

    router.access.peer_down(student)  # a token kept for a peer that may come back does not pile up:
    for other in students[1:]:  # past the token limit, those of unlinked peers are forgotten
        router.access.handle_request(other, {"peer_name": other.name})
    router.access.peer_changed(student, relinked=True)
    assert router.tokens.holder(token) is None and sorted(router.tokens.issued) == ["b" * 32, "c" * 32]
