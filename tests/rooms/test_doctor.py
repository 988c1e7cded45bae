"""The doctor room in-process: what `doctor`, `firewall` and `status` tell a user, from controlled inputs.

What it covers: the firewall commands built for each OS (never run: this machine's firewall is
never touched), from the configured ports and the private subnets of faked interfaces, and the
consent asked before any of them runs; each doctor check's verdict and fix (data dir, ports, a
runtime file left by a killed node, LLM servers, --peer, announcements heard from peers that
cannot be reached, from another room or from this machine's node, the links and LLMs a running
node reports), with what peers say about themselves escaped; the probe of a peer's port ends
with a clear error whatever the listener sends; a check that breaks is a note that hides no
other check; and the tables `status` prints from any shape of reply. Every server here is a
stand-in on 127.0.0.1; the processes' side (real nodes, a doctor in network namespaces) is
tests/e2e/test_doctor.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuromesh
from conftest import serve_wsgi
from support.cli import closed_port

PORTS = [("udp", 5000, "--udp-port"), ("tcp", 7878, "--tcp-port"), ("tcp", 9090, "--http-port")]
CLASSROOM = [("lo", "127.0.0.1", 8), ("wlan0", "192.168.5.23", 24), ("eth0", "10.77.1.9", 16),
             ("eth1", "10.77.200.1", 16), ("tun0", "10.8.0.2", 32), ("wan", "8.8.4.4", 24)]


def only(*tools):
    """A ``which`` that finds only ``tools``."""
    return lambda name: "/usr/sbin/" + name if name in tools else None


def doctor_of(config, system="linux"):
    """A Doctor of ``config`` and the list its report lines go to."""
    lines = []
    return neuromesh.Doctor(config, system=system, out=lines.append), lines


def json_app(replies):
    """A WSGI app answering each path of ``replies`` with its JSON (404 elsewhere)."""
    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path not in replies:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(replies[path]).encode()]
    return app


def write_runtime(data_dir, **info):
    os.makedirs(str(data_dir), exist_ok=True)
    with open(os.path.join(str(data_dir), neuromesh.RUNTIME_FILE), "w", encoding="utf-8") as handle:
        json.dump(info, handle)


def dead_pid():
    """The pid of a process that has ended (this test started and waited for it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    return child.pid


# ---- firewall: the commands of each OS, built without running them ----------------------------

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


def test_firewall_command_uses_the_configured_ports_and_runs_only_with_consent(mesh_config, capsys):
    config = mesh_config(discovery=True, extra=["--http-port", "9090", "--udp-port", "5001", "--tcp-port", "7878"])
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


def test_without_discovery_the_firewall_opens_no_udp_port(mesh_config, capsys):
    config = mesh_config(discovery=False, extra=["--http-port", "9090", "--tcp-port", "7979"])
    assert neuromesh.mesh_ports(config) == [("tcp", 7979, "--tcp-port"), ("tcp", 9090, "--http-port")]
    assert neuromesh.run_firewall(config, system="windows", dry_run=True) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("To open TCP 7979, TCP 9090 for the local subnet only on windows:")
    assert "UDP" not in printed


def test_the_rules_let_in_only_the_private_subnets_of_this_machine(mesh_config, monkeypatch, capsys):
    monkeypatch.setattr(neuromesh, "local_ipv4_interfaces", lambda: CLASSROOM)
    assert neuromesh.local_subnets() == ["192.168.5.0/24", "10.77.0.0/16"]
    assert neuromesh.run_firewall(mesh_config(), system="linux", dry_run=True) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    # whichever tool this machine has (ufw, firewalld or only nftables), each rule names one subnet
    assert commands and all("192.168.5.0/24" in line or "10.77.0.0/16" in line
                            for line in commands if "--reload" not in line)
    assert not any(other in line for line in commands for other in ("8.8.4", "10.8.0", "127.0.0"))


def test_a_machine_off_the_classroom_network_is_told_to_join_it_first(mesh_config, monkeypatch, capsys):
    monkeypatch.setattr(neuromesh, "local_ipv4_interfaces", lambda: [("lo", "127.0.0.1", 8), ("wan", "8.8.4.4", 24)])
    assert neuromesh.run_firewall(mesh_config(), system="linux", dry_run=True) == 1
    assert ("Note: No private IPv4 subnet found on this machine's interfaces: connect to the classroom network "
            "first, then run this again.") in capsys.readouterr().out


def test_at_a_terminal_the_firewall_asks_before_it_runs_anything(mesh_config, monkeypatch, capsys):
    config = mesh_config()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True))
    asked, ran = [], []

    def answer(reply):
        monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or reply)

    def fake_run(argv):
        ran.append(argv)
        return 0, ""

    answer("n")
    assert neuromesh.run_firewall(config, system="macos", run=fake_run) == 1
    assert asked == ["Run these commands now? [y/N] "] and ran == []
    assert capsys.readouterr().out.splitlines()[-1] == "Nothing changed."
    answer("yes")
    assert neuromesh.run_firewall(config, system="macos", run=fake_run) == 0
    assert ran == [["sudo", neuromesh.MACOS_SOCKETFILTERFW, flag, sys.executable] for flag in ("--add", "--unblockapp")]
    assert capsys.readouterr().out.splitlines()[-1] == "Done: peers of the local subnet can reach this node."
    answer("y")
    assert neuromesh.run_firewall(config, system="macos", run=lambda argv: (1, "sudo: a password is required")) == 1
    err = capsys.readouterr().err
    assert "failed (1): sudo %s --add" % neuromesh.MACOS_SOCKETFILTERFW in err and "a password is required" in err
    assert "Some commands failed: run this as root (sudo)." in err


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


