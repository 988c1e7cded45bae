"""Shared fixtures: real NeuroMesh nodes on loopback, each with its own ports and data dir.

Network safety: every node started here binds 127.0.0.1 and broadcasts only to
127.255.255.255 (or runs inside a network namespace the test made itself).
"""

import base64
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "neuromesh.py")
sys.path.insert(0, ROOT)

LOOPBACK_BROADCAST = "127.255.255.255"
# Fast meshes: announcements every half second, a peer is down after two silent seconds.
FAST = {"announce_interval": "0.5", "peer_timeout": "2", "sync_interval": "0.5"}


def _is_loopback(address):
    host = address[0] if isinstance(address, tuple) else None
    if host is None:  # AF_UNIX and socketpair: not the network
        return True
    return host in ("localhost", "::1") or str(host).startswith("127.")


@pytest.fixture(autouse=True, scope="session")
def loopback_only():
    """Network safety: the test process may connect and send only to loopback addresses."""
    originals = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex", "sendto")}

    def guard(name):
        original = originals[name]

        def checked(self, *args):
            address = args[-1]
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
                raise AssertionError("network safety: a test tried to reach %r (loopback only)" % (address,))
            return original(self, *args)
        return checked

    for name in originals:
        setattr(socket.socket, name, guard(name))
    yield
    for name, original in originals.items():
        setattr(socket.socket, name, original)


