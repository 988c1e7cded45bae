"""Slowloris: a stranger trickling never-finished requests must not lock the
owner out. The HTTP server caps connections per address, keeps room for the owner (loopback),
and closes a request not received in full by the request deadline; answers that stream for
long (SSE) are never cut by it.

The in-process tests run on loopback, with 127.0.0.2.. playing other machines; the attack test
runs a node with default flags and a stranger in network namespaces the test makes itself.
"""

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

import neuromesh
from conftest import NodeProcess, wait_for
from support.namespaces import Namespaces, needs_namespaces

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
PARTIAL = b"GET /health HTTP/1.1\r\nHost: node\r\nX-Slow: "


def tiny_app(environ, start_response):
    """/health answers at once, /slow?SECONDS after that long; /stream is an SSE answer of 8 events, one every 0.4 s."""
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def events():
            for index in range(8):
                yield b"data: %d\n\n" % index
                time.sleep(0.4)
        return events()
    if environ["PATH_INFO"] == "/slow":
        time.sleep(float(environ["QUERY_STRING"]))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@contextlib.contextmanager
def gated_server(request_deadline):
    """An HTTPServer on 127.0.0.1 whose owner is 127.0.0.1 only: 127.0.0.x are other machines."""
    try:
        probe = socket.socket()
        probe.bind(("127.0.0.2", 0))
        probe.close()
    except OSError:
        pytest.skip("this system routes only 127.0.0.1 to loopback (no 127.0.0.2 to play a stranger)")
    server = neuromesh.HTTPServer("127.0.0.1", 0, tiny_app, threads=8, connection_limit=64, idle_timeout=30,
                                  request_deadline=request_deadline, per_address=8,
                                  is_owner=lambda host: host == "127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="gated-http",
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture
def gated():
    with gated_server(request_deadline=1.5) as server:
        yield server


@pytest.fixture
def capped():
    """A gated server whose request deadline is far off: what closes a stranger's connection in
    these tests is the cap alone, however long a busy machine takes to count them."""
    with gated_server(request_deadline=120) as server:
        yield server


def connect_from(source, port):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def is_closed(sock, wait=0.0):
    """True once the server closed or reset ``sock`` (the stranger's view)."""
    sock.settimeout(wait)
    try:
        return sock.recv(4096) == b""
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:  # a reset
        return True


def owner_health(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        reply = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return reply
            reply += chunk


def test_a_stranger_holds_at_most_its_cap_and_the_owner_is_still_served(capped):
    port = capped.server_port
    sockets, refused = [], 0
    try:
        for _ in range(20):
            sock = None
            try:
                sock = connect_from("127.0.0.2", port)
                sock.sendall(PARTIAL)
                sockets.append(sock)
            except (ConnectionResetError, BrokenPipeError):  # past the cap, reset before it could send
                refused += 1
                if sock is not None:
                    sock.close()
        closed = set()

        def count_closed():
            closed.update(sock for sock in sockets if sock not in closed and is_closed(sock, 0.01))
            return refused + len(closed)
        wait_for(lambda: count_closed() >= 12, timeout=10, message="the 12 connections past the cap of 8 to be reset")
        assert count_closed() == 12 and len(sockets) - len(closed) == 8  # 8 are held, whichever were accepted
        assert owner_health(port).endswith(b"ok")
    finally:
        for sock in sockets:
            sock.close()


def test_strangers_from_many_addresses_cannot_take_the_owners_share(capped):
    port = capped.server_port  # limit 64: other machines together get 64 - 8 (the owner's share)
    sockets = []
    try:
        refused = 0
        for host in range(2, 12):  # 10 addresses x 8 = 80 tries
            for _ in range(8):
                try:
                    sock = connect_from("127.0.0.%d" % host, port)
                    sock.sendall(PARTIAL)
                    sockets.append(sock)
                except ConnectionResetError:  # reset while connecting
                    refused += 1
        wait_for(lambda: refused + sum(is_closed(sock, 0.01) for sock in sockets) == 80 - 56, timeout=10,
                 message="the connections past the strangers' share to be reset")
        owners = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(5)]
        try:
            assert owner_health(port).endswith(b"ok")
        finally:
            for sock in owners:
                sock.close()
    finally:
        for sock in sockets:
            sock.close()


def test_a_trickled_request_is_closed_at_the_deadline_however_steady(gated):
    sock = connect_from("127.0.0.2", gated.server_port)
    try:
        began = time.monotonic()
        sock.sendall(PARTIAL)
        while time.monotonic() - began < 8:  # one byte every 0.2 s: never idle, never finished
            if is_closed(sock, 0.2):
                break
            try:
                sock.sendall(b"a")
            except OSError:
                break
        took = time.monotonic() - began
        assert is_closed(sock, 1.0)
        assert 1.4 <= took <= 1.5 + 2.0, took  # the deadline (1.5 s) plus one maintenance round
    finally:
        sock.close()


def test_a_slow_streamed_answer_outlives_the_request_deadline(gated):
    """8 events over 3.2 s, twice the 1.5 s deadline: none is lost and the answer ends as it
    should, while a trickling request of the same address is closed at the deadline."""
    stream = connect_from("127.0.0.2", gated.server_port)
    slow = connect_from("127.0.0.2", gated.server_port)
    try:
        stream.sendall(b"GET /stream HTTP/1.1\r\nHost: node\r\n\r\n")
        slow.sendall(PARTIAL)
        stream.settimeout(10)
        received = b""
        while not received.endswith(b"0\r\n\r\n"):  # the last chunk
            chunk = stream.recv(4096)
            assert chunk, "the stream was cut after %r" % received[-80:]
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        assert all(b"data: %d\n\n" % index in received for index in range(8))
        assert is_closed(slow), "the trickling request outlived the deadline"
    finally:
        stream.close()
        slow.close()


def test_a_request_read_ahead_behind_a_slow_answer_gets_its_own_deadline():
    """Pipelined: a second request begun in the packet of a first whose answer takes 3.2 s
    (past the 3 s deadline) has the whole deadline from the end of that answer on."""
    with gated_server(request_deadline=3.0) as server:
        sock = connect_from("127.0.0.2", server.server_port)
        try:
            sock.sendall(b"GET /slow?3.2 HTTP/1.1\r\nHost: node\r\n\r\nGET /health HTTP/1.1\r\nHost: node\r\n")
            sock.settimeout(10)
            first = b""
            while not first.endswith(b"ok"):
                chunk = sock.recv(4096)
                assert chunk, "closed before the first answer"
                first += chunk
            time.sleep(1.6)  # past a maintenance round (1 s), well inside the second request's own deadline
            sock.sendall(b"Connection: close\r\n\r\n")
            second = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                second += chunk
            assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"ok"), second
        finally:
            sock.close()