def test_the_firewall_state_of_nftables_and_of_a_broken_powershell():
    nft = only("nft")
    assert neuromesh.firewall_state("linux", which=nft, run=lambda argv: (1, "Operation not permitted")) == \
        "nftables is installed; its rules need root to read: sudo nft list ruleset"
    assert neuromesh.firewall_state("linux", which=nft, run=lambda argv: (0, "")) == "nftables: no rules"
    assert neuromesh.firewall_state("linux", which=nft, run=lambda argv: (0, "table inet filter {\n}\n")) == \
        "nftables: 2 rules loaded; check they allow UDP/TCP from the local subnet"
    assert neuromesh.firewall_state("windows", run=lambda argv: (127, "powershell\x1b[2J: not found")) == \
        "Windows Defender Firewall: state unknown (powershell\\x1b[2J: not found)"
    assert neuromesh.firewall_state("windows", run=lambda argv: (0, "2\nPrivate\n")) == "2 NeuroMesh rules"


# ---- doctor: this machine ---------------------------------------------------------------------

def test_a_data_dir_that_cannot_be_written_is_a_problem_with_its_fix(mesh_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    doctor, lines = doctor_of(mesh_config(extra=["--data-dir", str(blocker / "data")]))
    doctor.check_data_dir()
    assert lines[0].startswith("[problem] the data dir %s is not writable (" % (blocker / "data"))
    assert lines[1] == "      fix: give a folder you can write with --data-dir (or NEUROMESH_DATA_DIR)"
    assert doctor.problems == doctor.findings


def test_a_busy_port_is_excused_only_by_a_node_that_still_runs(mesh_config, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    config = mesh_config(discovery=False, extra=["--http-port", str(port)])
    try:
        write_runtime(tmp_path, pid=dead_pid(), http_port=port)  # left behind by a killed node
        doctor, lines = doctor_of(config)
        doctor.check_ports()
        write_runtime(tmp_path, pid=os.getpid(), http_port=port)
        running, running_lines = doctor_of(config)
        running.check_ports()
    finally:
        busy.close()
    assert lines[0] == "[ok] TCP port 0 (--tcp-port): chosen when the node starts"
    assert lines[1].startswith("[problem] TCP port %d (--http-port) is in use by another program (" % port)
    assert lines[2] == ("      fix: stop that program, or start NeuroMesh with --http-port %d (every node of the room "
                        "needs the same UDP port; TCP ports may differ)" % (port + 1))
    assert running_lines[1] == "[ok] TCP port %d (--http-port) is held by the running node (pid %d)" % (
        port, os.getpid())
    assert not running.problems


def test_the_room_line_shows_the_key_hash_never_the_code(mesh_config):
    doctor, lines = doctor_of(mesh_config(extra=["--mesh-key", "quiet-owl-42"]))
    doctor.check_room()
    key_hash = neuromesh.room_status(neuromesh.derive_room_key("quiet-owl-42"))["key_hash"]
    assert lines == ["[ok] room: closed by a room code, key hash %s (every machine of the room shows the same "
                     "hash)" % key_hash]
    open_doctor, open_lines = doctor_of(mesh_config())
    open_doctor.check_room()
    assert open_lines == ["[ok] room: open (no --mesh-key): any NeuroMesh on this network may join"]


def test_each_llm_server_is_named_with_its_models_or_what_is_wrong(mesh_config):
    def openai(environ, start_response):
        if environ.get("HTTP_AUTHORIZATION") != "Bearer sk-class":
            start_response("401 Unauthorized", [("Content-Type", "application/json")])
            return [b'{"error": "bad key"}']
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"data": [{"id": "qwen2.5:0.5b"}, {"id": "evil\x1b[2J"}, "junk"]}).encode()]

    empty = json_app({"/api/tags": {"models": []}})
    broken = json_app({"/api/tags": "<html>"})
    with serve_wsgi(openai, "openai") as server, serve_wsgi(empty, "empty") as empty_server, \
            serve_wsgi(broken, "broken") as broken_server:
        urls = ["http://127.0.0.1:%d" % s.server_port for s in (server, empty_server, broken_server)]
        doctor, lines = doctor_of(mesh_config(extra=["--openai-url", urls[0], "--openai-key", "sk-class",
                                                     "--ollama-url", "%s,%s" % (urls[1], urls[2])]))
        doctor.check_llm()
        gone = closed_port()
        nobody, nobody_lines = doctor_of(mesh_config(extra=["--ollama-url", "http://127.0.0.1:%d" % gone]))
        nobody.check_llm()
        unconfigured, unconfigured_lines = doctor_of(mesh_config())
        unconfigured.check_llm()
    assert "[note] Ollama at %s answers; models: none" % urls[1] in lines
    assert lines[lines.index("[note] Ollama at %s answers; models: none" % urls[1]) + 1] == \
        "      fix: pull one: ollama pull llama3.2:1b"
    assert "[note] Ollama at %s is not reachable (" % urls[2] in "\n".join(lines)
    assert "[ok] OpenAI-compatible server at %s answers; models: qwen2.5:0.5b, evil\\x1b[2J" % urls[0] in lines
    assert not any("\x1b" in line for line in lines) and "sk-class" not in "\n".join(lines)
    assert doctor.local_models == ["qwen2.5:0.5b", "evil\\x1b[2J"]
    assert nobody_lines == ["[note] Ollama at http://127.0.0.1:%d is not reachable (nothing answers there)" % gone,
                            "      fix: start it (`ollama serve`), or point --ollama-url / --openai-url at it"]
    assert unconfigured_lines == ["[note] no LLM backend configured on this machine (--ollama-url none)"]