def wait_for(predicate, timeout=10.0, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (requests.RequestException, OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError("timed out after %.1f s waiting for %s (last error: %r)" % (timeout, message, last_error))


def reserve_udp_port():
    """A UDP port for one test mesh, held open (shareable) so no other test takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class NodeProcess:
    """A real ``python neuromesh.py`` process on loopback, driven by a test."""

    def __init__(self, data_dir, args, label, prefix=(), program=None):
        self.data_dir = str(data_dir)
        self.args = list(args)
        self.label = label
        self.prefix = list(prefix)
        self.program = list(program or [sys.executable, SCRIPT])  # the bundle tests run the .pyz instead
        self.process = None
        self.info = None
        self.log_path = os.path.join(self.data_dir, "node.log")

    def start(self, timeout=15.0):
        os.makedirs(self.data_dir, exist_ok=True)
        runtime = os.path.join(self.data_dir, "runtime.json")
        if os.path.exists(runtime):
            os.remove(runtime)  # left by a killed run
        command = self.prefix + self.program + ["--data-dir", self.data_dir, "--no-browser"] + self.args
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

        def ready():
            if self.process.poll() is not None:
                raise AssertionError("node %s exited with %s:\n%s" % (self.label, self.process.returncode, self.log()))
            with open(runtime) as handle:
                info = json.load(handle)
            return info if info.get("pid") == self.process.pid or self.prefix else None

        try:
            self.info = wait_for(ready, timeout, message="node %s to start" % self.label)
        except AssertionError:
            self.kill()
            raise
        return self

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.info["http_port"]

    @property
    def node_id(self):
        return self.info["node_id"]

    @property
    def tcp_port(self):
        return self.info["tcp_port"]

    def get(self, path, **kwargs):
        kwargs.setdefault("timeout", 5)
        return requests.get(self.url + path, **kwargs)

    def post(self, path, **kwargs):
        kwargs.setdefault("timeout", 10)
        return requests.post(self.url + path, **kwargs)

    def json(self, path, timeout=5):
        response = self.get(path, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def peers(self):
        return self.json("/api/peers")

    def connected_ids(self):
        return {peer["node_id"] for peer in self.peers() if peer["connected"]}

    def health(self):
        return self.json("/api/health")

    def log(self):
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-6000:]
        except OSError:
            return ""

    def stop(self, timeout=10.0):
        """Graceful stop, as a user's Ctrl+C or a service manager's SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return self.process and self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    @property
    def alive(self):
        return self.process is not None and self.process.poll() is None


class Cluster:
    """Starts loopback nodes that share one UDP discovery port; stops them all at the end."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.udp_reservation = reserve_udp_port()
        self.udp_port = self.udp_reservation.getsockname()[1]
        self.nodes = []

    def node_args(self, discovery=True, settings=None, extra=()):
        values = dict(FAST)
        values.update(settings or {})
        args = ["--host", "127.0.0.1", "--http-port", "0", "--tcp-port", "0", "--log-level", "debug"]
        if discovery:
            args += ["--broadcast", LOOPBACK_BROADCAST, "--udp-port", str(self.udp_port)]
        else:
            args += ["--no-discovery", "--udp-port", str(self.udp_port)]
        for key, value in values.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        if "--ollama-url" not in extra:
            args += ["--ollama-url", "none"]  # never probe a real Ollama this machine might run
        return args + list(extra)

    def start(self, label=None, discovery=True, settings=None, extra=(), data_dir=None):
        label = label or "n%d" % (len(self.nodes) + 1)
        node = NodeProcess(data_dir or self.tmp_path / label, self.node_args(discovery, settings, extra), label)
        self.nodes.append(node)
        return node.start()

    def assert_loopback_only(self):
        """Network safety: every running node announced to loopback and knows only loopback peers."""
        for node in self.nodes:
            if not node.alive or node.prefix:
                continue
            health = node.health()
            assert set(health["broadcast_addresses"]) <= {LOOPBACK_BROADCAST}, health["broadcast_addresses"]
            for peer in node.peers():
                assert peer["address"].startswith("127."), peer

    def close(self):
        try:
            self.assert_loopback_only()
        except requests.RequestException:
            pass  # a node the test left unreachable: its own assertions said why
        for node in self.nodes:
            try:
                node.stop(timeout=5)
            except subprocess.TimeoutExpired:
                node.kill()
        self.udp_reservation.close()


@pytest.fixture
def cluster(tmp_path):
    mesh = Cluster(tmp_path)
    try:
        yield mesh
    finally:
        mesh.close()


def fully_linked(nodes):
    """True when every node lists every other as connected."""
    for node in nodes:
        others = {other.node_id for other in nodes if other is not node}
        if not others <= node.connected_ids():
            return False
    return True


@pytest.fixture
def mesh_config(tmp_path):
    """Builds an in-process node's Config from the flags a cluster node gets (loopback only, its
    own reserved UDP port): ``mesh_config(discovery=False, settings=None, extra=())``."""
    import neuromesh as nm
    flags = Cluster(tmp_path)  # for its UDP port reservation and node flags; it starts no process

    def build(discovery=False, settings=None, extra=()):
        args = ["--data-dir", str(tmp_path)] + flags.node_args(discovery, settings, extra)
        return nm.load_config(nm.build_arg_parser().parse_args(args), environ={})

    try:
        yield build
    finally:
        flags.close()


@pytest.fixture
def meshes(mesh_config):
    """``start(node_id, key=None, peer_of=None, discovery=False, settings=None, flags=(), **heartbeats)``:
    in-process RunningMeshes (support/running_mesh.py), stopped at the end; ``peer_of`` another
    RunningMesh to dial, ``heartbeats`` its tunables (e.g. ``handshake_timeout``)."""
    from support.running_mesh import RecordingListener, RunningMesh
    running = []

    def start(node_id, key=None, peer_of=None, discovery=False, settings=None, flags=(), **heartbeats):
        extra = ["--name", node_id] + list(flags)
        if key is not None:
            extra += ["--mesh-key", key]
        if peer_of is not None:
            extra += ["--peer", "127.0.0.1:%d" % peer_of.mesh.tcp_port]
        config = mesh_config(discovery=discovery, settings=settings, extra=extra)
        running.append(RunningMesh(config, node_id, RecordingListener(), heartbeats))
        return running[-1]

    yield start
    for mesh in reversed(running):
        mesh.stop()


@pytest.fixture
def fresh_log_once(monkeypatch):
    """Each test sees its own rate-limited log lines."""
    monkeypatch.setattr(neuromesh, "_log_once", neuromesh.LogOnce())
    monkeypatch.setattr(neuromesh, "_VERSION_NOTICES", neuromesh.LogOnce(interval=float("inf")))


# -- the original NeuroMesh's file layout, made by the tests -----------------------------

# What the original program wrote: conversations/local.json for this machine, and
# received/<peer ip>/local.json for each peer; timestamps in nanoseconds or microseconds.
ORIGINAL_LAYOUT_PEERS = {"10.33.241.183": 2, "10.99.100.183": 1, "192.168.25.37": 4, "192.168.25.39": 4}
ORIGINAL_LAYOUT_LOCAL = (75, 69)  # questions, answers in conversations/local.json


def _original_message(index, question, hostname, ip_address):
    nanos = "%09d" % (123456789 * (index + 1) % 10 ** 9)
    fraction = nanos if index % 2 else nanos[:6]  # the original wrote both precisions
    moment = datetime.datetime(2025, 3, 25, 13, 57) + datetime.timedelta(minutes=7 * index)
    return {
        "content": ("question %d from %s" if question else "answer %d, for %s") % (index, hostname),
        "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.") + fraction + "Z",
        "sender": "user" if question else "LLM",
        "message_type": "Question" if question else "Response",
        "host_info": {"hostname": hostname, "ip_address": ip_address, "is_llm_host": not question},
    }


def _original_file(path, messages, hostname, ip_address):
    document = {"id": "local", "messages": messages,
                "host_info": {"hostname": hostname, "ip_address": ip_address, "is_llm_host": False}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")


def make_original_layout(root):
    """Writes a data folder in the original NeuroMesh layout under ``root``; returns ``root``."""
    questions, answers = ORIGINAL_LAYOUT_LOCAL
    local = [_original_message(i, i % 2 == 0 or i >= 2 * answers, "Wasim", "192.168.1.8")
             for i in range(questions + answers)]
    local[0]["content"] = "helllo"
    local[0]["timestamp"] = "2025-03-25T13:56:00.304707400Z"
    _original_file(root / "conversations" / "local.json", local, "Wasim", "192.168.1.8")
    for peer, count in ORIGINAL_LAYOUT_PEERS.items():
        messages = [_original_message(i, i % 2 == 0, "host-" + peer, peer) for i in range(count)]
        _original_file(root / "received" / peer / "local.json", messages, "host-" + peer, peer)
    return root


@pytest.fixture
def original_layout(tmp_path):
    """A folder in the original NeuroMesh layout that the test made itself."""
    return make_original_layout(tmp_path / "original")

###############################################################################
# In-process fixtures: a Router over scripted backends, a stub node, WSGI calls
###############################################################################
#
# These run the web app and the router inside the test process, without sockets.

import io  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402
import uuid  # noqa: E402
from wsgiref.util import setup_testing_defaults  # noqa: E402

import neuromesh  # noqa: E402


@contextlib.contextmanager
def serve_wsgi(app, name):
    """``app`` served on 127.0.0.1 (a port of its own) by a quiet wsgiref server in a daemon thread
    named ``name``: a stand-in host for in-process tests. Yields the server (``server_port``)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class ScriptedBackend(neuromesh.Backend):
    """A Backend whose answer is a script: ``reply`` token by token, or a failure.

    fail: None, "refuse" (refused before the first token, so the router fails over) or
    "midway" (an error after ``fail_after`` tokens, default 1; 0: right after its start). ``gate``: an Event the answer
    waits for before it starts, to hold a slot. ``continues``: a chat ending with the
    assistant's message gets the rest of ``reply`` after that text (as Ollama continues a prefill).
    """

    kind = "scripted"

    def __init__(self, node_name="fake", models=("m1",), reply="Hello from the fake", parallel=1,
                 fail=None, gate=None, node_id=None, fail_after=1, continues=False):
        neuromesh.Backend.__init__(self, "scripted://" + node_name, node_id or uuid.uuid4().hex, node_name,
                                   parallel)
        self.offer, self.reply, self.fail, self.gate = list(models), reply, fail, gate
        self.fail_after, self.continues = fail_after, continues
        self.asked = []  # (model, messages) of every chat
        self.options = []  # options of every chat
        self.started = threading.Event()

    def probe(self):
        return list(self.offer)

    def _stream(self, model, messages, options, cancel):
        self.asked.append((model, messages))
        self.options.append(options)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail == "refuse":
            raise neuromesh._UpstreamRefused("%s refused" % self.node_name)
        yield self._start_event(model)
        text = self.reply
        if self.continues and messages[-1]["role"] == "assistant" and text.startswith(messages[-1]["content"]):
            text = text[len(messages[-1]["content"]):]
        words = re.findall(r"\s*\S+", text)  # each word keeps the space before it
        if self.fail == "midway" and self.fail_after == 0:
            raise neuromesh.LLMError("%s broke before its first word" % self.node_name, partial=True)
        for index, word in enumerate(words):
            yield {"type": "token", "content": word}
            if self.fail == "midway" and index + 1 >= self.fail_after:
                raise neuromesh.LLMError("%s broke mid-answer" % self.node_name, partial=True)
        yield dict(self._start_event(model), type="done", eval_count=len(words), done_reason="stop",
                   tokens_per_second=42.0)


class ScriptedPeerBackend(ScriptedBackend):
    """A scripted backend that stands for a peer's relay (what Router.grants holds)."""

    local = False

    def __init__(self, node_name="peer", models=("m1",), **kwargs):
        ScriptedBackend.__init__(self, node_name, models, **kwargs)
        self.peer = types.SimpleNamespace(node_id=self.node_id, name=node_name, models=list(models),
                                          connected=True, load=None, rtt_ms=1, queue={}, loaded=[],
                                          tokens_per_second=None)
        self.available = True


def scripted_router(local=(), peers=(), **settings):
    """A Router whose backends are the given scripted ones (no Ollama, no network)."""
    config = neuromesh.Config(ollama_url=None, **settings)
    for backend in local:
        backend.refresh()
    router = neuromesh.Router(config, uuid.uuid4().hex, "stub", mesh=None, local=local)
    for backend in peers:
        router.grants[backend.node_id] = backend
    return router


class NoPeers:
    """A mesh with no peer: what the web app asks of a Mesh (peers, linked peers), answered empty."""

    @staticmethod
    def peers():
        return []

    @staticmethod
    def linked_peers():
        return []


class StubNode:
    """The web app's collaborators, real and small: a Store in a temp dir, a scripted Router, an
    EventBus, the room's rules (no teacher), no peers, no model to copy. ``app()`` builds the app
    from them as a Node does; this object stands for what a node says of itself (NodeReport:
    ``health``, ``urls``: this computer only) and what its owner changes (OwnerControls:
    ``rename``, ``pause_sharing``)."""

    started = 1700000000.0

    def __init__(self, tmp_path, router, **settings):
        self.config = neuromesh.Config(data_dir=str(tmp_path), ollama_url=None, **settings)
        self.router = router
        self.store = neuromesh.Store(str(tmp_path / "stub.db"), router.node_id, router.node_name)
        self.events = neuromesh.EventBus()
        self.room = neuromesh.RoomRules(self.store, None)
        self.mesh = NoPeers()
        self.transfers = neuromesh.TransferStats()
        models = neuromesh.ModelStore([])
        self.pulls = neuromesh.ModelPulls(router, models, str(tmp_path / "transfers"), self.transfers, None)
        self.share = neuromesh.ModelShare(models, router, self.config, self.pulls.partials, self.transfers)

    def app(self):
        """The Bottle app of these collaborators, with a chat room and a Gatekeeper of its own."""
        chat = neuromesh.ChatService(self.router, self.store, self.host_info, max_queued=self.config.max_queued)
        return neuromesh.build_app(self.config, self.router, chat, self.store, self.events, self.mesh, self.room,
                                   self, self, self.pulls, self.share, self.transfers, self.started)

    def health(self):
        return {"status": "ok", "node_id": self.router.node_id, "name": self.router.node_name}

    def urls(self):
        return ["http://127.0.0.1/"], []

    def rename(self, name):
        self.router.node_name = name
        return name

    def pause_sharing(self, paused):
        self.router.pause_sharing(paused)
        return paused

    def host_info(self):
        return {"hostname": self.router.node_name, "ip_address": "", "is_llm_host": self.router.has_local_llm}


class WsgiReply:
    """Status, headers and body of one WSGI call."""

    def __init__(self, status, headers, body):
        self.status = int(status.split()[0])
        self.headers = dict(headers)
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.text)

    def lines(self):
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


