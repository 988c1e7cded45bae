"""The node room in-process: a Node built from its Config, started, and stopped.

What it covers: a started node serves its page API on the port it reports and writes its
runtime file; a chat written on one node reaches another node linked to it (store, sync, mesh
and the other node's page, each built by the Node); and stop() ends every thread, removes the
runtime file and frees the node's ports for the next start. Loopback only, ports chosen by the
system, discovery off.
"""

import os
import socket
import threading

import pytest
import requests

import neuromesh as nm
from conftest import wait_for


@pytest.fixture
def start_node(tmp_path):
    """``start_node(label, extra=())``: a started in-process Node on 127.0.0.1; all stopped at the end."""
    from conftest import Cluster
    started, flags = [], Cluster(tmp_path)

    def start(label, extra=()):
        args = ["--data-dir", str(tmp_path / label), "--name", label] + flags.node_args(False, None, extra)
        os.makedirs(str(tmp_path / label), exist_ok=True)
        node = nm.Node(nm.load_config(nm.build_arg_parser().parse_args(args), environ={})).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
    flags.close()


def url(node, path):
    return "http://127.0.0.1:%d%s" % (node.http_port, path)


def bindable(port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_started_node_serves_its_page_api_and_stops_cleanly(start_node, tmp_path):
    node = start_node("ana")
    health = requests.get(url(node, "/api/health"), timeout=10).json()
    assert health["name"] == "ana" and health["ports"]["http"] == node.http_port
    assert nm.running_node_info(str(tmp_path / "ana"))["http_port"] == node.http_port
    created = requests.post(url(node, "/api/conversations"), json={"title": "biology"}, timeout=10)
    assert created.status_code == 201
    listed = requests.get(url(node, "/api/conversations"), timeout=10).json()
    assert [c["title"] for c in listed] == ["biology"]

    ports = (node.http_port, node.mesh.tcp_port)
    node.stop()
    assert nm.running_node_info(str(tmp_path / "ana")) is None
    alive = [t.name for t in threading.enumerate() if t.name in ("neuromesh-mesh", "neuromesh-http",
                                                               "neuromesh-sync", "neuromesh-housekeeping")]
    assert alive == []
    assert all(bindable(port) for port in ports), "the node's ports are free again"
    with pytest.raises(requests.ConnectionError):
        requests.get(url(node, "/api/health"), timeout=2)


def test_a_chat_written_on_one_node_reaches_a_linked_node_and_its_page(start_node):
    ana = start_node("ana")
    ben = start_node("ben", extra=("--peer", "127.0.0.1:%d" % ana.mesh.tcp_port))
    wait_for(lambda: ana.mesh.stats()["connected_peers"] == 1 and ben.mesh.stats()["connected_peers"] == 1,
             timeout=20, message="ana and ben linked")
    page = ben.events.subscribe()
    created = requests.post(url(ana, "/api/conversations"), json={"title": "shared lesson"}, timeout=10).json()
    posted = requests.post(url(ana, "/api/conversations/%s/messages" % created["id"]),
                           json={"content": "Why is the sky blue?", "sender": "ana", "answer": False}, timeout=10)
    assert posted.status_code == 201

    def ben_has_it():
        reply = requests.get(url(ben, "/api/conversations/" + created["id"]), timeout=10)
        return reply.status_code == 200 and [m["content"] for m in reply.json()["messages"]] == ["Why is the sky blue?"]

    wait_for(ben_has_it, timeout=20, message="the message on ben")
    heard = []

    def told():
        while not page.empty():
            heard.append(page.get_nowait())
        return any(e["type"] == "message" and e["data"]["conversation_id"] == created["id"] for e in heard)

    wait_for(told, timeout=20, message="ben's page told of the message")