# ---- doctor: the network ----------------------------------------------------------------------

def test_without_discovery_each_peer_given_is_tried(mesh_config, monkeypatch):
    monkeypatch.setattr(neuromesh, "local_ipv4_interfaces", lambda: CLASSROOM[:2] + CLASSROOM[4:5])
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    up, down = listening.getsockname()[1], closed_port()
    try:
        doctor, lines = doctor_of(mesh_config(discovery=False, extra=["--peer", "127.0.0.1:%d,127.0.0.1:%d"
                                                                      % (up, down)]))
        doctor.check_network()
    finally:
        listening.close()
    assert lines[:4] == ["[ok] 3 IPv4 interface(s)", "      lo 127.0.0.1/8 broadcast 127.255.255.255",
                         "      wlan0 192.168.5.23/24 broadcast 192.168.5.255", "      tun0 10.8.0.2/32"]
    assert lines[4:7] == ["[note] discovery is off (--no-discovery): peers come only from --peer",
                          "[ok] --peer 127.0.0.1:%d answers" % up,
                          "[problem] --peer 127.0.0.1:%d cannot be reached (Connection refused)" % down]
    assert lines[7] == "      fix: check the address, and open TCP %d on that machine" % down


class Announcements:
    """A stand-in for Discovery as the doctor listens to it: ``heard`` arrives once, then nothing;
    ``other_room`` datagrams failed the room's check."""

    def __init__(self, heard=(), other_room=0):
        self.sock, self._writer = socket.socketpair()
        self._writer.send(b"x")
        self.heard = list(heard)
        self.counters = {"unauthenticated_datagrams": other_room}

    def receive(self):
        self.sock.recv(1)
        heard, self.heard = self.heard, []
        return heard

    def close(self):
        self.sock.close()
        self._writer.close()


def hear(doctor, *heard, other_room=0):
    """The doctor listens to ``heard`` (``(ip, announcement)`` pairs), then judges the peers."""
    announcements = Announcements(heard, other_room)
    try:
        doctor.listen(announcements, 0.3)
    finally:
        announcements.close()
    doctor.judge_peers()


def announcement(node_id, port):
    return {"node_id": node_id, "tcp_port": port}


def test_a_peer_heard_whose_port_is_closed_is_named_with_the_firewall_fix(mesh_config):
    doctor, lines = doctor_of(mesh_config())
    port = closed_port()
    hear(doctor, ("127.0.0.1", announcement("ab12cd34" * 8, port)))
    assert lines[1] == "[problem] heard but cannot connect: TCP %d is blocked on ab12cd34 (127.0.0.1) " \
                       "(Connection refused)" % port
    assert lines[2] == "      fix: on ab12cd34 (127.0.0.1), open the firewall: %s firewall" % neuromesh.RUN


def test_a_peer_that_answers_but_is_no_neuromesh_fails_the_key_proof(mesh_config):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def answer_like_a_web_server():
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_like_a_web_server, daemon=True)
    thread.start()
    doctor, lines = doctor_of(mesh_config())
    try:
        hear(doctor, ("127.0.0.1", announcement("ee" * 32, port)))
    finally:
        thread.join(10)
        server.close()
    assert lines[1] == ("[problem] eeeeeeee (127.0.0.1) answers on TCP %d but the link fails: it closed the link "
                        "during the key proof: its room code differs, it runs an older NeuroMesh, or it is not a "
                        "NeuroMesh" % port)
    assert lines[2] == "      fix: give every machine of the room the same --mesh-key (doctor shows its key hash)"


def test_announcements_of_another_room_are_the_problem_named(mesh_config):
    doctor, lines = doctor_of(mesh_config())
    hear(doctor, other_room=2)
    assert lines[1:] == ["[problem] heard 2 announcement(s) from another room: their room code differs from this "
                         "machine's",
                         "      fix: give every machine of the room the same --mesh-key (doctor shows its key hash)"]


def test_hearing_only_this_machines_node_is_still_no_peer(mesh_config, monkeypatch, tmp_path):
    monkeypatch.setattr(neuromesh, "local_ipv4_interfaces", lambda: CLASSROOM[:2])
    own = "0123abcd" * 8
    write_runtime(tmp_path, pid=os.getpid(), node_id=own)
    doctor, lines = doctor_of(mesh_config(extra=["--tcp-port", "7979"]))
    hear(doctor, ("127.0.0.1", announcement(own, closed_port())))
    assert lines[1] == "[ok] this machine's running node is announcing"
    assert lines[2].startswith("[problem] no announcement heard: broadcasts are blocked on this network")
    assert lines[3] == "      fix: start the others with --peer 192.168.5.23:7979 (one reachable peer is enough)"


def test_of_many_peers_heard_only_the_first_few_are_dialed(mesh_config, monkeypatch):
    monkeypatch.setattr(neuromesh.Doctor, "max_dialed", 2)
    doctor, lines = doctor_of(mesh_config())
    port = closed_port()
    hear(doctor, *[("127.0.0.1", announcement("%02d" % n * 32, port)) for n in range(3)])
    assert lines[1] == "[note] heard 3 peers; trying the TCP port of the first 2"
    blocked = [line for line in lines if line.startswith("[problem] heard but cannot connect")]
    assert [line.split(" is blocked on ")[1][:8] for line in blocked] == ["00000000", "01010101"]


def test_a_flood_of_made_up_announcements_keeps_the_doctor_bounded(mesh_config):
    doctor, _lines = doctor_of(mesh_config())
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


def test_a_listener_that_never_answers_the_key_proof_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(OSError):
            neuromesh.probe_hello("127.0.0.1", silent.getsockname()[1], neuromesh.OPEN_ROOM_KEY, timeout=0.5)
    finally:
        silent.close()