def as_relay_peer(app, peer_id):
    """``app`` as RelayServer serves it to the peer ``peer_id`` on its TLS relay connection: for
    in-process tests of what the relay does (the connection itself: RelayServer, dial_relay)."""
    def on_relay_connection(environ, start_response):
        environ[neuromesh.RelayServer.PEER_KEY] = peer_id
        return app(environ, start_response)
    return on_relay_connection


def wsgi_call(app, method, path, body=None, headers=None, remote="127.0.0.1", environ=None):
    """Calls the WSGI ``app`` once, as a client at ``remote`` would, and reads the whole reply.
    ``environ`` adds to the request's environ (a relay connection's peer, for one)."""
    environ = dict(environ or {})
    setup_testing_defaults(environ)
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode("utf-8"))
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": remote,
                    "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw)),
                    "CONTENT_TYPE": "application/json"})
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started = {}

    def start_response(status, response_headers, exc_info=None):
        started["status"], started["headers"] = status, response_headers

    result = app(environ, start_response)
    try:
        data = b"".join(part if isinstance(part, bytes) else part.encode("utf-8") for part in result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return WsgiReply(started["status"], started["headers"], data)


@pytest.fixture
def stub_node(tmp_path):
    """A StubNode whose own LLM is one scripted backend offering ``m1``."""
    node = StubNode(tmp_path, scripted_router(local=[ScriptedBackend("stub-llm")]))
    yield node
    node.store.close()


###############################################################################
# Mesh security fixtures: a hand-driven peer link that runs (or skips) the key proof
###############################################################################


def tls_client_context(maximum=None):
    """A client context as a node's: TLS 1.2 at least, the certificate not checked (the key
    proof is bound to it)."""
    context = neuromesh.TLSIdentity._context(ssl.PROTOCOL_TLS_CLIENT, maximum)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RawPeer:
    """A hand-driven link to a node's TCP port (loopback), inside TLS: ``prove()`` runs the key
    proof with ``room_key`` (the open room's by default) and returns the node's HELO; then ``send``
    sends frames as a real peer would. ``sock`` (the TLS socket) is there for raw frame bytes."""

    def __init__(self, port, room_key=None, timeout=5.0):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls_client_context().wrap_socket(raw)
        certificate = hashlib.sha256(self.sock.getpeercert(True)).digest()
        self.handshake = neuromesh.Handshake(room_key or neuromesh.OPEN_ROOM_KEY, True, certificate)
        self.decoder = neuromesh.FrameDecoder(1 << 24)
        self.pending = []

    def next_frame(self):
        """The next frame from the node; ConnectionError when the node closed the link."""
        while not self.pending:
            self.pending += self.decoder.feed(b"")
            if self.pending:
                break
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                raise ConnectionError("the node closed the link")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def prove(self):
        for frame in self.handshake.start():
            self.sock.sendall(frame)
        while not self.handshake.done:
            marker, payload = self.next_frame()
            for frame in self.handshake.receive(marker, payload):
                self.sock.sendall(frame)
        self.decoder.proven = True
        marker, payload = self.next_frame()
        assert marker == neuromesh.HELLO, marker
        return payload

    def send(self, marker, payload):
        self.sock.sendall(neuromesh.encode_frame(marker, payload))

    def closed_by_node(self, timeout=5.0):
        """True when the node closes the link within ``timeout`` (whatever it sent before)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except socket.timeout:
            return False
        except (ConnectionResetError, ssl.SSLError):
            pass
        return True

    def close(self):
        self.sock.close()


class TamperingProxy:
    """A TCP relay on loopback to ``port``, below TLS: it passes bytes both ways as they come,
    until ``tamper`` is set; then the next chunk from the client is sent twice ("replay") or
    with its last bit flipped ("alter"). With ``wrap`` (a function of the two sockets returning
    two others) it can end TLS on both sides, as a machine in the middle would."""

    def __init__(self, port, wrap=None):
        self.target, self.wrap, self.tamper = port, wrap, None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets, self.errors = [], []
        threading.Thread(target=self._accept, name="tampering-proxy", daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self):
        while True:
            try:
                client, _address = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                self.sockets += [client, upstream]
                if self.wrap is not None:
                    client, upstream = self.wrap(client, upstream)
                    self.sockets += [client, upstream]
            except (OSError, ssl.SSLError) as error:
                self.errors.append(error)
                if self.listener.fileno() < 0:
                    return
                continue
            for source, sink, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, from_client), daemon=True).start()

    def _pump(self, source, sink, from_client):
        try:
            source.settimeout(None)
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_client and self.tamper:
                    kind, self.tamper = self.tamper, None
                    data = data + data if kind == "replay" else data[:-1] + bytes([data[-1] ^ 1])
                sink.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            sock.close()


class LinkedPeer:
    """A fake peer on a raw socket, linked to a live node: the key proof done (the open room's
    key unless ``room_key``) and its HELO sent. ``send(marker, payload)``, ``send_many(marker,
    payload, count)``, ``frames(timeout)`` (every frame received so far), ``closed_by_node``."""

    def __init__(self, node, name="raw-peer", node_id=None, hello=None, room_key=None, key=None):
        # Signs its HELO with ``key`` (a new NodeKey by default); a ``node_id`` that is not that
        # key's claims another node's id, which the node must refuse.
        self.key = key or neuromesh.NodeKey.generate()
        self.node_id = node_id or self.key.node_id
        self.node, self.room_key = node, room_key or neuromesh.OPEN_ROOM_KEY
        self.link = RawPeer(node.tcp_port, room_key)
        self.received = [(neuromesh.HELLO, self.link.prove())]
        payload = {"node_id": self.node_id, "name": name, "tcp_port": 1, "http_port": 0,
                   "version": neuromesh.__version__, "protocol_version": neuromesh.PROTOCOL_VERSION,
                   "has_llm": False, "models": []}
        payload.update(hello or {})
        self.send(neuromesh.HELLO, neuromesh.signed_hello(self.key, self.link, payload))

    def send(self, marker, payload):
        self.link.send(marker, payload)

    def send_many(self, marker, payload, count):
        """``count`` copies of one frame in one write."""
        self.link.sock.sendall(neuromesh.encode_frame(marker, payload) * count)

    def frames(self, timeout=0.2):
        """Read what arrives within ``timeout``; returns every frame received so far."""
        self.link.sock.settimeout(timeout)
        try:
            data = self.link.sock.recv(1 << 20)
            if data:
                self.received += self.link.decoder.feed(data)
        except (socket.timeout, BlockingIOError):
            pass
        return self.received

    def closed_by_node(self, timeout=5.0):
        return self.link.closed_by_node(timeout)

    def relay_request(self, method, path, headers=None):
        """One request on a relay connection of this peer's own, as a peer's relay client sends it
        (TLS to the node's mesh port, proven with this peer's key): ``(status, headers, body)``."""
        identity = types.SimpleNamespace(client=tls_client_context())
        sock = neuromesh.dial_relay(identity, self.room_key, self.key, ("127.0.0.1", self.node.tcp_port),
                                    self.node.node_id, 5.0)
        connection = http.client.HTTPConnection("neuromesh-relay", timeout=5.0)
        connection.sock = sock
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def close(self):
        self.link.close()


@pytest.fixture
def raw_peer():
    """``raw_peer(port, room_key=None)``: RawPeer links, closed at the end of the test."""
    made = []

    def connect(port, room_key=None, timeout=5.0):
        made.append(RawPeer(port, room_key, timeout))
        return made[-1]

    yield connect
    for peer in made:
        peer.close()


@pytest.fixture
def linked_peer():
    """``linked_peer(node, **kwargs)``: a LinkedPeer linked to ``node``, closed after the test."""
    made = []

    def make(node, **kwargs):
        made.append(LinkedPeer(node, **kwargs))
        return made[-1]

    yield make
    for peer in made:
        peer.close()

# -- HTTP access: other machines, guests, LAN clients ---------------------------

OTHER_MACHINE = "192.168.1.20"  # only ever an in-process REMOTE_ADDR, never a real connection


@pytest.fixture
def open_node(tmp_path):
    """A StubNode started with --guests and --lan-api."""
    node = StubNode(tmp_path, scripted_router(local=[ScriptedBackend("stub-llm")]), guests=True, lan_api=True)
    yield node
    node.store.close()


def guest_headers(app, node, remote=OTHER_MACHINE):
    """Logs a guest in at ``remote`` with the node's room code; the headers that carry the session."""
    reply = wsgi_call(app, "POST", "/api/guest/login", {"code": neuromesh.guest_code(node.config)}, remote=remote)
    assert reply.status == 200, reply.text
    cookie = reply.headers["Set-Cookie"].split(";")[0]
    return {"Cookie": cookie}


# -- real clients against a node without an LLM, served by a peer --------------------------

API_MODEL = "llama3.2:1b"
API_MODELS = (API_MODEL, "tinyllama", "nomic-embed-text:latest")
THINKER = "qwen3:0.6b"  # the fake thinks aloud for it (capabilities: thinking)
SEER = "llava:7b"  # the fake sees images for it (capabilities: vision)
PIXEL = base64.b64encode(bytes.fromhex(  # a 1x1 PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode("ascii")


class ServedMesh:
    """A host node whose LLM is the fake Ollama, and a node ``plain`` without one that it serves."""

    def __init__(self, fake, host, plain):
        self.fake, self.host, self.plain = fake, host, plain

    def answer(self, text, model=API_MODEL):
        """What the fake answers ``text`` asked alone of ``model``."""
        return self.fake.answer_for([{"role": "user", "content": text}], model)


@contextlib.contextmanager
def serving_mesh(cluster, models=API_MODELS, token_delay=0.02):
    """A ServedMesh of ``cluster`` whose fake Ollama offers ``models``, once the plain node may use them."""
    from support.fake_ollama import FakeOllama
    fake = FakeOllama(models=models, token_delay=token_delay).start()
    try:
        host = cluster.start("host", extra=["--ollama-url", fake.url])
        plain = cluster.start("plain")
        wait_for(lambda: fully_linked([host, plain]), message="mesh")
        wait_for(lambda: {m["name"] for m in plain.json("/api/models")["models"]} >= set(models),
                 timeout=15, message="LLM access granted to the plain node")
        yield ServedMesh(fake, host, plain)
    finally:
        fake.stop()


@pytest.fixture
def served_mesh(cluster):
    with serving_mesh(cluster) as served:
        yield served


@pytest.fixture
def served(cluster):
    """A ServedMesh whose fake offers API_MODEL, THINKER and SEER, with fast tokens."""
    with serving_mesh(cluster, (API_MODEL, THINKER, SEER), token_delay=0.01) as mesh:
        yield mesh


@pytest.fixture
def fakes():
    """Makes fake Ollamas on loopback, stopped at the end: ``fakes(models=(API_MODEL,), token_delay=0.0)``."""
    from support.fake_ollama import FakeOllama
    started = []

    def make(models=(API_MODEL,), token_delay=0.0):
        started.append(FakeOllama(models=models, token_delay=token_delay).start())
        return started[-1]

    yield make
    for fake in started:
        fake.stop()


def pytest_terminal_summary(terminalreporter):
    """Where the browser tests left their screenshots (CI prints the path)."""
    folder = os.path.join(ROOT, "artifacts")
    if os.path.isdir(folder):
        terminalreporter.write_line("screenshots of the browser tests: %s" % folder)


# -- signed origins: keyed stores, hand-signed batches, a data dir of schema 1 ----------


def keyed_store(path=":memory:", name="node"):
    """A Store with its own NodeKey: ``(store, key)``."""
    key = neuromesh.NodeKey.generate()
    return neuromesh.Store(str(path), key.node_id, name, key), key


def catch_up(source, target, max_entries=neuromesh.MAX_FRAME_ENTRIES, rounds=50):
    """Everything the Store ``source`` holds that ``target`` lacks, through the signed sync door,
    in batches of at most ``max_entries``."""
    for _ in range(rounds):
        payload = source.batches.missing(target.version_vector(), max_entries=max_entries)
        if not payload["entries"]:
            return
        target.batches.apply(payload)
    raise AssertionError("no end to the catch-up after %d batches" % rounds)


def signed_run(key, entries, prev=neuromesh.GENESIS, origin=None, head_key=None):
    """A FILE: payload of ``entries`` (one origin's consecutive run) chained from ``prev`` and
    signed by ``key``, which need not be the origin's: forgers use this. ``head_key`` is the
    public key the head names (``key``'s by default)."""
    origin = origin or entries[0]["origin"]
    for entry in entries:
        clean = neuromesh._clean_entry(entry)
        prev = neuromesh.entry_hash(prev, clean, neuromesh.data_text(clean["data"]))
    seq = entries[-1]["seq"]
    head = {"seq": seq, "hash": prev.hex(), "sig": key.sign(neuromesh.head_message(origin, seq, prev)).hex(),
            "key": (head_key or key.public).hex()}
    return {"entries": entries, "heads": {origin: head}, "more": False}


def make_entry(origin, seq, conversation_id, kind="message", **data):
    """An entry as a node writes it: a message (``content``) or a conversation snapshot."""
    if kind == "message":
        body = {"role": "user", "content": data.get("content", "hi"), "sender": "s",
                "host_info": {"hostname": "h", "ip_address": "", "is_llm_host": False}}
    else:
        body = {"title": data.get("title", "t"), "private": False, "deleted": data.get("deleted", False),
                "created_at": "2026-11-25T12:00:00.000000Z", "origin_name": "x", "peer_label": None}
    return {"origin": origin, "seq": seq, "kind": kind, "conversation_id": conversation_id,
            "timestamp": "2026-11-25T12:00:%02d.000000Z" % (seq % 60), "uid": "%s:%d" % (origin, seq),
            "data": body}


def write_schema1_data_dir(data_dir, conversations=2, messages=3):
    """A data dir as the version before node keys left it: a random ``node_id`` file and a
    schema-1 database (its shipped script) holding that node's conversations. Returns
    ``(old node id, {conversation id: [contents]})``."""
    import sqlite3
    os.makedirs(str(data_dir), exist_ok=True)
    old_id = uuid.uuid4().hex
    with open(os.path.join(str(data_dir), neuromesh.NODE_ID_FILE), "w") as handle:
        handle.write(old_id + "\n")
    db = sqlite3.connect(os.path.join(str(data_dir), neuromesh.DATABASE_FILE), isolation_level=None)
    db.executescript("BEGIN;\n%s\nPRAGMA user_version = 1;\nCOMMIT;" % neuromesh.Database._MIGRATIONS[0])
    db.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (old_id,))
    seq, written = 0, {}
    for number in range(conversations):
        cid = str(uuid.uuid4())
        entries = [make_entry(old_id, seq + 1, cid, "conversation", title="old chat %d" % number)]
        entries += [make_entry(old_id, seq + 2 + index, cid, content="old %d.%d" % (number, index))
                    for index in range(messages)]
        seq += len(entries)
        for entry in entries:
            db.execute("INSERT INTO entries (origin, seq, uid, kind, conversation_id, timestamp, data)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", (entry["origin"], entry["seq"], entry["uid"], entry["kind"],
                                                        cid, entry["timestamp"], json.dumps(entry["data"])))
        db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, 0, 0, ?, 'old', NULL, ?)",
                   (cid, old_id, old_id, entries[0]["seq"], "old chat %d" % number,
                    entries[0]["data"]["created_at"], entries[-1]["timestamp"]))
        written[cid] = [entry["data"]["content"] for entry in entries[1:]]
    db.execute("INSERT INTO origins (origin, contiguous) VALUES (?, ?)", (old_id, seq))
    db.close()
    return old_id, written


