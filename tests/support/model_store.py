"""Ollama model stores for the tests of model transfers: a store written in Ollama's own layout,
and a loopback node whose Ollama reads it."""

import hashlib
import json
import os

import neuromesh as nm
from conftest import NodeProcess


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
