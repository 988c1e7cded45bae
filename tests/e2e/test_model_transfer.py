"""Models travel across the room: a node reads its Ollama's store and serves it to
the room; a pull copies a model in chunks from every peer that holds it into this computer's
Ollama, through Ollama's API (the fake checks each blob's digest), and resumes after a cut."""

import functools
import json
import re
import signal
import subprocess
import os
import sys
import threading

import pytest
import requests

import neuromesh as nm
from conftest import fully_linked, wait_for
from support.llm_mesh import hosts_of
from support.model_store import start_node, write_store

MODEL = "tinyllama:1b"
SCRIPT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")


class ThreadedCall:
    """Runs ``call`` on a thread; ``result()`` is its value (or raises its exception)."""

    def __init__(self, call):
        self._outcome = []
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call):
        try:
            self._outcome.append((True, call()))
        except BaseException as exc:  # handed to result()
            self._outcome.append((False, exc))

    def result(self, timeout):
        self._thread.join(timeout)
        assert self._outcome, "the call did not end in %s s" % timeout
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


def pull_lines(node, model, timeout=120):
    reply = requests.post(node.url + "/api/pull", json={"model": model}, stream=True, timeout=timeout)
    assert reply.status_code == 200, reply.text
    return [json.loads(line) for line in reply.iter_lines() if line]


def metric(node, name):
    for line in node.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("no %s in /metrics" % name)


def test_a_64_mb_model_comes_from_a_peer_into_this_computers_ollama(cluster, fakes, tmp_path):
    digest = write_store(tmp_path / "store-a", MODEL, 64 * 1024 * 1024)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a")
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b")
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")

    lines = pull_lines(puller, MODEL)

    statuses = [line.get("status") for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", lines[-3:]
    assert "pulling %s" % digest[:12] in statuses and "verifying sha256 digest" in statuses
    progress = [line for line in lines if line.get("digest") == "sha256:" + digest]
    assert progress[-1]["completed"] == progress[-1]["total"] == 64 * 1024 * 1024
    assert puller_llm.blobs[digest] == 64 * 1024 * 1024  # the fake Ollama checked the digest
    created = puller_llm.created[-1]
    assert created["model"] == MODEL and created["files"] == {"model-0.gguf": "sha256:" + digest}
    assert created["template"] == "{{ .Prompt }}" and created["parameters"] == {"stop": ["<|eot_id|>"]}
    assert MODEL in {m["name"] for m in requests.get(puller_llm.url + "/api/tags").json()["models"]}
    assert MODEL in {m["name"] for m in puller.json("/api/tags")["models"]}
    wait_for(lambda: puller.node_id in hosts_of(source, MODEL), timeout=20, message="the mesh hears the new host")
    assert metric(puller, "neuromesh_model_fetched_bytes_total") == 64 * 1024 * 1024
    assert metric(source, "neuromesh_model_served_bytes_total") >= 64 * 1024 * 1024
    assert puller.health()["models_transfer"]["transfers"][-1]["status"] == "success"


def test_the_ollama_client_pulls_through_a_node_with_ollamas_progress(cluster, fakes, tmp_path):
    ollama = pytest.importorskip("ollama")
    digest = write_store(tmp_path / "store-a", MODEL, 3 * 1024 * 1024 + 5)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a")
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b")
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")

    events = list(ollama.Client(host=puller.url, timeout=60).pull(MODEL, stream=True))

    assert events[-1].status == "success"
    pulling = [e for e in events if e.digest == "sha256:" + digest]
    assert pulling and pulling[-1].completed == pulling[-1].total == 3 * 1024 * 1024 + 5
    assert {e.status for e in events} >= {"pulling manifest", "pulling %s" % digest[:12],
                                          "verifying sha256 digest", "writing manifest", "success"}
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=puller.url, timeout=30).pull("mistral:7b")


