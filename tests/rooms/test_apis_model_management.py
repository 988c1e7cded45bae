"""Ollama's model management on a node. ``create``, ``copy``, ``delete``,
``push`` and ``blobs`` act on this computer's own Ollama (the fake, which records them) for its
owner only: this computer, or a --lan-api client that sends the room code. Another machine of the
LAN is refused with a clear 403, never a silent no-op, and its Ollama sees nothing."""

import hashlib

import pytest

import neuromesh
from conftest import API_MODEL, StubNode, scripted_router, wait_for
from support.fake_ollama import FakeOllama
from conftest import SEER, THINKER

LAN_CLIENT = "192.168.1.60"
ROOM_CODE = "maple-otter-42"


def ollama_module():
    return pytest.importorskip("ollama")


@pytest.fixture
def lan_node(tmp_path):
    """An in-process node started with --lan-api (and ``code`` as its room code, if given) whose own
    Ollama is the fake; ``client(code)`` is the ``ollama`` client of a machine on its LAN."""
    httpx = pytest.importorskip("httpx")
    ollama = ollama_module()
    fake = FakeOllama(models=(API_MODEL,)).start()
    made = []

    def build(code=None):
        backend = neuromesh.OllamaBackend(fake.url, "n" * 32, "teacher-mac")
        node = StubNode(tmp_path / str(len(made)), scripted_router(local=[backend]), lan_api=True, mesh_key=code)
        backend.refresh()
        made.append(node)
        app = node.app()

        def client(bearer=None):
            transport = httpx.WSGITransport(app=app, remote_addr=LAN_CLIENT)
            return ollama.Client(host="http://192.168.1.10:8080", transport=transport,
                                 headers={"Authorization": "Bearer " + bearer} if bearer else None)
        return node, client
    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    try:
        yield fake, build
    finally:
        fake.stop()
        for node in made:
            node.store.close()


def test_another_machine_of_the_lan_is_refused_with_a_403_and_nothing_changes(lan_node, tmp_path):
    ollama = ollama_module()
    fake, build = lan_node
    node, client = build()  # --lan-api without a room code: the LAN may chat, not manage models
    assert client().chat(model=API_MODEL, messages=[{"role": "user", "content": "hi"}]).message.content
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(b"weights" * 1000)
    for attempt in (lambda c: c.create(model="mine", from_=API_MODEL), lambda c: c.copy(API_MODEL, "copied"),
                    lambda c: c.push(API_MODEL), lambda c: c.create_blob(str(blob)), lambda c: c.delete(API_MODEL)):
        with pytest.raises(ollama.ResponseError) as refused:
            attempt(client())
        assert refused.value.status_code == 403
        assert "only its owner may do" in refused.value.error and node.router.node_name in refused.value.error
    assert [m["model"] for m in fake.tags] == [API_MODEL]
    managed = [path for path, _body in fake.requests if path.startswith(("/api/create", "/api/copy", "/api/delete",
                                                                         "/api/push", "/api/blobs"))]
    assert managed == [], "the refused requests never reached the Ollama"


def test_a_lan_client_with_the_room_code_is_the_owner(lan_node):
    fake, build = lan_node
    _node, client = build(code=ROOM_CODE)
    with pytest.raises(ollama_module().ResponseError) as wrong:
        client("not-the-code").copy(API_MODEL, "copied")
    assert wrong.value.status_code == 401
    assert client(ROOM_CODE).copy(API_MODEL, "copied").status == "success"
    assert fake.requests_to("/api/copy")[-1] == {"source": API_MODEL, "destination": "copied"}


def test_the_owner_creates_copies_pushes_and_deletes_and_the_mesh_hears_of_it(served, tmp_path):
    ollama = ollama_module()
    fake, host, plain = served.fake, served.host, served.plain
    client = ollama.Client(host=host.url, timeout=30)
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(b"weights" * 1000)
    digest = client.create_blob(str(blob))
    assert digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert fake.blobs[digest[len("sha256:"):]] == len(blob.read_bytes())  # the fake checked the digest

    created = client.create(model="tutor", from_=API_MODEL, system="You are a patient tutor.")
    assert created.status == "success"
    assert fake.requests_to("/api/create")[-1] == {"model": "tutor", "from": API_MODEL,
                                                   "system": "You are a patient tutor.", "stream": False}
    assert [p.status for p in client.create(model="tutor2", from_=API_MODEL, stream=True)][-1] == "success"
    assert client.copy(API_MODEL, "copied").status == "success"
    assert client.push("tutor").status == "success"
    assert client.delete("tutor2").status == "success"
    assert {"tutor:latest", "copied:latest"} <= {m["model"] for m in fake.tags}
    assert "tutor2:latest" not in {m["model"] for m in fake.tags}
    wait_for(lambda: {"tutor:latest", "copied:latest"} <= {m["name"] for m in plain.json("/api/models")["models"]},
             timeout=15, message="the other node offers the new models")
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("no-such-model")
    assert missing.value.status_code == 404  # Ollama's answer, passed on

    # the other node has no Ollama of its own: it says so instead of acting on someone else's
    with pytest.raises(ollama.ResponseError) as none:
        ollama.Client(host=plain.url).create(model="x", from_=API_MODEL)
    assert none.value.status_code == 503 and "runs no Ollama of its own" in none.value.error


def test_status_show_and_ps_tell_the_mesh_and_the_capabilities(served):
    ollama = ollama_module()
    client = ollama.Client(host=served.plain.url, timeout=30)
    assert client.show(SEER).capabilities == ["completion", "tools", "vision"]
    assert client.show(THINKER).capabilities == ["completion", "tools", "thinking"]
    client.chat(model=SEER, messages=[{"role": "user", "content": "hi"}])
    assert [m.model for m in client.ps().models] == [SEER]
    status = served.plain.json("/api/status")
    assert status["status"] == "running" and status["mesh_models"] == 3 and status["llm_hosts"] == 1  # 3: the served models
    assert status["local_models"] == []
