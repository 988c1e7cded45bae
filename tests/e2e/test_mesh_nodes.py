"""The mesh room end-to-end: real nodes find and link to each other, and see each other go.

What it covers: discovery on loopback and between network namespaces; a graceful stop, Ctrl-C,
SIGKILL and a silent peer are seen within their deadlines and a restart relinks; --peer chains
join the whole mesh by peer exchange and reach a peer that starts later; a port in use or a
second node on the same data dir is a clear error; a keyed mesh leaves a node without the key
alone; start-up prints the URL and --version names Python and the packages."""

import json
import os
import subprocess
import sys
import time

from conftest import ROOT, SCRIPT, NodeProcess, fully_linked, wait_for
from support.namespaces import Namespaces, needs_namespaces


def _links_equal_peers(node):
    health = node.health()
    return health["counters"]["links"] == health["peer_count"]


def test_three_nodes_on_loopback_find_each_other(cluster):
    nodes = [cluster.start() for _ in range(3)]
    wait_for(lambda: fully_linked(nodes), timeout=10, message="3 nodes fully linked")
    for node in nodes:
        peers = {peer["node_id"]: peer for peer in node.peers()}
        for other in nodes:
            if other is node:
                continue
            record = peers[other.node_id]
            assert record["connected"] is True
            assert record["name"] == "NeuroMesh-" + other.node_id[:4]
            assert record["address"] == "127.0.0.1"
            assert record["tcp_port"] == other.tcp_port
            assert record["http_port"] == other.info["http_port"]
            assert record["has_llm"] is False and record["models"] == []
            assert record["last_seen"] > 0
        health = node.health()
        assert health["peer_count"] == 2 and health["node_id"] == node.node_id
        assert health["memory_rss_bytes"] > 0 and health["uptime_s"] >= 0
    # exactly one link per pair, once handshake races have settled
    wait_for(lambda: all(_links_equal_peers(node) for node in nodes), message="one link per pair")
    rtts = [peer["rtt_ms"] for peer in nodes[0].peers()]
    wait_for(lambda: all(peer["rtt_ms"] is not None for peer in nodes[0].peers()), message="rtt measured")
    assert len(rtts) == 2


def test_graceful_stop_is_seen_within_one_second(cluster):
    a, b, c = (cluster.start() for _ in range(3))
    wait_for(lambda: fully_linked([a, b, c]), message="mesh")
    stopped_at = time.monotonic()
    assert c.stop() == 0
    wait_for(lambda: c.node_id not in a.connected_ids() and c.node_id not in b.connected_ids(),
             timeout=1.0, interval=0.02, message="a graceful stop seen within 1 s")
    seen_after = time.monotonic() - stopped_at
    assert seen_after < 1.0 + 0.5  # includes the process exit itself
    assert "peer said goodbye" in a.log()
    assert "NeuroMesh stopped." in c.log()


def test_sigkill_is_seen_within_the_peer_timeout_and_a_restart_relinks(cluster):
    a, b, c = (cluster.start() for _ in range(3))
    wait_for(lambda: fully_linked([a, b, c]), message="mesh")
    old_id = c.node_id
    c.kill()
    wait_for(lambda: old_id not in a.connected_ids() and old_id not in b.connected_ids(),
             timeout=2.0, message="a killed peer seen down within --peer-timeout (2 s)")
    c.start()
    assert c.node_id == old_id  # identity survives a restart
    wait_for(lambda: fully_linked([a, b, c]), timeout=5, message="the restarted node linked again")
    wait_for(lambda: all(_links_equal_peers(node) for node in (a, b, c)), message="no duplicate links")
    assert len([p for p in a.peers() if p["node_id"] == old_id]) == 1


def test_silent_peer_is_declared_down_after_the_peer_timeout(cluster):
    a, b = cluster.start(), cluster.start()
    wait_for(lambda: fully_linked([a, b]), message="pair")
    b.process.send_signal(19)  # SIGSTOP: the socket stays open, the peer goes silent
    try:
        started = time.monotonic()
        wait_for(lambda: b.node_id not in a.connected_ids(), timeout=6, message="silent peer down")
        assert time.monotonic() - started >= 1.0  # not at once: silence waits for the timeout
        assert "silent for" in a.log()
    finally:
        b.process.send_signal(18)  # SIGCONT
    wait_for(lambda: fully_linked([a, b]), timeout=8, message="relinked after the peer woke up")


def test_static_peers_chain_joins_the_whole_mesh_by_peer_exchange(cluster):
    b = cluster.start("b", discovery=False)
    seed = "127.0.0.1:%d" % b.tcp_port
    a = cluster.start("a", discovery=False, extra=["--peer", seed])
    c = cluster.start("c", discovery=False, extra=["--peer", seed])
    wait_for(lambda: fully_linked([a, b, c]), timeout=10, message="A and C linked through B's peer exchange")
    assert a.health()["discovery"] is False
    assert "announcements_sent" not in a.health()["counters"]


def test_static_peer_that_starts_later_is_reached_by_backoff(cluster, tmp_path):
    # reserve B's port by starting it once, then stopping it
    b = cluster.start("b", discovery=False)
    port = b.tcp_port
    b.stop()
    a = cluster.start("a", discovery=False, extra=["--peer", "127.0.0.1:%d" % port])
    b.args[b.args.index("--tcp-port") + 1] = str(port)
    b.start()
    wait_for(lambda: fully_linked([a, b]), timeout=10, message="static peer reached after it started")


def test_a_port_in_use_is_a_clear_error_naming_the_flag(cluster, tmp_path):
    first = cluster.start("first")
    clash = subprocess.run(
        [sys.executable, SCRIPT, "--host", "127.0.0.1", "--http-port", str(first.info["http_port"]),
         "--tcp-port", "0", "--no-discovery", "--no-browser", "--data-dir", str(tmp_path / "clash")],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert clash.returncode == 2
    assert "--http-port" in clash.stderr and "already in use" in clash.stderr
    assert "Traceback" not in clash.stderr


def test_version_flag_names_python_and_packages():
    result = subprocess.run([sys.executable, SCRIPT, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "NeuroMesh" in result.stdout and "Python" in result.stdout
    for package in ("bottle", "requests", "ifaddr"):
        assert package in result.stdout


def test_start_prints_the_url_and_the_page_lists_peers(cluster):
    node = cluster.start()
    wait_for(lambda: "Chat page on this computer: %s/" % node.url in node.log(), message="URL printed")
    page = node.get("/")
    assert page.status_code == 200 and "NeuroMesh" in page.text


# -- real multi-host: network namespaces on a bridge ------------------------------------


@needs_namespaces
def test_three_hosts_in_namespaces_find_each_other_with_default_discovery(tmp_path):
    spaces = Namespaces()
    nodes = []
    try:
        spaces.create()
        for index, host in enumerate(spaces.hosts, start=1):
            # default discovery: no --broadcast, no --host; each namespace has its own ports
            lan_api = ["--lan-api"] if index == 3 else ["--guests"] if index == 1 else []
            node = NodeProcess(tmp_path / host, ["--announce-interval", "0.5", "--peer-timeout", "3",
                                                 "--log-level", "debug"] + lan_api, host,
                               prefix=["ip", "netns", "exec", host])
            nodes.append(node)
            node.start()

        def linked_everywhere():
            for host in spaces.hosts:
                peers = spaces.fetch_json(host, "http://127.0.0.1:8080/api/peers")
                if sum(1 for peer in peers if peer["connected"]) != 2:
                    return False
            return True

        wait_for(linked_everywhere, timeout=20, interval=0.3, message="3 namespaces fully linked")
        health = spaces.fetch_json(spaces.hosts[0], "http://127.0.0.1:8080/api/health")
        assert health["broadcast_addresses"] == ["%s.255" % spaces.subnet]
        peers = spaces.fetch_json(spaces.hosts[0], "http://127.0.0.1:8080/api/peers")
        assert sorted(peer["address"] for peer in peers) == ["%s.2" % spaces.subnet, "%s.3" % spaces.subnet]
        assert all(peer["tcp_port"] == 7878 for peer in peers)
        # with --guests the page serves the room (after the room code); the Ollama/OpenAI API only this
        # computer (no --lan-api); without --guests another machine gets a 403 naming the flag
        remote = "http://%s.1:8080" % spaces.subnet
        assert spaces.fetch_json(spaces.hosts[1], remote + "/api/health")["node_id"] == nodes[0].node_id
        closed = spaces.fetch_status(spaces.hosts[0], "http://%s.2:8080/api/health" % spaces.subnet)
        assert closed[0] == 403 and "--guests" in closed[1]
        refused = spaces.fetch_status(spaces.hosts[1], remote + "/api/tags")
        assert refused[0] == 403 and "--lan-api" in refused[1]
        assert spaces.fetch_json(spaces.hosts[0], "http://127.0.0.1:8080/api/tags") == {"models": []}
        # with --lan-api a private-network client is served
        assert spaces.fetch_json(spaces.hosts[0], "http://%s.3:8080/api/tags" % spaces.subnet) == {"models": []}
    finally:
        for node in nodes:
            node.kill()
        spaces.delete()


def test_ctrl_c_stops_gracefully_and_peers_hear_goodbye(cluster):
    a, b = cluster.start(), cluster.start()
    wait_for(lambda: fully_linked([a, b]), message="pair")
    b.process.send_signal(2)  # SIGINT, as Ctrl+C in a terminal
    assert b.process.wait(10) == 0
    assert "press Ctrl+C again to quit at once" in b.log() and "NeuroMesh stopped." in b.log()
    wait_for(lambda: b.node_id not in a.connected_ids(), timeout=1.0, message="goodbye heard")
    assert not os.path.exists(os.path.join(b.data_dir, "runtime.json"))


def test_a_second_node_on_the_same_data_dir_is_refused(cluster):
    first = cluster.start("first")
    clash = subprocess.run(
        [sys.executable, SCRIPT, "--host", "127.0.0.1", "--http-port", "0", "--tcp-port", "0", "--no-discovery",
         "--no-browser", "--ollama-url", "none", "--data-dir", first.data_dir],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert clash.returncode == 2
    assert "another NeuroMesh (pid %d)" % first.process.pid in clash.stderr and "--data-dir" in clash.stderr
    assert first.health()["status"] == "ok"


@needs_namespaces
def test_a_keyed_mesh_in_namespaces_leaves_a_node_without_the_key_alone(tmp_path):
    spaces = Namespaces()
    nodes = []
    try:
        spaces.create()
        for index, host in enumerate(spaces.hosts, start=1):
            key = ["--mesh-key", "bluefox-42"] if index < 3 else []  # host 3 has no room code
            node = NodeProcess(tmp_path / host, ["--announce-interval", "0.5", "--peer-timeout", "3",
                                                 "--log-level", "debug", "--ollama-url", "none"] + key, host,
                               prefix=["ip", "netns", "exec", host])
            nodes.append(node)
            node.start()

        def health(host):
            return spaces.fetch_json(host, "http://127.0.0.1:8080/api/health")

        def keyed_pair_linked():
            return all(health(host)["peer_count"] == 1 for host in spaces.hosts[:2])

        wait_for(keyed_pair_linked, timeout=20, interval=0.3, message="the two keyed hosts linked")
        # the stranger has heard the keyed announcements (and dropped them) several times over
        wait_for(lambda: health(spaces.hosts[2])["counters"].get("unauthenticated_datagrams", 0) >= 4,
                 timeout=10, interval=0.3, message="the stranger hears the keyed announcements")
        stranger = health(spaces.hosts[2])
        assert stranger["peer_count"] == 0 and stranger["room"]["closed"] is False
        assert spaces.fetch_json(spaces.hosts[2], "http://127.0.0.1:8080/api/peers") == []
        models = spaces.fetch_json(spaces.hosts[2], "http://127.0.0.1:8080/api/models")
        assert models["models"] == [] and models["llm_hosts"] == 0
        keyed = health(spaces.hosts[0])
        assert keyed["room"]["closed"] is True and keyed["room"]["key_hash"] == health(spaces.hosts[1])["room"]["key_hash"]
        peers = spaces.fetch_json(spaces.hosts[0], "http://127.0.0.1:8080/api/peers")
        assert [peer["address"] for peer in peers] == ["%s.2" % spaces.subnet]
        assert "bluefox-42" not in json.dumps(keyed)
        assert nodes[2].node_id not in json.dumps(peers)
        # a conversation of the room reaches the room, and not the stranger
        post = ("import json, urllib.request\nrequest = urllib.request.Request('http://127.0.0.1:8080/api/conversations', "
                "data=b'{\"title\": \"room only\"}', headers={'Content-Type': 'application/json'})\n"
                "print(json.load(urllib.request.urlopen(request, timeout=5))['id'])")
        created = subprocess.run(["ip", "netns", "exec", spaces.hosts[0], sys.executable, "-c", post],
                                 capture_output=True, text=True, timeout=20)
        conversation_id = created.stdout.strip()
        assert created.returncode == 0 and conversation_id, created.stderr

        def listed(host):
            return [c["id"] for c in spaces.fetch_json(host, "http://127.0.0.1:8080/api/conversations")]

        wait_for(lambda: conversation_id in listed(spaces.hosts[1]), timeout=10, message="synced in the room")
        assert conversation_id not in listed(spaces.hosts[2])
    finally:
        for node in nodes:
            node.kill()
        spaces.delete()