def test_a_pull_cut_when_its_source_dies_resumes_from_the_restarted_source(cluster, fakes, tmp_path):
    size, chunk = 24 * 1024 * 1024, nm.TRANSFER_CHUNK
    write_store(tmp_path / "store-a", MODEL, size)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source_llm.set_fail("hang")  # a chat the source answers: it serves at its --transfer-rate meanwhile
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a", extra=["--transfer-rate", "4MiB"])
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b")
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")
    chat = ThreadedCall(lambda: source.post("/api/chat", json={"model": MODEL, "stream": False,
                                                               "messages": [{"role": "user", "content": "hi"}]},
                                            timeout=60))
    wait_for(lambda: source_llm.in_flight == 1, message="the source answering a chat")
    pull = ThreadedCall(lambda: pull_lines(puller, MODEL, timeout=180))
    wait_for(lambda: metric(puller, "neuromesh_model_fetched_bytes_total") >= size // 3, timeout=60,
             message="a third of the model fetched")

    source.kill()  # a closed lid, a pulled plug
    before = metric(puller, "neuromesh_model_fetched_bytes_total")
    assert before < size
    source_llm.heal()
    source.start()

    lines = pull.result(timeout=180)
    assert lines[-1] == {"status": "success"}, lines[-3:]
    assert metric(puller, "neuromesh_model_fetched_bytes_total") == size  # each chunk landed once
    assert metric(source, "neuromesh_model_served_bytes_total") <= size - before + chunk
    assert MODEL in {m["name"] for m in requests.get(puller_llm.url + "/api/tags").json()["models"]}
    with pytest.raises(requests.ConnectionError):
        chat.result(timeout=60)  # it was asked of the source that died


def test_a_damaged_chunk_is_thrown_away_fetched_elsewhere_and_its_sender_named(cluster, fakes, tmp_path):
    size = 8 * 1024 * 1024
    digest = write_store(tmp_path / "store-a", MODEL, size)
    liar_llm, honest_llm, puller_llm = fakes((MODEL,)), fakes((MODEL,)), fakes(())
    liar = start_node(cluster, "liar", liar_llm, tmp_path / "store-a", extra=["--name", "Liar"],
                      program=[sys.executable, os.path.join(SCRIPT_DIR, "corrupt_model_peer.py")])
    honest = start_node(cluster, "honest", honest_llm, tmp_path / "store-a")
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b")
    wait_for(lambda: fully_linked([liar, honest, puller]), message="mesh")
    wait_for(lambda: {liar.node_id, honest.node_id} <= hosts_of(puller, MODEL), timeout=20,
             message="both sources on the mesh")

    lines = pull_lines(puller, MODEL)

    assert lines[-1] == {"status": "success"}, lines[-3:]
    assert puller_llm.blobs[digest] == size  # Ollama got the right bytes
    assert metric(puller, "neuromesh_model_rejected_chunks_total") >= 1
    assert "Liar" in puller.health()["models_transfer"]["transfers"][-1]["bad_peers"]
    assert "Liar sent chunk" in puller.log() and "does not match" in puller.log()


def test_a_node_outside_the_room_gets_nothing(cluster, fakes, tmp_path):
    digest = write_store(tmp_path / "store-a", MODEL, 2 * 1024 * 1024)
    source_llm, stranger_llm, keeper_llm = fakes((MODEL,)), fakes(()), fakes((MODEL,))
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a", extra=["--mesh-key", "room-one-code"])
    keeper = start_node(cluster, "keeper", keeper_llm, tmp_path / "store-a",
                        extra=["--mesh-key", "room-two-code", "--no-share-llm"])
    stranger = start_node(cluster, "stranger", stranger_llm, tmp_path / "store-c",
                          extra=["--mesh-key", "room-two-code"])
    wait_for(lambda: fully_linked([keeper, stranger]), message="the stranger's own room")

    reply = stranger.post("/api/pull", json={"model": MODEL})  # its room has it only on a node that shares none
    assert reply.status_code == 404 and "success" not in reply.text
    assert source.node_id not in stranger.connected_ids()
    assert not stranger_llm.blobs and not stranger_llm.created

    # a stranger on the LAN asking the relay itself on the HTTP port, with no token or a made-up one
    for headers in ({}, {"Authorization": "Bearer made-up-token"}):
        for path in ("/relay/models", "/relay/blobs/%s" % digest, "/relay/blobs/%s/chunks" % digest):
            reply = requests.get(source.url + path, headers=headers, timeout=5)
            assert reply.status_code == 403 and digest not in reply.text
    assert metric(source, "neuromesh_model_served_bytes_total") == 0


def test_the_pull_command_shows_a_progress_bar_and_status_lists_the_transfer(cluster, fakes, tmp_path):
    write_store(tmp_path / "store-a", MODEL, 5 * 1024 * 1024)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a")
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b")
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")

    def command(*words):
        return subprocess.run([sys.executable, nm.__file__] + list(words) + ["--data-dir", puller.data_dir],
                              capture_output=True, text=True, timeout=120)

    pulled = command("pull", MODEL)
    assert pulled.returncode == 0, pulled.stderr
    assert "100% [####" in pulled.stdout and "5/5 MB" in pulled.stdout and pulled.stdout.strip().endswith("success")
    missing = command("pull", "mistral:7b")
    assert missing.returncode == 1 and "ollama pull mistral:7b" in missing.stderr
    status = command("status")
    assert status.returncode == 0
    assert "Model transfers:" in status.stdout and re.search(r"tinyllama:1b\s+success", status.stdout)


# -- hostile input: manifests, parameters, ranges and catalogs never crash -------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                     max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), JSONISH.map(lambda v: json.dumps(v).encode())))
def test_a_manifest_is_read_or_refused_with_a_value_error(data):
    try:
        manifest = nm.parse_manifest(data)
    except ValueError:
        return
    assert all(nm.digest_hex(layer["digest"]) for layer in manifest["layers"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_parameters_text_gives_a_dict(text):
    assert isinstance(nm.modelfile_parameters(text), dict)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.integers(1, 1 << 40))
def test_a_range_header_is_a_range_inside_the_blob_or_416(header, size):
    try:
        start, end = nm.ModelRelayApi._range(header, size)
    except nm.HTTPFailure as exc:
        assert exc.status == 416
        return
    assert 0 <= start < end <= size


@settings(max_examples=100, deadline=None)
@given(catalog=JSONISH)
def test_a_peers_catalog_of_any_shape_never_breaks_a_fetch(tmp_path_factory, catalog):
    directory = str(tmp_path_factory.mktemp("partials"))
    partial = nm.PartialBlob(directory, "a" * 64, 3 * nm.TRANSFER_CHUNK, ["b" * 64] * 3)

    class Holders:
        def catalogs(self):
            return {object(): {"blobs": {"a" * 64: catalog}}}

    fetch = nm.BlobFetch(partial, Holders(), nm.TransferStats(), lambda n: None, threading.Event())
    fetch._work = lambda backend: None  # the look only
    fetch._look()
    assert all(held <= set(range(3)) for held in fetch.held.values())


def test_chunks_left_by_a_cut_pull_are_read_back_and_garbage_is_ignored(tmp_path):
    partial = nm.PartialBlob(str(tmp_path), "c" * 64, 2 * nm.TRANSFER_CHUNK + 1, ["d" * 64] * 3)
    partial.write(1, b"x" * nm.TRANSFER_CHUNK)
    with open(os.path.join(str(tmp_path), "c" * 64 + ".have"), "a") as handle:
        handle.write("7\nnot a number\n-1\n")
    again = nm.PartialBlob.resume(str(tmp_path), "c" * 64, 2 * nm.TRANSFER_CHUNK + 1)
    assert again.have == {1} and not again.complete
    assert nm.PartialBlob.resume(str(tmp_path), "c" * 64, 5) is None  # another size: start afresh
    with pytest.raises(ValueError):
        nm.PartialBlob(str(tmp_path), "e" * 64, 10, ["not a hash"])


def test_a_pull_that_does_not_fit_on_the_disk_says_so_before_it_starts(tmp_path):
    class Pulls:
        directory, partials = str(tmp_path), {}
        ollama = None

    free = nm.shutil.disk_usage(str(tmp_path)).free
    pull = nm.ModelPull("huge:70b", Pulls(), threading.Event())
    with pytest.raises(nm.PullError) as error:
        pull._check_space([{"digest": "sha256:" + "f" * 64, "size": free, "mediaType": nm.MODEL_LAYER}])
    assert "free on %s" % tmp_path in str(error.value) and "huge:70b needs" in str(error.value)
    assert "free some disk space" in str(error.value)
    pull._check_space([{"digest": "sha256:" + "f" * 64, "size": 1024, "mediaType": nm.MODEL_LAYER}])


def test_a_pull_stopped_by_ctrl_c_goes_on_where_it_stopped(cluster, fakes, tmp_path):
    size, chunk = 16 * 1024 * 1024, nm.TRANSFER_CHUNK
    write_store(tmp_path / "store-a", MODEL, size)
    source_llm, puller_llm = fakes((MODEL,)), fakes(())
    source_llm.set_fail("hang")  # the source answers a chat: it serves at --transfer-rate meanwhile
    source = start_node(cluster, "source", source_llm, tmp_path / "store-a", extra=["--transfer-rate", "4MiB"])
    puller = start_node(cluster, "puller", puller_llm, tmp_path / "store-b")
    wait_for(lambda: fully_linked([source, puller]), message="mesh")
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=20,
             message="the model on the mesh")
    ThreadedCall(lambda: source.post("/api/chat", json={"model": MODEL, "stream": False,
                                                        "messages": [{"role": "user", "content": "hi"}]}, timeout=60))
    wait_for(lambda: source_llm.in_flight == 1, message="the source answering a chat")
    command = [sys.executable, nm.__file__, "pull", MODEL, "--data-dir", puller.data_dir]
    # Ctrl+C as at a terminal: a suite started in the background ignores SIGINT, and so would the pull.
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: metric(puller, "neuromesh_model_fetched_bytes_total") >= size // 4, timeout=60,
             message="a quarter of the model fetched")
    first.send_signal(signal.SIGINT)  # Ctrl+C
    _out, err = first.communicate(timeout=30)
    assert first.returncode == 130 and "the same command again" in err
    wait_for(lambda: puller.health()["models_transfer"]["transfers"][-1]["status"] == "stopped", timeout=30,
             message="the node to stop the pull")
    before = metric(puller, "neuromesh_model_fetched_bytes_total")
    source_llm.heal()
    # A hanging Ollama also hangs the source's model probe, which can drop its LLM for a while:
    # the same command works once the room lists the model again, as the page would show.
    wait_for(lambda: MODEL in {m["name"] for m in puller.json("/api/models")["models"]}, timeout=30,
             message="the model on the mesh again")

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert again.returncode == 0 and again.stdout.strip().endswith("success"), again.stderr
    assert before < size and metric(puller, "neuromesh_model_fetched_bytes_total") == size
    assert metric(source, "neuromesh_model_served_bytes_total") <= size + chunk