# -- the attack, in network namespaces -------------------------------------------------------------


def slowloris(tmp_path, count=2000, open_for=6.0, deadline=20.0, reopen=4000, program=None):
    """A node with default flags (``program``: another neuromesh.py), a stranger opening ``count``
    trickling connections: what the stranger and the owner saw, as figures."""
    spaces = Namespaces(count=2)
    node = None
    try:
        spaces.create()
        node_ns, stranger_ns = spaces.hosts
        node = NodeProcess(tmp_path / "node", [], "node", prefix=["ip", "netns", "exec", node_ns],
                           program=program)
        node.start(timeout=30)
        helper = [sys.executable, os.path.join(HERE, "slowloris.py")]
        stop_after = open_for + deadline + 10
        owner = subprocess.Popen(["ip", "netns", "exec", node_ns] + helper
                                 + ["owner", "8080", spaces.subnet + ".2", str(open_for + deadline + 4)],
                                 stdout=subprocess.PIPE, text=True)
        stranger = subprocess.Popen(["ip", "netns", "exec", stranger_ns] + helper
                                    + ["stranger", spaces.subnet + ".1", "8080", str(count), str(open_for),
                                       str(stop_after), str(reopen)], stdout=subprocess.PIPE, text=True)
        attacked = json.loads(stranger.communicate(timeout=stop_after + 30)[0])
        watched = json.loads(owner.communicate(timeout=stop_after + 30)[0])
    finally:
        if node is not None:
            node.kill()
        spaces.delete()
    records = attacked["records"]
    answered = [value for value in watched["latencies"] if value is not None]
    lived = [closed - first for _, first, closed in records if first is not None and closed is not None]
    return {"connections": len(records), "still_open": attacked["still_open"],
            "never_connected": sum(1 for record in records if record[0] is None),
            "held_max": max(watched["held"]), "polls": len(watched["latencies"]),
            "unanswered": len(watched["latencies"]) - len(answered),
            "p50": statistics.median(answered) if answered else None, "max": max(answered, default=None),
            "longest_lived": max(lived, default=None), "last_closed": max(
                (record[2] for record in records if record[2] is not None), default=None)}


@needs_namespaces
def test_slowloris_from_a_stranger_does_not_lock_the_owner_out(tmp_path):
    figures = slowloris(tmp_path)
    print("\nslowloris, 2,000 trickling connections and reopens:", figures)
    assert figures["unanswered"] == 0 and figures["max"] < 1.0, figures  # the owner's page answers
    assert figures["held_max"] <= neuromesh.DEFAULTS["max_connections_per_address"], figures
    assert figures["still_open"] == 0, figures  # every one saw EOF or a reset
    assert figures["longest_lived"] <= neuromesh.DEFAULTS["http_request_deadline"] + 2.5, figures
