"""Meshes whose LLMs are fake Ollamas, as the tests of LLM sharing see them: which hosts serve a
model, an SSE reply read as it arrives, and two LLM hosts serving a node without one."""

import json

from conftest import API_MODEL, fully_linked, wait_for

LONG_QUESTION = " ".join("w%d" % index for index in range(41))  # the fake's answer to it: 50 tokens


def hosts_of(node, model=API_MODEL):
    """The node ids of the hosts ``node`` lists for ``model`` (empty when none has it)."""
    for entry in node.json("/api/models")["models"]:
        if entry["name"] == model:
            return {host["node_id"] for host in entry["hosts"]}
    return set()


def read_sse(response):
    """(event, data) pairs of a Server-Sent Events response, as they arrive."""
    event = None
    for line in response.iter_lines(chunk_size=1, decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def two_llm_mesh(cluster, fakes, token_delay=0.05, parallel=1):
    """Two LLM hosts of ``cluster``, each with a fake Ollama made by ``fakes`` (the conftest fixture), and
    a client without an LLM that both serve: ``(first fake, second fake, h1, h2, client)``."""
    first = fakes(token_delay=token_delay)
    second = fakes(token_delay=token_delay)
    settings = {"llm_parallel": str(parallel)}
    h1 = cluster.start("h1", settings=settings, extra=["--ollama-url", first.url])
    h2 = cluster.start("h2", settings=settings, extra=["--ollama-url", second.url])
    client = cluster.start("client")
    wait_for(lambda: fully_linked([h1, h2, client]), message="mesh")
    wait_for(lambda: hosts_of(client) == {h1.node_id, h2.node_id}, message="both hosts granted")
    return first, second, h1, h2, client