def test_an_insider_with_a_relay_token_reads_only_shared_blobs_and_only_in_them(cluster, fakes, tmp_path, linked_peer):
    shared = write_store(tmp_path / "store-a", MODEL, 2 * 1024 * 1024 + 7)
    secret = write_store(tmp_path / "store-a", "secret:1b", 1024 * 1024, seed=b"secret")  # Ollama does not list it
    source = start_node(cluster, "source", fakes((MODEL,)), tmp_path / "store-a")
    insider = linked_peer(source, name="insider")  # the room code and its own key: a member of the room
    insider.send(nm.LLM_REQUEST, {"peer_name": "insider"})
    wait_for(lambda: any(marker == nm.LLM_RESPONSE for marker, _payload in insider.frames()), message="a token")
    token = [payload for marker, payload in insider.frames() if marker == nm.LLM_RESPONSE][-1]["token"]
    auth = {"Authorization": "Bearer " + token}

    status, _headers, body = insider.relay_request("GET", "/relay/models", auth)
    catalog = json.loads(body)
    assert status == 200 and set(catalog["models"]) == {MODEL} and secret not in catalog["blobs"]
    status, _headers, part = insider.relay_request("GET", "/relay/blobs/" + shared, dict(auth, Range="bytes=10-19"))
    with open(os.path.join(str(tmp_path / "store-a"), "blobs", "sha256-" + shared), "rb") as handle:
        assert status == 206 and part == handle.read()[10:20]
    for path, expected in (("/relay/blobs/" + secret, 404), ("/relay/blobs/sha256:" + secret + "/chunks", 404),
                           ("/relay/blobs/..%2F..%2F..%2Fetc%2Fpasswd", (400, 404)),
                           ("/relay/blobs/" + "0" * 64, 404)):
        status, _headers, _body = insider.relay_request("GET", path, auth)
        assert status in (expected if isinstance(expected, tuple) else (expected,)), (path, status)
    status, _headers, _body = insider.relay_request("GET", "/relay/blobs/" + shared, dict(auth, Range="bytes=99999999-"))
    assert status == 416
    # the same token on the HTTP port (plain text on the LAN) reads nothing
    assert requests.get(source.url + "/relay/models", headers=auth, timeout=5).status_code == 403
    assert metric(source, "neuromesh_model_served_bytes_total") == 10
