"""Models travel across the room (issue 26): a node reads its Ollama's store and serves it to
the room; a pull copies a model in chunks from every peer that holds it into this computer's
Ollama, through Ollama's API (the fake checks each blob's digest), and resumes after a cut."""

import hashlib
import json
import os
import sys

import pytest
import requests

import neuromesh as nm
from conftest import NodeProcess, fully_linked, wait_for
from fake_ollama import FakeOllama

MODEL = "tinyllama:1b"
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def write_store(root, name, size, seed=b"model", extra=()):
    """An Ollama model store in Ollama's own layout: the manifest, the gguf blob, a template, a config.
    Returns the model blob's hex digest."""
    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        with open(os.path.join(root, "blobs", "sha256-" + digest), "wb") as handle:
            handle.write(data)
        return digest

    block = hashlib.sha512(seed).digest() * 16384  # 1 MiB, different for each seed
    model = blob((block * (size // len(block) + 1))[:size])
    template = blob(b"{{ .Prompt }}")
    config = blob(json.dumps({"model_format": "gguf", "model_family": "llama"}).encode())
    base, tag = name.split(":")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": "sha256:" + config, "size": len(json.dumps({"model_format": "gguf",
                                                                                   "model_family": "llama"}))},
                "layers": [{"mediaType": nm.MODEL_LAYER, "digest": "sha256:" + model, "size": size},
                           {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + template,
                            "size": 13}]}
    folder = os.path.join(root, "manifests", "registry.ollama.ai", "library", base)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, tag), "w") as handle:
        json.dump(manifest, handle)
    return model


def start_node(cluster, label, fake, store, extra=(), program=None):
    """A loopback node of ``cluster`` whose Ollama is ``fake`` and whose Ollama store is ``store``."""
    os.makedirs(str(store), exist_ok=True)
    args = cluster.node_args(extra=["--ollama-url", fake.url] + list(extra))
    node = NodeProcess(cluster.tmp_path / label, args, label, prefix=["env", "OLLAMA_MODELS=%s" % store],
                       program=program)
    cluster.nodes.append(node)
    return node.start()


def pull_lines(node, model, timeout=120):
    reply = requests.post(node.url + "/api/pull", json={"model": model}, stream=True, timeout=timeout)
    assert reply.status_code == 200, reply.text
    return [json.loads(line) for line in reply.iter_lines() if line]


def metric(node, name):
    for line in node.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("no %s in /metrics" % name)


def hosts_of(node, model):
    return {host["node_id"] for entry in node.json("/api/models")["models"] if entry["name"] == model
            for host in entry["hosts"]}


@pytest.fixture
def fakes():
    started = []

    def make(*models, token_delay=0.0):
        started.append(FakeOllama(models=models, token_delay=token_delay).start())
        return started[-1]

    yield make
    for fake in started:
        fake.stop()


def test_a_64_mb_model_comes_from_a_peer_into_this_computers_ollama(cluster, fakes, tmp_path):
    digest = write_store(tmp_path / "store-a", MODEL, 64 * 1024 * 1024)
    source_llm, puller_llm = fakes(MODEL), fakes()
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
    source_llm, puller_llm = fakes(MODEL), fakes()
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