class Keyring(dict):
    """Node keys for test labels, since a node id is now the hash of a key: ``KEYS.id("node-a")``
    is that label's node id (its key made on first use), ``KEYS[label]`` its NodeKey, and
    ``KEYS.label_of(node_id)`` the label back (the id itself when it has none)."""

    def __missing__(self, label):
        self[label] = neuromesh.NodeKey.generate()
        return self[label]

    def id(self, label):
        return self[label].node_id

    def label_of(self, node_id):
        return next((label for label, key in list(self.items()) if key.node_id == node_id), node_id)


KEYS = Keyring()


# -- fan-out and bounded links -----------------------------------------------------------------


@pytest.fixture
def sync_network(tmp_path):
    """A SyncNetwork (tests/support/mesh_simulation.py): real Stores and SyncWorkers on simulated links."""
    from support.mesh_simulation import SyncNetwork
    network = SyncNetwork(tmp_path)
    try:
        yield network
    finally:
        network.close()


HUNDRED_DEGREE = 8  # well under 100: every node must choose its links


@pytest.fixture
def hundred_nodes(cluster):
    """100 node processes on loopback with --max-links 8, one of them an LLM host (the fake
    Ollama): ``(nodes, host, degree)`` once every node holds a few links."""
    from concurrent.futures import ThreadPoolExecutor
    from support.fake_ollama import FakeOllama
    fake = FakeOllama(models=(API_MODEL,)).start()
    settings = {"announce_interval": "3", "peer_timeout": "20", "sync_interval": "5"}
    base = cluster.node_args(True, settings, ["--max-links", str(HUNDRED_DEGREE)])
    base[base.index("debug")] = "warning"  # 100 debug logs would cost more than the mesh
    nodes = [NodeProcess(cluster.tmp_path / ("n%d" % index), base + (["--ollama-url", fake.url] if index == 0 else []),
                         "n%d" % index) for index in range(100)]
    cluster.nodes.extend(nodes)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda node: node.start(timeout=120), nodes))  # 100 imports share 2 cores
        running = time.monotonic()
        wait_for(lambda: all(node.json("/api/health", timeout=30)["peer_count"] >= 3 for node in nodes),
                 timeout=120, interval=1.0, message="every node linked")
        print("100 processes running in %.1f s, each with 3 links or more %.1f s later"
              % (running - started, time.monotonic() - running))
        yield nodes, nodes[0], HUNDRED_DEGREE
    finally:
        for node in nodes:  # all at once: one by one, 100 graceful stops take minutes
            if node.alive:
                node.process.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.stop(timeout=15)
            except subprocess.TimeoutExpired:  # a loaded machine: the test's assertions are done
                node.kill()
        fake.stop()


