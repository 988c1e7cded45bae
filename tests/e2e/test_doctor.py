"""`doctor` says why peers do not appear, `status` prints a running node's tables, and
`firewall` builds each OS's commands (built here for every OS, never run: this machine's firewall
is never touched)."""

import os
import socket
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuromesh
from conftest import LOOPBACK_BROADCAST, ROOT, SCRIPT, NodeProcess, fully_linked, wait_for
from support.fake_ollama import FakeOllama
from e2e.test_mesh_nodes import Namespaces, _can_make_namespaces

MODEL = "llama3.2:1b"


def config_of(*flags, data_dir):
    return neuromesh.load_config(neuromesh.build_arg_parser().parse_args(["--data-dir", str(data_dir)] + list(flags)),
                                 environ={})


def closed_port():
    """A loopback TCP port nothing listens on (bound, then closed)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def run_cli(*args, prefix=(), timeout=60):
    return subprocess.run(list(prefix) + [sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def loopback_doctor_flags(cluster, *extra):
    return ["--host", "127.0.0.1", "--broadcast", LOOPBACK_BROADCAST, "--udp-port", str(cluster.udp_port),
            "--http-port", "0", "--tcp-port", "0", "--announce-interval", "0.5"] + list(extra)


# ---- firewall: the commands of each OS, built without running them ----------------------------

PORTS = [("udp", 5000, "--udp-port"), ("tcp", 7878, "--tcp-port"), ("tcp", 9090, "--http-port")]


def test_windows_rules_open_each_port_for_the_local_subnet_in_the_neuromesh_group():
    steps = neuromesh.firewall_steps("windows", PORTS)
    commands = [argv[-1] for argv in steps.run]
    assert all(argv[:3] == ["powershell", "-NoProfile", "-Command"] for argv in steps.run)
    assert commands == ["New-NetFirewallRule -DisplayName 'NeuroMesh %s %d' -Group 'NeuroMesh' -Direction Inbound "
                        "-Action Allow -Protocol %s -LocalPort %d -RemoteAddress LocalSubnet -Profile Domain,Private"
                        % (proto.upper(), port, proto.upper(), port) for proto, port, _ in PORTS]
    assert any("Public" in note and "Private" in note for note in steps.notes)
    removal = neuromesh.firewall_steps("windows", PORTS, remove=True)
    assert [argv[-1] for argv in removal.run] == [
        "Remove-NetFirewallRule -Group 'NeuroMesh' -ErrorAction SilentlyContinue"]


def test_macos_allows_this_python_in_the_application_firewall():
    steps = neuromesh.firewall_steps("macos", PORTS, python="/opt/py/bin/python3")
    fw = neuromesh.MACOS_SOCKETFILTERFW
    assert steps.run == [["sudo", fw, "--add", "/opt/py/bin/python3"], ["sudo", fw, "--unblockapp", "/opt/py/bin/python3"]]
    assert "TCP 9090" in steps.notes[0] and "not a port" in steps.notes[0]
    assert neuromesh.firewall_steps("macos", PORTS, python="/p", remove=True).run == [["sudo", fw, "--remove", "/p"]]


def only(*tools):
    return lambda name: "/usr/sbin/" + name if name in tools else None


def test_linux_uses_ufw_then_firewalld_per_local_subnet_else_prints_nftables():
    subnets = ["10.77.1.0/24", "192.168.5.0/24"]
    ufw = neuromesh.firewall_steps("linux", PORTS, subnets, which=only("ufw", "firewall-cmd"))
    assert ufw.run[0] == ["ufw", "allow", "from", "10.77.1.0/24", "to", "any", "port", "5000", "proto", "udp"]
    assert ufw.run[-1] == ["ufw", "allow", "from", "192.168.5.0/24", "to", "any", "port", "9090", "proto", "tcp"]
    assert len(ufw.run) == 6 and not ufw.show
    assert neuromesh.firewall_steps("linux", PORTS, subnets, which=only("ufw"), remove=True).run[0][:3] == [
        "ufw", "delete", "allow"]
    firewalld = neuromesh.firewall_steps("linux", PORTS, subnets, which=only("firewall-cmd"))
    assert firewalld.run[0] == ["firewall-cmd", "--permanent", "--add-rich-rule=rule family=ipv4 source "
                                "address=10.77.1.0/24 port port=5000 protocol=udp accept"]
    assert firewalld.run[-1] == ["firewall-cmd", "--reload"]
    removed = neuromesh.firewall_steps("linux", PORTS, subnets, which=only("firewall-cmd"), remove=True)
    assert removed.run[0][2].startswith("--remove-rich-rule=")
    bare = neuromesh.firewall_steps("linux", PORTS, subnets, which=only())
    assert bare.run == [] and ('nft insert rule inet filter input ip saddr 10.77.1.0/24 udp dport 5000 accept '
                               'comment "NeuroMesh"') in bare.show
    bare_removal = neuromesh.firewall_steps("linux", PORTS, subnets, which=only(), remove=True)
    assert bare_removal.run == [] and bare_removal.show[0] == "nft -a list chain inet filter input | grep NeuroMesh"
    assert len(bare.show) == 6 and "nftables" in bare.notes[0]
    nowhere = neuromesh.firewall_steps("linux", PORTS, [], which=only("ufw"))
    assert nowhere.run == [] and "No private IPv4 subnet" in nowhere.notes[0]


def test_firewall_command_uses_the_configured_ports_and_runs_only_with_consent(tmp_path, capsys):
    config = config_of("--http-port", "9090", "--udp-port", "5001", data_dir=tmp_path)
    ran = []

    def fake_run(argv):
        ran.append(argv)
        return 0, ""

    assert neuromesh.run_firewall(config, system="windows", dry_run=True, run=fake_run) == 0
    printed = capsys.readouterr().out
    assert "UDP 5001, TCP 7878, TCP 9090" in printed and "-LocalPort 9090" in printed and ran == []
    # no terminal to ask and no --yes: nothing runs
    sys_stdin = sys.stdin
    sys.stdin = types.SimpleNamespace(isatty=lambda: False)
    try:
        assert neuromesh.run_firewall(config, system="windows", run=fake_run) == 1
    finally:
        sys.stdin = sys_stdin
    assert ran == [] and "--yes" in capsys.readouterr().err
    assert neuromesh.run_firewall(config, system="windows", assume_yes=True, run=fake_run) == 0
    assert [argv[-1].split(" -LocalPort ")[1].split()[0] for argv in ran] == ["5001", "7878", "9090"]
    ran.clear()
    assert neuromesh.run_firewall(config, system="windows", remove=True, assume_yes=True,
                                  run=lambda argv: (1, "Access is denied.")) == 1
    assert "Administrator" in capsys.readouterr().err


def test_each_os_is_told_apart_and_its_firewall_state_read_with_a_faked_system(monkeypatch):
    for platform, name in (("win32", "windows"), ("darwin", "macos"), ("linux", "linux")):
        monkeypatch.setattr(sys, "platform", platform)
        assert neuromesh.current_os() == name
    asked = []

    def fake(reply, code=0):
        def run(argv):
            asked.append(argv)
            return code, reply
        return run

    windows = neuromesh.firewall_state("windows", run=fake("3\nPublic\n"))
    assert windows.startswith("3 NeuroMesh rules") and "Public" in windows and "Get-NetFirewallRule" in asked[-1][-1]
    assert neuromesh.firewall_state("macos", run=fake("Firewall is enabled. (State = 1)\n")) == \
        "Firewall is enabled. (State = 1)"
    assert asked[-1] == [neuromesh.MACOS_SOCKETFILTERFW, "--getglobalstate"]
    assert "sudo ufw status" in neuromesh.firewall_state("linux", which=only("ufw"), run=fake("ERROR: need root", 1))
    assert "Status: active" in neuromesh.firewall_state("linux", which=only("ufw"), run=fake(
        "Status: active\n\nTo Action From\n5000/udp ALLOW 10.0.0.0/24\n"))
    assert neuromesh.firewall_state("linux", which=only("firewall-cmd"), run=fake("running\n")) == "firewalld: running"
    assert "nothing on this machine filters" in neuromesh.firewall_state("linux", which=only(), run=fake(""))


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


def test_status_escapes_what_peers_say_about_themselves():
    lines = neuromesh.status_report(
        {"name": "me", "node_id": "ab" * 16, "version": "0.1.0", "uptime_s": 3725, "room": {"closed": False}},
        [{"name": "evil\x1b[2J", "node_id": "cd" * 16, "address": "10.0.0.2", "tcp_port": 7878, "connected": True,
          "has_llm": True, "models": ["m\nfake line"], "rtt_ms": 1.5}],
        {"models": [{"name": "m", "hosts": [{"name": "evil\x1b[2J", "local": False}]}], "llm_hosts": 1})
    text = "\n".join(lines)
    assert "\x1b" not in text and "evil\\x1b[2J" in text and "m\\nfake line" in text
    assert lines[0] == "me (node abababab), NeuroMesh 0.1.0, up 1h02m, room open"


# ---- doctor in network namespaces ---------------------------------------------------------------

needs_namespaces = pytest.mark.skipif(_can_make_namespaces() is not None, reason=str(_can_make_namespaces()))


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


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                      max_size=4), max_leaves=20)
reply_fields = st.dictionaries(st.sampled_from(["name", "node_id", "version", "uptime_s", "room", "llm", "models",
                                                "hosts", "llm_hosts", "connected", "has_llm", "rtt_ms", "tcp_port",
                                                "address", "available", "key_hash", "closed", "local"]),
                               json_values, max_size=8)


@settings(max_examples=100, deadline=None)
@given(health=reply_fields | json_values, peers=st.lists(reply_fields | json_values, max_size=4) | json_values,
       models=st.fixed_dictionaries({"models": st.lists(reply_fields, max_size=3)}) | json_values)
def test_status_prints_any_reply_shape_as_escaped_text(health, peers, models):
    lines = neuromesh.status_report(health, peers, models)
    assert lines[0] and all(isinstance(line, str) and "\x1b" not in line and "\n" not in line for line in lines)
    assert any(line.startswith("Peers: ") for line in lines) and any(line.startswith("LLM hosts") for line in lines)


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


def test_the_page_is_served_from_inside_the_archive(tmp_path):
    import zipfile
    archive = str(tmp_path / "neuromesh-test.pyz")
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("neuromesh_static/index.html", "<!doctype html><title>NeuroMesh</title>")
        bundle.writestr("neuromesh_static/app.js", "console.log(1);")
        bundle.writestr("neuromesh.py", "secret = 1")
    files = neuromesh.ArchivedFiles(archive)
    page = files.response("index.html")
    assert page.status_code == 200 and page.body == b"<!doctype html><title>NeuroMesh</title>"
    assert page.headers["Content-Type"] == "text/html; charset=UTF-8"
    assert "javascript" in files.response("app.js").headers["Content-Type"]
    for name in ("../neuromesh.py", "neuromesh.py", "", "nope.css", "..\\neuromesh.py"):
        assert files.response(name).status_code == 404, name


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=40))
def test_any_path_asked_of_the_archive_is_its_file_or_a_404(name):
    files = neuromesh.ArchivedFiles("unused.pyz")
    files._files = {"index.html": b"page", "sub/app.js": b"js"}
    reply = files.response(name)
    assert reply.status_code in (200, 404)
    if reply.status_code == 200:
        assert reply.body in (b"page", b"js") and name.replace("\\", "/").lstrip("/") in files._files


def test_a_flood_of_made_up_announcements_keeps_the_doctor_bounded(tmp_path):
    doctor = neuromesh.Doctor(config_of("--ollama-url", "none", data_dir=tmp_path), system="linux", out=list().append)
    readable, other = socket.socketpair()
    counter = iter(range(10 ** 9))

    class Flood:
        sock = readable
        counters = {"unauthenticated_datagrams": 3}

        @staticmethod
        def receive():
            return [("10.0.0.9", {"node_id": "n%d" % next(counter), "tcp_port": 7878}) for _ in range(64)]

    try:
        other.send(b"x")  # the socket stays readable: the flood never stops
        doctor.listen(Flood, 0.3)
    finally:
        readable.close()
        other.close()
    assert len(doctor.heard) == doctor.max_heard and doctor.other_room == 3


def test_doctor_piped_into_head_stops_quietly(cluster, tmp_path):
    flags = " ".join(loopback_doctor_flags(cluster, "--ollama-url", "none"))
    piped = subprocess.run(["sh", "-c", "'%s' '%s' doctor --data-dir '%s' %s | head -n 1" % (
        sys.executable, SCRIPT, tmp_path, flags)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert piped.stdout.startswith("NeuroMesh doctor") and len(piped.stdout.splitlines()) == 1
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr
