"""The doctor room end-to-end: `doctor`, `status` and `firewall` run as commands beside real nodes.

What it covers: `doctor` names a busy port, a missing LLM, blocked broadcasts, a peer whose TCP
port is blocked and a running node's own ports, on loopback and between network namespaces (its
drops made by nftables inside the test's own namespace, never this machine's firewall); `status`
prints a running node's peers and LLM hosts; each command has its own help; install.sh
--uninstall changes nothing without consent; `doctor | head` stops quietly. The checks' verdicts
from controlled inputs are tests/rooms/test_doctor.py."""

import os
import socket
import subprocess
import sys

import pytest

import neuromesh
from conftest import ROOT, SCRIPT, NodeProcess, fully_linked, wait_for
from support.cli import closed_port, loopback_doctor_flags, run_cli
from support.fake_ollama import FakeOllama
from support.namespaces import Namespaces, needs_namespaces

MODEL = "llama3.2:1b"


# ---- doctor on loopback -------------------------------------------------------------------------

def test_doctor_names_an_occupied_port_and_a_missing_llm_and_exits_non_zero(cluster, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        flags = loopback_doctor_flags(cluster, "--ollama-url", "http://127.0.0.1:%d" % closed_port())
        flags[flags.index("--http-port") + 1] = str(port)
        result = run_cli("doctor", "--data-dir", str(tmp_path / "d"), *flags)
    finally:
        busy.close()
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "[problem] TCP port %d (--http-port) is in use by another program" % port in out
    assert "fix: stop that program, or start NeuroMesh with --http-port %d" % (port + 1) in out
    assert "Ollama at http://127.0.0.1:" in out and "nothing answers there" in out
    assert "[problem] no LLM: none answers on this machine and no computer of the room has one" in out
    assert "[problem] no announcement heard: broadcasts are blocked on this network (client isolation?), use --peer" in out
    assert "bottle 0.13.4 from" in out and "Python %d.%d" % sys.version_info[:2] in out
    assert "[ok] data dir %s is writable" % (tmp_path / "d") in out
    assert "problem(s) block the mesh" in out


def test_doctor_hears_a_loopback_node_with_an_llm_and_passes(cluster, tmp_path):
    fake = FakeOllama(models=(MODEL,)).start()
    try:
        node = cluster.start("host", extra=["--ollama-url", fake.url])
        secret = "plum-tree-77"
        result = run_cli("doctor", "--data-dir", str(tmp_path / "d"), "--mesh-key", secret,
                         *loopback_doctor_flags(cluster, "--ollama-url", fake.url))
        # a keyed doctor hears the open node only as another room
        assert "from another room" in result.stdout and secret not in result.stdout
        assert "key hash %s" % neuromesh.room_status(neuromesh.derive_room_key(secret))["key_hash"] in result.stdout
        result = run_cli("doctor", "--data-dir", str(tmp_path / "d"), *loopback_doctor_flags(cluster, "--ollama-url",
                                                                                            fake.url))
    finally:
        fake.stop()
    out = result.stdout
    assert "[ok] peer %s (127.0.0.1) heard, and TCP %d reaches it" % (node.health()["name"], node.tcp_port) in out, out  # its name, from its HELO in TLS
    assert "[ok] Ollama at %s answers; models: %s" % (fake.url, MODEL) in out
    assert "room: open" in out and "[problem]" not in out
    assert result.returncode == 0 and "Nothing blocks the mesh." in out
    assert node.health()["status"] == "ok"  # the doctor's probe and connection did the node no harm


def test_doctor_counts_a_running_nodes_ports_as_held_and_its_peers_llm(cluster, tmp_path):
    fake = FakeOllama(models=(MODEL,)).start()
    try:
        host = cluster.start("host", extra=["--ollama-url", fake.url])
        plain = cluster.start("plain")
        wait_for(lambda: fully_linked([host, plain]), message="mesh")
        wait_for(lambda: plain.json("/api/models")["llm_hosts"] == 1, message="the plain node sees the LLM")
        flags = loopback_doctor_flags(cluster, "--ollama-url", "none", "--mesh-key", "other-room-1")
        flags[flags.index("--http-port") + 1] = str(plain.info["http_port"])
        flags[flags.index("--tcp-port") + 1] = str(plain.tcp_port)
        result = run_cli("doctor", "--data-dir", plain.data_dir, *flags)
    finally:
        fake.stop()
    out = result.stdout
    assert "TCP port %d (--http-port) is held by the running node (pid %d)" % (
        plain.info["http_port"], plain.process.pid) in out, out
    assert "[ok] LLM on the mesh: %s (127.0.0.1): %s" % (host.health()["name"], MODEL) in out


# ---- status -------------------------------------------------------------------------------------

def test_status_lists_the_peers_and_llm_hosts_of_a_running_node(cluster):
    fake = FakeOllama(models=(MODEL,)).start()
    try:
        host = cluster.start("host", extra=["--ollama-url", fake.url, "--name", "host"])
        plain = cluster.start("plain", extra=["--name", "plain"])
        third = cluster.start("third", extra=["--name", "third"])
        wait_for(lambda: fully_linked([host, plain, third]), message="mesh")
        wait_for(lambda: plain.json("/api/models")["llm_hosts"] == 1, message="the LLM host is known")
        by_data_dir = run_cli("status", "--data-dir", plain.data_dir)
        by_port = run_cli("status", "--http-port", str(plain.info["http_port"]))
    finally:
        fake.stop()
    assert by_data_dir.returncode == 0, by_data_dir.stderr
    assert by_port.returncode == 0 and by_port.stdout.split(",")[0] == by_data_dir.stdout.split(",")[0]
    lines = by_data_dir.stdout.splitlines()
    assert lines[0].startswith("plain (node %s), NeuroMesh %s" % (plain.node_id[:8], neuromesh.__version__))
    assert "Peers: 2 linked, 2 known" in lines
    header = next(line for line in lines if line.strip().startswith("NAME"))
    assert header.split() == ["NAME", "NODE", "ADDRESS", "TCP", "LINKED", "LLM", "RTT", "MS", "TLS", "MODELS"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  host ") or line.startswith("  third ")}
    assert rows["host"][1:6] == [host.node_id[:8], "127.0.0.1", str(host.tcp_port), "yes", "yes"]
    assert rows["host"][-1] == MODEL and rows["third"][5] == "no"
    assert rows["host"][-3].startswith("TLSv1."), "each link's TLS version and cipher"
    assert "LLM hosts on the mesh: 1" in lines
    assert any(line.split() == [MODEL, "host"] for line in lines)


def test_status_says_how_to_find_a_node_when_none_runs(tmp_path):
    result = run_cli("status", "--http-port", str(closed_port()), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no NeuroMesh answers at http://127.0.0.1:" in result.stderr and "--http-port PORT" in result.stderr


# ---- doctor in network namespaces ---------------------------------------------------------------

def drop_in(namespace, *match):
    """An nftables rule that drops the input ``match`` (words of nft's syntax) in the test's own
    namespace only (never this machine's firewall); the test is skipped where nft is missing."""
    if subprocess.run(["sh", "-c", "command -v nft"], capture_output=True).returncode != 0:
        pytest.skip("needs nft (apt-get install nftables; .ci/run installs it)")
    for rule in (["add", "table", "inet", "nmtest"],
                 ["add", "chain", "inet", "nmtest", "input",
                  "{ type filter hook input priority 0 ; policy accept ; }"],
                 ["add", "rule", "inet", "nmtest", "input"] + list(match) + ["drop"]):
        subprocess.run(["ip", "netns", "exec", namespace, "nft"] + rule, check=True,
                       capture_output=True, timeout=20)


@pytest.fixture
def two_hosts(tmp_path):
    """Two namespaces on a bridge; the first runs a node whose LLM is a fake Ollama beside it."""
    spaces = Namespaces(count=2)
    started = []
    try:
        spaces.create()
        fake = subprocess.Popen(["ip", "netns", "exec", spaces.hosts[0], sys.executable,
                                 os.path.join(ROOT, "tests", "support", "fake_ollama.py"), "--port", "11434", "--models", MODEL,
                                 "--max-seconds", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(fake)
        node = NodeProcess(tmp_path / "node", ["--announce-interval", "0.5", "--name", "lab-pc-1",
                                               "--ollama-url", "http://127.0.0.1:11434"], "lab-pc-1",
                           prefix=["ip", "netns", "exec", spaces.hosts[0]])
        started.append(node)
        node.start()
        wait_for(lambda: spaces.fetch_json(spaces.hosts[0], "http://127.0.0.1:8080/api/health")["has_llm"],
                 timeout=15, message="the node finds its LLM")
        yield spaces
    finally:
        for item in started:
            item.kill()
            if isinstance(item, subprocess.Popen):
                item.wait(10)
        spaces.delete()


def doctor_in(spaces, tmp_path, *extra):
    return run_cli("doctor", "--data-dir", str(tmp_path / "doctor"), "--announce-interval", "1",
                   "--ollama-url", "none", *extra, prefix=["ip", "netns", "exec", spaces.hosts[1]], timeout=90)


@needs_namespaces
def test_doctor_in_a_namespace_reports_the_node_of_another_host_as_a_peer(two_hosts, tmp_path):
    result = doctor_in(two_hosts, tmp_path)
    out = result.stdout
    peer_ip = "%s.1" % two_hosts.subnet
    assert "[ok] a broadcast can be sent to %s.255 (UDP 5000)" % two_hosts.subnet in out, out
    assert "[ok] peer lab-pc-1 (%s) heard, and TCP 7878 reaches it" % peer_ip in out, out
    assert "[ok] LLM on the mesh: lab-pc-1" in out
    assert "broadcast %s.255" % two_hosts.subnet in out  # the interface list
    assert result.returncode == 0, out


@needs_namespaces
def test_doctor_names_blocked_broadcasts_when_its_network_drops_them(two_hosts, tmp_path):
    drop_in(two_hosts.hosts[1], "meta", "pkttype", "broadcast")
    result = doctor_in(two_hosts, tmp_path)
    out = result.stdout
    assert result.returncode == 1, out
    assert "[problem] no announcement heard: broadcasts are blocked on this network (client isolation?), " \
           "use --peer" in out
    assert "lab-pc-1" not in out
    # a --peer gets round it: the mesh links, so it is a note, not a problem
    linked = doctor_in(two_hosts, tmp_path, "--peer", "%s.1:7878" % two_hosts.subnet)
    assert "[ok] --peer %s.1:7878 answers" % two_hosts.subnet in linked.stdout, linked.stdout
    assert "but the --peer given links the mesh" in linked.stdout


@needs_namespaces
def test_doctor_says_which_peer_blocks_its_tcp_port(two_hosts, tmp_path):
    drop_in(two_hosts.hosts[0], "tcp", "dport", "7878")
    result = doctor_in(two_hosts, tmp_path)
    out = result.stdout
    assert result.returncode == 1, out
    heard = neuromesh.load_identity(str(tmp_path / "node"))[:8]  # unreachable: its name crosses only in TLS
    assert "[problem] heard but cannot connect: TCP 7878 is blocked on %s (%s.1)" % (heard, two_hosts.subnet) in out
    assert "fix: on %s (%s.1), open the firewall: python3 neuromesh.py firewall" % (heard, two_hosts.subnet) in out


def test_the_new_commands_have_their_own_help():
    for command, words in (("doctor", "two\nannounce intervals"), ("status", "health, peers and LLM hosts"),
                           ("firewall", "New-NetFirewallRule in the group NeuroMesh")):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith("python3 neuromesh.py %s: " % command)
        assert " ".join(words.split()) in " ".join(result.stdout.split()), result.stdout
    listing = run_cli("--help").stdout
    assert all("\n  %s " % command in listing for command in ("doctor", "status", "firewall"))


def test_install_sh_uninstall_shows_the_removal_and_changes_nothing_without_consent(tmp_path):
    # stdin is no terminal and there is no --yes: the commands are printed, never run
    result = subprocess.run(["sh", os.path.join(ROOT, "install.sh"), "--uninstall"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert "To remove NeuroMesh's firewall rules on linux:" in result.stdout, result.stdout + result.stderr
    assert "Done." not in result.stdout
    assert result.returncode == 0 or "Nothing changed" in result.stderr or "No private IPv4 subnet" in result.stdout


def test_doctor_piped_into_head_stops_quietly(cluster, tmp_path):
    flags = " ".join(loopback_doctor_flags(cluster, "--ollama-url", "none"))
    piped = subprocess.run(["sh", "-c", "'%s' '%s' doctor --data-dir '%s' %s | head -n 1" % (
        sys.executable, SCRIPT, tmp_path, flags)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert piped.stdout.startswith("NeuroMesh doctor") and len(piped.stdout.splitlines()) == 1
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr
