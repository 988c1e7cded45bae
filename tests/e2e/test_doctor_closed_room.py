"""The doctor room end-to-end in a closed room: `doctor` judges from what it can prove.

It links to each peer heard with the room code, reads the HELO the room tells only its members,
and names the computers and the one with the LLM, beside a running node and on a machine about to
join; a node of another room code fails the key proof of the doctor's probe."""

import neuromesh
import pytest
from conftest import fully_linked, wait_for
from support.fake_ollama import FakeOllama
from support.cli import loopback_doctor_flags, run_cli

MODEL = "llama3.2:1b"
CODE = "quiet-otter-42"


@pytest.fixture
def closed_room(cluster):
    """Three nodes of one closed room; only "ana-laptop" has an LLM."""
    fake = FakeOllama(models=(MODEL,)).start()
    try:
        keyed = ["--mesh-key", CODE]
        host = cluster.start("host", extra=keyed + ["--ollama-url", fake.url, "--name", "ana-laptop"])
        plain = cluster.start("plain", extra=keyed + ["--name", "ben-desk"])
        third = cluster.start("third", extra=keyed + ["--name", "cleo-desk"])
        wait_for(lambda: fully_linked([host, plain, third]), timeout=30, message="the closed room links")
        wait_for(lambda: plain.json("/api/models")["llm_hosts"] == 1, timeout=30, message="the LLM host is known")
        yield cluster, host, plain, third
    finally:
        fake.stop()


def test_doctor_on_a_machine_about_to_join_a_closed_room_names_the_llm_host(closed_room, tmp_path):
    cluster, host, plain, third = closed_room
    result = run_cli("doctor", "--data-dir", str(tmp_path / "new"),
                     *loopback_doctor_flags(cluster, "--ollama-url", "none", "--mesh-key", CODE), timeout=90)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for node, name in ((host, "ana-laptop"), (plain, "ben-desk"), (third, "cleo-desk")):
        assert "[ok] peer %s (127.0.0.1) heard, and TCP %d reaches it: it proved the room code" % (
            name, node.tcp_port) in out, out
    assert "ana-laptop (127.0.0.1) heard, and TCP %d reaches it: it proved the room code; has the LLM (%s)" % (
        host.tcp_port, MODEL) in out
    assert "[ok] LLM on the mesh: ana-laptop (127.0.0.1): %s" % MODEL in out
    assert "[problem]" not in out and "Nothing blocks the mesh." in out
    assert CODE not in out and host.node_id not in out  # names, not bare hex ids; never the code
    assert all(node.health()["status"] == "ok" for node in (host, plain, third))  # the doctor's links did no harm


def test_doctor_beside_a_running_node_of_a_closed_room_names_the_llm_host(closed_room):
    cluster, host, plain, _third = closed_room
    flags = loopback_doctor_flags(cluster, "--ollama-url", "none", "--mesh-key", CODE)
    flags[flags.index("--http-port") + 1] = str(plain.info["http_port"])
    flags[flags.index("--tcp-port") + 1] = str(plain.tcp_port)
    result = run_cli("doctor", "--data-dir", plain.data_dir, *flags, timeout=90)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "this machine's running node is announcing" in out
    assert "[ok] LLM on the mesh: ana-laptop (127.0.0.1): %s" % MODEL in out, out
    assert "[problem]" not in out


def test_a_peer_of_another_room_code_fails_the_key_proof_and_says_which_fix(cluster):
    other = cluster.start("other", extra=["--mesh-key", "another-room-9"])
    room_key = neuromesh.derive_room_key(CODE)
    # its proof fails here, or it hangs up first when ours failed there (which comes first is timing)
    with pytest.raises(neuromesh.ProtocolError, match="does not hold this mesh's key|room code differs"):
        neuromesh.probe_hello("127.0.0.1", other.tcp_port, room_key, timeout=10)
    hello = neuromesh.probe_hello("127.0.0.1", other.tcp_port, neuromesh.derive_room_key("another-room-9"), timeout=10)
    assert hello["node_id"] == other.node_id and hello["has_llm"] is False