class RecordingMesh:
    """A mesh that only records what a SyncWorker sends: (peer id or None, marker, payload)."""

    def __init__(self):
        self.sent = []
        self.handlers = {}  # marker -> handler, as the worker registered it
        self.listeners = []  # what hears of peers, as it registered with a Mesh

    def handle(self, marker, handler):
        self.handlers[marker] = handler

    def watch(self, listener):
        self.listeners.append(listener)

    def send(self, peer_id, marker, payload):
        self.sent.append((peer_id, marker, payload))

    def broadcast(self, marker, payload, exclude=None):
        self.sent.append((None, marker, payload))

    def forward(self, marker, payload, sender, spread, holders=()):
        self.sent.append((None, marker, payload))


def drain(inbox):
    """The events waiting in an EventBus subscriber's inbox, taken out."""
    events = []
    while True:
        try:
            events.append(inbox.get_nowait())
        except queue.Empty:
            return events


# -- a peer's relay as a node serves it: TLS to its mesh port, proven as links are ---------------


class _RelayKeys:
    """One TLS identity and two node keys for every TLSRelay of a run (making them costs time)."""

    _made = None

    @classmethod
    def get(cls):
        if cls._made is None:
            import tempfile
            identity = neuromesh.TLSIdentity.load_or_create(tempfile.mkdtemp(prefix="neuromesh-relay-tls-"))
            cls._made = (identity, neuromesh.NodeKey.generate(), neuromesh.NodeKey.generate())
        return cls._made