@given(st.binary(max_size=300))
@settings(max_examples=40, deadline=None)
def test_any_bytes_from_a_peer_end_the_probe_with_a_clear_error(reply):
    """A hostile listener on a peer's port: the doctor's probe fails cleanly, never hangs or crashes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        try:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(reply)
        except OSError:
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises((neuromesh.ProtocolError, OSError)):
            neuromesh.probe_hello("127.0.0.1", listener.getsockname()[1], neuromesh.OPEN_ROOM_KEY, timeout=2)
    finally:
        listener.close()
        thread.join(5)


# ---- doctor: what the running node knows ------------------------------------------------------

RUNNING_PEERS = [
    {"name": "lab-pc-2", "node_id": "aa" * 32, "address": "127.0.0.1", "connected": True, "has_llm": True,
     "models": ["llama3.2:1b"], "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}},
    {"name": "old-pc", "node_id": "bb" * 32, "address": "127.0.0.2", "connected": False, "outdated": True},
    {"name": "evil\x1b[2J", "node_id": "cc" * 32, "address": "127.0.0.3\n", "connected": True, "has_llm": True,
     "models": ["m\nfake line"], "tls": "weird"},
    "not a peer",
]


def test_the_running_nodes_links_and_llm_hosts_are_reported_escaped(mesh_config, tmp_path):
    with serve_wsgi(json_app({"/api/peers": RUNNING_PEERS}), "running-node") as server:
        write_runtime(tmp_path, pid=os.getpid(), http_port=server.server_port)
        doctor, lines = doctor_of(mesh_config(extra=["--guests", "--mesh-key", "quiet-owl-42"]))
        doctor.check_privacy()
        doctor.check_mesh_llm()
    assert lines[0].startswith("[ok] peer links and relayed chats are private: TLS 1.")
    assert lines[1:5] == ["[ok] the link to lab-pc-2 is private: TLSv1.3 TLS_AES_256_GCM_SHA384",
                          "[note] old-pc is not linked: it runs an older NeuroMesh without private links",
                          "      fix: upgrade NeuroMesh on old-pc",
                          "[ok] the link to evil\\x1b[2J is private: -"]
    assert lines[5].startswith("[note] guests' browsers reach the chat page over plain HTTP on the LAN")
    assert lines[-1] == ("[ok] LLM on the mesh: lab-pc-2 (127.0.0.1): llama3.2:1b; "
                         "evil\\x1b[2J (127.0.0.3\\n): m\\nfake line")  # escaped once, as each line above
    assert not any("\x1b" in line or "\n" in line for line in lines)


def test_with_no_llm_anywhere_the_fix_says_how_to_get_one(mesh_config, tmp_path):
    with serve_wsgi(json_app({"/api/peers": {"not": "a list"}}), "odd-node") as server:
        write_runtime(tmp_path, pid=os.getpid(), http_port=server.server_port)
        doctor, lines = doctor_of(mesh_config())
        doctor.check_mesh_llm()
    assert lines == ["[problem] no LLM: none answers on this machine and no computer of the room has one",
                     "      fix: install Ollama on one machine of the room (https://ollama.com) and pull a model "
                     "(ollama pull llama3.2:1b), or point --ollama-url / --openai-url at a running one"]


def test_a_check_that_breaks_is_a_note_and_the_others_still_run(mesh_config, monkeypatch, capsys):
    def broken_firewall(system):
        raise RuntimeError("powershell hung")

    monkeypatch.setattr(neuromesh, "firewall_state", broken_firewall)
    tags = json_app({"/api/tags": {"models": [{"name": "llama3.2:1b"}]}})
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    try:
        with serve_wsgi(tags, "ollama") as ollama:
            config = mesh_config(discovery=False, extra=["--ollama-url", "http://127.0.0.1:%d" % ollama.server_port,
                                                         "--peer", "127.0.0.1:%d" % listening.getsockname()[1]])
            assert neuromesh.run_doctor(config, system="linux") == 0
    finally:
        listening.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "NeuroMesh doctor %s: checks this machine and its network (it changes nothing)." % (
        neuromesh.__version__)
    assert "[note] firewall could not run: powershell hung" in out
    assert "[ok] LLM on the mesh: this computer (llama3.2:1b)" in out
    assert out[-1] == "Nothing blocks the mesh." and not any(line.startswith("[problem]") for line in out)


# ---- status -----------------------------------------------------------------------------------

def test_status_shows_a_closed_room_its_own_llm_and_its_model_transfers():
    health = {"name": "lab-pc-1", "node_id": "ab" * 32, "version": "9.9.9", "uptime_s": 185,
              "room": {"closed": True, "key_hash": "1f2e3d4c"},
              "llm": {"available": True, "backend": "ollama", "url": "http://127.0.0.1:11434", "models": ["tiny"]},
              "models_transfer": {"transfers": [
                  {"model": "llama3.2:1b", "status": "pulling", "total": 100 * neuromesh.MiB,
                   "completed": 25 * neuromesh.MiB},
                  {"model": "qwen", "status": "failed", "error": "no peer has it"}]}}
    models = {"llm_hosts": 1, "models": [{"name": "tiny", "hosts": [{"name": "lab-pc-1", "local": True}]}]}
    lines = neuromesh.status_report(health, [], models)
    assert lines[:2] == ["lab-pc-1 (node abababab), NeuroMesh 9.9.9, up 3m05s, room closed (key hash 1f2e3d4c)",
                         "LLM on this node: ollama at http://127.0.0.1:11434, models: tiny"]
    assert "Peers: 0 linked, 0 known" in lines and "  NAME" not in "\n".join(lines)
    assert lines[lines.index("LLM hosts on the mesh: 1") + 2].split() == ["tiny", "lab-pc-1", "(this", "node)"]
    transfers = lines[lines.index("Model transfers:") + 1:]
    assert transfers[0].split() == ["MODEL", "STATUS", "DONE", "NOTE"]
    assert transfers[1].split()[:3] == ["llama3.2:1b", "pulling", "25%"] and transfers[1].split()[-1] == "-"
    assert transfers[2].split() == ["qwen", "failed", "-", "no", "peer", "has", "it"]
    idle = neuromesh.status_report({"llm": {"available": False, "error": "Ollama is not running"}}, [], {})
    assert idle[1] == "LLM on this node: none (Ollama is not running)" and "Model transfers:" not in idle


def test_status_escapes_what_peers_say_about_themselves():
    lines = neuromesh.status_report(
        {"name": "me", "node_id": "ab" * 16, "version": "0.1.0", "uptime_s": 3725, "room": {"closed": False}},
        [{"name": "evil\x1b[2J", "node_id": "cd" * 16, "address": "10.0.0.2", "tcp_port": 7878, "connected": True,
          "has_llm": True, "models": ["m\nfake line"], "rtt_ms": 1.5}],
        {"models": [{"name": "m", "hosts": [{"name": "evil\x1b[2J", "local": False}]}], "llm_hosts": 1})
    text = "\n".join(lines)
    assert "\x1b" not in text and "evil\\x1b[2J" in text and "m\\nfake line" in text
    assert lines[0] == "me (node abababab), NeuroMesh 0.1.0, up 1h02m, room open"


def test_status_finds_the_node_by_its_runtime_file_and_says_when_it_answers_no_json(mesh_config, tmp_path, capsys):
    replies = {"/api/health": {"name": "lab-pc-1", "node_id": "ab" * 32, "version": "9.9.9", "uptime_s": 5},
               "/api/peers": [], "/api/models": {"llm_hosts": 0, "models": []}}
    with serve_wsgi(json_app(replies), "status-node") as server:
        write_runtime(tmp_path, pid=os.getpid(), http_port=server.server_port)
        assert neuromesh.run_status(mesh_config()) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("lab-pc-1 (node abababab), NeuroMesh 9.9.9, up 0m05s")
    def web_page(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<html>a router's login page</html>"]

    with serve_wsgi(web_page, "not-neuromesh") as other:
        assert neuromesh.run_status(mesh_config(), port=other.server_port) == 1
    err = capsys.readouterr().err
    assert err.startswith("neuromesh: error: no NeuroMesh answers at http://127.0.0.1:%d (" % other.server_port)
    assert "status --http-port PORT (or its --data-dir)." in err


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                      max_size=4), max_leaves=20)
reply_fields = st.dictionaries(st.sampled_from(["name", "node_id", "version", "uptime_s", "room", "llm", "models",
                                                "hosts", "llm_hosts", "connected", "has_llm", "rtt_ms", "tcp_port",
                                                "address", "available", "key_hash", "closed", "local", "tls",
                                                "models_transfer", "transfers"]),
                               json_values, max_size=8)


@settings(max_examples=100, deadline=None)
@given(health=reply_fields | json_values, peers=st.lists(reply_fields | json_values, max_size=4) | json_values,
       models=st.fixed_dictionaries({"models": st.lists(reply_fields, max_size=3)}) | json_values)
def test_status_prints_any_reply_shape_as_escaped_text(health, peers, models):
    lines = neuromesh.status_report(health, peers, models)
    assert lines[0] and all(isinstance(line, str) and "\x1b" not in line and "\n" not in line for line in lines)
    assert any(line.startswith("Peers: ") for line in lines) and any(line.startswith("LLM hosts") for line in lines)
