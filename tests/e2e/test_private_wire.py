"""Private on the wire: three nodes in network namespaces on a bridge, a capture on
the bridge. While C asks A's LLM through the relay, the conversation syncs to B and a rename
syncs, no canary (question, answer, titles, names) crosses in any packet; the same capture sees
a canary sent to a page over plain HTTP (the control).

Network safety: everything runs inside namespaces this test makes (a bridge in its own
namespace, the host untouched), removed at the end; as root only, else skipped."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, NodeProcess, wait_for
from support.namespaces import Namespaces, namespaces_missing

CANARIES = {"question": "quokkaquestion4471", "answer": "deterministic fake reply", "title": "zebratitle9921",
            "renamed": "ocelotrename5531", "name A": "ibisnode-A", "name B": "ibisnode-B", "name C": "ibisnode-C"}
CONTROL = "controlcanary8812"
MODEL = "llama3.2:1b"


def in_namespace(host, code, timeout=60):
    """Run Python ``code`` inside the namespace ``host``; its stdout as JSON."""
    result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise ValueError(result.stderr[-2000:])
    return json.loads(result.stdout)


def call(host, method, path, body=None, timeout=60):
    code = ("import json, urllib.request\n"
            "request = urllib.request.Request('http://127.0.0.1:8080%s', method=%r, data=%r,\n"
            "    headers={'Content-Type': 'application/json', 'Accept': 'application/json'})\n"
            "print(urllib.request.urlopen(request, timeout=%d).read().decode())\n"
            % (path, method, None if body is None else json.dumps(body).encode(), timeout))
    return in_namespace(host, code, timeout + 10)


def packets(path):
    """The frames of a pcap file (tcpdump -w), as bytes."""
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 24:
        return []
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    found, offset = [], 24
    while offset + 16 <= len(data):
        captured = struct.unpack_from(endian + "IIII", data, offset)[2]
        found.append(data[offset + 16:offset + 16 + captured])
        offset += 16 + captured
    return found


@pytest.mark.skipif(namespaces_missing() is not None or shutil.which("tcpdump") is None,
                    reason=str(namespaces_missing() or "needs tcpdump"))
def test_a_sniffer_on_the_bridge_sees_no_question_answer_title_or_name(tmp_path):
    spaces = Namespaces()
    nodes, helpers, capture = [], [], None
    pcap = str(tmp_path / "bridge.pcap")
    try:
        spaces.create()
        capture = subprocess.Popen(["ip", "netns", "exec", spaces.hub, "tcpdump", "-i", "br0", "-s", "0", "-U",
                                    "-w", pcap], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        a, b, c = spaces.hosts

        def probe():  # a datagram inside the namespaces, until the capture shows it runs
            in_namespace(b, "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(%r, ('%s.1', 9))"
                         "\nprint(1)" % (CONTROL.encode() + b"-start", spaces.subnet))
            return os.path.exists(pcap) and any(CONTROL.encode() + b"-start" in frame for frame in packets(pcap))

        wait_for(probe, timeout=20, interval=0.3, message="the capture runs")
        fake = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, os.path.join(ROOT, "tests", "support", "fake_ollama.py"),
                                 "--port", "11434", "--max-seconds", "300"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        helpers.append(fake)
        assert b"listening" in fake.stdout.readline()
        for host, name, extra in ((a, CANARIES["name A"], ["--ollama-url", "http://127.0.0.1:11434"]),
                                  (b, CANARIES["name B"], []), (c, CANARIES["name C"], [])):
            node = NodeProcess(tmp_path / host, ["--announce-interval", "0.5", "--peer-timeout", "5", "--name", name,
                                                 "--log-level", "debug"] + extra, host,
                               prefix=["ip", "netns", "exec", host])
            nodes.append(node)
            node.start()

        def linked_everywhere():
            return all(sum(1 for peer in call(host, "GET", "/api/peers") if peer["connected"]) == 2
                       for host in spaces.hosts)

        wait_for(linked_everywhere, timeout=30, interval=0.3, message="3 namespaces fully linked")
        wait_for(lambda: any(m["name"] == MODEL and m["hosts"] for m in call(c, "GET", "/api/models")["models"]),
                 timeout=30, interval=0.3, message="C may use A's LLM")
        cid = call(c, "POST", "/api/conversations", {"title": CANARIES["title"]})["id"]
        reply = call(c, "POST", "/api/conversations/%s/messages" % cid, {"content": CANARIES["question"]})
        assert CANARIES["answer"] in json.dumps(reply), reply

        def synced(expected_title):
            try:
                held = call(b, "GET", "/api/conversations/%s" % cid)
            except ValueError:
                return False
            text = json.dumps(held)
            return held.get("title") == expected_title and CANARIES["answer"] in text

        wait_for(lambda: synced(CANARIES["title"]), timeout=30, interval=0.3, message="the chat synced to B")
        call(c, "PATCH", "/api/conversations/%s" % cid, {"title": CANARIES["renamed"]})
        wait_for(lambda: synced(CANARIES["renamed"]), timeout=30, interval=0.3, message="the rename synced to B")
        assert in_namespace(b, "import urllib.request, urllib.error\ntry:\n urllib.request.urlopen("
                            "'http://%s.1:8080/api/health?q=%s', timeout=5)\nexcept urllib.error.HTTPError as e:\n"
                            " pass\nprint(1)" % (spaces.subnet, CONTROL)) == 1
        wait_for(lambda: any(CONTROL.encode() + b" " in frame for frame in packets(pcap)), timeout=20,
                 message="the control written (tcpdump -U writes each packet as it comes)")
    finally:
        for node in nodes:
            node.kill()
        for helper in helpers:
            helper.kill()
            helper.wait(10)
        if capture is not None:
            capture.send_signal(signal.SIGINT)
            capture.wait(10)
        spaces.delete()
    frames = packets(pcap)
    assert len(frames) > 50, "the capture saw the mesh"
    assert any(CONTROL.encode() + b" " in frame for frame in frames), "the control: plain HTTP is seen"
    for what, canary in CANARIES.items():
        assert not any(canary.encode() in frame for frame in frames), "the %s crossed in clear" % what