class SocketStream(io.RawIOBase):
    """A blocking TLS socket as RelayServer serves a relay connection (``readinto``, ``sendall``,
    ``close``, ``sock``), as TLSStream is off the mesh loop."""

    def __init__(self, sock):
        io.RawIOBase.__init__(self)
        self.sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.sock.recv_into(buffer)

    def sendall(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()
        io.RawIOBase.close(self)


class TLSRelay:
    """A host's relay on 127.0.0.1 as its mesh port takes a relay connection (the other end of
    neuromesh.dial_relay: TLS, the key proof, both HELOs, RELY:); each connection then goes to
    ``handle(sock)`` on a thread of its own, or with ``app`` to RelayServer serving that WSGI app.
    ``node_id`` is the host's, ``client_id`` the asking node's (give it the relay token);
    ``peer_backend(peer, token)`` is a PeerBackend of the asking node that dials here.
    ``connections`` counts the connections proven."""

    def __init__(self, handle=None, app=None):
        self.identity, self.key, self.client_key = _RelayKeys.get()
        self.node_id, self.client_id = self.key.node_id, self.client_key.node_id
        self.handle = handle or self._serve_app
        self.relay_server = neuromesh.RelayServer(app, RecordingMesh()) if app is not None else None
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="test-tls-relay", daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _address = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="test-tls-relay-conn", daemon=True).start()

    def _serve_app(self, sock):
        self.relay_server.relay_connection(SocketStream(sock), self.client_id, "127.0.0.1")

    def _serve(self, sock):
        try:
            sock.settimeout(5)
            sock = self.identity.server.wrap_socket(sock, server_side=True)
            link = neuromesh.BlockingLink(sock, neuromesh.Handshake(
                neuromesh.OPEN_ROOM_KEY, False, hashlib.sha256(self.identity.certificate).digest()))
            link.prove()
            hello = neuromesh.signed_hello(self.key, link, {"node_id": self.node_id, "tcp_port": 0})
            sock.sendall(neuromesh.encode_frame(neuromesh.HELLO, hello))
            link.hello()
            sock.sendall(neuromesh.encode_frame(neuromesh.RELAY_READY, {}))
            sock.settimeout(None)
        except (OSError, neuromesh.ProtocolError):
            sock.close()
            return
        self.connections += 1
        self.handle(sock)

    def dial(self, timeout):
        return relay_dial(self.port, self.node_id)(timeout)

    def peer_backend(self, peer, token, **kwargs):
        return neuromesh.PeerBackend(peer, {"llm_host": "127.0.0.1", "llm_port": self.port, "token": token},
                                     self.dial, **kwargs)

    def close(self):
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def relay_dial(port, node_id):
    """``dial(timeout)``: a relay connection to the host ``node_id`` at 127.0.0.1:``port``, as
    Mesh.dial_relay makes one (the asking node's key is TLSRelay's ``client_id``)."""
    _identity, _host_key, client_key = _RelayKeys.get()
    context = types.SimpleNamespace(client=tls_client_context())
    return lambda timeout: neuromesh.dial_relay(context, neuromesh.OPEN_ROOM_KEY, client_key,
                                                ("127.0.0.1", port), node_id, timeout)
