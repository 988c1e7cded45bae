"""Soak: thousands of garbage frames, datagrams and HTTP requests leave a node as it was.

Bounded in count and time; loopback only. The node's RSS, thread count and open files are
measured after a warm-up round of the same attacks, then again after the soak.
"""

import os
import random
import socket
import struct
import time

import pytest

from conftest import fully_linked, wait_for

SOAK = 2000
WARM_UP = 200
DEADLINE = 90.0  # seconds for the whole soak: the loops stop early rather than run long


def process_figures(pid):
    """(RSS in KiB, threads, open files) of a process, from /proc."""
    with open("/proc/%d/status" % pid) as handle:
        status = dict(line.split(":", 1) for line in handle if ":" in line)
    rss = int(status["VmRSS"].split()[0])
    threads = int(status["Threads"])
    files = len(os.listdir("/proc/%d/fd" % pid))
    return rss, threads, files


def garbage_frames(chance):
    """Byte strings that are not valid frames, or frames no handshake allows."""
    header = struct.Struct("<5sQ")
    return [
        bytes(chance.getrandbits(8) for _ in range(chance.randint(1, 64))),
        header.pack(b"PING:", 5) + b"[[[[[",
        header.pack(b"PING:", 2000) + b"[" * 1000 + b"]" * 1000,
        header.pack(b"HELO:", 9) + b"not json!",
        header.pack(b"SYNC:", 2) + b"{}",
        header.pack(b"XXXX:", 2) + b"{}",
        header.pack(b"FILE:", 1 << 40),
        b"GET / HTTP/1.1\r\n\r\n",
    ]


def send_garbage_frames(port, count, chance, deadline):
    sent = 0
    while sent < count and time.monotonic() < deadline:
        batch = garbage_frames(chance)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            for frame in batch[: count - sent]:
                try:
                    sock.sendall(frame)
                except OSError:
                    break  # the node closed this link: the next frames go on a new one
                sent += 1
    return sent


def send_garbage_datagrams(port, count, chance, deadline):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sent = 0
        while sent < count and time.monotonic() < deadline:
            kind = sent % 4
            if kind == 0:
                data = bytes(chance.getrandbits(8) for _ in range(chance.randint(1, 200)))
            elif kind == 1:
                data = b"[" * 1000 + b"]" * 1000
            elif kind == 2:
                data = b'{"message_type":"ONLINE","node_id":"%d","tcp_port":1}' % sent
            else:
                data = b'{"message_type":"ONLINE","node_id":7,"tcp_port":"x"}'
            sock.sendto(data, ("127.0.0.1", port))
            sent += 1
        return sent
    finally:
        sock.close()


MALFORMED_HTTP = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
    b"\x00" * 64,
    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1e3\r\n\r\n{}",
    b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2, 2\r\n\r\n{}",
    b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\nzz\r\n",
    b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2000\r\n\r\n" + b"[" * 1000 + b"]" * 1000,
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"BREW /coffee HTCPCP/1.0\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # never completed
]


def send_malformed_http(port, count, deadline):
    sent = 0
    while sent < count and time.monotonic() < deadline:
        request = MALFORMED_HTTP[sent % len(MALFORMED_HTTP)]
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)  # the node must not wait for the rest
                sock.recv(256)
            except OSError:
                pass  # refused, reset or timed out: the node chose to drop us
        finally:
            sock.close()
        sent += 1
    return sent


def attack(node, udp_port, count, chance, deadline):
    return (send_garbage_frames(node.tcp_port, count, chance, deadline),
            send_garbage_datagrams(udp_port, count, chance, deadline),
            send_malformed_http(node.info["http_port"], count, deadline))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc (Linux)")
def test_soak_leaves_the_node_as_it_was(cluster):
    target, friend = cluster.start("target"), cluster.start("friend")
    wait_for(lambda: fully_linked([target, friend]), message="pair")
    chance = random.Random(2000)
    deadline = time.monotonic() + DEADLINE
    attack(target, cluster.udp_port, WARM_UP, chance, deadline)
    wait_for(lambda: target.health()["status"] == "ok", message="health after the warm-up")
    before = process_figures(target.process.pid)

    counts = attack(target, cluster.udp_port, SOAK, chance, deadline)
    print("soak: %d garbage frames, %d datagrams, %d malformed HTTP requests; before %s" % (counts + (before,)))
    assert min(counts) >= SOAK * 0.5, "the soak ran out of time: %s" % (counts,)
    assert target.health()["status"] == "ok"

    def settled():
        rss, threads, files = process_figures(target.process.pid)
        return (rss <= before[0] * 1.1 and threads <= before[1] * 1.1 + 1
                and files <= before[2] * 1.1 + 1) and (rss, threads, files)

    after = wait_for(settled, timeout=30, interval=0.5, message="RSS, threads and files back within 10 %%: "
                     "before %s, now %s" % (before, process_figures(target.process.pid)))
    print("soak: after %s" % (after,))
    # the good peer stayed linked and still syncs
    assert friend.node_id in target.connected_ids()
    conversation_id = friend.post("/api/conversations", json={"title": "after the soak"}).json()["id"]
    wait_for(lambda: target.get("/api/conversations/%s" % conversation_id).status_code == 200,
             timeout=5, message="a conversation synced after the soak")
    with open(target.log_path, errors="replace") as handle:
        assert "Traceback" not in handle.read()
