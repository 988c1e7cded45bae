#!/usr/bin/env python3
"""NeuroMesh: share the local LLMs of a classroom or an air-gapped lab, with nothing to configure.

Run ``python3 neuromesh.py`` on every machine of a room. Nodes find each other by UDP
broadcast, link over framed TCP, tell each other who has an LLM (Ollama or an
OpenAI-compatible server), keep conversations synced, and serve a chat page in the browser.

One module, synchronous and threaded, standard library plus a few small pure-Python
packages (``requests``, ``bottle``, ``ifaddr``, ``waitress``, ``ecdsa``) that ``install.sh``
puts into ``_vendor/`` beside this file. Runs on Python 3.9 and newer.

The rooms of this file, foundations first (each section a room)::

    helpers, config, identity       Config; NodeKey (Ed25519; the node id is its key's hash);
                                    TLSIdentity (the certificate every link runs under)
    wire                            frames (marker + u64 LE length + JSON), Handshake (room code and
                                    signed HELO, bound to the link's TLS certificate), schemas
    store                           Database -> EntryLog (per-origin logs; SyncReads) -> LogChain,
                                    BatchVerifier (hash chains, signed heads), SignedBatches -> Store
                                    (+ StorePages: search, pages; LocalWrites, MessageReads,
                                    GuestOwners, RoomRecords)
    seed files                      SeedFiles: the original NeuroMesh's JSON layout
    discovery                       Discovery (UDP announcements)
    peer links                      TLSChannel, TLSStream (relay connections on the mesh port); Peer,
                                    PeerTable, DialPlan, LinkPolicy; LinkIO (sockets);
                                    Heartbeats, Dialer, PeerExchange, LinkAdmission (HELO); Mesh (frames;
                                    MeshListeners: the rooms that hear of peers, each registered)
    events, sync                    EventBus (SSE), SyncWorker (SYNC/FILE, push)
    llm                             Backend: Ollama/OpenAI/PeerBackend (relay client: RelayConnections,
                                    RelayConnection); Slots (fair queues), Placement; IssuedTokens,
                                    LLMAccess (asking peers for LLM access), Router;
                                    MeshCalls (any request kind, passed on as it is)
    model transfer                  ModelStore (Ollama's store, read-only), BlobFetch, ModelPull
    chat                            ChatService: ask, regenerate, history, store answers
    http apis                       Gatekeeper (who may ask), PageApi, OllamaApi, OpenAIApi, RelayApi,
                                    OllamaChats (Anthropic's and OpenAI's Responses APIs), ErrorReplies;
                                    the teacher's room (RoomBundle, RoomApi), ModelRelayApi,
                                    ModelPageApi, RelayServer (peers' relay connections); QueueReport
                                    (health's queues, /metrics); HTTPServer
    node, cli                       LocalLLM (this computer's LLM, told truly); LLMNews, PeerNews (what
                                    peers and pages hear); RuntimeFile, OwnerControls (name, sharing),
                                    NodeReport (health, URLs), Housekeeping; Node builds the rooms,
                                    starts and stops them; Doctor, status, firewall steps per OS; main()

Contents (the section banners, in order): Imports and the _vendor shim; Constants; Exceptions;
Utilities; Configuration; Identity and signatures; Wire protocol; Store; Seed files; Discovery;
Peer links; Events; Sync; LLM backends and routing; Any request kind, passed on as it is;
Routing: which LLM answers, fairly, with failover; Model transfer; Chat; HTTP APIs; Who is asking:
the access model; The API units; Anthropic's Messages and OpenAI's Responses APIs; The teacher's
room; Queues on view: health and metrics; Node; Firewall, doctor and status; CLI.

Run as one file (``install.sh --bundle``: a .pyz, or its folder), the runtime packages sit beside
this module and the page is read from inside the archive (ArchivedFiles).

A chat: PageApi.post_message -> ChatService.add_question -> Store.add_message ->
ChatService.answer -> ChatService.stream -> Router.chat -> Backend.chat (a PeerBackend
crosses to the host's RelayApi) -> token events -> PageApi streams SSE ->
ChatService._store_answer -> Store.add_message -> LocalWrites.run -> SyncWorker.local_written ->
SyncWorker.push (-> Mesh.broadcast), then publish_entries -> EventBus.

A synced message: LinkIO reads a frame (TLSChannel decrypts) -> FrameDecoder -> Mesh.link_frame
(check_frame) -> Mesh._pass_on -> SyncWorker.handle_file (registered with Mesh.handle) ->
SyncWorker._apply -> SignedBatches.apply: the batch verified (chain, one signature per origin) and
stored -> Mesh.forward, publish_entries -> EventBus -> the page's SSE. Node is in neither path.
"""

__version__ = "0.4.1"
__license__ = "MIT"

PROTOCOL_VERSION = 4  # 2: the key proof (HI!!:, AUTH:) and sealed frames; 3: node keys, signed logs; 4: TLS

###############################################################################
# Imports and the _vendor shim ################################################
###############################################################################

import argparse
import base64
import collections
import dataclasses
import difflib
import errno
import functools
import ipaddress
import itertools
import hashlib
import hmac
import http.client
import importlib
import io
import json
import logging
import mimetypes
import os
import queue
import random
import re
import secrets
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types
import unicodedata
import uuid
import webbrowser
import zipfile
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR_DIR = os.path.join(HERE, "_vendor")
# Run as one file (neuromesh-<version>.pyz), HERE is the archive itself; the bundle, as a file or as
# its folder, holds the runtime packages beside this module instead of in _vendor/.
ARCHIVE = HERE if os.path.isfile(HERE) else None
BUNDLED = ARCHIVE is not None or os.path.isfile(os.path.join(HERE, "__main__.py"))
if BUNDLED:
    sys.dont_write_bytecode = True  # a bundle writes nothing beside itself: no __pycache__
_DEPENDENCY_DIR = HERE if BUNDLED else VENDOR_DIR
# How a user runs this program again, for the commands messages suggest: stock Debian and Ubuntu
# have no `python`, and a bundle is run by its own name.
PROGRAM = os.path.basename(HERE) if BUNDLED else "neuromesh.py"
RUN = ("py -3 " if os.name == "nt" else "python3 ") + PROGRAM  # as the README says
if (BUNDLED or os.path.isdir(VENDOR_DIR)) and _DEPENDENCY_DIR not in sys.path:
    sys.path.insert(0, _DEPENDENCY_DIR)

try:
    import bottle
    import ifaddr
    import requests
    import waitress.server
    from ecdsa import NIST256p, BadSignatureError, Ed25519, SigningKey, VerifyingKey
    from waitress import wasyncore
except ImportError as _missing:  # pragma: no cover - exercised by hand on a bare machine
    _fix = ".\\install.ps1" if os.name == "nt" else "./install.sh"
    raise SystemExit(
        "NeuroMesh needs the package %r, which is not installed.\n"
        "Fix: run `%s` in %s first: it puts the pinned bottle, requests, ifaddr, waitress and ecdsa\n"
        "into _vendor/ there, and changes nothing else on this computer."
        % (_missing.name, _fix, HERE)
    )

log = logging.getLogger("neuromesh")

###############################################################################
# Constants ###################################################################
###############################################################################

MiB = 1024 * 1024
DEFAULTS = {
    "name": None,
    "data_dir": os.path.join("~", ".neuromesh"),
    "host": "0.0.0.0",
    "http_port": 8080,
    "tcp_port": 7878,
    "udp_port": 5000,
    "broadcast": [],
    "no_discovery": False,
    "peer": [],
    "announce_interval": 30.0,
    "peer_timeout": 60.0,
    "sync_interval": 30.0,
    "max_message_size": 50 * MiB,
    "no_browser": False,
    "log_level": "info",
    "ollama_url": "http://127.0.0.1:11434",
    "openai_url": None,
    "model": None,
    "no_share_llm": False,
    "llm_parallel": 1,
    "lan_api": False,
    "mesh_key": None,
    "allow_public": False,
    "guests": False,
    "chat_rate": 100,
    "max_queued": 64,
    "max_requests_per_address": 32,
    "http_idle_timeout": 30.0,
    "http_request_deadline": 20.0,
    "max_connections_per_address": 128,
    "share_slots": None,
    "requester_weight": {},
    "max_links": 24,
    "teacher": None,
    "transfer_rate": 10 * MiB,
}
STATIC_DIR = os.path.join(HERE, "neuromesh_static")
RUNTIME_FILE = "runtime.json"
NAME_FILE = "name.txt"  # the name the owner gave this node from the page
SHARING_FILE = "sharing_paused"  # there while the owner paused sharing from the page
DATABASE_FILE = "neuromesh.db"
NODE_ID_FILE = "node_id"   # the random id of versions before node keys

###############################################################################
# Exceptions ##################################################################
###############################################################################


class NeuroMeshError(Exception):
    """Base of every error NeuroMesh raises on purpose; its text is meant for the user."""


class ConfigError(NeuroMeshError):
    """A setting is missing or malformed."""


class PortInUseError(NeuroMeshError):
    """A port NeuroMesh must listen on is taken."""


class ProtocolError(NeuroMeshError):
    """A peer sent something that is not NeuroMesh's wire protocol."""


###############################################################################
# Utilities ###################################################################
###############################################################################


def utc_now():
    """The current UTC time as ISO 8601 with microseconds and a trailing Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def safe_text(value, limit=200):
    """Text from the network, made safe to put in one log line."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape", "replace").decode("ascii", "replace")
    return text if len(text) <= limit else text[:limit] + "..."


def memory_rss_bytes():
    """Resident memory of this process, or None where the platform does not say."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def local_ipv4_interfaces():
    """Every IPv4 address of this machine as ``(interface, ip, prefix_length)``, loopback too."""
    found = []
    for adapter in ifaddr.get_adapters():
        for address in adapter.ips:
            if isinstance(address.ip, str):
                found.append((adapter.nice_name, address.ip, address.network_prefix))
    return found


def directed_broadcast(ip, prefix_length):
    """The directed broadcast address of ``ip/prefix_length`` (10.1.2.3/24 -> 10.1.2.255)."""
    (value,) = struct.unpack("!I", socket.inet_aton(ip))
    host_bits = (1 << (32 - prefix_length)) - 1
    return socket.inet_ntoa(struct.pack("!I", value | host_bits))


def default_broadcast_addresses():
    """Directed broadcast addresses of the up, non-loopback IPv4 interfaces."""
    addresses = []
    for _name, ip, prefix in local_ipv4_interfaces():
        if ip.startswith("127.") or prefix >= 31:
            continue
        address = directed_broadcast(ip, prefix)
        if address not in addresses:
            addresses.append(address)
    return addresses


PRIVATE_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",
    "::1/128", "fc00::/7", "fe80::/10"))


def is_private_address(address):
    """True for an IP literal of a private network: RFC 1918, loopback, link-local, CGNAT
    100.64.0.0/10, IPv6 ULA and link-local (an IPv4-mapped IPv6 address counts as its IPv4)."""
    if not isinstance(address, str):
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in PRIVATE_NETWORKS)


def count_down(counts, key):
    """One less of ``key`` in the dict ``counts``; the key goes at zero, so idle keys cost nothing."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def lan_addresses():
    """This machine's non-loopback IPv4 addresses, for the URLs printed at start."""
    return [ip for _n, ip, _p in local_ipv4_interfaces() if not ip.startswith(("127.", "169.254."))]


def close_quietly(sock):
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        pass


class LogOnce:
    """Logs a message once per ``interval`` for each key (e.g. a peer's address and the kind
    of error); the repeats in between are counted and told with the next one that is logged.
    Thread-safe; it keeps at most ``max_keys`` keys, so a flood of keys cannot grow it.
    """

    def __init__(self, interval=60.0, max_keys=1024):
        self.interval = interval
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._next = {}  # key -> monotonic time when it may be logged again
        self._suppressed = collections.Counter()

    def log(self, level, key, message, *args):
        """Log ``message % args`` at ``level`` unless ``key`` was logged within the interval."""
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._suppressed[key] += 1
                return False
            if len(self._next) >= self.max_keys:
                self._next = {k: t for k, t in self._next.items() if t > now}
                if len(self._next) >= self.max_keys:
                    self._next.clear()
            self._next[key] = now + self.interval
            repeats = self._suppressed.pop(key, 0)
        if repeats:
            message += " (and %d more like it since the last such line)" % repeats
        log.log(level, message, *args)
        return True


_log_once = LogOnce()


def log_limited(level, key, message, *args):
    """``log.log(level, message, *args)``, at most once a minute per ``key`` (see LogOnce)."""
    return _log_once.log(level, key, message, *args)


MAX_JSON_DEPTH = 64  # HTTP bodies and datagrams; JSON schemas of tool calls nest far less
MAX_DATAGRAM_JSON = 65536


class JSONInputError(ValueError):
    """Text from the network that is not acceptable JSON: too big, not UTF-8, malformed or too deep."""


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_INNERMOST_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


def json_deeper_than(data, max_depth):
    """Whether the JSON text ``data`` (bytes) nests lists and objects deeper than ``max_depth``.

    Told before parsing, at C speed: a deep parse would touch a worker thread's stack for good.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    skeleton = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        skeleton, removed = _INNERMOST_PAIR.subn(b"", skeleton)
        if not skeleton or not removed:
            return False  # flat enough, or unbalanced: then the parser says what is wrong
    return bool(skeleton)


def parse_json(data, what="JSON", max_bytes=None, max_depth=None):
    """``data`` (bytes or str from the network) parsed as JSON, at most ``max_bytes`` long and,
    when ``max_depth`` is given, nesting at most that deep (checked before parsing).

    Every failure is one JSONInputError (a ValueError) naming ``what``: oversize, bad UTF-8,
    malformed JSON, and nesting so deep that the parser would raise RecursionError."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    elif not isinstance(data, (bytes, bytearray)):
        raise JSONInputError("%s is not text" % what)
    if max_bytes is not None and len(data) > max_bytes:
        raise JSONInputError("%s is %d bytes, over the limit of %d" % (what, len(data), max_bytes))
    if max_depth is not None and json_deeper_than(bytes(data), max_depth):
        raise JSONInputError("%s nests lists or objects deeper than %d levels" % (what, max_depth))
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise JSONInputError("%s is not UTF-8" % what) from None
    except RecursionError:
        raise JSONInputError("%s nests lists or objects too deeply" % what) from None
    except ValueError as exc:
        raise JSONInputError("%s is not valid JSON: %s" % (what, exc)) from None


###############################################################################
# Configuration ###############################################################
###############################################################################


def parse_size(text):
    """Bytes from ``1048576``, ``512k``, ``50M``, ``50MiB`` or ``1G``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ValueError("not a size: %r (use bytes, or a number with k, M or G)" % (text,))
    return int(match.group(1)) * {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}[match.group(2).lower()]


def parse_count(text):
    """A whole number of at least 1, such as a queue length or a rate."""
    return max(1, int(text))


def parse_seconds(text):
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number of seconds, got %r" % (text,))
    return value


def parse_port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("not a port number: %r" % (text,))
    return value


def parse_host_port(text):
    """``HOST:PORT`` (or ``[v6]:PORT``) to ``(host, port)``; the port defaults to 7878."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        host, port = text, str(DEFAULTS["tcp_port"])
    host = host.strip("[]")
    if not host:
        raise ValueError("not HOST:PORT: %r" % (text,))
    return host, parse_port(port)


def parse_bool(text):
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a yes/no value: %r" % (text,))


def parse_tls_max(text):
    text = str(text).strip()
    if text not in ("1.2", "1.3"):
        raise ValueError("write 1.2 or 1.3")
    return text


def parse_mesh_key(text):
    """A room code, trimmed; its text never goes into an error message."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the room code is empty")
    return text.strip()


def parse_fingerprint(text):
    """A teacher's key fingerprint as `neuromesh.py teacher` prints it: 32 hex digits."""
    text = str(text or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise ValueError("a teacher fingerprint is 32 hex digits")
    return text


def _string_list(value):
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return [item.strip() for item in str(value).split(",") if item.strip()]


def parse_requester_weights(value):
    """``NODE_OR_TAG=WEIGHT`` items (a list, comma-separated text, or a JSON object) to a dict."""
    pairs = value.items() if isinstance(value, dict) else [item.rpartition("=")[::2] for item in _string_list(value)]
    weights = {}
    for name, weight in pairs:
        name = str(name).strip()
        if not name:
            raise ValueError("write each weight as NODE_OR_TAG=WEIGHT, e.g. 3f2a9c01=3 or owner=2")
        try:
            number = float(weight)
        except (TypeError, ValueError):
            raise ValueError("the weight of %r is not a number: %r" % (name, weight))
        if not 0.01 <= number <= 100:
            raise ValueError("the weight of %r must be from 0.01 to 100, not %r" % (name, weight))
        weights[name] = number
    return weights


# Each setting: (converter, help). The flag is --name-with-dashes, the env var NEUROMESH_NAME.
SETTINGS = {
    "name": (str, "display name of this node (default: NeuroMesh-xxxx from the node id)"),
    "data_dir": (str, "where the node id and the database live (default: ~/.neuromesh)"),
    "host": (str, "address to bind the HTTP and TCP listeners to (default: 0.0.0.0)"),
    "http_port": (parse_port, "port of the chat page and the HTTP API (default: 8080)"),
    "tcp_port": (parse_port, "port of the peer links (default: 7878)"),
    "udp_port": (parse_port, "port of the discovery broadcasts (default: 5000)"),
    "broadcast": (_string_list, "broadcast address to announce to; repeatable (default: every "
                                "up, non-loopback IPv4 interface's directed broadcast)"),
    "no_discovery": (parse_bool, "do not broadcast or listen for announcements"),
    "peer": (_string_list, "HOST:PORT of a peer to link to; repeatable (for networks that block "
                           "broadcast: one peer is enough, peer exchange finds the rest)"),
    "announce_interval": (parse_seconds, "seconds between discovery broadcasts (default: 30)"),
    "peer_timeout": (parse_seconds, "seconds of silence before a peer counts as down (default: 60)"),
    "sync_interval": (parse_seconds, "seconds between conversation sync rounds (default: 30)"),
    "max_message_size": (parse_size, "largest frame accepted from a peer (default: 50MiB)"),
    "no_browser": (parse_bool, "do not open the chat page in a browser at start"),
    "log_level": (str, "debug, info, warning or error (default: info)"),
    "ollama_url": (str, "this machine's Ollama; `none` for no Ollama (default: OLLAMA_HOST, "
                        "else http://127.0.0.1:11434)"),
    "openai_url": (str, "an OpenAI-compatible server on this machine (llama.cpp, LM Studio, vLLM), "
                        "e.g. http://127.0.0.1:8000"),
    "model": (str, "the preferred model for chats (default: the first one found)"),
    "no_share_llm": (parse_bool, "keep this machine's LLM to itself (peers cannot use it)"),
    "llm_parallel": (parse_count, "chats one LLM answers at once; the rest queue (default: 1)"),
    "lan_api": (parse_bool, "let other machines of the private network use this node's Ollama and "
                            "OpenAI API (default: this computer only)"),
    "mesh_key": (parse_mesh_key, "room code: only nodes with the same code link and "
                 "learn anything (default: an open room); prefer NEUROMESH_MESH_KEY or the config file, "
                 "as flags show in `ps`"),
    "tls_max": (parse_tls_max, "newest TLS version of peer links: 1.2 or 1.3 (default: the newest this "
                               "Python has; links use at least 1.2)"),
    "allow_public": (parse_bool, "accept peers and announcements from public (non-private) addresses"),
    "guests": (parse_bool, "let browser-only devices of the room (phones, Chromebooks) use the chat page "
                           "after they enter this node's guest code (default: this computer only)"),
    "chat_rate": (parse_count, "chats a minute one guest, LAN client or peer's user may start; a peer node "
                               "32 times that (default: 100)"),
    "max_queued": (parse_count, "chats that may wait for an LLM on this node; more get 503 (default: 64)"),
    "max_requests_per_address": (parse_count, "HTTP requests one other machine may have in progress at "
                                              "once (default: 32)"),
    "http_idle_timeout": (parse_seconds, "seconds before an idle HTTP connection is closed (default: 30)"),
    "http_request_deadline": (parse_seconds, "seconds a client has to send a whole HTTP request, headers "
                                             "and body; a never-finished one is closed (default: 20)"),
    "max_connections_per_address": (parse_count, "HTTP connections one other machine may hold open; more "
                                                 "are closed at once, and this computer always finds room "
                                                 "(default: 128)"),
    "max_links": (parse_count, "peer links this node keeps at most, besides one to each LLM host; a bigger "
                               "room is linked by a random, well-connected subset (default: 24, at least 4)"),
    "teacher": (parse_fingerprint, "the room's teacher: the fingerprint the `teacher` command shows; only that "
                                   "key's room policy is obeyed (default: no teacher, no one's policy)"),
    "openai_key": (str, "API key of the --openai-url server(s) (default: NEUROMESH_OPENAI_KEY, else "
                        "OPENAI_API_KEY); prefer the environment, as flags show in `ps`"),
    "share_slots": (parse_count, "at most this many of this machine's LLM slots (--llm-parallel) answer "
                                 "other people's chats at once, so its owner always finds one free "
                                 "(default: all)"),
    "transfer_rate": (parse_size, "bytes a second this machine serves models to the room's other computers "
                                  "while it answers a chat, so chats stay quick (default: 10MiB)"),
    "requester_weight": (parse_requester_weights, "NODE_OR_TAG=WEIGHT: a bigger share of this machine's LLM "
                                                  "queue for a node (its id, 8+ characters) or a tag (owner, "
                                                  "guest-..., lan:ADDRESS); repeatable (default: 1 each)"),
}
LIST_SETTINGS = ("broadcast", "peer", "requester_weight")
FLAG_SETTINGS = ("no_discovery", "no_browser", "no_share_llm", "lan_api", "allow_public", "guests")
URL_SETTINGS = ("ollama_url", "openai_url")  # repeatable (or comma-separated): several backends per node


@dataclasses.dataclass
class Config:
    """Every setting of a node, after defaults, config file, environment and flags are merged."""

    name: str = None
    data_dir: str = DEFAULTS["data_dir"]
    host: str = DEFAULTS["host"]
    http_port: int = DEFAULTS["http_port"]
    tcp_port: int = DEFAULTS["tcp_port"]
    udp_port: int = DEFAULTS["udp_port"]
    broadcast: list = dataclasses.field(default_factory=list)
    no_discovery: bool = False
    peer: list = dataclasses.field(default_factory=list)
    announce_interval: float = DEFAULTS["announce_interval"]
    peer_timeout: float = DEFAULTS["peer_timeout"]
    sync_interval: float = DEFAULTS["sync_interval"]
    max_message_size: int = DEFAULTS["max_message_size"]
    no_browser: bool = False
    log_level: str = DEFAULTS["log_level"]
    ollama_url: str = DEFAULTS["ollama_url"]
    openai_url: str = None
    model: str = None
    no_share_llm: bool = False
    llm_parallel: int = 1
    lan_api: bool = False
    mesh_key: str = dataclasses.field(default=None, repr=False)  # the room code: never shown
    tls_max: str = None
    allow_public: bool = False
    guests: bool = False
    chat_rate: int = DEFAULTS["chat_rate"]
    max_queued: int = DEFAULTS["max_queued"]
    max_requests_per_address: int = DEFAULTS["max_requests_per_address"]
    http_idle_timeout: float = DEFAULTS["http_idle_timeout"]
    http_request_deadline: float = DEFAULTS["http_request_deadline"]
    max_connections_per_address: int = DEFAULTS["max_connections_per_address"]
    max_links: int = DEFAULTS["max_links"]
    openai_key: str = dataclasses.field(default=None, repr=False)
    share_slots: int = None
    requester_weight: dict = dataclasses.field(default_factory=dict)
    teacher: str = None
    transfer_rate: int = DEFAULTS["transfer_rate"]

    @property
    def static_peers(self):
        return [parse_host_port(item) for item in self.peer]


def build_arg_parser():
    epilog_lines = ["environment variables (between the config file and the flags):"]
    epilog_lines += ["  NEUROMESH_%s" % key.upper() for key in SETTINGS]
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        usage=RUN + " [run | teacher | doctor | status | pull MODEL | firewall | export DIR | import DIR] [options]",
        description="Share the local LLMs of a room: run it on every machine.\n\ncommands:\n" + "\n".join(
            textwrap.fill(" ".join(text.split("\n\n")[0].split()), 96, initial_indent="  %-12s " % name,
                          subsequent_indent=" " * 15) for name, text in COMMAND_HELP.items())
        + "\n\n`%s COMMAND --help` explains a command." % RUN,
        epilog="\n".join(epilog_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON file of settings (keys like http_port)")
    for key, (converter, help_text) in SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        if key in FLAG_SETTINGS:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        elif key in URL_SETTINGS:
            parser.add_argument(flag, action="append", default=None, metavar="URL", help=help_text)
        elif key in LIST_SETTINGS:
            parser.add_argument(flag, action="append", default=None, help=help_text,
                                metavar={"broadcast": "ADDR", "peer": "HOST:PORT"}.get(key, "NODE_OR_TAG=W"))
        else:
            parser.add_argument(flag, default=None, help=help_text)
    parser.add_argument("--version", action="store_true", help="print versions and where packages load from")
    parser.add_argument("--uninstall", action="store_true", help="firewall: remove NeuroMesh's rules")
    parser.add_argument("--yes", action="store_true", help="firewall: apply the commands without asking")
    parser.add_argument("--dry-run", action="store_true", help="firewall: only print the commands")
    parser.add_argument("command", nargs="?", choices=tuple(COMMAND_HELP), default="run",
                        help=argparse.SUPPRESS)
    parser.add_argument("directory", nargs="?", help=argparse.SUPPRESS)
    return parser


COMMAND_HELP = {
    "run": "start this node (the default): the chat page, the mesh, the APIs.\n\n"
           "  " + RUN + " [options]",
    "export": "write this node's conversations to DIR, in the original NeuroMesh file layout.\n\n"
              "  " + RUN + " export DIR [--data-dir DATA_DIR]\n\n"
              "DIR/conversations/local.json holds this node's own conversations, DIR/received/<peer>/local.json\n"
              "each peer's; private conversations are left out. Importing the export again adds nothing twice.",
    "import": "read conversations from DIR (the original NeuroMesh's files, or an export) into this node.\n\n"
              "  " + RUN + " import DIR [--data-dir DATA_DIR]\n\n"
              "Reads DIR/conversations/*.json and DIR/received/<peer>/*.json; a bad file imports nothing.\n"
              "What the data dir already holds is skipped, so importing twice adds nothing twice.",
    "doctor": "check why peers do not appear, and print a fix for each problem found.\n\n"
              "  " + RUN + " doctor [--broadcast ADDR] [--udp-port N] [--mesh-key CODE] ...\n\n"
              "Takes the node's options (ports, room code, LLM URLs, --peer) and checks: Python and where each\n"
              "package loads from, the data dir, the ports, each interface and its broadcast, the room (a hash of\n"
              "the code, never the code), this machine's LLM, the firewall, and the peers heard during two\n"
              "announce intervals. Exits 1 when something blocks the mesh.",
    "teacher": "start this node as the room's teacher: makes a teacher key in the data dir (once) and\n"
               "runs the node; its page links to the teacher's room: pause the room, set instructions, see the class.\n\n"
               "  " + RUN + " teacher [options]\n\n"
               "Students obey only the teacher their node pins: the room file from the teacher's page, or\n"
               "--teacher FINGERPRINT.",
    "status": "ask the node running on this computer for its health, peers and LLM hosts, as tables.\n\n"
              "  " + RUN + " status [--http-port PORT | --data-dir DATA_DIR]",
    "pull": "get MODEL from the room's computers into this computer's Ollama, with no internet.\n\n"
            "  " + RUN + " pull MODEL [--http-port PORT | --data-dir DATA_DIR]\n\n"
            "The node running on this computer fetches it in checked chunks from every peer that has it\n"
            "and hands it to Ollama; Ctrl+C stops, and the same command resumes where it stopped.",
    "firewall": "open this node's ports (UDP 5000, TCP 7878 and 8080, or the ones configured) for the local\n"
                "subnet only; shows the commands and asks first.\n\n"
                "  " + RUN + " firewall [--uninstall] [--yes] [--dry-run] [--http-port N ...]\n\n"
                "Windows: New-NetFirewallRule in the group NeuroMesh. macOS: the application firewall.\n"
                "Linux: ufw or firewalld where present, else the nftables commands to run. --uninstall removes\n"
                "the rules. Needs Administrator or root.",
}

# What a setting's value must be, in words, for an error people can act on.
_VALUE_WORDS = {parse_port: "a port number from 0 to 65535", parse_count: "a whole number of at least 1",
                parse_seconds: "a positive number of seconds", int: "a whole number", float: "a number"}


def command_help(argv):
    """The help of ``import``/``export``/``run`` when the command line asks for it, else None."""
    words = [word for word in argv if word in COMMAND_HELP]
    if words and ("-h" in argv or "--help" in argv):
        return "%s %s: %s\n" % (RUN, words[0], COMMAND_HELP[words[0]])
    return None


def _convert(key, value, source):
    converter = SETTINGS[key][0]
    try:
        return converter(value)
    except (TypeError, ValueError) as exc:
        wanted = _VALUE_WORDS.get(converter)
        if wanted is None:
            raise ConfigError("%s: bad value for %s: %s" % (source, key, exc))
        raise ConfigError("%s must be %s, not %r" % (source, wanted, value))


def load_config(args, environ=None):
    """Merge defaults < ``--config`` JSON file < ``NEUROMESH_*`` variables < flags into a Config."""
    environ = os.environ if environ is None else environ
    # a room's .pyz: its room code and teacher, under every other source
    values = {key: _convert(key, value, "the room file") for key, value in bundled_room().items()}
    if environ.get("OLLAMA_HOST"):
        values["ollama_url"] = environ["OLLAMA_HOST"]
    if environ.get("OPENAI_API_KEY"):
        values["openai_key"] = environ["OPENAI_API_KEY"]
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                from_file = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ConfigError("cannot read config file %s: %s" % (args.config, exc))
        if not isinstance(from_file, dict):
            raise ConfigError("config file %s must hold a JSON object" % args.config)
        for raw_key, value in from_file.items():
            key = raw_key.replace("-", "_")
            if key not in SETTINGS:
                raise ConfigError("config file %s: unknown setting %r (known: %s)"
                                  % (args.config, raw_key, ", ".join(SETTINGS)))
            values[key] = _convert(key, value, "config file " + args.config)
    for key in SETTINGS:
        env_name = "NEUROMESH_" + key.upper()
        if env_name in environ:
            values[key] = _convert(key, environ[env_name], env_name)
    for key in SETTINGS:
        given = getattr(args, key, None)
        if given is not None:
            if key in LIST_SETTINGS:
                given = [item for chunk in given for item in _string_list(chunk)]
            elif key in URL_SETTINGS and isinstance(given, list):
                given = ",".join(given)
            values[key] = _convert(key, given, "--" + key.replace("_", "-"))
    config = Config(**values)
    config.data_dir = os.path.abspath(os.path.expanduser(config.data_dir))
    config.ollama_url = ",".join(filter(None, (normalize_ollama_url(url) for url in
                                               _string_list(config.ollama_url or "none")))) or None
    if config.openai_url:
        urls = [url.rstrip("/") for url in _string_list(config.openai_url)]
        config.openai_url = ",".join(url[:-3] if url.endswith("/v1") else url for url in urls) or None
    try:
        config.static_peers
    except ValueError as exc:
        raise ConfigError("--peer: %s" % exc)
    if config.max_links < 4:
        raise ConfigError("--max-links must be at least 4 (fewer links could split the room), not %d"
                          % config.max_links)
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("--log-level must be debug, info, warning or error, not %r" % config.log_level)
    return config


def load_teacher_key(config):
    """The teacher key in the data dir when this node is the teacher it pins (see the
    ``teacher`` command), else None."""
    if not config.teacher or not os.path.exists(os.path.join(config.data_dir, TEACHER_KEY_FILE)):
        return None
    key = NodeKey.load_or_create(config.data_dir, TEACHER_KEY_FILE)
    return key if key.node_id == config.teacher else None


def load_identity(data_dir):
    """This node's id: the hash of its key (see load_node_key)."""
    return load_node_key(data_dir).node_id


def load_node_key(data_dir):
    """The NodeKey kept in the data dir, made on first start (random: no hostname leaks).

    A data dir whose database is gone gets a new key, so a new id, too: peers already hold the
    old id's signed log, and a new log under it would be refused as a fork. The old key is
    kept beside it as node_key.old.
    """
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, KEY_FILE)
    if os.path.exists(path) and not os.path.exists(os.path.join(data_dir, DATABASE_FILE)):
        os.replace(path, path + ".old")
    return NodeKey.load_or_create(data_dir)


###############################################################################
# Identity and signatures #####################################################
###############################################################################
#
# Each node holds an Ed25519 key (pure Python, the `ecdsa` package) in its data dir; its node id is
# a short hash of the public key, so only the key's holder can speak for that id. Pure-Python
# verification costs milliseconds, so logs are hash-chained and only one head per origin per
# batch is signed (see LogChain, BatchVerifier). Links run in TLS (TLSIdentity, TLSChannel), and
# each HELO signs the link's certificate: a student who knows the room code cannot sit between.

KEY_FILE = "node_key"        # 64 hex characters: the Ed25519 seed (RFC 8032 private key)
TEACHER_KEY_FILE = "teacher_key"  # the same, of the room's teacher (`neuromesh.py teacher`)
_ID_TAG = b"neuromesh node id v1\0"
_ENTRY_TAG = b"neuromesh entry v1\0"
_HEAD_TAG = b"neuromesh head v1\0"
_HELO_TAG = b"neuromesh helo v1\0"
GENESIS = bytes(32)          # the chain hash before an origin's first entry
_BOUND_CID_RE = re.compile(r"([0-9a-f]{32})\.[0-9a-f]{32}")


class BatchRejected(NeuroMeshError):
    """A FILE: batch failed verification: nothing of it was applied; the sender is logged and
    unlinked. ``origin`` names the log at fault, when one is."""

    def __init__(self, reason, origin=None):
        super().__init__(reason)
        self.reason = reason
        self.origin = origin


def node_id_from_key(public_key):
    """The node id of a 32-byte Ed25519 public key: 128 bits of SHA-256 as 32 hex digits (the
    shape of the uuid4 ids of earlier versions, so every id check stays as it is)."""
    return hashlib.sha256(_ID_TAG + bytes(public_key)).hexdigest()[:32]


def write_secret_file(path, text):
    """``text`` (ASCII) as the file ``path``, readable by this user only from its first byte, and
    whole or not at all: a crash leaves the old file or none, never half a key."""
    temporary = path + ".tmp"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class NodeKey:
    """This node's Ed25519 key pair, kept as a 0600 file in the data dir; never shown or logged."""

    def __init__(self, seed):
        self._signing = SigningKey.from_string(bytes(seed), curve=Ed25519)
        self.public = bytes(self._signing.get_verifying_key().to_string())
        self.node_id = node_id_from_key(self.public)

    def __repr__(self):
        return "<NodeKey %s>" % self.node_id

    @classmethod
    def generate(cls):
        return cls(os.urandom(32))

    @classmethod
    def load_or_create(cls, data_dir, filename=KEY_FILE):
        """The key in ``data_dir``, made on first start. A damaged key file is an error, never
        silently a new identity (peers would see a stranger)."""
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, filename)
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read().strip()
        except FileNotFoundError:
            return cls._create(path)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError("cannot read the node key %s: %s" % (path, error))
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise ConfigError("node key file %s is damaged: restore it from a backup, or move it away"
                              " together with %s to start as a new node" % (path, DATABASE_FILE))
        if os.name != "nt" and os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        return cls(bytes.fromhex(text))

    @classmethod
    def _create(cls, path):
        seed = os.urandom(32)
        write_secret_file(path, seed.hex() + "\n")
        return cls(seed)

    def sign(self, message):
        return bytes(self._signing.sign(message))


_VERIFIERS = collections.OrderedDict()  # public key -> VerifyingKey with precomputed tables
_VERIFIERS_LOCK = threading.Lock()


def verify_signature(public_key, message, signature):
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``; never raises."""
    try:
        public_key, signature = bytes(public_key), bytes(signature)
    except (TypeError, ValueError):
        return False
    if len(public_key) != 32 or len(signature) != 64:
        return False
    with _VERIFIERS_LOCK:
        key = _VERIFIERS.get(public_key)
    if key is None:
        try:
            key = VerifyingKey.from_string(public_key, curve=Ed25519)
            key.precompute(lazy=True)  # 4x faster verifies for a key seen again
        except Exception:
            return False
        with _VERIFIERS_LOCK:
            _VERIFIERS[public_key] = key
            while len(_VERIFIERS) > 256:
                _VERIFIERS.popitem(last=False)
    try:
        return bool(key.verify(signature, message))
    except (BadSignatureError, ValueError, AssertionError, TypeError):
        return False


TLS_FILE = "tls_identity.pem"  # this node's TLS key and self-signed certificate (0600)
_OID_ECDSA_SHA256 = (1, 2, 840, 10045, 4, 3, 2)
_OID_COMMON_NAME = (2, 5, 4, 3)


def _der(tag, body):
    from ecdsa import der
    return bytes([tag]) + der.encode_length(len(body)) + body


def self_signed_certificate(signing_key, name="neuromesh"):
    """A DER X.509 v3 certificate of ``signing_key`` (ECDSA P-256), signed by itself. Nothing
    checks its fields: a link's identity is the node key's signature over its fingerprint."""
    from ecdsa import der
    from ecdsa.util import sigencode_der
    algorithm = der.encode_sequence(der.encode_oid(*_OID_ECDSA_SHA256))
    subject = der.encode_sequence(_der(0x31, der.encode_sequence(der.encode_oid(*_OID_COMMON_NAME),
                                                                 _der(0x0C, name.encode("ascii")))))
    validity = der.encode_sequence(_der(0x17, b"200101000000Z"), _der(0x18, b"99991231235959Z"))
    serial = der.encode_integer(int.from_bytes(os.urandom(16), "big") >> 1)
    tbs = der.encode_sequence(der.encode_constructed(0, der.encode_integer(2)), serial, algorithm, subject,
                              validity, subject, signing_key.get_verifying_key().to_der())
    signature = signing_key.sign_deterministic(tbs, hashfunc=hashlib.sha256, sigencode=sigencode_der)
    return der.encode_sequence(tbs, algorithm, der.encode_bitstring(signature, 0))


class TLSIdentity:
    """This node's TLS key and self-signed certificate (kept in the data dir, mode 0600, made at
    first start) and the SSLContexts of its links: TLS 1.2 at least, 1.3 where both ends have it
    (stock macOS python3 has LibreSSL with 1.2 only), ECDSA P-256 for every ``ssl``. Clients do
    not check the certificate: Handshake binds the room code and both node keys to it."""

    def __init__(self, path, maximum=None):
        self.path = path
        with open(path, "rb") as handle:
            text = handle.read().decode("ascii")
        self.certificate = ssl.PEM_cert_to_DER_cert(text[text.index("-----BEGIN CERTIFICATE"):])
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER, maximum)
        self.server.load_cert_chain(path)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT, maximum)
        self.client.check_hostname = False
        self.client.verify_mode = ssl.CERT_NONE

    @staticmethod
    def _context(protocol, maximum):
        context = ssl.SSLContext(protocol)
        context.options |= getattr(ssl, "OP_NO_COMPRESSION", 0)
        try:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if maximum == "1.2":
                context.maximum_version = ssl.TLSVersion.TLSv1_2
        except (AttributeError, ValueError):  # an ssl without version bounds: the older options
            context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
            if maximum == "1.2":
                context.options |= getattr(ssl, "OP_NO_TLSv1_3", 0)
        if protocol == ssl.PROTOCOL_TLS_SERVER:
            try:
                context.num_tickets = 0  # links are never resumed: tickets would be bytes for nothing
            except (AttributeError, ValueError):
                pass
        return context

    @classmethod
    def load_or_create(cls, data_dir, maximum=None):
        """The identity in ``data_dir``; a missing or damaged file is made anew (nothing trusts a
        certificate beyond one link, so a new one costs nothing). ``maximum`` "1.2" caps TLS."""
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, TLS_FILE)
        try:
            return cls(path, maximum)
        except (OSError, ValueError, ssl.SSLError):
            pass
        key = SigningKey.generate(curve=NIST256p)
        write_secret_file(path, key.to_pem().decode("ascii") + ssl.DER_cert_to_PEM_cert(self_signed_certificate(key)))
        return cls(path, maximum)


def load_saved_name(data_dir):
    """The name the owner gave this node from the page (kept in the data dir), or None."""
    try:
        with open(os.path.join(data_dir, NAME_FILE), encoding="utf-8") as handle:
            return clean_node_name(handle.read()) or None
    except (OSError, ValueError):
        return None


def clean_node_name(text):
    """A node name as people type it, e.g. "Ana's laptop": one line, 1 to 40 characters."""
    name = " ".join(str(text or "").split())
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    if not name:
        raise ValueError("a name needs at least one letter or digit")
    if len(name) > 40:
        raise ValueError("a name has at most 40 characters")
    return name


def head_message(origin, seq, head):
    """What an origin signs to vouch for its log up to ``seq``, whose chain hash is ``head``."""
    return _HEAD_TAG + origin.encode("ascii") + b"\0" + struct.pack(">Q", seq) + head


def helo_message(peer_nonce, channel_binding, node_id):
    """What a node signs in its HELO: the peer's fresh nonce, this link's binding, its own id."""
    return _HELO_TAG + peer_nonce + channel_binding + node_id.encode("ascii")


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # made once


def data_text(data):
    """The canonical text of an entry's data as it came (sorted, compact JSON): what its hash
    covers, so fields a node does not know are kept and forwarded. Data this version writes is
    already clean, so its text is what earlier versions hash too."""
    return _CANONICAL_JSON.encode(data)


def entry_hash(prev, entry, text):
    """The chain hash through a checked ``entry`` (``text`` its data_text) after ``prev``. Its six
    validated fields cannot hold a newline, so one a line is unambiguous."""
    fields = "%s\n%d\n%s\n%s\n%s\n%s\n" % (entry["origin"], entry["seq"], entry["kind"],
                                            entry["conversation_id"], entry["timestamp"], entry["uid"])
    return hashlib.sha256(_ENTRY_TAG + prev + (fields + text).encode("utf-8")).digest()


def bound_owner(conversation_id):
    """The owner a conversation id names ("<owner id>.<uuid hex>"), or None for the plain ids
    of earlier versions and of imports."""
    match = _BOUND_CID_RE.fullmatch(conversation_id)
    return match.group(1) if match else None


###############################################################################
# Wire protocol ###############################################################
###############################################################################
#
# A frame is a 5-byte ASCII marker, a u64 little-endian payload length, and a UTF-8 JSON
# object. The marker says what the payload is.

HELLO = b"HELO:"       # handshake: who I am, what I can do
LLM_CAPS = b"LLMC:"    # my LLM capability changed
PING = b"PING:"
PONG = b"PONG:"
PEERS = b"PEER:"       # peer exchange: whom I am linked to
GOODBYE = b"BYE!:"     # I am stopping (five bytes, like every marker)
SYNC = b"SYNC:"        # my version vector
FILE = b"FILE:"        # entries you are missing
LLM_REQUEST = b"LREQ:"
LLM_RESPONSE = b"LRES:"
HELLO_NONCE = b"HI!!:"  # key proof, step 1: my fresh nonce and auth version
AUTH = b"AUTH:"         # key proof, step 2: my proof that I hold the room key
RELAY_READY = b"RELY:"  # a relay connection is ready: HTTP/1.1 requests to /relay/... follow
HANDSHAKE_MARKERS = frozenset((HELLO_NONCE, AUTH))
MARKERS = frozenset((HELLO, LLM_CAPS, PING, PONG, PEERS, GOODBYE, SYNC, FILE, LLM_REQUEST, LLM_RESPONSE,
                     HELLO_NONCE, AUTH, RELAY_READY))

FRAME_HEADER = struct.Struct("<5sQ")


def encode_frame(marker, payload):
    """One frame of ``marker`` carrying the JSON object ``payload``."""
    if marker not in MARKERS:
        raise ProtocolError("unknown marker %r" % (marker,))
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return FRAME_HEADER.pack(marker, len(body)) + body


# Mesh authentication. Every link is TLS (1.2 at least; TLSIdentity), and inside it starts with a
# key proof, keyed or not (one code path):
#   both ends:  HI!!: {"v": 3, "n": <32-byte nonce, hex>, "c": <SHA-256 of the server's TLS certificate, hex>}
#   both ends:  AUTH: {"p": <HMAC proof of the room key over both HI!!: and the certificate, hex>}
#   then HELO:, signed by the node key over the peer's nonce and the link's binding, which covers
#   the certificate: someone in the path who ends TLS on both sides with a certificate of their
#   own is refused by both ends, even in an open room (its code is public).
# Without --mesh-key the room key is OPEN_ROOM_KEY, which is public: the mesh is open but runs
# the same handshake. TLS encrypts every frame; it carries their integrity too.
# Discovery datagrams are b"NMK1" + 32-byte HMAC tag + the JSON announcement.

NONCE_SIZE = 32
HANDSHAKE_MAX_SIZE = 4096     # largest frame a peer may send before it proved the key
AUTH_VERSION = 3              # 3: inside TLS, bound to the server's certificate ("c")
DATAGRAM_MAGIC = b"NMK1"
DATAGRAM_TAG_SIZE = 32
ROOM_KDF_ITERATIONS = 200000  # PBKDF2: slows offline guessing of a weak room code (~0.1 s, once)
OPEN_ROOM_KEY = hashlib.sha256(b"neuromesh open room v1").digest()  # public by design
_ROOM_SALT = b"neuromesh room code v1"
_LINK_LABEL = b"neuromesh link v2"


def derive_room_key(code):
    """The 32-byte room key for a --mesh-key ``code``, or OPEN_ROOM_KEY when ``code`` is None.

    Never log the code or the key; error messages do not include them.
    """
    if code is None:
        return OPEN_ROOM_KEY
    if not isinstance(code, str):
        raise TypeError("the mesh key must be text")
    normalized = unicodedata.normalize("NFC", code).strip()
    if not normalized:
        raise ValueError("the mesh key is empty")
    return hashlib.pbkdf2_hmac("sha256", normalized.encode("utf-8"), _ROOM_SALT,
                               ROOM_KDF_ITERATIONS, 32)


def is_open_room(room_key):
    """True when ``room_key`` is the public open-room key (no --mesh-key)."""
    return hmac.compare_digest(room_key, OPEN_ROOM_KEY)


def room_status(room_key):
    """What /api/health may say of the room: closed or open, and a short hash of the key
    (to compare two nodes' codes), never the code."""
    closed = not is_open_room(room_key)
    return {"closed": closed, "key_hash": hashlib.sha256(room_key).hexdigest()[:8] if closed else None}


def _subkey(key, label):
    """A key for one purpose, so one secret never keys two protocols."""
    return hmac.new(key, b"neuromesh " + label, hashlib.sha256).digest()


def tag_datagram(room_key, data):
    """``data`` (an announcement) as a datagram tagged with the room's discovery key."""
    tag = hmac.new(_subkey(room_key, b"discovery"), DATAGRAM_MAGIC + data, hashlib.sha256).digest()
    return DATAGRAM_MAGIC + tag + data


def open_datagram(room_key, data):
    """The announcement in datagram ``data``, or None when it must be dropped unread.

    A tagged datagram passes only with a valid tag for this room. An untagged one passes only
    on an open node (no --mesh-key); a keyed node never accepts one.
    """
    data = bytes(data)
    if data[:len(DATAGRAM_MAGIC)] != DATAGRAM_MAGIC:
        return data if is_open_room(room_key) else None
    start = len(DATAGRAM_MAGIC) + DATAGRAM_TAG_SIZE
    if len(data) < start:
        return None
    body = data[start:]
    expected = hmac.new(_subkey(room_key, b"discovery"), DATAGRAM_MAGIC + body, hashlib.sha256).digest()
    return body if hmac.compare_digest(data[len(DATAGRAM_MAGIC):start], expected) else None


PUBLIC_ANNOUNCEMENT_FIELDS = ("node_id", "tcp_port", "protocol_version", "version", "has_llm")


def public_announcement(hello):
    """What a node may announce in the clear, open room or not: only what a dial needs (whether
    to dial an LLM host first, and whether it speaks this protocol). Names and models come in
    the HELO:, inside TLS, once the peer proved the key."""
    return {key: hello[key] for key in PUBLIC_ANNOUNCEMENT_FIELDS if key in hello}


def _canonical(payload):
    """Bytes both ends compute alike for a decoded JSON object (for the transcript)."""
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        raise ProtocolError("a HI!!: frame that cannot be canonicalized")
    return text.encode("ascii")


def _hex_field(payload, key, size, what):
    value = payload.get(key)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise ProtocolError("%s without a %d-byte %s" % (what, size, key))
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError("%s with a malformed %s" % (what, key))


class LinkSecrets:
    """The keys of one link, derived from the room key and the handshake transcript (which holds
    the server's TLS certificate). ``channel_binding`` is public-safe and unique to the link (the
    HELO signatures cover it)."""

    def __init__(self, room_key, transcript_hash):
        prk = hmac.new(transcript_hash, _subkey(room_key, b"handshake"), hashlib.sha256).digest()  # HKDF-Extract

        def expand(label):  # HKDF-Expand, one block
            return hmac.new(prk, _LINK_LABEL + b" " + label + b"\x01", hashlib.sha256).digest()

        self.proof_initiator = expand(b"proof initiator")
        self.proof_responder = expand(b"proof responder")
        self.channel_binding = expand(b"channel binding")

    def __repr__(self):
        return "<LinkSecrets>"  # never the keys


class Handshake:
    """Runs one link's key proof inside its TLS, both ends alike: nonce exchange, transcript,
    proofs; when the peer proved the room key, ``done`` is True. ``certificate`` is the SHA-256
    of the server's TLS certificate as this end sees it (its own on the server).

    ``start()`` and ``receive(marker, payload)`` return encoded frames to send, in order. Any
    misstep (wrong marker, malformed payload, wrong proof, another certificate) raises
    ProtocolError and the handshake is failed for good: close the link.
    """

    def __init__(self, room_key, initiator, certificate, nonce=None):
        self.initiator = initiator  # True on the end that dialed
        self._room_key = room_key
        self._certificate = certificate
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._hello = {"v": AUTH_VERSION, "n": self._nonce.hex(), "c": certificate.hex()}
        self._state = "new"  # new -> wait_nonce -> wait_proof -> done | failed
        self.peer_nonce = None
        self.transcript_hash = None
        self.secrets = None

    def __repr__(self):
        return "<Handshake %s %s>" % ("initiator" if self.initiator else "responder", self._state)

    @property
    def done(self):
        return self._state == "done"

    @property
    def nonce(self):
        return self._nonce

    def start(self):
        """The opening frame(s): my HI!!:. Call once TLS is up."""
        if self._state != "new":
            return []
        self._state = "wait_nonce"
        return [encode_frame(HELLO_NONCE, self._hello)]

    def receive(self, marker, payload):
        """Take one frame of the key proof from the peer; return the frames to send in reply."""
        state = self._state
        self._state = "failed"  # until this step succeeds
        if state in ("new", "wait_nonce") and marker == HELLO_NONCE:
            out = [encode_frame(HELLO_NONCE, self._hello)] if state == "new" else []
            out.append(self._take_nonce(payload))
            self._state = "wait_proof"
            return out
        if state == "wait_proof" and marker == AUTH:
            self._take_proof(payload)
            self._state = "done"
            return []
        name = safe_text(marker.decode("ascii", "replace")) if isinstance(marker, bytes) else "?"
        raise ProtocolError("%s frame during the key proof (%s)" % (name, state))

    def _take_nonce(self, payload):
        if not isinstance(payload, dict):
            raise ProtocolError("a HI!!: frame must carry a JSON object")
        version = payload.get("v")
        if not isinstance(version, int) or isinstance(version, bool) or version != AUTH_VERSION:
            raise ProtocolError("the peer speaks mesh auth version %s, this node %d: it runs an older "
                                "NeuroMesh: upgrade it" % (safe_text(version, 20), AUTH_VERSION))
        peer_nonce = _hex_field(payload, "n", NONCE_SIZE, "HI!!: frame")
        if hmac.compare_digest(peer_nonce, self._nonce):
            raise ProtocolError("the peer sent this node's own nonce back")
        if not hmac.compare_digest(_hex_field(payload, "c", 32, "HI!!: frame"), self._certificate):
            raise ProtocolError("the peer sees another TLS certificate than this node: someone in the path "
                                "ends TLS on both sides (a machine in the middle); link refused")
        mine, theirs = _canonical(self._hello), _canonical(payload)
        first, second = (mine, theirs) if self.initiator else (theirs, mine)
        digest = hashlib.sha256(_LINK_LABEL + b" transcript" + self._certificate)
        for part in (first, second):
            digest.update(struct.pack("<I", len(part)) + part)
        self.peer_nonce = peer_nonce
        self.transcript_hash = digest.digest()
        self.secrets = LinkSecrets(self._room_key, self.transcript_hash)
        proof = self.secrets.proof_initiator if self.initiator else self.secrets.proof_responder
        return encode_frame(AUTH, {"p": proof.hex()})

    def _take_proof(self, payload):
        if not isinstance(payload, dict):
            raise ProtocolError("an AUTH: frame must carry a JSON object")
        proof = _hex_field(payload, "p", 32, "AUTH: frame")
        keys = self.secrets
        expected = keys.proof_responder if self.initiator else keys.proof_initiator
        if not hmac.compare_digest(proof, expected):
            raise ProtocolError("the peer does not hold this mesh's key (--mesh-key differs, "
                                "or only one side has one)")


class FrameDecoder:
    """Turns a byte stream into ``(marker, payload)`` frames, refusing anything malformed.

    ``feed()`` takes whatever bytes arrived and returns the complete frames; a partial frame
    waits for more bytes. A length over ``max_size`` raises before the payload is buffered.
    Until ``proven`` is set (by the caller, when the key proof is done) a frame may be at most
    HANDSHAKE_MAX_SIZE and feed() returns at most one frame: call feed(b"") for the next one.
    """

    def __init__(self, max_size):
        self.max_size = max_size
        self.proven = False  # the peer proved the room key
        self._buffer = bytearray()
        self._need = None  # (marker, length) of the frame whose payload is awaited

    @property
    def buffered(self):
        return len(self._buffer)

    def feed(self, data):
        self._buffer += data
        frames, start, size = [], 0, len(self._buffer)
        try:
            while True:
                if self._need is None:
                    if size - start < FRAME_HEADER.size:
                        return frames
                    self._need = self._header(start)
                    start += FRAME_HEADER.size
                marker, length = self._need
                end = start + length
                if size < end:
                    return frames
                body = self._buffer[start:end]  # a copy already: parse_json takes a bytearray
                start = end
                self._need = None
                frames.append((marker, self._decode(marker, body)))
                if not self.proven:  # the caller runs the handshake before the next frame
                    return frames
        finally:
            del self._buffer[:start]  # once per feed: deleting per frame would copy the rest each time

    def _header(self, start):
        marker, length = FRAME_HEADER.unpack_from(self._buffer, start)
        if marker not in MARKERS:
            raise ProtocolError("unknown frame marker %s" % safe_text(bytes(marker)))
        if not self.proven:
            if marker == HELLO and length > HANDSHAKE_MAX_SIZE:
                raise ProtocolError("peer runs an older NeuroMesh (protocol 1: HELO: before the key proof): "
                                    "upgrade it")
            if length > min(self.max_size, HANDSHAKE_MAX_SIZE):
                raise ProtocolError("frame of %d bytes is over the limit of %d before the key proof"
                                    % (length, min(self.max_size, HANDSHAKE_MAX_SIZE)))
        elif length > self.max_size:
            raise ProtocolError("frame of %d bytes is over the limit of %d (--max-message-size)"
                                % (length, self.max_size))
        return marker, length

    @staticmethod
    def _decode(marker, body):
        try:
            payload = parse_json(body, "the payload")
        except JSONInputError as exc:
            raise ProtocolError("bad JSON in a %s frame: %s" % (marker.decode("ascii"), safe_text(str(exc), 160)))
        if not isinstance(payload, dict):
            raise ProtocolError("a %s frame must carry a JSON object" % marker.decode("ascii"))
        return payload


# Frame schemas ---------------------------------------------------------------
#
# Every frame a peer sends is checked against FRAME_SCHEMAS by check_frame() before any
# handler reads it (Mesh.link_frame calls it first). A violation raises ProtocolError naming
# the frame, the peer and the field; the mesh then closes that one link. Unknown fields are
# ignored (a newer peer may send more); None counts as absent for optional fields. Entries
# inside FILE: are checked one by one by the store (a bad entry is skipped, not the link).

MAX_ORIGINS = 10000          # origins in one version vector
MAX_FRAME_ENTRIES = 1000     # entries in one FILE: frame (a sync batch fills it, within 1 MiB)
MAX_LOAD = 1000000           # in_flight, queued, parallel of an LLM load report


class Field:
    """One field of a frame schema. kind: "str" (lo..hi characters), "int" and "num" (lo..hi,
    finite, never a boolean), "bool", "list" (at most hi items, each ``of``), "map" (at most hi
    string keys of at most 128 characters, each value ``of``), "obj" (``of`` is a schema dict)."""

    __slots__ = ("kind", "lo", "hi", "of", "required")

    def __init__(self, kind, lo=None, hi=None, of=None, required=False):
        self.kind, self.lo, self.hi, self.of, self.required = kind, lo, hi, of, required


def _str(hi, lo=0, required=False):
    return Field("str", lo, hi, required=required)


def _int(lo, hi, required=False):
    return Field("int", lo, hi, required=required)


_PORT = _int(0, 65535)
_LOAD = Field("map", hi=20, of=_int(0, MAX_LOAD))
_CAPABILITY = {"has_llm": Field("bool"), "models": Field("list", hi=1000, of=_str(200)), "load": _LOAD,
               "loaded": Field("list", hi=200, of=_str(200)), "queue": Field("map", hi=64, of=_int(0, MAX_LOAD)),
               "tokens_per_second": Field("num", 0, 1e6), "shares_models": Field("bool")}
_HEAD = {"seq": _int(1, (1 << 62) - 1, True), "hash": _str(64, 64, True), "sig": _str(128, 128, True),
         "key": _str(64, 64)}
_PEER_ENTRY = {"node_id": _str(64, 1, True), "name": _str(1024), "address": _str(253, 1, True),
               "tcp_port": _int(0, 65535, True)}

FRAME_SCHEMAS = {
    HELLO: dict(_CAPABILITY, node_id=_str(64, 1, True), name=_str(1024), tcp_port=_int(0, 65535, True),
                http_port=_PORT, version=_str(64), protocol_version=_int(0, MAX_LOAD), role=_str(16),
                key=_str(64, 64, True), sig=_str(128, 128, True)),
    LLM_CAPS: dict(_CAPABILITY),
    PING: {"t": Field("num", -1e15, 1e15, required=True)},
    PONG: {"t": Field("num", 0, 1e12, required=True)},  # our own time.monotonic(), echoed
    PEERS: {"peers": Field("list", hi=10000, of=Field("obj", of=_PEER_ENTRY), required=True)},
    GOODBYE: {"reason": _str(200)},
    SYNC: {"vector": Field("map", hi=MAX_ORIGINS, of=_int(0, (1 << 62) - 1), required=True),
           "gaps": Field("list", hi=MAX_FRAME_ENTRIES, of=_str(128))},
    FILE: {"entries": Field("list", hi=MAX_FRAME_ENTRIES, of=Field("obj", of={}), required=True),
           "heads": Field("map", hi=MAX_ORIGINS, of=Field("obj", of=_HEAD)), "more": Field("bool"),
           "spread": Field("bool")},
    LLM_REQUEST: {"peer_name": _str(1024), "reason": _str(500)},
    RELAY_READY: {},
    LLM_RESPONSE: {"granted": Field("bool", required=True), "message": _str(500), "llm_host": _str(253),
                   "llm_port": _PORT, "token": _str(256)},
}


def _check_field(field, value, path):
    """Raise ProtocolError unless ``value`` fits ``field``; ``path`` names it in the message."""
    kind = field.kind
    if kind == "bool":
        if type(value) is not bool:
            raise ProtocolError("%s must be true or false" % path)
    elif kind in ("int", "num"):
        number_types = (int,) if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise ProtocolError("%s must be %s" % (path, "an integer" if kind == "int" else "a number"))
        if value != value or not field.lo <= value <= field.hi:  # NaN fails the first test
            raise ProtocolError("%s must be from %s to %s" % (path, field.lo, field.hi))
    elif kind == "str":
        if not isinstance(value, str) or not field.lo <= len(value) <= field.hi:
            raise ProtocolError("%s must be text of %d to %d characters" % (path, field.lo, field.hi))
    elif kind == "list":
        if not isinstance(value, list) or len(value) > field.hi:
            raise ProtocolError("%s must be a list of at most %d items" % (path, field.hi))
        for index, item in enumerate(value):
            _check_field(field.of, item, "%s[%d]" % (path, index))
    elif kind == "map":
        if not isinstance(value, dict) or len(value) > field.hi:
            raise ProtocolError("%s must be an object of at most %d keys" % (path, field.hi))
        for key, item in value.items():
            if len(key) > 128:
                raise ProtocolError("%s has a key longer than 128 characters" % path)
            _check_field(field.of, item, "%s.%s" % (path, safe_text(key, 40)))
    elif kind == "obj":
        if not isinstance(value, dict):
            raise ProtocolError("%s must be an object" % path)
        _check_fields(field.of, value, path + ".")


def _check_fields(schema, payload, prefix):
    for name, field in schema.items():
        value = payload.get(name)
        if value is None:
            if field.required:
                raise ProtocolError("%s%s is missing" % (prefix, name))
            continue
        _check_field(field, value, prefix + name)


def _frame_source(link):
    """Who sent a frame on ``link``, for error messages: its name from the handshake and address."""
    if link is None:
        return "a peer"
    hello = link.hello if isinstance(getattr(link, "hello", None), dict) else {}
    name = hello.get("name") or (link.peer_id or "?")[:8]
    return "%s (%s:%s)" % (safe_text(name, 60), link.address[0], link.address[1])


def check_frame(marker, payload, link=None):
    """Raise ProtocolError unless ``payload`` fits the schema of ``marker`` (see FRAME_SCHEMAS)."""
    schema = FRAME_SCHEMAS.get(marker)
    label = marker.decode("ascii", "replace") if isinstance(marker, bytes) else "?"
    if schema is None:
        raise ProtocolError("unknown frame %s from %s" % (safe_text(label), _frame_source(link)))
    if not isinstance(payload, dict):
        raise ProtocolError("%s frame from %s is not a JSON object" % (label, _frame_source(link)))
    try:
        _check_fields(schema, payload, "")
    except ProtocolError as exc:
        raise ProtocolError("bad %s frame from %s: %s" % (label, _frame_source(link), exc)) from None


###############################################################################
# Store #######################################################################
###############################################################################
#
# Conversations in SQLite, as per-origin append-only logs.


class StoreError(NeuroMeshError):
    """A store operation was refused, a file could not be imported, or the
    database failed."""


_TIMESTAMP_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?", re.ASCII)


def parse_timestamp(text) -> datetime:
    """Parse an ISO 8601 timestamp into an aware UTC datetime.

    Accepts what this store writes and what the original NeuroMesh wrote
    (7 to 9 fractional digits and a trailing Z), which
    datetime.fromisoformat() rejects before Python 3.11. Digits beyond the
    microsecond are dropped; no zone means UTC. Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("timestamp is not a string")
    match = _TIMESTAMP_RE.fullmatch(text.strip())
    if not match:
        raise ValueError("not an ISO 8601 timestamp: %r" % text[:64])
    fields = [int(group) for group in match.group(1, 2, 3, 4, 5, 6)]
    micros = int((match.group(7) or "").ljust(6, "0")[:6])
    zone = timezone.utc
    try:
        if match.group(9):
            offset = timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
            zone = timezone(-offset if match.group(9) == "-" else offset)
        moment = datetime(*fields, micros, tzinfo=zone)
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError) as error:
        raise ValueError("impossible timestamp %r: %s" % (text[:64], error)) from None


def format_timestamp(moment) -> str:
    """Format a datetime the way the store keeps timestamps:
    YYYY-MM-DDTHH:MM:SS.ffffffZ in UTC (a naive datetime is taken as UTC).
    Equal-length text, so timestamps sort as strings."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
        moment.year, moment.month, moment.day,
        moment.hour, moment.minute, moment.second, moment.microsecond)


_CANONICAL_TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", re.ASCII)  # format_timestamp's


def _normal_timestamp(text, what="timestamp") -> str:
    if isinstance(text, str) and _CANONICAL_TIMESTAMP_RE.fullmatch(text):
        try:  # already in the stored form (every synced entry): only check it is a real moment
            datetime.fromisoformat(text[:-1])
            return text
        except ValueError:
            pass  # the full parse below says what is wrong
    try:
        return format_timestamp(parse_timestamp(text))
    except ValueError as error:
        raise ValueError("%s: %s" % (what, error)) from None


# Entry validation. Everything from a peer passes through these before it
# touches the database; they raise ValueError (never anything else) so one bad
# entry can be skipped without losing the batch.

PRIVATE_SUFFIX = "~private"        # origin suffix of this node's unsynced log
MAX_CONTENT_BYTES = 256 * 1024     # THE message limit: one message's text in UTF-8, at every door (page,
                                   # Ollama/OpenAI APIs, relay, sync; v0.1.0 peers hold the same)
MAX_ENTRY_BYTES = 512 * 1024       # a whole entry as JSON; far below --max-message-size
MAX_SEQ_JUMP = 100000              # a peer's entry may lie at most this far past our prefix
_MAX_TEXT_BYTES = 1024             # titles, names, senders, host fields
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,127}")
_IMPORT_UID_RE = re.compile(r"import:[0-9a-f]{64}")
_UUID_NAMESPACE = uuid.UUID("04b01456-d29a-44bf-93d9-f299200b1c25")
_ROLES = ("user", "assistant")


def _text(value, what, limit=_MAX_TEXT_BYTES, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError("%s is not a string" % what)
    if len(value) > limit:
        raise ValueError("%s is longer than %d bytes" % (what, limit))
    if value.isascii():  # one byte a character, and no lone surrogate
        return value
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:      # lone surrogates pass json.loads, not SQLite
        raise ValueError("%s is not valid Unicode" % what) from None
    if size > limit:
        raise ValueError("%s is longer than %d bytes" % (what, limit))
    return value


def _ident(value, what, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError("%s is not a valid id" % what)
    return value


def _flag(value, what):
    if not isinstance(value, bool):
        raise ValueError("%s is not true or false" % what)
    return value


def _clean_host_info(value):
    if not isinstance(value, dict):
        raise ValueError("host_info is not an object")
    return {"hostname": _text(value.get("hostname", ""), "host_info.hostname"),
            "ip_address": _text(value.get("ip_address", ""), "host_info.ip_address"),
            "is_llm_host": _flag(value.get("is_llm_host", False), "host_info.is_llm_host")}


def _clean_message_data(data):
    if not isinstance(data, dict):
        raise ValueError("message data is not an object")
    role = data.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise ValueError("role is not 'user' or 'assistant'")
    return {"role": role,
            "content": _text(data.get("content"), "content", MAX_CONTENT_BYTES),
            "sender": _text(data.get("sender"), "sender"),
            "host_info": _clean_host_info(data.get("host_info")),
            "model": _text(data.get("model"), "model", optional=True),
            "answered_by": _ident(data.get("answered_by"), "answered_by", optional=True),
            "answered_by_name": _text(data.get("answered_by_name"), "answered_by_name",
                                      optional=True),
            "tokens_per_second": _rate(data.get("tokens_per_second")),
            **_answered_by_hosts(data.get("answered_by_hosts")),
            **_message_marks(data)}


_MESSAGE_FIELDS = frozenset(("role", "content", "sender", "host_info", "model", "answered_by", "answered_by_name",
                             "tokens_per_second"))  # always in what _clean_message_data returns
_MESSAGE_MARKS = _MESSAGE_FIELDS | {"answered_by_hosts", "cut_off", "replaces", "waited_s", "original_timestamp",
                                    "images", "thinking"}
MAX_MESSAGE_IMAGES = 4  # images one question carries (the page downscales them first)
MAX_IMAGES_BYTES = 224 * 1024  # their base64 text together: with the text, one entry stays under MAX_ENTRY_BYTES
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _message_images(value):
    """A question's images: 1 to MAX_MESSAGE_IMAGES base64 texts, MAX_IMAGES_BYTES together; or None."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGE_IMAGES:
        return None
    if not all(isinstance(image, str) and image and _BASE64.fullmatch(image) for image in value):
        return None
    return list(value) if sum(len(image) for image in value) <= MAX_IMAGES_BYTES else None
MAX_ANSWER_HOSTS = 16  # hosts one answer was continued on (each takes over after a failure)


def _answered_by_hosts(value):
    """``{"answered_by_hosts": [{node_id, name, tokens}, ...]}`` of an answer that one host began
    and others continued (mid-answer failover), in the order they wrote it; ``{}`` when absent,
    so the entries of single-host answers clean as before. ValueError when it is malformed."""
    if value is None:
        return {}
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_ANSWER_HOSTS:
        raise ValueError("answered_by_hosts is not a list of 2 to %d hosts" % MAX_ANSWER_HOSTS)
    hosts = []
    for index, host in enumerate(value):
        what = "answered_by_hosts[%d]" % index
        if not isinstance(host, dict):
            raise ValueError("%s is not an object" % what)
        tokens = host.get("tokens")
        if type(tokens) is not int or not 0 <= tokens <= MAX_CONTENT_BYTES:
            raise ValueError("%s.tokens is not a count of tokens" % what)
        hosts.append({"node_id": _ident(host.get("node_id"), what + ".node_id"),
                      "name": _text(host.get("name"), what + ".name"), "tokens": tokens})
    return {"answered_by_hosts": hosts}


def _message_marks(data):
    """The optional marks of a message, present only when set (so older entries clean the same):
    ``cut_off`` (an answer stopped or broken off, stored with what arrived), ``replaces``
    (the id of the question an edited question replaces) and ``waited_s`` (how long an answer
    waited for its host)."""
    marks = {}
    if data.get("cut_off") is True:
        marks["cut_off"] = True
    replaces = data.get("replaces")
    if isinstance(replaces, str) and 0 < len(replaces) <= 100:
        marks["replaces"] = replaces
    waited = _rate(data.get("waited_s"))  # seconds an answer waited for its host
    if waited is not None:
        marks["waited_s"] = waited
    original = data.get("original_timestamp")  # as an imported file wrote it (nanoseconds)
    if isinstance(original, str) and 0 < len(original) <= 64:
        marks["original_timestamp"] = original
    images = _message_images(data.get("images"))  # a question's pictures, for a vision model
    if images:
        marks["images"] = images
    thinking = data.get("thinking")  # what a reasoning model thought before its answer
    if isinstance(thinking, str) and thinking and len(thinking.encode("utf-8", "surrogatepass")) <= MAX_CONTENT_BYTES:
        marks["thinking"] = thinking
    return marks


def _snippet(text, needle, width=80):
    """The words of ``text`` around the first ``needle`` (lower case), on one line."""
    text = " ".join((text or "").split())
    at = max(text.lower().find(needle), 0)
    start = max(at - width // 3, 0)
    return ("…" if start else "") + text[start:start + width] + ("…" if start + width < len(text) else "")


def _rate(value):
    """An optional non-negative number (tokens per second), rounded; None when absent or bad."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
        return None
    return round(float(value), 2)


def _clean_conversation_data(data):
    if not isinstance(data, dict):
        raise ValueError("conversation data is not an object")
    return {"title": _text(data.get("title"), "title"),
            "private": _flag(data.get("private"), "private"),
            "deleted": _flag(data.get("deleted"), "deleted"),
            "created_at": _normal_timestamp(data.get("created_at"), "created_at"),
            "origin_name": _text(data.get("origin_name"), "origin_name"),
            "peer_label": _text(data.get("peer_label"), "peer_label", optional=True)}


def _clean_entry(raw):
    """A peer's entry checked (its data kept as it came, see data_text), or ValueError saying
    what is wrong."""
    return _clean_entry_text(raw)[0]


# The bytes json.dumps(entry, ensure_ascii=False) spends on an entry's keys and punctuation: its
# six other values are ids, a timestamp and a seq, which JSON writes as they are (no escapes).
_ENTRY_WRAPPER_BYTES = len(json.dumps({"origin": "", "seq": 0, "kind": "", "conversation_id": "",
                                       "timestamp": "", "uid": "", "data": 0})) - 2


MAX_DATA_DEPTH = 16  # lists and objects in an entry's data (this version's nest 3 deep)


def _default_separator_bytes(value, depth=MAX_DATA_DEPTH):
    """The bytes json.dumps's default separators (", " and ": ") add over the compact ones;
    ValueError when ``value`` nests deeper than ``depth`` (fields this version does not know)."""
    if isinstance(value, dict):
        count, items = max(2 * len(value) - 1, 0), value.values()
    elif isinstance(value, list):
        count, items = max(len(value) - 1, 0), value
    else:
        return 0
    if depth <= 0:
        raise ValueError("data nests deeper than %d levels" % MAX_DATA_DEPTH)
    for item in items:
        if isinstance(item, (dict, list)):  # most values are scalars: no call for them
            count += _default_separator_bytes(item, depth - 1)
    return count


def _clean_entry_text(raw):
    """(_clean_entry(raw), data_text of its data): a received entry is encoded once, for its
    size check, its chain hash and its row. The size is json.dumps(entry)'s, to the byte."""
    if not isinstance(raw, dict):
        raise ValueError("entry is not an object")
    origin = _ident(raw.get("origin"), "origin")      # "~" is refused: no private logs
    seq = raw.get("seq")
    if type(seq) is not int or not 0 < seq < 1 << 62:
        raise ValueError("seq is not a positive integer")
    kind = raw.get("kind")
    data = raw.get("data")
    if kind == "message":
        _clean_message_data(data)  # known fields are checked; the data is kept as it came
    elif kind == "conversation":
        _clean_conversation_data(data)
    else:
        raise ValueError("kind is not 'message' or 'conversation'")
    uid = raw.get("uid")
    # A uid that is neither native nor an import hash could squat on an
    # identity another origin will use, and hide that origin's entry.
    imported = kind == "message" and isinstance(uid, str) and _IMPORT_UID_RE.fullmatch(uid)
    if uid != "%s:%d" % (origin, seq) and not imported:
        raise ValueError("uid is neither origin:seq nor an import hash")
    entry = {"origin": origin, "seq": seq, "kind": kind,
             "conversation_id": _ident(raw.get("conversation_id"), "conversation_id"),
             "timestamp": _normal_timestamp(raw.get("timestamp")),
             "uid": uid, "data": data}
    separators = _default_separator_bytes(data)  # first: it bounds the nesting data_text walks
    text = data_text(data)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in a field this version does not know
            raise ValueError("data is not valid Unicode") from None
    if _entry_bytes(entry, text, separators) > MAX_ENTRY_BYTES:
        raise ValueError("entry is larger than %d bytes" % MAX_ENTRY_BYTES)
    return entry, text


def _entry_bytes(entry, text, separators=None):
    """len(json.dumps(entry, ensure_ascii=False).encode("utf-8")) of a cleaned ``entry`` whose
    data_text is ``text``, without encoding it again."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if separators is None:
        separators = _default_separator_bytes(entry["data"])
    return (size + separators + _ENTRY_WRAPPER_BYTES + len(entry["origin"])
            + len(str(entry["seq"])) + len(entry["kind"]) + len(entry["conversation_id"])
            + len(entry["timestamp"]) + len(entry["uid"]))


def _clean_imported_conversation(raw):
    """An imported conversation (see Store.import_conversations) checked and
    normalized, or ValueError saying what is wrong."""
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
        raise ValueError('imported conversation is not an object with a "messages" list')
    messages = []
    for message in raw["messages"]:
        if not isinstance(message, dict):
            raise ValueError("imported message is not an object")
        uid = message.get("uid")
        # Peers accept no other uid on a message that is not origin:seq.
        if not isinstance(uid, str) or not _IMPORT_UID_RE.fullmatch(uid):
            raise ValueError("uid of an imported message is not an import hash")
        messages.append({"uid": uid, "timestamp": _normal_timestamp(message.get("timestamp")),
                         "data": _clean_message_data(message.get("data"))})
    return {"id": _ident(raw.get("id"), "conversation id"),
            "title": _text(raw.get("title"), "title"),
            "peer_label": _text(raw.get("peer_label"), "peer_label", optional=True),
            "messages": messages}


def _owner_of(origin):
    if origin.endswith(PRIVATE_SUFFIX):
        return origin[:-len(PRIVATE_SUFFIX)]
    return origin


_ENTRY_COLUMNS = "origin, seq, uid, kind, conversation_id, timestamp, data"
REFUSED = 2  # entries.duplicate of a peer's entry into a conversation of another owner: never listed


class Database:
    """Holds a store's SQLite connection: opens it, brings its schema up to
    date (PRAGMA user_version), claims it for one node id, and runs one
    transaction at a time.

    Methods for the caller, all thread-safe: write(action, *args) runs action
    in one IMMEDIATE transaction, committed on return; read(action, *args) runs
    it under the same lock; both raise a database error as StoreError.
    execute(sql, parameters) and executemany(sql, rows), for use inside those actions; close.
    Attribute to extend: rollback_listeners, callables run after a write rolled back.

    Class variables: SCHEMA_VERSION (PRAGMA user_version after migrating),
    BUSY_TIMEOUT_MS (wait for another process holding the write lock).
    """

    SCHEMA_VERSION = 2
    BUSY_TIMEOUT_MS = 10000

    # One SQL script per schema version, applied in order. Never edit a
    # shipped script: append a new one.
    _MIGRATIONS = [
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE entries (
            origin TEXT NOT NULL,
            seq INTEGER NOT NULL,
            uid TEXT NOT NULL,
            kind TEXT NOT NULL,
            conversation_id TEXT NOT NULL,
            timestamp TEXT NOT NULL,
            data TEXT NOT NULL,
            -- 1: a second entry with an existing uid; it fills its log slot so
            -- vectors stay contiguous, but is never listed
            duplicate INTEGER NOT NULL DEFAULT 0,
            -- 1: a private-log message since copied to the public log
            republished INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (origin, seq)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX entries_uid ON entries (uid) WHERE duplicate = 0;
        CREATE INDEX entries_by_conversation
            ON entries (conversation_id, kind, timestamp, origin, seq);
        CREATE TABLE origins (
            origin TEXT PRIMARY KEY,
            contiguous INTEGER NOT NULL     -- 1..contiguous are all present
        ) WITHOUT ROWID;
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            state_origin TEXT NOT NULL,
            state_seq INTEGER NOT NULL,
            title TEXT NOT NULL,
            private INTEGER NOT NULL,
            deleted INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            origin_name TEXT NOT NULL,
            peer_label TEXT,
            updated_at TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX conversations_by_update ON conversations (updated_at);
        """,
        # 2: signed logs. Rows from before keep hash NULL: their origin has no key, so they stay
        # here, readable, but are never served (nobody could verify them).
        """
        ALTER TABLE entries ADD COLUMN hash BLOB;   -- chain hash through this entry
        ALTER TABLE entries ADD COLUMN sig BLOB;    -- origin's head signature at this seq, if made
        ALTER TABLE origins ADD COLUMN head BLOB;   -- chain hash at contiguous
        CREATE TABLE keys (origin TEXT PRIMARY KEY, public_key BLOB NOT NULL) WITHOUT ROWID;
        """,
    ]

    def __init__(self, path, node_id):
        self.path = path
        self.migrated_from = None  # the schema version found, when this open migrated it
        self.rollback_listeners = []  # callables told when a write is rolled back (caches to drop)
        self._lock = threading.Lock()
        try:
            if path != ":memory:" and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            # isolation_level=None: transactions are begun and ended explicitly.
            self._connection = sqlite3.connect(path, check_same_thread=False,
                                               isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise StoreError("cannot open database %s: %s" % (path, error)) from error
        self._connection.row_factory = sqlite3.Row
        try:
            self.execute("PRAGMA busy_timeout = %d" % self.BUSY_TIMEOUT_MS)
            self.execute("PRAGMA journal_mode = WAL")
            self.execute("PRAGMA synchronous = FULL")
            self._migrate()
            self.write(self._claim, node_id)
        except BaseException:
            self._connection.close()
            raise

    def close(self):
        with self._lock:
            self._connection.close()

    def execute(self, sql, parameters=()):
        return self._connection.execute(sql, parameters)

    def executemany(self, sql, rows):
        return self._connection.executemany(sql, rows)

    def write(self, action, *args):
        with self._lock:
            try:
                self.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise StoreError("database error: %s" % error) from error
            try:
                result = action(*args)
                self.execute("COMMIT")
            except BaseException as error:
                if self._connection.in_transaction:
                    try:
                        self.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass        # the original error is the one to report
                for listener in self.rollback_listeners:
                    listener()
                if isinstance(error, sqlite3.Error):
                    raise StoreError("database error: %s" % error) from error
                raise
            return result

    def read(self, action, *args):
        with self._lock:
            try:
                return action(*args)
            except sqlite3.Error as error:
                raise StoreError("database error: %s" % error) from error

    def _migrate(self):
        version = self.execute("PRAGMA user_version").fetchone()[0]
        if version > len(self._MIGRATIONS):
            raise StoreError("database %s has schema version %d; this NeuroMesh knows"
                             " up to %d" % (self.path, version, len(self._MIGRATIONS)))
        if version < len(self._MIGRATIONS):
            self.migrated_from = version
        for number in range(version + 1, len(self._MIGRATIONS) + 1):
            try:
                self._connection.executescript(
                    "BEGIN IMMEDIATE;\n%s\nPRAGMA user_version = %d;\nCOMMIT;"
                    % (self._MIGRATIONS[number - 1], number))
            except sqlite3.Error as error:
                if self._connection.in_transaction:
                    self.execute("ROLLBACK")
                raise StoreError("cannot migrate %s to schema version %d: %s"
                                 % (self.path, number, error)) from error

    def _claim(self, node_id):
        # A database written under another node id would reuse that node's
        # seqs under a new name, or this node's seqs twice: refuse it.
        row = self.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
        if row is None:
            self.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (node_id,))
        elif row[0] != node_id and self.migrated_from == 1:
            self._adopt_legacy(row[0], node_id)
        elif row[0] != node_id:
            raise StoreError("database %s belongs to node %s, not %s"
                             % (self.path, row[0], node_id))


    def _adopt_legacy(self, legacy_id, node_id):
        # The first start with a node key: the id becomes the key's hash (an old random id proves
        # nothing, so it cannot be bound to a key). The old logs stay; their conversations are
        # this node's here, and its new messages in them go to its new, signed log.
        self.execute("UPDATE meta SET value = ? WHERE key = 'node_id'", (node_id,))
        self.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('legacy_id', ?)", (legacy_id,))
        self.execute("UPDATE conversations SET owner = ? WHERE owner = ?", (node_id, legacy_id))
        log.info("store: node id %s is now %s (derived from the node key); its conversations are kept",
                 legacy_id, node_id)


class MessageCounts:
    """Listed messages per conversation: each counted once, then kept up to date by the writes,
    so a sidebar, a conversation's record and /api/health cost the same however long the
    conversations are.

    Methods for the caller, inside a transaction or read of the database: of (the count),
    added (a listed message was inserted), forget (drop a count, or all, to count again).
    """

    def __init__(self, database):
        self._db = database
        self._counts = {}
        database.rollback_listeners.append(self.forget)

    def of(self, conversation_id) -> int:
        count = self._counts.get(conversation_id)
        if count is None:
            count = self._db.execute(
                "SELECT COUNT(*) FROM entries WHERE conversation_id = ? AND kind = 'message'"
                " AND duplicate = 0 AND republished = 0", (conversation_id,)).fetchone()[0]
            self._counts[conversation_id] = count
        return count

    def added(self, conversation_id):
        if conversation_id in self._counts:
            self._counts[conversation_id] += 1

    def forget(self, conversation_id=None):
        if conversation_id is None:
            self._counts.clear()
        else:
            self._counts.pop(conversation_id, None)


class EntryLog:
    """Keeps the per-origin append-only logs in a store's database, and the
    conversations table folded from them (the owner's newest snapshot wins).

    Methods for the caller, inside a transaction of the database: append (an
    entry written on this node), conversation_row, has_uid. Methods that run
    their own transaction, for sync: apply_entries; ``reads`` (SyncReads)
    answers what a peer lacks.
    """

    def __init__(self, database, key=None, teacher_key=None):
        self._db = database
        self.chain = LogChain(database, key, teacher_key)
        self.counts = MessageCounts(database)
        self.reads = SyncReads(database)

    def append(self, origin, kind, conversation_id, data, timestamp=None, uid=None) -> dict:
        """Append a local entry to one of this node's logs and return it."""
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM entries"
                               " WHERE origin = ?", (origin,)).fetchone()[0]
        entry = {"origin": origin, "seq": seq, "kind": kind,
                 "conversation_id": conversation_id,
                 "timestamp": timestamp or utc_now(),
                 "uid": uid or "%s:%d" % (origin, seq), "data": data}
        self._put(entry, False, self.chain.link(entry))
        if kind == "conversation":
            self._apply_snapshot(entry, local=True)
        else:
            self._touch(conversation_id, entry["timestamp"])
        return entry

    def conversation_row(self, conversation_id):
        return self._db.execute("SELECT * FROM conversations WHERE id = ?",
                                (conversation_id,)).fetchone()

    def has_uid(self, uid) -> bool:
        return self._db.execute("SELECT 1 FROM entries WHERE uid = ? AND duplicate = 0",  # the uid index
                                (uid,)).fetchone() is not None

    def store_verified(self, items):
        """Store what BatchVerifier passed (inside its transaction): returns (stored, took effect).

        A catch-up brings runs of hundreds of entries per origin: each run is looked up, inserted
        and advanced with a few statements, not several per entry; conversations are touched once
        per batch. Entries already held, and repeated message ids, are handled as one by one."""
        stored, new, touched, owners = [], [], {}, {}
        for run in self._origin_runs(items):
            stored.extend(entry for entry, _digest, _sig, _text in run)
            new.extend(self._store_run(run, touched, owners))
        for conversation_id, timestamp in touched.items():
            self._touch(conversation_id, timestamp)
        return stored, new

    @staticmethod
    def _origin_runs(items):
        """``items`` cut into runs of one origin each, in order."""
        runs = []
        for item in items:
            if runs and runs[-1][-1][0]["origin"] == item[0]["origin"]:
                runs[-1].append(item)
            else:
                runs.append([item])
        return runs

    _LOOKUP_CHUNK = 400  # SQL parameters per lookup (SQLite before 3.32 allows 999)

    def _held_uids(self, uids):
        held = set()
        for start in range(0, len(uids), self._LOOKUP_CHUNK):
            chunk = uids[start:start + self._LOOKUP_CHUNK]
            held.update(row[0] for row in self._db.execute(
                "SELECT uid FROM entries WHERE duplicate = 0 AND uid IN (%s)" % ",".join("?" * len(chunk)), chunk))
        return held

    def _store_run(self, run, touched, owners):
        """Insert one origin's verified run; returns the entries that took effect. ``owners``:
        {conversation id: owner} of the batch so far (see _refused)."""
        origin = run[0][0]["origin"]
        seqs = [entry["seq"] for entry, _digest, _sig, _text in run]
        held = {row[0] for row in self._db.execute(
            "SELECT seq FROM entries WHERE origin = ? AND seq BETWEEN ? AND ?", (origin, min(seqs), max(seqs)))}
        taken = self._held_uids([entry["uid"] for entry, _digest, _sig, _text in run])
        rows, new = [], []
        for entry, digest, sig, text in run:
            if entry["seq"] in held:
                continue
            duplicate = entry["uid"] in taken
            refused = not duplicate and self._refused(entry, owners)
            if not refused:
                taken.add(entry["uid"])
            rows.append((origin, entry["seq"], entry["uid"], entry["kind"], entry["conversation_id"],
                         entry["timestamp"], text, REFUSED if refused else int(duplicate), digest, sig))
            if duplicate:
                log.warning("store: entry %s:%d repeats uid %s of a held entry; kept unlisted",
                            origin, entry["seq"], entry["uid"])
            elif refused:
                continue
            elif entry["kind"] == "conversation":
                self._insert_rows(rows)  # the snapshot folds in what came before it
                rows = []
                if self._apply_snapshot(entry, local=False):
                    new.append(entry)
            else:
                self.counts.added(entry["conversation_id"])
                touched[entry["conversation_id"]] = max(touched.get(entry["conversation_id"], ""),
                                                        entry["timestamp"])
                new.append(entry)
        self._insert_rows(rows)
        self._advance_run(origin, min(seqs))
        return new

    def conversation_owner(self, conversation_id):
        row = self.conversation_row(conversation_id)
        return row["owner"] if row is not None else None

    def _owner_held(self, conversation_id):
        """The owner of a conversation as this node holds it: its row's, else the writer of the
        entries held in it (messages may come before their conversation); None if none is held."""
        row = self._db.execute("SELECT owner FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            row = self._db.execute("SELECT origin FROM entries WHERE conversation_id = ? AND duplicate = 0"
                                   " LIMIT 1", (conversation_id,)).fetchone()
            return _owner_of(row[0]) if row else None
        return row[0]

    def _refused(self, entry, owners):
        """Whether a peer's entry writes into a conversation of another owner: the id names it
        (bound_owner), or this node holds it. A plain id (of an import by v0.1.0, or from before
        node keys) keeps the owner held here; its first writer owns a new one. A refused entry
        keeps its log slot (REFUSED), so the chain stays whole and is forwarded for others to judge."""
        cid, writer = entry["conversation_id"], _owner_of(entry["origin"])
        if cid not in owners:
            owners[cid] = bound_owner(cid) or self._owner_held(cid) or writer
        if owners[cid] == writer:
            return False
        log_limited(logging.WARNING, ("refused", entry["origin"]),
                    "store: refused %s:%d: it %s conversation %s of %s (kept unlisted)", entry["origin"],
                    entry["seq"], "changes" if entry["kind"] == "conversation" else "writes to", cid, owners[cid])
        return True

    def _insert_rows(self, rows):
        if rows:
            self._db.executemany(
                "INSERT INTO entries (%s, duplicate, hash, sig) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                % _ENTRY_COLUMNS, rows)

    def _advance_run(self, origin, first):
        """_advance after a run from ``first`` on was inserted: walks the contiguous prefix on."""
        have = self._contiguous(origin)
        if self._db.execute("SELECT 1 FROM origins WHERE origin = ?", (origin,)).fetchone() is None:
            self._db.execute("INSERT INTO origins (origin, contiguous) VALUES (?, 0)", (origin,))
        if first > have + 1 or not self._db.execute("SELECT 1 FROM entries WHERE origin = ? AND seq = ?",
                                                    (origin, have + 1)).fetchone():
            return
        row = self._db.execute(  # the first seq past ``have`` that is not held (a gap, or the end)
            "SELECT MIN(e.seq) + 1 FROM entries e WHERE e.origin = ? AND e.seq >= ? AND NOT EXISTS"
            " (SELECT 1 FROM entries n WHERE n.origin = e.origin AND n.seq = e.seq + 1)",
            (origin, have + 1)).fetchone()
        if row[0] is None:
            return
        have = row[0] - 1
        self._db.execute("UPDATE origins SET contiguous = ?, head = (SELECT hash FROM entries"
                         " WHERE origin = ? AND seq = ?) WHERE origin = ?", (have, origin, have, origin))

    def apply_entries(self, entries) -> list:
        """Store the entries a peer sent, in one transaction, unverified (sync
        goes through BatchVerifier and store_verified); returns those
        that were new and took effect (to announce and forward). Invalid
        entries are skipped with a warning; peer input never raises."""
        if not isinstance(entries, list):
            log.warning("store: ignored a batch that is not a list")
            return []
        valid, invalid, reason = [], 0, ""
        for raw in entries:
            try:
                valid.append(_clean_entry(raw))
            except ValueError as error:
                invalid, reason = invalid + 1, reason or str(error)
        if invalid:
            log.warning("store: skipped %d invalid entr%s from a peer (first: %s)",
                        invalid, "y" if invalid == 1 else "ies", reason)
        if not valid:
            return []
        far = []    # entries too far past what this node holds: a seq of 2**62-1 ends a log

        def insert():
            return [e for e in valid if self._plausible(e, far) and self._insert_remote(e)]
        new = self._db.write(insert)
        if far:
            log.warning("store: refused %d entr%s more than %d past the entries held (first: %s:%d)",
                        len(far), "y" if len(far) == 1 else "ies", MAX_SEQ_JUMP,
                        far[0]["origin"], far[0]["seq"])
        return new

    def _plausible(self, entry, far):
        if entry["seq"] <= self._contiguous(entry["origin"]) + MAX_SEQ_JUMP:
            return True
        far.append(entry)
        return False

    def _put(self, entry, duplicate, digest=None, sig=None, text=None):
        self._db.execute(
            "INSERT INTO entries (%s, duplicate, hash, sig) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            % _ENTRY_COLUMNS,
            (entry["origin"], entry["seq"], entry["uid"], entry["kind"],
             entry["conversation_id"], entry["timestamp"],
             json.dumps(entry["data"], ensure_ascii=False) if text is None else text,
             int(duplicate), digest, sig))
        if entry["kind"] == "message" and not duplicate:
            self.counts.added(entry["conversation_id"])
        self._advance(entry["origin"], entry["seq"])

    def _advance(self, origin, seq):
        row = self._db.execute("SELECT contiguous FROM origins WHERE origin = ?",
                               (origin,)).fetchone()
        have = row[0] if row else 0
        if row is None:
            self._db.execute("INSERT INTO origins (origin, contiguous) VALUES (?, 0)",
                             (origin,))
        if seq != have + 1:
            return
        while self._db.execute("SELECT 1 FROM entries WHERE origin = ? AND seq = ?",
                               (origin, have + 1)).fetchone():
            have += 1
        self._db.execute("UPDATE origins SET contiguous = ?, head = (SELECT hash FROM entries"
                         " WHERE origin = ? AND seq = ?) WHERE origin = ?", (have, origin, have, origin))

    def _insert_remote(self, entry, digest=None, sig=None, text=None):
        """Store a validated peer entry. True if it is new and takes effect."""
        key = (entry["origin"], entry["seq"])
        if self._db.execute("SELECT 1 FROM entries WHERE origin = ? AND seq = ?",
                            key).fetchone():
            return False
        taken = self._db.execute("SELECT origin, seq FROM entries WHERE uid = ?"
                                 " AND duplicate = 0", (entry["uid"],)).fetchone()
        self._put(entry, bool(taken), digest, sig, text)
        if taken:
            log.warning("store: entry %s:%d repeats uid %s of %s:%d; kept unlisted",
                        key[0], key[1], entry["uid"], taken[0], taken[1])
            return False
        if entry["kind"] == "conversation":
            return self._apply_snapshot(entry, local=False)
        self._touch(entry["conversation_id"], entry["timestamp"])
        return True

    def _contiguous(self, origin):
        row = self._db.execute("SELECT contiguous FROM origins WHERE origin = ?",
                               (origin,)).fetchone()
        return row[0] if row else 0

    def drop_implausible(self):
        """Delete entries more than MAX_SEQ_JUMP past their origin's contiguous prefix, which a
        peer could once plant (seq 2**62-1 ended its origin's log for good): run at open, in
        its own transaction. Conversations whose snapshot was such an entry fall back to the
        newest snapshot left. Returns how many entries were dropped."""
        def drop():
            far = ("seq > %d + COALESCE((SELECT contiguous FROM origins o"
                   " WHERE o.origin = entries.origin), 0)" % MAX_SEQ_JUMP)
            dropped = self._db.execute("DELETE FROM entries WHERE " + far).rowcount
            if dropped:
                self.counts.forget()
                self._db.execute(
                    "UPDATE conversations SET state_seq = COALESCE((SELECT MAX(seq) FROM entries e"
                    " WHERE e.origin = state_origin AND e.conversation_id = conversations.id"
                    " AND e.kind = 'conversation'), 0) WHERE NOT EXISTS (SELECT 1 FROM entries e"
                    " WHERE e.origin = state_origin AND e.seq = state_seq)")
            return dropped
        dropped = self._db.write(drop)
        if dropped:
            log.warning("store: dropped %d entr%s with implausible sequence numbers",
                        dropped, "y" if dropped == 1 else "ies")
        return dropped

    def _touch(self, conversation_id, timestamp):
        self._db.execute("UPDATE conversations SET updated_at = MAX(updated_at, ?)"
                         " WHERE id = ?", (timestamp, conversation_id))

    def _apply_snapshot(self, entry, local):
        """Fold a conversation entry into the conversations table.
        False when refused: only the conversation's owner may change it."""
        cid, origin = entry["conversation_id"], entry["origin"]
        data = _clean_conversation_data(entry["data"])  # the fields this version knows
        row = self.conversation_row(cid)
        state = (origin, entry["seq"], data["title"], int(data["private"]),
                 int(data["deleted"]), data["created_at"], data["origin_name"],
                 data["peer_label"])
        if row is None:
            # Messages may have arrived before their conversation.
            latest = self._db.execute(
                "SELECT MAX(timestamp) FROM entries WHERE conversation_id = ?"
                " AND kind = 'message' AND duplicate = 0", (cid,)).fetchone()[0]
            self._db.execute(
                "INSERT INTO conversations (state_origin, state_seq, title, private,"
                " deleted, created_at, origin_name, peer_label, id, owner, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                state + (cid, _owner_of(origin), max(latest or "", entry["timestamp"])))
            return True
        if _owner_of(origin) != row["owner"]:
            log.warning("store: refused change of conversation %s by %s: it belongs to %s",
                        cid, origin, row["owner"])
            return False
        self._touch(cid, entry["timestamp"])
        # Seqs order snapshots only within one log; local writes are newest
        # by construction.
        if local or (origin == row["state_origin"] and entry["seq"] > row["state_seq"]):
            self._db.execute(
                "UPDATE conversations SET state_origin = ?, state_seq = ?, title = ?,"
                " private = ?, deleted = MAX(deleted, ?), created_at = ?,"
                " origin_name = ?, peer_label = ? WHERE id = ?", state + (cid,))
        return True


class SyncReads:
    """Reads what a peer lacks from the public logs in a store's database: the version vector,
    the entries past a peer's vector, and a run up to its first signed entry. Each read runs in
    its own read of the database.
    """

    def __init__(self, database):
        self._db = database

    def version_vector(self) -> dict:
        """{origin: n} where this store holds seqs 1..n of origin's public log."""
        rows = self._db.read(lambda: self._db.execute(
            "SELECT origin, contiguous FROM origins WHERE contiguous > 0").fetchall())
        return {origin: seq for origin, seq in rows if not origin.endswith(PRIVATE_SUFFIX)}

    def entries_missing(self, their_vector, max_bytes=1 << 20, max_entries=MAX_FRAME_ENTRIES, only=None):
        """(entries, more): public entries past their_vector, by origin then
        seq, at most max_entries and about max_bytes of JSON (always at least
        one entry), of the origins in ``only`` when given. more is True when
        the batch was cut short.

        A peer with a gap keeps being sent what lies beyond it; a caller
        looping while more should also stop once a batch brings nothing new."""
        if not isinstance(their_vector, dict):
            their_vector = {}
        max_entries = max(1, max_entries)

        def collect():
            rows, size = [], 0
            origins = [row[0] for row in self._db.execute(
                "SELECT origin FROM origins ORDER BY origin")]
            for origin in origins:
                if origin.endswith(PRIVATE_SUFFIX) or (only is not None and origin not in only):
                    continue
                since = their_vector.get(origin, 0)
                if type(since) is not int or since < 0:
                    since = 0
                cursor = self._db.execute(
                    "SELECT " + _ENTRY_COLUMNS + " FROM entries WHERE origin = ?"
                    " AND seq > ? ORDER BY seq", (origin, since))
                for row in cursor:
                    cost = self._frame_bytes(row)
                    if len(rows) >= max_entries or (rows and size + cost > max_bytes):
                        return self._entries_of(rows), True
                    rows.append(row)
                    size += cost
            return self._entries_of(rows), False
        return self._db.read(collect)

    @staticmethod
    def _entries_of(rows):
        """Entry dicts of ``rows``; their data texts parsed in one json.loads, not one call each."""
        datas = json.loads("[%s]" % ",".join([row["data"] for row in rows]))
        if len(datas) != len(rows):  # a damaged row holding "1,2": parse them one by one, as before
            datas = [json.loads(row["data"]) for row in rows]
        return [{"origin": row["origin"], "seq": row["seq"], "kind": row["kind"],
                 "conversation_id": row["conversation_id"], "timestamp": row["timestamp"], "uid": row["uid"],
                 "data": data} for row, data in zip(rows, datas)]

    @staticmethod
    def _frame_bytes(row):
        """At least the bytes an entry row takes in a FILE: frame (compact JSON, UTF-8): its data's
        stored text, never shorter than the compact form, plus the other fields, keys and quotes."""
        data = row["data"]
        return ((len(data) if data.isascii() else len(data.encode("utf-8"))) + len(row["origin"]) + len(row["uid"])
                + len(row["conversation_id"]) + len(row["timestamp"]) + len(row["kind"]) + 120)

    def run_from(self, origin, seq, limit):
        """Entries of ``origin`` from ``seq`` on, up to its first signed one (at most ``limit``)."""
        def collect():
            run = []
            for row in self._db.execute("SELECT " + _ENTRY_COLUMNS + ", sig FROM entries WHERE origin = ?"
                                        " AND seq >= ? ORDER BY seq LIMIT ?", (origin, seq, limit)):
                run.append({"origin": row["origin"], "seq": row["seq"], "kind": row["kind"],
                            "conversation_id": row["conversation_id"], "timestamp": row["timestamp"],
                            "uid": row["uid"], "data": json.loads(row["data"])})
                if row["sig"] is not None:
                    break
            return run
        return self._db.read(collect)


class LogChain:
    """The hash chains and head signatures of the public logs in a store's database.

    Entry n of an origin carries h(n) = SHA-256(tag, h(n-1), entry) in ``entries.hash``; a head
    signature (``entries.sig``) is the origin's Ed25519 signature of (origin, n, h(n)). Every
    batch sent ends each origin's run at a signed seq, so any holder can pass history on and the
    receiver checks it with one signature per origin. ``keys`` pins each origin's public key.
    Methods run inside a transaction of the database, except ``signed_batch``.
    """

    def __init__(self, database, key=None, teacher_key=None):
        self._db = database
        self.key = key  # this node's NodeKey; None: a store that cannot sign (tests, tools)
        self.signers = {k.node_id: k for k in (key, teacher_key) if k is not None}  # the logs it signs

    def link(self, entry):
        """The chain hash of a new local ``entry`` (None on a private log, which never syncs)."""
        if entry["origin"].endswith(PRIVATE_SUFFIX):
            return None
        try:
            clean = _clean_entry(entry)
        except ValueError as error:
            raise StoreError("a local entry is invalid: %s" % error) from None
        prev = GENESIS if clean["seq"] == 1 else self.hash_at(clean["origin"], clean["seq"] - 1)
        if prev is None:
            raise StoreError("the log of %s has no chain before seq %d" % (clean["origin"], clean["seq"]))
        return entry_hash(prev, clean, data_text(clean["data"]))

    def hash_at(self, origin, seq):
        row = self._db.execute("SELECT hash FROM entries WHERE origin = ? AND seq = ?", (origin, seq)).fetchone()
        return row[0] if row else None

    def head(self, origin):
        """(contiguous seq, chain hash there) of ``origin``'s stored log."""
        row = self._db.execute("SELECT contiguous, head FROM origins WHERE origin = ?", (origin,)).fetchone()
        if row is None or row[0] == 0:
            return 0, GENESIS
        return row[0], row[1]

    def public_key(self, origin):
        row = self._db.execute("SELECT public_key FROM keys WHERE origin = ?", (origin,)).fetchone()
        return row[0] if row else None

    def remember_key(self, origin, public):
        self._db.execute("INSERT OR IGNORE INTO keys (origin, public_key) VALUES (?, ?)", (origin, bytes(public)))

    def keyed_origins(self):
        return {row[0] for row in self._db.execute("SELECT origin FROM keys")}

    def signed_head(self, origin, seq):
        """The head record of ``origin`` at ``seq`` for a FILE: frame; this node signs its own log
        on demand (one signature per batch or push). None when no signature is held there."""
        row = self._db.execute("SELECT hash, sig FROM entries WHERE origin = ? AND seq = ?", (origin, seq)).fetchone()
        public = self.public_key(origin)
        if row is None or row[0] is None or public is None:
            return None
        sig = row[1]
        if sig is None and origin in self.signers:
            sig = self.signers[origin].sign(head_message(origin, seq, row[0]))
            self._db.execute("UPDATE entries SET sig = ? WHERE origin = ? AND seq = ?", (sig, origin, seq))
        if sig is None:
            return None
        return {"seq": seq, "hash": row[0].hex(), "sig": bytes(sig).hex(), "key": public.hex()}

    def heads_for(self, entries):
        """{origin: head} for the last entry of each origin in ``entries``."""
        last = {}
        for entry in entries:
            last[entry["origin"]] = entry["seq"]
        return {origin: self.signed_head(origin, seq) for origin, seq in last.items()}

    def signed_cut(self, entries):
        """``entries`` (each origin's run consecutive) with every run cut back to its last signed
        seq, and the heads; second value True when something was cut."""
        runs = collections.OrderedDict()
        for entry in entries:
            runs.setdefault(entry["origin"], []).append(entry)
        kept, heads, cut = [], {}, False
        for origin, run in runs.items():
            while run:
                head = self.signed_head(origin, run[-1]["seq"])
                if head is not None:
                    break
                run.pop()
                cut = True
            if run:
                kept.extend(run)
                heads[origin] = head
        return kept, heads, cut

    def signed_batch(self, reads, vector, max_bytes, max_entries):
        """A FILE: payload of what ``vector`` lacks, from keyed logs only (unkeyed ones, from
        before signing, cannot be verified by anyone); runs end at signed seqs."""
        keyed = self._db.read(self.keyed_origins)
        entries, more = reads.entries_missing(vector, max_bytes, max_entries, only=keyed)
        kept, heads, cut = self._db.write(self.signed_cut, entries)
        if not kept and entries:  # a relay's run signed only past the budget: send it whole
            first = entries[0]
            kept, heads, cut = self._db.write(self.signed_cut, reads.run_from(
                first["origin"], first["seq"], MAX_FRAME_ENTRIES))
        return {"entries": kept, "heads": heads, "more": more or cut}


class BatchVerifier:
    """Checks a FILE: payload against the stored chains before anything of it is applied: per
    origin, consecutive entries that chain from the stored head to a head that origin's key
    signed (one signature per origin), written by their owner. ``verify`` runs inside the
    write transaction and raises BatchRejected; it returns [(entry, hash, sig, text)] to store.
    A run that starts past the stored head (a push after a missed one) waits for SYNC."""

    def __init__(self, chain):
        self.chain = chain

    def verify(self, payload):
        runs = self._runs(payload.get("entries"))
        heads = payload.get("heads")
        if not runs:
            return []
        if not isinstance(heads, dict) or set(heads) != set(runs):
            raise BatchRejected("entries without one signed head per origin")
        accepted = []
        for origin, run in runs.items():
            accepted.extend(self._verify_run(origin, run, heads[origin]))
        return accepted

    @staticmethod
    def _runs(entries):
        if not isinstance(entries, list):
            raise BatchRejected("FILE: without an entry list")
        runs = collections.OrderedDict()
        for raw in entries:
            try:
                entry, text = _clean_entry_text(raw)
            except ValueError as error:
                raise BatchRejected("invalid entry: %s" % error)
            run = runs.setdefault(entry["origin"], [])
            if run and entry["seq"] != run[-1][0]["seq"] + 1:
                raise BatchRejected("entries of %s are not consecutive" % entry["origin"], entry["origin"])
            run.append((entry, text))
        return runs

    def _verify_run(self, origin, run, head):
        """``run``: [(entry, its data_text)] of ``origin``, consecutive."""
        if not isinstance(head, dict) or head.get("seq") != run[-1][0]["seq"]:
            raise BatchRejected("the head of %s is not its last entry" % origin, origin)
        have, prev = self.chain.head(origin)
        first = run[0][0]["seq"]
        if first > have + 1:
            return []  # a gap that the next SYNC fills
        if first <= have:  # held entries must be the very same: a replay cannot alter them
            prev = GENESIS if first == 1 else self.chain.hash_at(origin, first - 1)
            if prev is None:
                raise BatchRejected("no chain held for %s" % origin, origin)
        out = []
        for entry, text in run:
            prev = entry_hash(prev, entry, text)
            if entry["seq"] > have:
                out.append((entry, prev, None, text))
            elif prev != self.chain.hash_at(origin, entry["seq"]):
                raise BatchRejected("entry %s:%d differs from the one held (a forked log)"
                                    % (origin, entry["seq"]), origin)
        if not out:
            return []
        self._check_head(origin, run[-1][0]["seq"], prev, head, self._key(origin, head.get("key")))
        self._check_owners(origin, out)
        out[-1] = out[-1][:2] + (bytes.fromhex(head["sig"]), out[-1][3])
        return out

    def _key(self, origin, key_hex):
        public = self.chain.public_key(origin)
        if public is not None:
            return public
        try:
            public = bytes.fromhex(key_hex)
        except (TypeError, ValueError):
            raise BatchRejected("no key for %s" % origin, origin)
        if len(public) != 32 or node_id_from_key(public) != origin:
            raise BatchRejected("the key sent for %s is not its own" % origin, origin)
        self.chain.remember_key(origin, public)  # rolled back with the batch if it fails
        return public

    @staticmethod
    def _check_head(origin, seq, digest, head, public):
        try:
            claimed, sig = bytes.fromhex(head.get("hash")), bytes.fromhex(head.get("sig"))
        except (TypeError, ValueError):
            raise BatchRejected("a malformed head of %s" % origin, origin)
        if claimed != digest:
            raise BatchRejected("broken chain: the entries of %s do not hash to its signed head" % origin, origin)
        if not verify_signature(public, head_message(origin, seq, digest), sig):
            raise BatchRejected("a bad signature on the head of %s" % origin, origin)

    @staticmethod
    def _check_owners(origin, items):
        owners = {}  # conversation id -> its owner: a run writes to few conversations
        for entry, _digest, _sig, _text in items:
            conversation_id = entry["conversation_id"]
            if conversation_id not in owners:
                owners[conversation_id] = bound_owner(conversation_id)
            owner = owners[conversation_id]
            if owner is not None and owner != origin:
                what = "deletes" if entry["kind"] == "conversation" and entry["data"]["deleted"] else "writes to"
                raise BatchRejected("%s %s conversation %s of %s" % (origin, what, entry["conversation_id"], owner),
                                    origin)


class SignedBatches:
    """What sync sends and takes, signed: FILE: payloads whose runs end at a head their origin
    signed (see LogChain), and received ones checked by BatchVerifier before the one transaction
    that stores them. A store made without a key serves no log of its own."""

    def __init__(self, database, entry_log, key=None):
        self._db, self._log = database, entry_log
        self._chain = entry_log.chain
        self._verifier = BatchVerifier(self._chain)
        for signer in self._chain.signers.values():
            database.write(self._chain.remember_key, signer.node_id, signer.public)

    def missing(self, vector, max_bytes=1 << 20, max_entries=MAX_FRAME_ENTRIES):
        """The FILE: payload answering a SYNC: ``vector``."""
        return self._chain.signed_batch(self._log.reads, vector, max_bytes, max_entries)

    def payload(self, entries):
        """The FILE: payload of a live push or a forward of stored ``entries``."""
        kept, heads, _cut = self._db.write(self._chain.signed_cut, entries)
        return {"entries": kept, "heads": heads, "more": False}

    def apply(self, payload):
        """Verify and store a FILE: payload: (the payload to forward or None, the entries that
        took effect). BatchRejected when it fails: then nothing of it was stored."""
        def verify_and_store():
            return self._log.store_verified(self._verifier.verify(payload))
        stored, new = self._db.write(verify_and_store)
        if not stored:
            return None, new
        heads = {}
        for entry in stored:  # each origin's stored run ends at the head it came with
            heads[entry["origin"]] = dict(payload["heads"][entry["origin"]])
        for origin, head in heads.items():
            head["key"] = self._db.read(self._chain.public_key, origin).hex()
        return {"entries": stored, "heads": heads, "more": False}, new


class StorePages:
    """Store's reads for a sidebar and a chat that scale to a room: search and pages of long
    conversations (mixed into Store, whose tables and helpers they use); and the node's name.

    Methods for the caller: search, get_conversation_page, rename_node.
    """

    def rename_node(self, name):
        """The name new conversations and messages of this node carry from now on."""
        try:
            self.node_name = _text(name, "node name")
        except ValueError as error:
            raise StoreError(str(error)) from None

    _VISIBLE_SQL = "c.deleted = 0 AND (c.owner = ? OR c.private = 0)"

    def search(self, query, limit=50) -> list:
        """Listed conversations whose title or a message contains ``query`` (any case): records
        with ``match`` ("title" or "message") and ``snippet`` (the text around the first hit; for a
        title, the words of its first message, so that two look-alike titles can be told apart)."""
        needle = " ".join(str(query).split()).lower()
        if not needle:
            return []

        def find():
            by_title = self._db.execute(
                self._RECORD_SQL + " WHERE " + self._VISIBLE_SQL + " AND instr(lower(c.title), ?) > 0"
                " ORDER BY c.updated_at DESC LIMIT ?", (self.node_id, needle, limit)).fetchall()
            found = [dict(self._record(row), match="title", snippet=self._first_words(row, needle)) for row in by_title]
            seen = {record["id"] for record in found}
            hits = self._db.execute(
                "SELECT e.conversation_id, json_extract(e.data, '$.content') AS content"
                " FROM entries e JOIN conversations c ON c.id = e.conversation_id WHERE " + self._VISIBLE_SQL
                + " AND e." + self._LISTED.replace(" AND ", " AND e.") + " AND instr(lower(json_extract("
                "e.data, '$.content')), ?) > 0 ORDER BY c.updated_at DESC, e.timestamp DESC",
                (self.node_id, needle)).fetchall()
            for hit in hits:
                if len(found) >= limit:
                    break
                if hit["conversation_id"] in seen:
                    continue
                seen.add(hit["conversation_id"])
                found.append(dict(self._record_of(hit["conversation_id"]), match="message",
                                  snippet=_snippet(hit["content"], needle)))
            return found
        return self._db.read(find)

    def _first_words(self, row, needle):
        first = self._db.execute(
            "SELECT json_extract(data, '$.content') AS content FROM entries WHERE conversation_id = ? AND "
            + self._LISTED + " ORDER BY timestamp LIMIT 1", (row["id"],)).fetchone()
        return _snippet(first["content"], needle) if first and first["content"] else row["title"]

    def known_message_ids(self, ids) -> set:
        """Those of the message ids ``ids`` this store holds (an import skips them)."""
        return self._db.read(lambda: {uid for uid in ids if self._log.has_uid(uid)})

    def get_conversation_page(self, conversation_id, limit, before=None):
        """Like get_conversation, with only the ``limit`` newest messages older than the message
        whose id is ``before`` (None: the newest); ``has_more`` tells whether older ones exist."""
        def page():
            if not self._visible(self._log.conversation_row(conversation_id)):
                return None
            conversation = self._record_of(conversation_id)
            where, parameters = "", [conversation_id]
            if before:
                cursor = self._db.execute(
                    "SELECT timestamp, origin, seq FROM entries WHERE uid = ? AND conversation_id = ?",
                    (before, conversation_id)).fetchone()
                if cursor is None:
                    raise StoreError("no message %s in this conversation" % before)
                where, parameters = " AND (timestamp, origin, seq) < (?, ?, ?)", parameters + list(cursor)
            rows = self._db.execute(
                "SELECT " + _ENTRY_COLUMNS + " FROM entries WHERE conversation_id = ? AND " + self._LISTED
                + where + " ORDER BY timestamp DESC, origin DESC, seq DESC LIMIT ?",
                parameters + [limit + 1]).fetchall()
            conversation["has_more"] = len(rows) > limit
            conversation["messages"] = [self.messages.from_row(row) for row in reversed(rows[:limit])]
            return conversation
        return self._db.read(page)


class Store(StorePages):
    """Keeps conversations durable in SQLite and answers what peers are missing.

    Every change is an entry in its origin node's append-only log, identified
    by (origin, seq); the `conversations` table is derived from them (the
    owner's newest snapshot wins). Entries of private conversations go to a
    second log of this node, origin + PRIVATE_SUFFIX, that sync never reads.

    Methods for the caller, all thread-safe, every write committed before it
    returns: create_conversation, default_conversation, add_message,
    update_conversation, delete_conversation, import_conversations;
    list_conversations, get_conversation, get_all_conversations,
    message_count, owner_of; version_vector, entries_missing, apply_entries, is_shared;
    write_control (the teacher's room); close. Its collaborators: ``writes`` (LocalWrites:
    ``writes.watch(listener)`` hears each local write's entries), ``batches`` (SignedBatches)
    serves and applies signed FILE: payloads, ``guests`` (GuestOwners), ``room`` (RoomRecords),
    ``messages`` (MessageReads).

    Class variable: SCHEMA_VERSION (PRAGMA user_version after migrating).
    """

    SCHEMA_VERSION = Database.SCHEMA_VERSION

    _LISTED = "kind = 'message' AND duplicate = 0 AND republished = 0"
    _RECORD_SQL = "SELECT c.* FROM conversations c"   # _record adds the message count (MessageCounts)

    def __init__(self, path, node_id, node_name, key=None, teacher_key=None):
        try:
            self.node_id = _ident(node_id, "node id")
            self.node_name = _text(node_name, "node name")
        except ValueError as error:
            raise StoreError(str(error)) from None
        self.private_origin = node_id + PRIVATE_SUFFIX
        self.path = path
        self._db = Database(path, node_id)
        self._log = EntryLog(self._db, key, teacher_key)
        self._log.drop_implausible()    # a log poisoned before MAX_SEQ_JUMP existed
        self.writes = LocalWrites(self._db, self._log)
        self.batches = SignedBatches(self._db, self._log, key)
        self.guests = GuestOwners(self._db)
        self.room = RoomRecords(self._db)
        self.messages = MessageReads(self._db)
        if key is not None:
            self.writes.run(self._sign_unsigned)

    def _sign_unsigned(self):
        # Own shared conversations whose newest snapshot lies in a log no key signs (written
        # before node keys): a signed snapshot each, once, so every peer learns their owner
        # before anyone else can claim their plain ids. Their time stays, and with it their place.
        rows = self._db.execute("SELECT * FROM conversations WHERE owner = ? AND private = 0 AND state_origin"
                                " NOT IN (SELECT origin FROM keys)", (self.node_id,)).fetchall()
        for row in rows:
            self.writes.append(self.node_id, "conversation", row["id"], self._state(row), timestamp=row["updated_at"])

    def close(self):
        self._db.close()

    # -- conversations -------------------------------------------------------

    def _visible(self, row):
        return (row is not None and not row["deleted"]
                and (row["owner"] == self.node_id or not row["private"]))

    def _own_row(self, conversation_id):
        row = self._log.conversation_row(conversation_id)
        if not self._visible(row):
            raise StoreError("no conversation %s" % conversation_id)
        if row["owner"] != self.node_id:
            raise StoreError("conversation %s belongs to %s"
                             % (conversation_id, row["origin_name"]))
        return row

    def _log_for(self, row):
        return self.private_origin if row["private"] else self.node_id

    def _state(self, row):
        return {"title": row["title"], "private": bool(row["private"]),
                "deleted": bool(row["deleted"]), "created_at": row["created_at"],
                "origin_name": row["origin_name"], "peer_label": row["peer_label"]}

    def _record(self, row):
        return {"id": row["id"], "origin": row["owner"],
                "origin_name": row["origin_name"], "peer_label": row["peer_label"],
                "title": row["title"], "private": bool(row["private"]),
                "deleted": bool(row["deleted"]), "created_at": row["created_at"],
                "updated_at": row["updated_at"], "message_count": self._log.counts.of(row["id"]),
                "own": row["owner"] == self.node_id}

    def _record_of(self, conversation_id):
        return self._record(self._db.execute(self._RECORD_SQL + " WHERE c.id = ?",
                                             (conversation_id,)).fetchone())

    def _new_conversation(self, conversation_id, title, private, peer_label=None,
                          origin_name=None, created_at=None):
        data = _clean_conversation_data({
            "title": title, "private": private, "deleted": False,
            "created_at": created_at or utc_now(),
            "origin_name": origin_name or self.node_name, "peer_label": peer_label})
        origin = self.private_origin if private else self.node_id
        self.writes.append(origin, "conversation", conversation_id, data)

    def create_conversation(self, title="New chat", private=False) -> dict:
        """Start a conversation owned by this node; returns its record."""
        conversation_id = "%s.%s" % (self.node_id, uuid.uuid4().hex)  # names its owner (bound_owner)
        try:
            _text(title, "title")
            _flag(private, "private")
        except ValueError as error:
            raise StoreError(str(error)) from None

        def create():
            self._new_conversation(conversation_id, title, private)
            return self._record_of(conversation_id)
        return self.writes.run(create)

    def default_conversation(self) -> dict:
        """This node's conversation for the seed API, created on first use.
        Its id is derived from the node id; after a delete the next id in the
        sequence is used, since a deleted conversation never comes back."""
        def get_or_create():
            generation = 0
            while True:
                conversation_id = "%s.%s" % (self.node_id, uuid.uuid5(
                    _UUID_NAMESPACE, "default/%s/%d" % (self.node_id, generation)).hex)
                row = self._log.conversation_row(conversation_id)
                if row is None:
                    self._new_conversation(conversation_id, "Local chat", False)
                    break
                if not row["deleted"]:
                    break
                generation += 1
            return self._record_of(conversation_id)
        return self.writes.run(get_or_create)

    def add_message(self, conversation_id, role, content, sender, host_info=None,
                    model=None, answered_by=None, answered_by_name=None,
                    tokens_per_second=None, **marks) -> dict:
        """Store a message written on this node; returns its entry. ``marks``:
        cut_off=True, replaces=<message id> (see _message_marks), answered_by_hosts=[...]
        (see _answered_by_hosts)."""
        if host_info is None:
            host_info = {"hostname": self.node_name, "ip_address": "", "is_llm_host": False}
        try:
            data = _clean_message_data(dict(marks, **{
                "role": role, "content": content, "sender": sender,
                "host_info": host_info, "model": model, "answered_by": answered_by,
                "answered_by_name": answered_by_name,
                "tokens_per_second": tokens_per_second}))
        except ValueError as error:
            raise StoreError("invalid message: %s" % error) from None

        def add():
            row = self._log.conversation_row(conversation_id)
            if not self._visible(row):
                raise StoreError("no conversation %s" % conversation_id)
            return self.writes.append(self._log_for(row), "message", conversation_id, data)
        return self.writes.run(add)

    def update_conversation(self, conversation_id, title=None, private=None) -> dict:
        """Rename and/or change the privacy of an own conversation; returns
        its record. Going private tells peers to hide it (with the old title);
        going public again republishes what was written meanwhile."""
        try:
            if title is not None:
                _text(title, "title")
            if private is not None:
                _flag(private, "private")
        except ValueError as error:
            raise StoreError(str(error)) from None

        def update():
            row = self._own_row(conversation_id)
            state = self._state(row)
            renamed = title is not None and title != state["title"]
            was_private = state["private"]
            now_private = was_private if private is None else private
            if now_private and not was_private:
                self.writes.append(self.node_id, "conversation", conversation_id,
                             dict(state, private=True))
                if renamed:
                    self.writes.append(self.private_origin, "conversation", conversation_id,
                                 dict(state, private=True, title=title))
            elif was_private and not now_private:
                self._republish(conversation_id)
                self.writes.append(self.node_id, "conversation", conversation_id,
                             dict(state, private=False,
                                  title=state["title"] if title is None else title))
            elif renamed:
                self.writes.append(self._log_for(row), "conversation", conversation_id,
                             dict(state, title=title))
            return self._record_of(conversation_id)
        return self.writes.run(update)

    def _republish(self, conversation_id):
        rows = self._db.execute(
            "SELECT seq, timestamp, data FROM entries WHERE conversation_id = ?"
            " AND origin = ? AND " + self._LISTED + " ORDER BY timestamp, seq",
            (conversation_id, self.private_origin)).fetchall()
        for row in rows:
            self.writes.append(self.node_id, "message", conversation_id, json.loads(row["data"]),
                         timestamp=row["timestamp"])
            self._db.execute("UPDATE entries SET republished = 1 WHERE origin = ?"
                             " AND seq = ?", (self.private_origin, row["seq"]))
        self._log.counts.forget(conversation_id)

    def delete_conversation(self, conversation_id) -> dict:
        """Delete an own conversation for good: a tombstone peers obey."""
        def delete():
            row = self._own_row(conversation_id)
            self.writes.append(self._log_for(row), "conversation", conversation_id,
                         dict(self._state(row), deleted=True))
            return self._record_of(conversation_id)
        return self.writes.run(delete)

    def import_conversations(self, conversations) -> dict:
        """Add conversations read from files as own ones, all in one
        transaction. Each is {"id", "title", "peer_label", "messages"}, where
        peer_label (also the origin_name) is None or the peer it came from,
        and each message is {"uid", "timestamp", "data"}: data as a stored
        message holds it, uid "import:" and a hash of the message.
        Importing the same again adds nothing: a conversation already here is
        kept, a message whose uid is stored is skipped, and a deleted
        conversation takes no messages. Returns {conversations, messages,
        skipped} (skipped: already present)."""
        try:
            cleaned = [_clean_imported_conversation(c) for c in conversations]
        except ValueError as error:
            raise StoreError("cannot import: %s" % error) from None
        return self.writes.run(self._import, cleaned)

    def _import(self, conversations):
        summary = {"conversations": 0, "messages": 0, "skipped": 0}
        for conversation in conversations:
            conversation_id, messages = conversation["id"], conversation["messages"]
            row = self._log.conversation_row(conversation_id)
            if row is None:
                self._new_conversation(
                    conversation_id, conversation["title"], False,
                    peer_label=conversation["peer_label"],
                    origin_name=conversation["peer_label"],
                    created_at=min((m["timestamp"] for m in messages), default=None))
                summary["conversations"] += 1
                row = self._log.conversation_row(conversation_id)
            elif row["deleted"]:
                summary["skipped"] += len(messages)
                continue
            for message in messages:
                if self._log.has_uid(message["uid"]):
                    summary["skipped"] += 1
                    continue
                self.writes.append(self._log_for(row), "message", conversation_id, message["data"],
                             timestamp=message["timestamp"], uid=message["uid"])
                summary["messages"] += 1
        return summary


    # -- reads -------------------------------------------------------------

    def _list(self):
        rows = self._db.execute(
            self._RECORD_SQL + " WHERE c.deleted = 0 AND (c.owner = ? OR c.private = 0)"
            " ORDER BY c.updated_at DESC, c.id", (self.node_id,)).fetchall()
        return [self._record(row) for row in rows]

    def _get(self, conversation_id):
        if not self._visible(self._log.conversation_row(conversation_id)):
            return None
        conversation = self._record_of(conversation_id)
        rows = self._db.execute(
            "SELECT " + _ENTRY_COLUMNS + " FROM entries WHERE conversation_id = ?"
            " AND " + self._LISTED + " ORDER BY timestamp, origin, seq",
            (conversation_id,)).fetchall()
        conversation["messages"] = [self.messages.from_row(row) for row in rows]
        return conversation

    @staticmethod
    def is_shared(entry) -> bool:
        """Whether an entry may leave this node (entries of the private log may not)."""
        return not entry["origin"].endswith(PRIVATE_SUFFIX)

    def list_conversations(self) -> list:
        """Records of the conversations to show, most recently updated first."""
        return self._db.read(self._list)

    def get_conversation(self, conversation_id):
        """A record plus "messages" in timestamp order, or None if the
        conversation is unknown, deleted, or a peer's private one."""
        return self._db.read(self._get, conversation_id)

    def owner_of(self, conversation_id):
        """The node id owning a conversation held here, deleted ones too; None when none is held."""
        return self._db.read(self._log.conversation_owner, conversation_id)

    def get_conversation_record(self, conversation_id):
        """Like get_conversation without the messages: as cheap for a long conversation as for
        a new one (a post checks with it that the conversation is there)."""
        def record():
            if not self._visible(self._log.conversation_row(conversation_id)):
                return None
            return self._record_of(conversation_id)
        return self._db.read(record)

    def get_all_conversations(self) -> list:
        """get_conversation of every listed conversation, read at one moment."""
        return self._db.read(lambda: [self._get(record["id"]) for record in self._list()])

    def message_count(self) -> int:
        """Messages listed across all listed conversations."""
        return sum(record["message_count"] for record in self.list_conversations())

    # -- sync ----------------------------------------------------------------

    def version_vector(self) -> dict:
        """{origin: n} where this store holds seqs 1..n of origin's public log."""
        return self._log.reads.version_vector()

    def entries_missing(self, their_vector, max_bytes=1 << 20, max_entries=MAX_FRAME_ENTRIES):
        """(entries, more): public entries past their_vector; see SyncReads."""
        return self._log.reads.entries_missing(their_vector, max_bytes, max_entries)

    def apply_entries(self, entries) -> list:
        """Store the entries a peer sent; returns those that took effect (see EntryLog)."""
        return self._log.apply_entries(entries)

    # -- the room's control records ---------------------------------------------------
    # A control record is a message, its JSON as its content, in a deleted conversation bound to
    # its writer: only fields every earlier version knows (their hashes cover clean data), so
    # they store and forward it, signed and chained like every entry, and never show it.

    def write_control(self, origin, conversation_id, fields):
        """Append a control record ``fields`` to the log of ``origin`` (this node's, or the
        teacher key's) and return the entry."""
        content = json.dumps(dict(fields, neuromesh_room=1), sort_keys=True)
        data = _clean_message_data({"role": "user", "content": content, "sender": "NeuroMesh room record",
                                    "host_info": {"hostname": self.node_name}})

        def write():
            if self._log.conversation_row(conversation_id) is None:
                self.writes.append(origin, "conversation", conversation_id, {
                    "title": "NeuroMesh room record", "private": False, "deleted": True,
                    "created_at": utc_now(), "origin_name": self.node_name, "peer_label": None})
            return self.writes.append(origin, "message", conversation_id, data)
        return self.writes.run(write)


class LocalWrites:
    """Runs a store's local writes: each in one transaction, committed on return, then the
    entries it appended handed to the watchers (the sync room registers itself with watch).

    ``watch(listener)``: ``listener(entries)`` hears the entries each local write appended
    (private ones included: filter with Store.is_shared), after the commit, outside the
    store's lock. ``run(action, *args)`` and ``append(...)`` are the store's own.
    """

    def __init__(self, database, entry_log):
        self._db, self._log = database, entry_log
        self._listeners = []
        self._appended = []         # entries of the local write in progress

    def watch(self, listener):
        """``listener(entries)`` after each committed local write."""
        self._listeners.append(listener)

    def run(self, action, *args):
        """Run action(*args) in one transaction, committed on return; then hand
        the entries it appended to the listeners."""
        def collecting_appended():
            self._appended = []
            result = action(*args)
            appended, self._appended = self._appended, []
            return result, appended
        result, appended = self._db.write(collecting_appended)
        # Outside the lock, so the callback may use the store.
        for listener in self._listeners if appended else ():
            try:
                listener(appended)
            except Exception:   # the write is committed; the caller must hear so
                log.exception("store: a local write's listener failed")
        return result

    def append(self, origin, kind, conversation_id, data, timestamp=None, uid=None):
        entry = self._log.append(origin, kind, conversation_id, data, timestamp, uid)
        self._appended.append(entry)
        return entry


class GuestOwners:
    """Which guest of this node's page started which conversation (kept here, never synced).

    Methods for the caller: record, owners.
    """

    def __init__(self, database):
        self._db = database

    _GUEST_TABLE = ("CREATE TABLE IF NOT EXISTS guest_conversations"   # guests of the page (HTTP)
                    " (conversation_id TEXT PRIMARY KEY, guest_id TEXT NOT NULL)")

    def record(self, conversation_id, guest_id):
        """Record that a guest of this node's page started ``conversation_id`` (never synced)."""
        self._db.write(lambda: (self._db.execute(self._GUEST_TABLE), self._db.execute(
            "INSERT OR REPLACE INTO guest_conversations VALUES (?, ?)", (conversation_id, guest_id))))

    def owners(self) -> dict:
        """{conversation id: guest id} of the conversations guests started."""
        return self._db.write(lambda: (self._db.execute(self._GUEST_TABLE), dict(self._db.execute(
            "SELECT conversation_id, guest_id FROM guest_conversations").fetchall()))[1])


class MessageReads:
    """Messages as callers see them: an entry or a stored row made a message, and the newest
    messages of a conversation, what an answer's history needs.

    Methods for the caller: from_row, message_from_entry, recent_messages, last_question_id.
    """

    _LISTED = Store._LISTED

    def __init__(self, database):
        self._db = database

    @staticmethod
    def from_row(row):
        """The message of an entry row read from the database."""
        return MessageReads.message_from_entry(dict(row, data=json.loads(row["data"])))

    @staticmethod
    def message_from_entry(entry) -> dict:
        """The message dict get_conversation lists, made from a message entry."""
        message = {"id": entry["uid"], "origin": entry["origin"], "seq": entry["seq"],
                   "conversation_id": entry["conversation_id"],
                   "timestamp": entry["timestamp"]}
        data = entry["data"]
        if not _MESSAGE_FIELDS <= data.keys() <= _MESSAGE_MARKS:  # a newer version's fields: show ours
            data = _clean_message_data(data)
        message.update(data)
        return message

    def recent_messages(self, conversation_id, min_chars) -> list:
        """The newest messages of a conversation, oldest first, back to the first one that
        brings their contents to ``min_chars`` characters (all of them if it has fewer): what an
        answer's history needs, read without the rest of a long conversation."""
        def read():
            cursor = self._db.execute(
                "SELECT " + _ENTRY_COLUMNS + " FROM entries WHERE conversation_id = ? AND " + self._LISTED
                + " ORDER BY timestamp DESC, origin DESC, seq DESC", (conversation_id,))
            messages, chars = [], 0
            for row in cursor:
                messages.append(self.from_row(row))
                chars += len(messages[-1].get("content") or "")
                if chars >= min_chars:
                    break
            cursor.close()
            messages.reverse()
            return messages
        return self._db.read(read)

    def last_question_id(self, conversation_id):
        """The id of the conversation's newest question (a message of role "user"), or None."""
        row = self._db.read(lambda: self._db.execute(
            "SELECT uid FROM entries WHERE conversation_id = ? AND " + self._LISTED
            + " AND json_extract(data, '$.role') = 'user' ORDER BY timestamp DESC, origin DESC, seq DESC"
            " LIMIT 1", (conversation_id,)).fetchone())
        return row[0] if row else None


class RoomRecords:
    """Reads the teacher's room from the logs: the newest control records (see
    Store.write_control) and the activity of the shared conversations.

    Methods for the caller: control_record, control_records, activity_since.
    """

    _LISTED = Store._LISTED

    def __init__(self, database):
        self._db = database

    @staticmethod
    def _control_data(text):
        try:
            record = json.loads(json.loads(text)["content"])
        except (TypeError, ValueError, KeyError):
            return None
        return record if isinstance(record, dict) and record.get("neuromesh_room") == 1 else None

    def control_record(self, origin, conversation_id):
        """The newest control record ``origin`` wrote under ``conversation_id``, with its
        ``seq``; None when there is none."""
        row = self._db.read(lambda: self._db.execute(
            "SELECT seq, data FROM entries WHERE origin = ? AND conversation_id = ? AND kind = 'message'"
            " AND duplicate = 0 ORDER BY seq DESC LIMIT 1", (origin, conversation_id)).fetchone())
        record = row and self._control_data(row[1])
        return dict(record, seq=row[0]) if record else None

    def control_records(self, conversation_suffix):
        """{origin: record} of the newest control record of each origin whose conversation id is
        ``<origin>.<conversation_suffix>`` (the students' shares)."""
        rows = self._db.read(lambda: self._db.execute(
            "SELECT origin, data FROM entries e WHERE kind = 'message' AND duplicate = 0"
            " AND conversation_id = origin || '.' || ? AND seq = (SELECT MAX(seq) FROM entries"
            " WHERE origin = e.origin AND conversation_id = e.conversation_id)", (conversation_suffix,)).fetchall())
        records = {}
        for origin, text in rows:
            record = self._control_data(text)
            if record is not None:
                records[origin] = record
        return records

    def activity_since(self, since):
        """{owner: {"chats": questions asked, "waited": longest wait of an answer (s)}} of the shared
        conversations since the timestamp ``since``: counts and times, never text."""
        rows = self._db.read(lambda: self._db.execute(
            "SELECT c.owner, json_extract(e.data, '$.role'), json_extract(e.data, '$.waited_s')"
            " FROM entries e JOIN conversations c ON c.id = e.conversation_id WHERE e." + self._LISTED.replace(
                " AND ", " AND e.") + " AND e.timestamp >= ? AND c.private = 0 AND c.deleted = 0", (since,)).fetchall())
        activity = {}
        for owner, role, waited in rows:
            record = activity.setdefault(owner, {"chats": 0, "waited": 0.0})
            if role == "user":
                record["chats"] += 1
            elif isinstance(waited, (int, float)):
                record["waited"] = max(record["waited"], float(waited))
        return activity


###############################################################################
# Seed files ##################################################################
###############################################################################
#
# The original NeuroMesh's file layout: conversations/*.json for a node's own
# chats, received/<peer>/*.json for what peers sent it.


def _safe_name(text, limit=100):
    """A file or directory name made from peer-controlled text."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text or "")
    name = re.sub(r"\.{2,}", "_", name)
    if name.startswith("."):
        name = "_" + name[1:]
    return name[:limit] or "_"


def _import_uid(conversation_id, raw_timestamp, data):
    # The raw timestamp keeps digits the normalized one drops, so two messages
    # a few nanoseconds apart stay two messages.
    what = [conversation_id, data["host_info"]["hostname"], data["host_info"]["ip_address"],
            raw_timestamp.strip(), data["sender"], data["role"], data["content"]]
    text = json.dumps(what, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return "import:" + hashlib.sha256(text).hexdigest()


def seed_message(message) -> dict:
    """A stored message (from Store.get_conversation) in the original NeuroMesh's
    JSON shape: {content, timestamp, sender, message_type, host_info}."""
    return {"content": message["content"],
            "timestamp": message.get("original_timestamp") or message["timestamp"],
            "sender": message["sender"],
            "message_type": "Response" if message["role"] == "assistant" else "Question",
            "host_info": dict(message["host_info"])}


def seed_conversation(conversation, host_info=None) -> dict:
    """A conversation with its messages (from Store.get_conversation) in the
    original's shape {"id", "messages", "host_info"}. host_info defaults to the
    host of the first user message, as the original recorded its own host."""
    messages = conversation.get("messages") or []
    if host_info is None:
        asked = [m for m in messages if m["role"] == "user"] or messages
        host_info = asked[0]["host_info"] if asked else {
            "hostname": conversation.get("origin_name") or "",
            "ip_address": "", "is_llm_host": False}
    return {"id": conversation["id"],
            "messages": [seed_message(m) for m in messages],
            "host_info": dict(host_info)}


class SeedFiles:
    """Moves a store's conversations to and from the original NeuroMesh's
    file layout, through the store's public methods.

    Methods for the caller: export_layout(directory), import_layout(directory).
    """

    def __init__(self, store):
        self.store = store

    def export_layout(self, directory) -> dict:
        """Write the original's layout: conversations/local.json holds this node's own
        conversations, and received/<peer>/local.json each peer's (imported peers' too), their
        messages in time order with their timestamps as first written, as the original's files
        held a node's chat. Private conversations are left out. Beyond the original's keys (it
        ignores others), each message carries "id" and "conversation_id", and each file
        "conversations" {id: {"title", "peer"}}, so an import splits them again and skips what
        a store already holds. Returns {conversations, messages, private_skipped}."""
        groups, skipped, count = {("conversations", "local.json"): []}, 0, 0
        for conversation in self.store.get_all_conversations():
            if conversation["private"]:
                skipped += 1
                continue
            peer = self._peer_of(conversation)
            parts = ("conversations", "local.json") if peer is None else ("received", _safe_name(peer), "local.json")
            groups.setdefault(parts, []).append(conversation)
            count += 1
        total = 0
        for parts, conversations in sorted(groups.items()):
            document = self._seed_file(conversations)
            total += len(document["messages"])
            self._write_json(os.path.join(directory, *parts), document)
        return {"conversations": count, "messages": total, "private_skipped": skipped}

    @staticmethod
    def _peer_of(conversation):
        if conversation["own"] and not conversation["peer_label"]:
            return None
        return conversation["peer_label"] or conversation["origin_name"] or conversation["origin"]

    def _seed_file(self, conversations):
        pairs = sorted(((m, c) for c in conversations for m in c["messages"]),
                       key=lambda pair: (pair[0]["timestamp"], pair[0]["id"]))
        peer = self._peer_of(conversations[0]) if conversations else None
        document = seed_conversation({"id": "local", "origin_name": peer or self.store.node_name,
                                      "messages": [m for m, _c in pairs]})
        for written, (message, conversation) in zip(document["messages"], pairs):
            written.update(id=message["id"], conversation_id=conversation["id"])
        document["conversations"] = {c["id"]: {"title": c["title"], "peer": self._peer_of(c)}
                                     for c in conversations}
        if peer is not None:
            document["peer"] = peer  # the folder name is sanitized; "peer" keeps the label as shown
        return document

    @staticmethod
    def _write_json(path, document):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(temporary, path)

    def import_layout(self, directory) -> dict:
        """Read the original's layout (conversations/*.json and
        received/<peer>/*.json) into own conversations; a received one gets
        its peer (its "peer" key, else the folder's name) as peer_label and
        origin_name. Every file is checked before
        anything is written, and everything is written in one transaction:
        a bad file raises StoreError naming it and nothing is imported.
        Importing the same files again adds nothing.
        Returns {conversations, messages, skipped} (skipped: already present)."""
        files = [self._read_seed_file(*source) for source in self._seed_files(directory)]
        conversations = [c for f in files for c in self._conversations(f)]
        known = self.store.known_message_ids([m["id"] for c in conversations for m in c.pop("ids")])
        kept, skipped = [], 0
        for conversation in conversations:
            fresh = [m for m, i in zip(conversation["messages"], conversation.pop("message_ids"))
                     if i not in known]
            skipped += len(conversation["messages"]) - len(fresh)
            if fresh or not conversation.pop("exported") or not conversation["messages"]:
                kept.append(dict(conversation, messages=fresh))
        summary = self.store.import_conversations(kept)
        summary["skipped"] += skipped
        return summary

    @staticmethod
    def _seed_files(directory):
        if not os.path.isdir(directory):
            raise StoreError("%s is not a directory" % directory)
        sources = []
        own = os.path.join(directory, "conversations")
        if os.path.isdir(own):
            for name in sorted(os.listdir(own)):
                if name.endswith(".json") and os.path.isfile(os.path.join(own, name)):
                    sources.append(("conversations/" + name, os.path.join(own, name), None))
        received = os.path.join(directory, "received")
        if os.path.isdir(received):
            for peer in sorted(os.listdir(received)):
                folder = os.path.join(received, peer)
                if not os.path.isdir(folder):
                    continue
                for name in sorted(os.listdir(folder)):
                    path = os.path.join(folder, name)
                    if name.endswith(".json") and os.path.isfile(path):
                        sources.append(("received/%s/%s" % (peer, name), path, peer))
        if not sources:
            raise StoreError("%s has no conversations/*.json or received/*/*.json"
                             % directory)
        return sources

    @staticmethod
    def _read_seed_file(relative, path, peer):
        def fail(problem):
            raise StoreError("cannot import %s: %s" % (path, problem))
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            fail("not readable JSON (%s)" % error)
        if not isinstance(document, dict) or not isinstance(document.get("messages"), list):
            fail('expected an object with a "messages" list')
        file_host = document.get("host_info")
        title = document.get("title")
        if peer is not None and document.get("peer"):
            peer = document["peer"]
        try:
            if file_host is not None:
                _clean_host_info(file_host)
            _text(title, "title", optional=True)
            _text(peer, "peer", optional=True)
        except ValueError as error:
            fail(str(error))
        messages = []
        for number, message in enumerate(document["messages"], 1):
            if not isinstance(message, dict):
                fail("message %d is not an object" % number)
            for key in ("content", "timestamp", "sender", "message_type"):
                if key not in message:
                    fail("message %d has no %r" % (number, key))
            kind = message["message_type"]
            if kind not in ("Question", "Response"):
                fail("message %d: message_type %r is not Question or Response"
                     % (number, kind))
            try:
                timestamp = _normal_timestamp(message["timestamp"])
                raw = message["timestamp"].strip()
                data = _clean_message_data({
                    "role": "user" if kind == "Question" else "assistant",
                    "content": message["content"], "sender": message["sender"],
                    "host_info": message.get("host_info") or file_host or {},
                    "original_timestamp": raw if raw != timestamp else None})
                ids = [_ident(message.get(key), key, optional=True) for key in ("id", "conversation_id")]
            except ValueError as error:
                fail("message %d: %s" % (number, error))
            messages.append((message["timestamp"], timestamp, data, ids))
        listed = document.get("conversations")
        return {"relative": relative, "peer": peer, "title": title, "messages": messages,
                "conversations": listed if isinstance(listed, dict) else {}}

    def _conversations(self, seed_file):
        """A read file as Store.import_conversations takes it: one conversation, or those its
        messages' "conversation_id" name (an export of ours). An id comes from the file's path,
        or from the exported conversation's id; messages' uids from their contents. Each also
        has "message_ids" (the exported ids, to skip those a store holds) and "exported"."""
        relative, peer = seed_file["relative"], seed_file["peer"]
        stem = relative.rsplit("/", 1)[1][:-len(".json")]
        if seed_file["title"] is not None:
            title = seed_file["title"]
        elif peer is None:
            title = "Imported: %s" % stem
        else:
            title = peer if stem == "local" else "%s: %s" % (peer, stem)
        groups = {}
        for raw_timestamp, timestamp, data, (message_id, exported_id) in seed_file["messages"]:
            groups.setdefault(exported_id, []).append((raw_timestamp, timestamp, data, message_id))
        result = []
        for exported_id, messages in (groups or {None: []}).items():
            listed = seed_file["conversations"].get(exported_id)
            listed = listed if isinstance(listed, dict) else {}
            key = "import/%s/%s" % (self.store.node_id, relative) if exported_id is None else "import/" + exported_id
            conversation_id = self._conversation_id(uuid.uuid5(_UUID_NAMESPACE, key))
            label = peer if exported_id is None or peer is None else (listed.get("peer") or peer)
            result.append({
                "id": conversation_id, "peer_label": label if isinstance(label, str) else peer,
                "title": listed.get("title") if isinstance(listed.get("title"), str) else title,
                "messages": [{"uid": _import_uid(conversation_id, raw, data), "timestamp": timestamp, "data": data}
                             for raw, timestamp, data, _id in messages],
                "message_ids": [message_id for *_rest, message_id in messages],
                "ids": [{"id": message_id} for *_rest, message_id in messages if message_id],
                "exported": exported_id is not None})
        return result

    def _conversation_id(self, derived):
        """The id of an imported conversation: bound to this node (see bound_owner), so no one
        can claim it first; the plain id earlier versions gave it when this node holds that."""
        if self.store.owner_of(str(derived)) == self.store.node_id:
            return str(derived)
        return "%s.%s" % (self.store.node_id, derived.hex)


###############################################################################
# Discovery ###################################################################
###############################################################################
#
# Announcement datagram (JSON): {"message_type": "ONLINE" | "OFFLINE", "timestamp": utc, "node_id",
#    "tcp_port", "version", "protocol_version", "has_llm"}, open room or keyed (names and models
# cross only in TLS); sent as b"NMK1" + HMAC tag + JSON (see tag_datagram); a keyed node drops
# datagrams without this room's tag.

MAX_DATAGRAM = 65507


class Discovery:
    """Tells the room this node exists, and hears who else does, over UDP broadcast.

    It has no thread of its own: the mesh registers ``sock`` in its selector, calls
    ``receive()`` when it is readable and ``announce(kind, hello)`` when ``due(now)`` says.
    Methods for the caller: ``open()``, ``due(now)``, ``announce(kind, hello)``,
    ``receive()`` (the ``(ip, message)`` announcements heard from other nodes) and
    ``close()``; ``make_announcement`` and ``parse_announcement`` are the datagram format.
    Datagrams are tagged with ``room_key``; ones without this room's tag, or from a public
    address (unless ``allow_public``), are dropped unread.
    """

    def __init__(self, udp_port, broadcast, node_id, interval, counters=None, room_key=OPEN_ROOM_KEY,
                 allow_public=False):
        self.udp_port = udp_port
        self.room_key = room_key
        self.allow_public = allow_public
        self.configured = list(broadcast)  # empty: every interface's directed broadcast
        self.node_id = node_id
        self.interval = interval
        self.counters = collections.Counter() if counters is None else counters
        self.broadcast_addresses = []
        self.sock = None
        self._next_announce = 0.0

    @staticmethod
    def make_announcement(kind, hello):
        """The datagram a node broadcasts: ``kind`` is ONLINE or OFFLINE, ``hello`` its HELO payload."""
        datagram = dict(hello)
        datagram.update({"message_type": kind, "timestamp": utc_now()})
        return json.dumps(datagram, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def parse_announcement(data):
        """A received datagram as a dict, or None when it is not a NeuroMesh announcement."""
        try:
            message = parse_json(data, "an announcement", MAX_DATAGRAM_JSON, MAX_JSON_DEPTH)
        except JSONInputError:
            return None
        if not isinstance(message, dict) or message.get("message_type") not in ("ONLINE", "OFFLINE"):
            return None
        node_id, tcp_port = message.get("node_id"), message.get("tcp_port")
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
            return None
        if not isinstance(tcp_port, int) or isinstance(tcp_port, bool) or not 0 < tcp_port <= 65535:
            return None
        return message

    def open(self):
        """Bind the UDP socket, which several nodes on one host can share; returns it."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(("", self.udp_port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError("UDP port %d for discovery is in use by another program: pick another "
                                     "with --udp-port (all nodes of a room must use the same one)"
                                     % self.udp_port)
            raise
        self.sock = sock
        self.broadcast_addresses = self.configured or default_broadcast_addresses()
        if not self.broadcast_addresses:
            log.warning("no network interface with a broadcast address: discovery will find "
                        "nobody; connect with --peer HOST:PORT")
        return sock

    @property
    def next_due(self):
        """Monotonic time of the next announcement (never, once the socket is closed)."""
        return float("inf") if self.sock is None else self._next_announce

    def due(self, now):
        """True when an announcement is due, and then not again for an announce interval."""
        if self.sock is None or now < self._next_announce:
            return False
        self._next_announce = now + self.interval
        return True

    def announce(self, kind, hello):
        if self.sock is None:
            return
        announcement = self.make_announcement(kind, public_announcement(hello))
        datagram = tag_datagram(self.room_key, announcement)
        for address in self.broadcast_addresses:
            try:
                self.sock.sendto(datagram, (address, self.udp_port))
                self.counters["announcements_sent"] += 1
            except OSError as exc:
                self.counters["announce_errors"] += 1
                log.debug("cannot announce to %s: %s", address, exc)

    def receive(self):
        """The ``(ip, message)`` announcements of other nodes waiting on the socket."""
        heard = []
        for _ in range(64):
            try:
                data, (ip, _port) = self.sock.recvfrom(MAX_DATAGRAM)[:2]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("discovery socket error: %s", exc)
                break
            message = self.open_announcement(ip, data)
            if message is None:
                continue
            if message["node_id"] == self.node_id:
                continue
            self.counters["announcements_heard"] += 1
            heard.append((ip, message))
        return heard

    def open_announcement(self, ip, data):
        """The announcement in a datagram from ``ip``, or None (counted) when it is dropped."""
        if not (self.allow_public or is_private_address(ip)):
            self.counters["public_datagrams"] += 1
            log_limited(logging.INFO, ("public datagram", ip), "ignoring announcements from the public "
                        "address %s (--allow-public accepts them)", ip)
            return None
        body = open_datagram(self.room_key, data)
        if body is None:
            self.counters["unauthenticated_datagrams"] += 1
            return None
        message = self.parse_announcement(body)
        if message is None:
            self.counters["garbage_datagrams"] += 1
        return message

    def close(self):
        close_quietly(self.sock)


###############################################################################
# Peer links ##################################################################
###############################################################################


class OutdatedPeer(ProtocolError):
    """The far end speaks an earlier protocol (frames in the clear, no TLS)."""


class TLSChannel:
    """One link's TLS in memory (``ssl.MemoryBIO``), so the mesh loop never blocks on a
    handshake or a partial record. ``receive(data)`` takes the bytes the socket read and returns
    the plaintext they held; ``send(plain)`` encrypts; ``wire()`` are the bytes to write.
    ``certificate`` is the SHA-256 of the server's certificate once ``established``. Garbage
    raises ssl.SSLError; an older NeuroMesh's clear frames raise OutdatedPeer."""

    read_size = 256 * 1024

    def __init__(self, identity, server_side):
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = identity.server if server_side else identity.client
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._own = identity.certificate if server_side else None
        self.established = False
        self.certificate = None
        self._first = True

    def start(self):
        """Begin the handshake (the client's hello goes out with the next ``wire()``)."""
        self._handshake()

    def _handshake(self):
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.established = True
        self.certificate = hashlib.sha256(self._own or self._ssl.getpeercert(True)).digest()

    def receive(self, data):
        if self._first:
            self._first = False
            if data[:5] in (HELLO_NONCE, HELLO):
                raise OutdatedPeer("it runs an older NeuroMesh: upgrade it")
        self._in.write(data)
        if not self.established:
            self._handshake()
            if not self.established:
                return b""
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(self.read_size)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise ConnectionResetError("the peer ended TLS")
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, plain):
        self._ssl.write(plain)

    def wire(self):
        return self._out.read() if self._out.pending else b""

    def describe(self):
        """{"version", "cipher"} once established, for /api/peers and status."""
        cipher = self._ssl.cipher() if self.established else None
        return {"version": self._ssl.version(), "cipher": cipher[0]} if cipher else None


class TLSStream(io.RawIOBase):
    """A relay connection's TLS, taken off the mesh loop (TLSChannel on a blocking socket), read
    and written by one thread: ``readinto`` (wrap it in io.BufferedReader), ``sendall`` and
    ``close``. ``wire`` is what the loop left to send."""

    def __init__(self, sock, tls, wire=b""):
        io.RawIOBase.__init__(self)
        self.sock, self.tls = sock, tls
        self._wire = wire
        self._plain = bytearray()

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._plain:
            self.sendall(b"")
            data = self.sock.recv(TLSChannel.read_size)
            if not data:
                return 0
            self._plain += self.tls.receive(data)
        count = min(len(buffer), len(self._plain))
        buffer[:count] = self._plain[:count]
        del self._plain[:count]
        return count

    def sendall(self, data):
        if data:
            self.tls.send(data)
        wire, self._wire = self._wire + self.tls.wire(), b""
        if wire:
            self.sock.sendall(wire)

    def close(self):
        close_quietly(self.sock)
        io.RawIOBase.close(self)


def dial_relay(identity, room_key, key, address, node_id, timeout):
    """A relay connection to the peer ``node_id`` at ``address`` (its mesh port): TLS, the key
    proof and both signed HELOs as on a link (this end's says "role": "relay"), then its RELY:.
    Returns the blocking ssl.SSLSocket, on which HTTP/1.1 requests to /relay/... go; raises
    OSError (or ProtocolError) when the peer is not who it should be."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = identity.client.wrap_socket(sock)
        link = BlockingLink.dialing(sock, room_key)
        link.prove()
        if link.hello()["node_id"] != node_id:
            raise ProtocolError("the relay at %s:%d is not the peer it should be" % address)
        sock.sendall(encode_frame(HELLO, signed_hello(key, link, {"node_id": key.node_id, "tcp_port": 0,
                                                                "role": "relay"})))
        while link.next_frame()[0] != RELAY_READY:
            pass
        return sock
    except BaseException:
        sock.close()
        raise


class BlockingLink:
    """One end of a link on a blocking TLS socket, for a short exchange (a relay connection's
    dialing end, the doctor's probe): ``prove()`` runs the key proof of ``handshake``,
    ``hello()`` reads the peer's HELO, checked and its signature proven, and ``next_frame()``
    reads any frame, one by one. ``dialing(sock, room_key)`` is the end that dialed."""

    def __init__(self, sock, handshake):
        self.sock, self.handshake = sock, handshake
        self.decoder, self._ready = FrameDecoder(MiB), []

    @classmethod
    def dialing(cls, sock, room_key):
        return cls(sock, Handshake(room_key, True, hashlib.sha256(sock.getpeercert(True)).digest()))

    def prove(self):
        self.sock.sendall(b"".join(self.handshake.start()))
        while not self.handshake.done:
            self.sock.sendall(b"".join(self.handshake.receive(*self.next_frame())))
        self.decoder.proven = True

    def hello(self):
        marker, payload = self.next_frame()
        if marker != HELLO:
            raise ProtocolError("it sent %s before its HELO" % marker.decode("ascii", "replace"))
        check_frame(marker, payload)
        proven_hello_key(self, payload["node_id"], payload)
        return payload

    def next_frame(self):
        while not self._ready:
            self._ready += self.decoder.feed(b"")
            if self._ready:
                break
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the peer closed the connection")
            self._ready += self.decoder.feed(data)
        return self._ready.pop(0)


class Link:
    """One TCP connection to a peer: its TLS (``tls``), its decoder, its key proof (``handshake``,
    made once TLS is up), what waits to be encrypted (``outgoing``) and sent (``wire``), and what
    the peer's HELO told."""

    def __init__(self, sock, address, outbound, max_size, tls, target=None):
        self.sock = sock
        self.address = address  # (ip, port) of the far end
        self.outbound = outbound
        self.target = target  # the DialTarget this link was dialed for
        self.decoder = FrameDecoder(max_size)
        self.tls = tls
        self.outgoing = bytearray()  # frames not yet encrypted
        self.wire = bytearray()  # TLS bytes not yet sent
        self.connecting = outbound
        self.handshake = None  # the key proof, once TLS is up
        self.peer_id = None  # set by the signed HELO
        self.hello = None
        now = time.monotonic()
        self.opened = now
        self.last_received = now
        self.closed = False
        self.closing = None  # (reason, since) once close_after() queued its last frame

    def __repr__(self):
        return "<Link %s:%s %s %s>" % (self.address[0], self.address[1],
                                      "out" if self.outbound else "in", (self.peer_id or "?")[:8])

    @property
    def proven(self):
        return self.decoder.proven


@dataclasses.dataclass(eq=False)
class DialTarget:
    """An address worth dialing, how often it failed, and until when it is worth it."""

    host: str
    port: int
    node_id: str = None
    static: bool = False
    failures: int = 0
    next_dial: float = 0.0
    expires: float = None  # monotonic time; None for static peers
    ip: str = None  # a host name's address, looked up for its next dial (NameResolver)


@dataclasses.dataclass(eq=False)
class Peer:
    """What this node knows of another node (the /api/peers record)."""

    node_id: str
    name: str = ""
    address: str = ""
    tcp_port: int = 0
    http_port: int = 0
    version: str = ""
    protocol_version: int = 0
    has_llm: bool = False
    shares_models: bool = False  # it serves the models of its Ollama store to the room
    models: list = dataclasses.field(default_factory=list)
    load: dict = dataclasses.field(default_factory=dict)
    loaded: list = dataclasses.field(default_factory=list)  # its models in memory
    queue: dict = dataclasses.field(default_factory=dict)  # requester key -> chats waiting at its LLM
    tokens_per_second: float = None  # its LLM's recent speed
    last_seen: float = 0.0  # wall clock, epoch seconds
    rtt_ms: float = None
    link: Link = None
    ever_linked: bool = False  # False: a stranger only heard of, forgotten quickly
    public_key: bytes = None  # the Ed25519 key its HELO proved (node_id is its hash)
    links: frozenset = None  # the node ids it said it is linked to (its last PEER: frame); None: unknown

    @property
    def connected(self):
        return self.link is not None

    def release(self):
        """(protocol version, version key) its HELO told: what it can read, then how new it is."""
        return self.protocol_version, version_key(self.version)

    def to_dict(self):
        return {
            "node_id": self.node_id, "name": self.name, "address": self.address,
            "tcp_port": self.tcp_port, "http_port": self.http_port, "connected": self.connected,
            "has_llm": self.has_llm, "models": list(self.models), "load": dict(self.load),
            "queue": dict(self.queue), "loaded": list(self.loaded), "tokens_per_second": self.tokens_per_second,
            "version": self.version, "last_seen": self.last_seen,
            "outdated": (bool(self.version) and self.release() < this_release())
                        or 0 < self.protocol_version < PROTOCOL_VERSION,
            "rtt_ms": None if finite_or_none(self.rtt_ms, 3600000.0) is None else round(self.rtt_ms, 3),
            "tls": self.link.tls.describe() if self.link is not None else None,  # {"version", "cipher"}
        }

    def update(self, info):
        """Take what a HELO, an announcement or an LLMC: frame says, checked and capped: a field
        of the wrong type is ignored (``"false"`` is no boolean), a load is clamped (see clamp_load)."""
        if isinstance(info.get("name"), str):
            self.name = info["name"][:100]
        for key, kind in (("http_port", int), ("version", str), ("protocol_version", int), ("has_llm", bool),
                          ("shares_models", bool)):
            if type(info.get(key)) is kind:
                setattr(self, key, info[key][:64] if kind is str else info[key])
        if not 0 <= self.http_port <= 65535:
            self.http_port = 0
        if isinstance(info.get("models"), list):
            self.models = [model[:200] for model in info["models"][:200] if isinstance(model, str)]
        if isinstance(info.get("load"), dict):
            self.load = clamp_load(info["load"])
        if isinstance(info.get("loaded"), list):
            self.loaded = [model[:200] for model in info["loaded"][:200] if isinstance(model, str)]
        if isinstance(info.get("queue"), dict):
            self.queue = {key[:128]: min(count, 10000) for key, count in list(info["queue"].items())[:64]
                          if isinstance(key, str) and type(count) is int and count > 0}
        if "tokens_per_second" in info:
            rate = finite_or_none(info["tokens_per_second"], 1e6)
            self.tokens_per_second = rate if rate is not None and rate >= 0 else None
        self.last_seen = time.time()


_VERSION_NOTICES = LogOnce(interval=float("inf"))  # once a process per peer: an upgrade is a person's job


def this_release():
    return PROTOCOL_VERSION, version_key(__version__)


def tell_versions(peer):
    """Log once which of this node and a linked ``peer`` should be upgraded, when they differ."""
    if not peer.version or peer.release() == this_release():
        return
    name = safe_text(peer.name or peer.node_id[:8])
    if peer.release() < this_release():
        _VERSION_NOTICES.log(logging.WARNING, peer.node_id, "%s runs an older NeuroMesh (%s): upgrade it",
                             name, safe_text(peer.version, 20))
    else:
        _VERSION_NOTICES.log(logging.WARNING, peer.node_id, "%s runs a newer NeuroMesh (%s): upgrade this"
                             " computer (it runs %s)", name, safe_text(peer.version, 20), __version__)


class PeerTable(dict):
    """The mesh's peers by node id, capped at ``max_peers``: when it is full, the stranger
    (never linked) heard of longest ago makes room, and unlinked peers expire (``expire``)."""

    def __init__(self, max_peers=256):
        dict.__init__(self)
        self.max_peers = max_peers
        self._banned = {}  # node id -> monotonic time until which its links are refused

    def ban(self, node_id, seconds):
        """Refuse ``node_id``'s links for ``seconds``; returns its current link, to close."""
        self._banned[node_id] = time.monotonic() + seconds
        peer = self.get(node_id)
        return peer.link if peer is not None else None

    def banned(self, node_id):
        until = self._banned.get(node_id)
        if until is not None and until <= time.monotonic():
            del self._banned[node_id]
            until = None
        return until is not None

    def admit(self, node_id):
        """The Peer of ``node_id``, made if need be; None when the table is full of linked peers."""
        peer = self.get(node_id)
        if peer is not None:
            return peer
        if len(self) >= self.max_peers and not self._make_room():
            return None
        peer = self[node_id] = Peer(node_id)
        return peer

    def _make_room(self):
        unlinked = [peer for peer in self.values() if not peer.connected]
        if not unlinked:
            return False
        oldest = min(unlinked, key=lambda peer: (peer.ever_linked, peer.last_seen))
        del self[oldest.node_id]
        return True

    def expire(self, stranger_ttl, forget_after):
        """Forget unlinked peers silent for ``forget_after`` s, strangers after ``stranger_ttl`` s."""
        now = time.time()
        for node_id, peer in list(self.items()):
            ttl = forget_after if peer.ever_linked else stranger_ttl
            if not peer.connected and peer.last_seen < now - ttl:
                del self[node_id]

    def outdated(self, link):
        """``link`` speaks an earlier protocol: say so once, naming its peer; mark the peer outdated."""
        node_id = link.target.node_id if link.target is not None else None
        if node_id is None:
            node_id = next((peer.node_id for peer in self.values() if peer.address == link.address[0]
                            and (peer.tcp_port == link.address[1] or not link.outbound)), None)
        peer = self.get(node_id) if node_id else None
        if peer is not None and (not peer.protocol_version or peer.protocol_version >= PROTOCOL_VERSION):
            peer.protocol_version = PROTOCOL_VERSION - 1
        where = "%s:%s" % (link.address[0], link.address[1]) if link.outbound else link.address[0]
        name = "%s (%s)" % (safe_text(peer.name), where) if peer is not None and peer.name else where
        _VERSION_NOTICES.log(logging.WARNING, ("outdated", where), "refusing the link with %s: it runs an older "
                             "NeuroMesh: upgrade it (this computer runs %s)", name, __version__)


def peer_address_allowed(address, allow_public=False):
    """True when ``address`` is an IP literal (never a name: no DNS lookup on the mesh thread)
    of a private network, or any IP literal with --allow-public."""
    if not isinstance(address, str):
        return False
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return allow_public or is_private_address(address)


class TokenBucket:
    """Allows ``rate`` events a second on average and ``burst`` at once (e.g. new dials)."""

    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self, now=None):
        """True, using a token, when one is left; False when the caller must wait."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def clamp_load(load):
    """A peer's load report made safe to rank by: in_flight and queued integers of 0 to
    10,000, parallel of 1 to 1,000; anything else about it is dropped."""
    clean = {}
    for key, low, high in (("in_flight", 0, 10000), ("queued", 0, 10000), ("parallel", 1, 1000)):
        value = load.get(key)
        if type(value) is float and value == value and abs(value) < 1e18:
            value = int(value)
        if type(value) is int:
            clean[key] = min(high, max(low, value))
    return clean


def finite_or_none(value, high=None):
    """``value`` when it is a finite number (at most ``high``), else None: JSON has no Infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    if value in (float("inf"), float("-inf")) or (high is not None and value > high):
        return None
    return value


def signed_hello(key, link, payload):
    """``payload`` (a HELO) with ``key`` and its signature over the peer's nonce and the link's
    binding: it cannot be replayed on another link nor made without the key."""
    if key is not None:
        handshake = link.handshake
        payload["key"] = key.public.hex()
        binding = handshake.secrets.channel_binding
        payload["sig"] = key.sign(helo_message(handshake.peer_nonce, binding, payload["node_id"])).hex()
    return payload


def proven_hello_key(link, node_id, payload, banned=False):
    """The public key proving ``node_id`` on ``link``; ProtocolError (the link closes) when the
    HELO's id is not the hash of its key or the key did not sign this link."""
    try:
        public = bytes.fromhex(payload.get("key") or "")
        signature = bytes.fromhex(payload.get("sig") or "")
    except ValueError:
        raise ProtocolError("HELO with a malformed key or signature")
    if len(public) != 32 or node_id_from_key(public) != node_id:
        raise ProtocolError("HELO claims node id %s, which is not its key's" % safe_text(node_id, 64))
    handshake = link.handshake
    if not verify_signature(public, helo_message(handshake.nonce, handshake.secrets.channel_binding, node_id),
                            signature):
        raise ProtocolError("HELO of %s is not signed by its key for this link" % safe_text(node_id, 64))
    if banned:
        raise ProtocolError("refusing %s for a while: it sent data that failed verification" % node_id)
    return public


def keep_existing_link(own_id, peer_id, existing, new):
    """Of two links between this node and ``peer_id``, whether to keep ``existing`` rather than
    ``new``: both ends keep the link dialed by the smaller node id; on a tie, the newer one."""
    def dialer(link):
        return own_id if link.outbound else peer_id

    if dialer(existing) != dialer(new):
        return dialer(existing) == min(own_id, peer_id)
    return False


def resolve_ipv4(name):
    """The first IPv4 address of the host name ``name`` (blocks: call it off the mesh thread)."""
    return socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


class NameResolver:
    """Looks up the host names of --peer off the mesh thread, so a slow DNS freezes no link:
    one short-lived thread per lookup, at most one in flight per name; the result goes back
    to the loop through ``call_soon`` (its queue and wake-up).

    Methods for the caller (on the mesh thread): ``lookup(name, done)`` starts a lookup unless
    one for ``name`` is under way (then False); ``done(address, error)`` is called on the mesh
    thread when it returns. ``resolve(name)`` (an IPv4 address; it may raise OSError) is the
    lookup itself, ``resolve_ipv4`` unless the caller gives another.
    """

    def __init__(self, call_soon, resolve=None):
        self._call_soon = call_soon
        self._resolve = resolve or resolve_ipv4
        self._pending = set()  # names under way; touched on the mesh thread only

    def lookup(self, name, done):
        if name in self._pending:
            return False
        self._pending.add(name)
        threading.Thread(target=self._run, args=(name, done), name="neuromesh-resolve", daemon=True).start()
        return True

    def _run(self, name, done):
        address, error = None, None
        try:
            address = self._resolve(name)
            if not peer_address_allowed(address, allow_public=True):
                address, error = None, "not an IP address: %s" % safe_text(address, 60)
        except (OSError, UnicodeError, ValueError) as exc:
            error = exc
        except Exception as exc:  # a thread must not die silently
            log.exception("looking up %s failed", safe_text(name))
            error = exc
        self._call_soon(self._finish, name, done, address, error)

    def _finish(self, name, done, address, error):
        self._pending.discard(name)
        done(address, error)


class DialPlan:
    """Which addresses to dial and when: the capped table of dial targets and their backoff.

    It opens no socket. Methods for the caller: ``add_static(host, port)`` for --peer,
    ``target(host, port, node_id)`` to record or refresh an address, ``due(now, busy,
    linked)`` for the targets to dial now (at most ``dial_rate`` new dials a second),
    ``from_exchange(entries, skip, allowed)`` for a PEER: frame, ``failed(target, reason)``
    to back off, ``drop(target)`` and ``forget(node_id)`` for peers that left.
    """

    max_backoff = 30.0
    max_targets = 1024  # addresses worth dialing, from discovery, peer exchange and --peer
    max_exchanged = 256  # entries read from one PEER: frame (a classroom is smaller)
    dial_rate, dial_burst = 10.0, 20

    def __init__(self, node_id, peer_timeout):
        self.node_id = node_id
        self.peer_timeout = peer_timeout
        self.targets = {}
        self.bucket = TokenBucket(self.dial_rate, self.dial_burst)

    def __len__(self):
        return len(self.targets)

    def add_static(self, host, port):
        self.targets[(host, port)] = DialTarget(host, port, static=True)

    def target(self, host, port, node_id=None):
        """The dial target for ``host:port``, made or refreshed for another peer_timeout."""
        key = (host, port)
        target = self.targets.get(key)
        if target is None:
            if len(self.targets) >= self.max_targets:  # a peer's exchange list must not run us in circles
                return DialTarget(host, port, node_id=node_id, expires=0.0)
            target = self.targets[key] = DialTarget(host, port)
        if node_id:
            target.node_id = node_id
        if not target.static:
            target.expires = time.monotonic() + self.peer_timeout
        return target

    def due(self, now, busy, linked):
        """The targets worth dialing now, in random order: not this node, not expired (those are
        dropped), not ``busy`` (a link is dialed for them already), not a node in ``linked``, not
        backing off. The caller takes a token of ``bucket`` for each one it dials."""
        ready = []
        for key, target in list(self.targets.items()):
            if target.node_id == self.node_id:
                continue
            if target.expires is not None and now > target.expires:
                del self.targets[key]
                continue
            if target in busy or target.node_id in linked or now < target.next_dial:
                continue
            ready.append(target)
        random.shuffle(ready)
        return ready

    def known_ids(self):
        """The node ids of the targets (addresses of --peer not yet linked have none)."""
        return {target.node_id for target in self.targets.values() if target.node_id}

    def from_exchange(self, entries, skip, allowed):
        """Record the dial targets of a PEER: frame's ``entries``, but node ids in ``skip`` and
        addresses ``allowed(address)`` refuses; returns how many were taken."""
        taken = 0
        for entry in entries[:self.max_exchanged]:
            if not isinstance(entry, dict):
                continue
            node_id, address, port = entry.get("node_id"), entry.get("address"), entry.get("tcp_port")
            if not isinstance(node_id, str) or node_id in skip or not allowed(address):
                continue
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
                continue
            self.target(address, port, node_id[:64])
            taken += 1
        return taken

    def failed(self, target, reason):
        target.failures += 1
        delay = min(self.max_backoff, 0.25 * (2 ** min(target.failures, 8)))
        target.next_dial = time.monotonic() + delay
        log.debug("cannot reach %s:%d (%s); next try in %.1f s", target.host, target.port, reason, delay)

    def drop(self, target):
        """Forget the address of ``target`` unless it came from --peer."""
        if not target.static:
            self.targets.pop((target.host, target.port), None)

    def forget(self, node_id):
        for key, target in list(self.targets.items()):
            if target.node_id == node_id and not target.static:
                del self.targets[key]


class LinkPolicy:
    """Which links a node keeps, and which peers a received entry goes on to (no sockets: the
    Mesh and the simulated mesh of the tests and the benchmark both use it).

    Links: while a node knows at most ``max_links`` others it links to all (a full mesh). In a
    bigger room it dials ``out_links`` peers of its own, chosen at random, and accepts every
    link; past ``max_links`` it closes random links that peers dialed (``evictions``). That
    leaves a random graph of degree out_links to max_links: connected, a few hops across. A
    link to or from an LLM host is never counted nor closed: every node keeps one to each LLM
    host, so each can chat.

    Forwarding (``forward_to``): the origin sends a new entry to all its peers, marked
    "spread". A node that stores it from a spread frame passes it on only to its peers the
    sender is not linked to: those the sender sent it to itself or left to the node it got it
    from, back to the origin. Peers whose version vector shows they hold it get nothing. In a
    full mesh an entry costs N-1 frames; in a chain each hop forwards at once.
    """

    def __init__(self, max_links):
        self.max_links = max_links
        self.out_links = max(2, (max_links + 2) // 3)

    def full_mesh(self, known):
        """Whether ``known`` other nodes are few enough to link to every one."""
        return known <= self.max_links

    def dial_choices(self, ready, known, outbound, rng=random):
        """Of ``ready`` ((target, is_llm_host) pairs), the targets to dial now, given ``known``
        other nodes and ``outbound`` counted links this node dialed or is dialing."""
        hosts = [target for target, is_host in ready if is_host]
        others = [target for target, is_host in ready if not is_host]
        if self.full_mesh(known):
            return hosts + others
        wanted = max(0, self.out_links - outbound)
        return hosts + rng.sample(others, min(wanted, len(others)))

    def evictions(self, counted, newcomer, rng=random):
        """The peers to unlink so that at most ``max_links`` of the ``counted`` links stay:
        ``counted`` is (node id, dialed by the peer) pairs; random links peers dialed go first,
        never the ``newcomer``'s (a node that joins late must find room)."""
        excess = len(counted) - self.max_links
        if excess <= 0:
            return []
        inbound = [node_id for node_id, dialed_by_peer in counted if dialed_by_peer and node_id != newcomer]
        outbound = [node_id for node_id, dialed_by_peer in counted if not dialed_by_peer and node_id != newcomer]
        rng.shuffle(inbound)
        rng.shuffle(outbound)
        return (inbound + outbound)[:excess]

    @staticmethod
    def forward_to(linked, sender, sender_links, spread, holders=()):
        """The node ids of ``linked`` to pass entries from ``sender`` on to: not the sender, not
        ``holders`` (their vectors show the entries), and when the sender ``spread`` them, not
        the peers in ``sender_links`` (None when the sender has not told its links)."""
        skip = set(holders)
        skip.add(sender)
        if spread and sender_links is not None:
            skip.update(sender_links)
        return [node_id for node_id in linked if node_id not in skip]


class CallQueue:
    """Hands work to the mesh thread from any other: ``call_soon(function, *args)`` queues it and
    ``wake()`` ends the loop's ``select`` early through a socket pair (its ``reader`` is watched,
    ``drain()`` empties it); the mesh thread runs the queue with ``run_calls()``."""

    def __init__(self):
        self._calls = queue.SimpleQueue()
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)

    def wake(self):
        """End the current ``select`` early (any thread)."""
        try:
            self._writer.send(b"\0")
        except OSError:  # buffer full: the loop is awake already; closed: it has stopped
            pass

    def call_soon(self, function, *args):
        """Queue ``function(*args)`` for ``run_calls()`` on the mesh thread (any thread)."""
        self._calls.put((function, args))
        self.wake()

    def run_calls(self):
        while True:
            try:
                function, args = self._calls.get_nowait()
            except queue.Empty:
                return
            function(*args)

    def drain(self):
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self):
        for sock in (self.reader, self._writer):
            close_quietly(sock)


class LinkIO:
    """Moves the mesh's bytes: one selector over the TCP listener, the peer links, the
    discovery socket and its CallQueue's wake-up pair; it accepts, dials, buffers, reads and writes.

    It knows no peers and runs on the mesh thread (but for ``calls``, its CallQueue, which
    other threads hand work to). Every link is TLS (TLSChannel, with
    ``identity``) and starts with the key proof inside it (Handshake, with ``room_key``); nothing
    else is sent or accepted before it. Links from or to public addresses are refused unless ``allow_public``.
    It tells its ``owner`` (the Mesh): ``owner.hello_frame(link)`` is sent first once the peer
    proved the key, ``owner.link_frame(link, marker, payload)`` gets each frame received
    after that (a ProtocolError closes the link) and ``owner.link_closed(link, reason)``
    is told after a link's socket is closed. Methods for the owner: ``listen(host, port)``, ``watch(sock, handler)``,
    ``dial(target)``, ``queue(link, frame)``, ``close(link, reason)``, ``select(timeout)``,
    ``dispatch(events)``, ``close_links(goodbye)`` and ``close_sockets()``.
    """

    max_outgoing = 16 * MiB  # a peer that does not read is dropped, not buffered for
    write_slice = MiB  # plaintext encrypted at a time: a big queue is not copied whole

    def __init__(self, owner, max_frame, counters, identity, room_key=OPEN_ROOM_KEY, allow_public=False):
        self.owner = owner
        self.identity = identity
        self.max_frame = max_frame
        self.counters = counters
        self.room_key = room_key
        self.allow_public = allow_public
        self.links = set()
        self._selector = selectors.DefaultSelector()
        self._listener = None
        self.calls = CallQueue()
        self._selector.register(self.calls.reader, selectors.EVENT_READ, self.calls.drain)

    def listen(self, host, port):
        """Bind the TCP listener for peer links; returns its port. Errors name the flag to change."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if os.name != "nt":  # on Windows SO_REUSEADDR would let two nodes share a port
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError("TCP port %d for peer links is already in use (another NeuroMesh "
                                     "on this machine?): pick another with --tcp-port" % port)
            raise NeuroMeshError("cannot listen on %s:%d: %s (check --host)" % (host, port, exc.strerror))
        self._listener = listener
        self.watch(listener, self._accept)
        return listener.getsockname()[1]

    def watch(self, sock, handler):
        """Call ``handler()`` whenever ``sock`` is readable."""
        self._selector.register(sock, selectors.EVENT_READ, handler)

    def select(self, timeout):
        return self._selector.select(timeout)

    def dispatch(self, events):
        for key, mask in events:
            if not isinstance(key.data, Link):
                key.data()
                continue
            link = key.data
            if mask & selectors.EVENT_WRITE:
                self._writable(link)
            if mask & selectors.EVENT_READ and not link.closed:
                self._readable(link)

    def dial(self, target):
        """Start connecting to ``target``: the new outbound Link; OSError or ValueError when the
        address is bad, has no route or refuses at once."""
        sock = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((target.ip or target.host, target.port))
            if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, getattr(errno, "WSAEWOULDBLOCK", -1)):
                raise OSError(code, os.strerror(code))
        except (OSError, ValueError):
            close_quietly(sock)
            raise
        link = Link(sock, (target.ip or target.host, target.port), True, self.max_frame,
                    TLSChannel(self.identity, False), target)
        self.links.add(link)
        self._selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        self.counters["dials"] += 1
        return link

    def _accept(self):
        for _ in range(16):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: log, keep serving
                log.warning("cannot accept a peer link: %s", exc)
                return
            if not self.origin_allowed(address[0], "from"):
                close_quietly(sock)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(sock, address[:2], False, self.max_frame, TLSChannel(self.identity, True))
            self.links.add(link)
            self._selector.register(sock, selectors.EVENT_READ, link)
            self.counters["accepted"] += 1

    def origin_allowed(self, ip, direction):
        """Whether a link ``direction`` ("from", "to") ``ip`` may be made: private, or --allow-public."""
        if self.allow_public or is_private_address(ip):
            return True
        self.counters["refused_public"] += 1
        log_limited(logging.WARNING, ("public link", ip), "refusing a peer link %s the public address %s "
                    "(--allow-public allows it)", direction, ip)
        return False

    def _queue_all(self, link, frames):
        for frame in frames:
            self.queue(link, frame)

    def queue(self, link, frame):
        """Queue ``frame`` on ``link`` (encrypted when it is written); before the key proof only
        HI!!:/AUTH: frames go."""
        if link.closed:
            return
        if not link.proven and frame[:5] not in HANDSHAKE_MARKERS:
            self.counters["frames_held_back"] += 1
            return
        if link.outgoing and len(link.outgoing) + len(link.wire) + len(frame) > self.max_outgoing:
            log_limited(logging.WARNING, ("not reading", link.address[0]), "dropping the link to %s:%s: it "
                        "does not read what it is sent (%.1f MiB queued)", link.address[0], link.address[1],
                        len(link.outgoing) / MiB)
            self.counters["links_not_reading"] += 1
            self.close(link, "peer does not read what it is sent")
            return
        link.outgoing += frame
        if not link.proven:  # a record for each step of the key proof, as a peer reads them one by one
            self._encrypt(link)
        if not link.connecting:
            self._selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def close_after(self, link, frame, reason):
        """Queue ``frame`` (a goodbye) and close ``link`` once it is sent; ``expire_closing``
        closes it anyway if the peer never reads it."""
        self.queue(link, frame)
        if not link.closed and link.closing is None:
            link.closing = (reason, time.monotonic())

    def expire_closing(self, now, grace=2.0):
        for link in list(self.links):
            if link.closing is not None and now - link.closing[1] > grace:
                self.close(link, link.closing[0])

    def _writable(self, link):
        if link.connecting:
            code = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.close(link, os.strerror(code))
                return
            if not self._connected_peer_allowed(link):
                return
            link.connecting = False
            link.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link.tls.start()
        if len(link.wire) < self.write_slice:  # every frame queued since the last write: few records
            self._encrypt(link, self.write_slice)
        if link.wire:
            try:
                sent = link.sock.send(link.wire)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(link, "send failed: %s" % exc)
                return
            del link.wire[:sent]
        if not link.wire and not (link.outgoing and link.tls.established):
            if link.closing is not None:
                self.close(link, link.closing[0])
                return
            self._selector.modify(link.sock, selectors.EVENT_READ, link)

    def _readable(self, link):
        if link.connecting:
            return
        try:
            data = link.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(link, "receive failed: %s" % exc)
            return
        if not data:
            self.close(link, "connection closed by peer")
            return
        try:
            self._take(link, self._decrypt(link, data))
        except OutdatedPeer as exc:
            self.counters["outdated_peers"] += 1
            self.owner.link_outdated(link)
            self.close(link, str(exc))
        except (ssl.SSLError, ConnectionResetError) as exc:
            self.counters["tls_errors"] += 1
            log_limited(logging.INFO, ("tls error", link.address[0]), "closing link to %s:%s: not a NeuroMesh "
                        "TLS link (%s)", link.address[0], link.address[1], safe_text(str(exc), 120))
            self.close(link, "TLS failed: %s" % safe_text(str(exc), 120))
        except ProtocolError as exc:
            self.counters["protocol_errors"] += 1
            text = str(exc)
            log_limited(logging.WARNING, ("protocol error", link.address[0], text[:30]),
                        "closing link to %s:%s: %s", link.address[0], link.address[1], text)
            if not link.proven:  # the key proof it still waits for: so both ends log why
                self._send_now(link)
            self.close(link, text)

    def _send_now(self, link):
        """One try to send what is queued on ``link``, without waiting."""
        self._encrypt(link)
        try:
            link.sock.send(link.wire)
        except OSError:
            pass

    def _connected_peer_allowed(self, link):
        try:
            ip = link.sock.getpeername()[0]
        except OSError as exc:
            self.close(link, "connect failed: %s" % exc)
            return False
        if not self.origin_allowed(ip, "to"):
            self.close(link, "a public address (--allow-public allows it)")
            return False
        return True

    def _decrypt(self, link, data):
        """The plaintext in ``data``; once TLS is up, the key proof starts inside it."""
        plain = link.tls.receive(data)
        if link.handshake is None and link.tls.established:
            link.handshake = Handshake(self.room_key, link.outbound, link.tls.certificate)
            self.counters["tls_handshakes"] += 1
            self._queue_all(link, link.handshake.start())
        link.wire += link.tls.wire()
        if link.wire and not link.closed:
            self._selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        return plain

    def _take(self, link, data):
        """Feed ``data`` to the link's decoder and handle every complete frame: the key proof's
        frames one by one until it is done, then the owner's frames."""
        if not data:
            return
        frames = link.decoder.feed(data)
        while frames:
            link.last_received = time.monotonic()  # only a complete frame shows the peer is alive
            handshaking = not link.proven
            for marker, payload in frames:
                if link.closed:
                    return
                self.counters["frames_in"] += 1
                if handshaking:
                    self._handshake_step(link, marker, payload)
                elif marker in HANDSHAKE_MARKERS:
                    raise ProtocolError("a %s frame after the key proof" % marker.decode("ascii"))
                else:
                    self.owner.link_frame(link, marker, payload)
            frames = link.decoder.feed(b"") if handshaking and not link.closed else ()

    def _handshake_step(self, link, marker, payload):
        self._queue_all(link, link.handshake.receive(marker, payload))
        if link.handshake.done:
            link.decoder.proven = True
            self.counters["key_proofs"] += 1
            self.queue(link, self.owner.hello_frame(link))

    def detach(self, link):
        """Take ``link`` off the loop, its socket open and blocking (what is queued, encrypted, is
        in ``link.wire``): the relay's thread serves it from here on."""
        self._encrypt(link)
        link.closed = True
        self.links.discard(link)
        self._selector.unregister(link.sock)
        link.sock.setblocking(True)

    def _encrypt(self, link, limit=None):
        """Move what is queued on ``link`` (at most ``limit`` bytes of it) through its TLS."""
        if link.outgoing and link.tls.established:
            if limit is None or len(link.outgoing) <= limit:
                link.tls.send(link.outgoing)
                link.outgoing.clear()
            else:
                with memoryview(link.outgoing) as queued:  # no copy of a big queue's slice
                    link.tls.send(queued[:limit])
                del link.outgoing[:limit]
        link.wire += link.tls.wire()

    def close(self, link, reason):
        if link.closed:
            return
        link.closed = True
        self.links.discard(link)
        try:
            self._selector.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        close_quietly(link.sock)
        self.owner.link_closed(link, reason)

    def close_links(self, goodbye):
        """Send ``goodbye`` on every handshaken link, flush for up to a second, close them all."""
        for link in list(self.links):
            if link.peer_id is not None and link.proven and not link.connecting:
                link.tls.send(bytes(link.outgoing) + goodbye)
                link.outgoing.clear()
                link.wire += link.tls.wire()
        deadline = time.monotonic() + 1.0
        for link in list(self.links):  # best effort flush, bounded in time
            link.sock.setblocking(True)
            link.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if link.wire and not link.connecting:
                    link.sock.sendall(link.wire)
            except OSError:
                pass
            self.close(link, "this node is stopping")

    def close_sockets(self):
        """Close the listener, the wake-up pair and the selector (after ``close_links``)."""
        close_quietly(self._listener)
        self.calls.close()
        self._selector.close()


class MeshListener:
    """What a Mesh tells a room that listens to it; this default hears it all and does nothing.

    The mesh calls these on its own thread, so they must return quickly: ``hello_extra()``
    returns fields to add to this node's HELO and announcements; ``peer_up(peer)``,
    ``peer_down(peer, reason)``, ``peer_changed(peer)`` (its LLM capability changed),
    ``peer_measured(peer)`` (a new link's first round trip is known), and
    ``frame(marker, peer, payload)`` for each frame no room registered a handler for (a
    ProtocolError raised there closes the link), ``relay_connection(stream, node_id, address)``
    (a peer's relay connection: True once taken, to serve on a thread of its own).
    """

    def hello_extra(self):
        return {}

    def peer_up(self, peer):
        pass

    def peer_down(self, peer, reason):
        pass

    def peer_changed(self, peer):
        pass

    def peer_measured(self, peer):
        pass

    def frame(self, marker, peer, payload):
        pass

    def relay_connection(self, stream, node_id, address):
        """A proven relay connection from the peer ``node_id`` (a TLSStream): True if served here."""
        return False


class MeshListeners(MeshListener):
    """Tells every room that listens to a mesh (``add(listener)``, in the order they were built)
    what happened; one room's failure is logged and the others still hear it. HELO fields are
    merged, and a relay connection goes to the first listener that takes it (it is closed when
    none does)."""

    def __init__(self):
        self._listeners = []

    def add(self, listener):
        self._listeners.append(listener)

    def _tell(self, event, *args):
        for listener in self._listeners:
            try:
                getattr(listener, event)(*args)
            except Exception:
                log.exception("%s failed to hear %s", type(listener).__name__, event)

    def hello_extra(self):
        extra = {}
        for listener in self._listeners:
            extra.update(listener.hello_extra())
        return extra

    def peer_up(self, peer):
        self._tell("peer_up", peer)

    def peer_down(self, peer, reason):
        self._tell("peer_down", peer, reason)

    def peer_changed(self, peer):
        self._tell("peer_changed", peer)

    def peer_measured(self, peer):
        self._tell("peer_measured", peer)

    def frame(self, marker, peer, payload):
        log.debug("no handler for %s frames", marker.decode("ascii"))
        for listener in self._listeners:  # a ProtocolError raised here closes the link
            listener.frame(marker, peer, payload)

    def relay_connection(self, stream, node_id, address):
        if not any(listener.relay_connection(stream, node_id, address) for listener in self._listeners):
            stream.close()
        return True


class Heartbeats:
    """Keeps a mesh's links honest, on the mesh thread: pings quiet links, closes those silent
    past --peer-timeout (or stuck dialing, or with no handshake), times round trips from PONGs
    and forgets peers down too long. ``beat(now)`` runs when ``next_due`` has come."""

    connect_timeout = 5.0
    handshake_timeout = 10.0
    forget_after = 600.0  # seconds a down peer stays listed

    def __init__(self, node_id, config, io, peer_table, listener):
        self.node_id = node_id
        self.config = config
        self.io = io
        self.peer_table = peer_table
        self.listener = listener
        self.interval = max(0.05, config.peer_timeout / 3.0)
        self.next_due = 0.0

    def beat(self, now):
        self.next_due = now + self.interval
        for link in list(self.io.links):
            if link.connecting:
                if now - link.opened > self.connect_timeout:
                    self.io.close(link, "connect timed out")
            elif link.peer_id is None:
                if now - link.opened > self.handshake_timeout:
                    self.io.close(link, "no handshake")
            elif now - link.last_received > self.config.peer_timeout:
                self.io.close(link, "silent for %.1f s (--peer-timeout)" % (now - link.last_received))
            elif self.node_id < link.peer_id or now - link.last_received > 1.5 * self.interval:
                # One end pings (its PONG shows the other alive): half the idle frames of both pinging.
                self.io.queue(link, encode_frame(PING, {"t": now}))
        self.peer_table.expire(max(self.config.peer_timeout, 2 * self.config.announce_interval),
                               max(self.forget_after, 5 * self.config.peer_timeout))
        self.io.expire_closing(now)

    def ping(self, link, payload):
        self.io.queue(link, encode_frame(PONG, {"t": payload.get("t")}))

    def pong(self, peer, payload):
        sent = payload.get("t")
        if isinstance(sent, (int, float)) and not isinstance(sent, bool):
            first = peer.rtt_ms is None
            peer.rtt_ms = max(0.0, (time.monotonic() - sent) * 1000.0)
            if first:
                self.listener.peer_measured(peer)


class Dialer:
    """Decides whom a mesh dials and when, on the mesh thread: the targets due (DialPlan), the
    link budget (LinkPolicy), names looked up off the thread (NameResolver), announcements
    heard; and past --max-links, which links to close. ``check(now)`` runs when ``next_check``
    has come; ``soon(moment)`` brings it forward."""

    dial_check_interval = 0.1  # seconds between a node's announcement and the dial check it triggers

    def __init__(self, node_id, config, io, peer_table, dials, resolver, listener, counters, poll_interval):
        self.node_id = node_id
        self.config = config
        self.io = io
        self.peer_table = peer_table
        self.dials = dials
        self.resolver = resolver
        self.listener = listener
        self.counters = counters
        self.poll_interval = poll_interval
        self.link_policy = LinkPolicy(config.max_links)
        self.next_check = 0.0

    def soon(self, moment):
        """Check the dial targets no later than ``moment`` (a backoff ends, a node spoke)."""
        self.next_check = min(self.next_check, moment)

    def check(self, now):
        self.next_check = now + self.poll_interval  # sooner when told (soon)
        self.dial_due(now)

    def dial_due(self, now):
        busy = {link.target for link in self.io.links if link.target is not None}
        linked = {node_id for node_id, peer in self.peer_table.items() if peer.connected}
        ready = self.dials.due(now, busy, linked)
        if not ready:
            return
        known = len((self.dials.known_ids() | linked) - {self.node_id})
        choices = self.link_policy.dial_choices([(target, self._is_llm_host(target.node_id)) for target in ready],
                                                known, self._outbound_links())
        for target in choices:
            if not self._address_known(target, now):
                continue
            if not self.dials.bucket.take(now):  # one PEER: frame must not start hundreds of dials
                break
            try:
                self.io.dial(target)
            except (OSError, ValueError) as exc:  # bad address, no route, refused at once
                self.dials.failed(target, exc)
                self.soon(target.next_dial)
            target.ip = None  # a name is looked up again for its next dial

    def _address_known(self, target, now):
        """Whether ``target`` can be dialed now: an IP address, or a host name looked up (off
        this thread); else a lookup starts, and the target waits for it."""
        if target.ip is not None or peer_address_allowed(target.host, allow_public=True):
            return True
        if self.resolver.lookup(target.host, functools.partial(self._looked_up, target)):
            target.next_dial = now + Heartbeats.connect_timeout + DialPlan.max_backoff  # its answer resets it
        return False

    def _looked_up(self, target, address, error):
        """On the mesh thread: the lookup of ``target.host`` returned; dial it now, or back off."""
        if address is None:
            log_limited(logging.WARNING, ("lookup", target.host), "cannot look up the peer %s: %s (check the "
                        "name given with --peer, or give its IP address)", safe_text(target.host), error)
            self.dials.failed(target, error)
        else:
            target.ip, target.next_dial = address, 0.0
        self.soon(target.next_dial)

    def _is_llm_host(self, node_id):
        peer = self.peer_table.get(node_id) if node_id else None
        return peer is not None and peer.has_llm

    def _outbound_links(self):
        """Counted links this node dialed (linked or still dialing): not those to LLM hosts."""
        count = 0
        for link in self.io.links:
            node_id = link.peer_id or (link.target.node_id if link.target is not None else None)
            if link.outbound and link.closing is None and not self._is_llm_host(node_id):
                count += 1
        return count

    def trim(self, newcomer):
        """Past --max-links, unlink random peers that dialed this node (see LinkPolicy);
        an LLM host keeps every link, and no link to an LLM host counts."""
        if self.listener.hello_extra().get("has_llm"):
            return
        counted = [(peer.node_id, not peer.link.outbound) for peer in self.peer_table.values()
                   if peer.link is not None and peer.link.closing is None and not peer.has_llm]
        for node_id in self.link_policy.evictions(counted, newcomer):
            self.counters["links_trimmed"] += 1
            self.io.close_after(self.peer_table[node_id].link, encode_frame(GOODBYE, {"reason": "links full"}),
                                "this node keeps at most %d links (--max-links)" % self.config.max_links)

    def closed(self, link, reason):
        """``link`` closed: back off from its target, or redial it soon."""
        if link.target is not None and link.peer_id is None and reason != "that is this node itself":
            self.dials.failed(link.target, reason)
        elif link.target is not None:
            link.target.next_dial = time.monotonic() + 0.25  # relink soon, not in a tight loop
        if link.target is not None:
            self.soon(link.target.next_dial)

    def heard(self, ip, message):
        """An announcement from ``ip``: note the node and its address; dial it soon if not linked."""
        node_id = message["node_id"]
        target = self.dials.target(ip, message["tcp_port"], node_id)
        if message["message_type"] == "OFFLINE":
            self.dials.drop(target)
            return
        known = node_id in self.peer_table
        peer = self.peer_table.admit(node_id)
        if peer is None:
            return
        if not known:
            log.info("heard %s at %s", safe_text(message.get("name") or node_id[:8]), ip)
        if not peer.connected:
            peer.address, peer.tcp_port = ip, message["tcp_port"]
        peer.update(message)
        if not peer.connected:
            target.failures, target.next_dial = 0, 0.0  # a node that speaks is worth dialing now
            self.soon(time.monotonic() + self.dial_check_interval)


class PeerExchange:
    """Tells linked peers about each other (PEERS: frames) and reads what they tell, on the mesh
    thread: one seed joins a whole mesh, and forwards spare the peers the sender reached
    (LinkPolicy). The addresses heard go to the DialPlan, and the Dialer checks them at once."""

    max_link_list = 1024  # node ids of one PEER: frame kept as the sender's links

    def __init__(self, node_id, config, io, peer_table, dials, dialer):
        self.node_id = node_id
        self.config = config
        self.io = io
        self.peer_table = peer_table
        self.dials = dials
        self.dialer = dialer

    def send(self, only=None):
        """Tell every linked peer (or ``only`` that one) about the others."""
        linked = [peer for peer in self.peer_table.values() if peer.connected]
        for peer in linked if only is None else [only]:
            others = [{"node_id": other.node_id, "name": other.name, "address": other.address,
                       "tcp_port": other.tcp_port} for other in linked if other is not peer]
            self.io.queue(peer.link, encode_frame(PEERS, {"peers": others}))

    def handle(self, peer, payload):
        entries = payload.get("peers")
        if not isinstance(entries, list):
            raise ProtocolError("PEER: frame without a peer list")
        # Whom the peer is linked to (it lists all but us): forwarding spares those (LinkPolicy).
        peer.links = frozenset([self.node_id] + [entry["node_id"] for entry in entries[:self.max_link_list]
                                                 if isinstance(entry, dict) and isinstance(entry.get("node_id"), str)])
        skip = {node_id for node_id, peer in self.peer_table.items() if peer.connected} | {self.node_id}
        self.dials.from_exchange(entries, skip, lambda address: peer_address_allowed(
            address, self.config.allow_public))
        self.dialer.dial_due(time.monotonic())


class LinkAdmission:
    """Admits a link on its HELO:, on the mesh thread: checks it, links its peer (retiring a
    duplicate link, telling linked peers), or hands a proven relay connection to the listener."""

    def __init__(self, node_id, io, peer_table, dials, dialer, peer_exchange, listener, counters):
        self.node_id = node_id
        self.io = io
        self.peer_table = peer_table
        self.dials = dials
        self.dialer = dialer
        self.peer_exchange = peer_exchange
        self.listener = listener
        self.counters = counters

    def hello(self, link, payload):
        """The HELO: on ``link``: a peer linked (a ProtocolError closes the link)."""
        if link.peer_id is not None:
            raise ProtocolError("second handshake on one link")
        node_id, tcp_port = payload.get("node_id"), payload.get("tcp_port")
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
            raise ProtocolError("handshake without a node id")
        if not isinstance(tcp_port, int) or isinstance(tcp_port, bool) or not 0 <= tcp_port <= 65535:
            raise ProtocolError("handshake without a TCP port")
        public = proven_hello_key(link, node_id, payload, self.peer_table.banned(node_id))
        if payload.get("role") == "relay":
            self._hand_off_relay(link, node_id)
            return
        if link.target is not None:
            link.target.node_id = node_id
        if node_id == self.node_id:
            self.io.close(link, "that is this node itself")
            return
        peer = self.peer_table.admit(node_id)
        if peer is None:
            self.io.close(link, "the peer table is full")
            return
        link.peer_id, link.hello = node_id, payload
        current = peer.link
        if current is not None and current is not link:
            if keep_existing_link(self.node_id, node_id, current, link):
                self.io.close(link, "duplicate link")
                return
            current.peer_id = None  # retire it quietly: the peer is not down
            self.io.close(current, "replaced by a newer link")
        peer.link, peer.ever_linked = link, True
        peer.address = link.address[0]
        peer.tcp_port = tcp_port or peer.tcp_port
        if link.target is not None:
            link.target.failures = 0
        else:
            self.dials.target(peer.address, peer.tcp_port, node_id)
        peer.update(payload)
        peer.public_key = public
        self.io.queue(link, encode_frame(PING, {"t": time.monotonic()}))
        if current is None:
            log.info("linked to %s (%s:%d)", safe_text(peer.name), peer.address, peer.tcp_port)
            tell_versions(peer)
            self.peer_exchange.send()
            self.dialer.trim(node_id)
        else:  # what the retired link still held unsent is lost: the peer hears our links again
            self.peer_exchange.send(peer)
        self.listener.peer_up(peer)

    def _hand_off_relay(self, link, node_id):
        """A peer's relay connection (proven like a link): its HTTP requests go to the listener."""
        peer = self.peer_table.get(node_id)
        if peer is None or peer.link is None or link.outbound:
            raise ProtocolError("a relay connection from a peer that is not linked")
        self.io.queue(link, encode_frame(RELAY_READY, {}))
        self.io.detach(link)
        self.counters["relay_connections"] += 1
        self.listener.relay_connection(TLSStream(link.sock, link.tls, bytes(link.wire)), node_id, link.address[0])


class Mesh:
    """Keeps one framed TCP link to each peer, on one thread with one selector: the frames of a
    link (LinkAdmission admits it on its HELO; Heartbeats, Dialer, PeerExchange, Discovery,
    DialPlan and LinkIO do the rest). Its room key
    comes from --mesh-key (the public open-room key without one) and is never shown.

    Methods for the caller (any thread): ``start()``, ``serve_forever()`` (on its own
    thread), ``shutdown()``, ``send(peer_id, marker, payload)``, ``broadcast(marker,
    payload)``, ``forward(marker, payload, sender, spread, holders)``, ``announce_now()``,
    ``peers()``, ``linked_peers()``, ``stats()``, ``rename(name)``, ``serve_page_on(http_port)``
    (both told to peers in each HELO), and two registrations, made by each room where it is
    built: ``handle(marker, handler)`` by the room that answers a kind of frame (SyncWorker for
    SYNC: and FILE:, LLMAccess for LREQ: and LRES:), ``watch(listener)`` by each room that hears
    of peers (see MeshListener; on the mesh thread, in the order they registered). LinkIO calls
    ``hello_frame(link)``, ``link_frame(link, marker, payload)`` and ``link_closed(link, reason)``.
    """

    poll_interval = 2.0  # the longest the loop sleeps; timers wake it sooner

    def __init__(self, config, node_id, listener=None, key=None, resolve=None, identity=None, name=None):
        self.config = config
        self.node_id = node_id
        self.key = key  # the NodeKey that proves node_id in every HELO
        self.name = name or config.name
        self.http_port = 0  # this node's page, once it is bound (serve_page_on)
        self.listener = MeshListeners()
        if listener is not None:
            self.listener.add(listener)
        self._handlers = {}  # marker -> handler(peer, payload), registered by the rooms that answer them
        self.lock = threading.RLock()  # guards the peer table; held by the loop while it works
        self.peer_table = PeerTable()
        self.counters = collections.Counter()
        self.tcp_port = None
        self.room_key = derive_room_key(config.mesh_key)  # never logged, never shown
        identity = identity or TLSIdentity.load_or_create(config.data_dir, config.tls_max)
        self.io = LinkIO(self, config.max_message_size, self.counters, identity, self.room_key, config.allow_public)
        self.dials = DialPlan(node_id, config.peer_timeout)
        resolver = NameResolver(self.call_soon, resolve)  # resolve: the lookup of --peer names
        self.heartbeats = Heartbeats(node_id, config, self.io, self.peer_table, self.listener)
        self.dialer = Dialer(node_id, config, self.io, self.peer_table, self.dials, resolver, self.listener,
                             self.counters, self.poll_interval)
        self.peer_exchange = PeerExchange(node_id, config, self.io, self.peer_table, self.dials, self.dialer)
        self.admission = LinkAdmission(node_id, self.io, self.peer_table, self.dials, self.dialer,
                                       self.peer_exchange, self.listener, self.counters)
        self.discovery = None
        if not config.no_discovery:
            self.discovery = Discovery(config.udp_port, config.broadcast, node_id, config.announce_interval,
                                       self.counters, self.room_key, config.allow_public)
        if config.allow_public:
            log.warning("--allow-public: peers and announcements from public addresses are accepted")
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Bind the TCP listener and the discovery socket; errors here name the flag to change."""
        self.tcp_port = self.io.listen(self.config.host, self.config.tcp_port)
        if self.discovery is not None:
            try:
                self.io.watch(self.discovery.open(), self._receive_announcements)
            except Exception:
                self.io.close_sockets()
                raise
        for host, port in self.config.static_peers:
            self.dials.add_static(host, port)
        self._stopped.clear()

    def serve_forever(self):
        """Run the loop until ``shutdown()``; never raises for what a peer sends."""
        try:
            self._announce_if_due(time.monotonic())
            while not self._stopping.is_set():
                try:
                    events = self.io.select(self._select_timeout())
                    with self.lock:
                        self.io.dispatch(events)
                        self.io.calls.run_calls()
                        self._run_timers()
                except Exception:  # a bug must not kill the mesh: log it and go on
                    log.exception("error in the mesh loop")
                    self.counters["loop_errors"] += 1
                    time.sleep(0.05)
        finally:
            self._close_all()
            self._stopped.set()

    @property
    def stopping(self):
        """True once ``shutdown()`` was asked: links closing now are this node's doing."""
        return self._stopping.is_set()

    def shutdown(self, timeout=5.0):
        """Say goodbye to every peer, stop the loop and wait for it (call from another thread)."""
        self._stopping.set()
        self.io.calls.wake()
        self._stopped.wait(timeout)

    # -- thread-safe requests ------------------------------------------------

    def call_soon(self, function, *args):
        """Run ``function(*args)`` on the mesh thread."""
        self.io.calls.call_soon(function, *args)

    def unlink(self, peer_id, reason, seconds=60.0):
        """Close the link to ``peer_id`` and refuse it for ``seconds`` (any thread)."""
        def close():
            link = self.peer_table.ban(peer_id, seconds)
            if link is not None:
                self.io.close(link, reason)
        self.call_soon(close)

    def send(self, peer_id, marker, payload):
        """Queue a frame to one linked peer; quietly dropped if it is not linked."""
        frame = encode_frame(marker, payload)
        self.call_soon(self._send_to_peer, peer_id, frame)

    def broadcast(self, marker, payload, exclude=None):
        """Queue a frame to every linked peer but ``exclude``. With no such peer nothing is encoded:
        a new peer's catch-up would otherwise encode every batch again to forward it to nobody."""
        # Read without the lock the loop holds while it works (list() copies the table at once): a
        # peer linked a moment later gets this from the SYNC every new link starts with.
        if not any(peer.connected and peer.node_id != exclude for peer in list(self.peer_table.values())):
            return
        frame = encode_frame(marker, payload)
        self.call_soon(self._send_to_all, frame, exclude)

    def forward(self, marker, payload, sender, spread, holders=()):
        """Queue a frame of entries received from ``sender`` (``spread``: in a spread frame) to
        the peers that may lack them (see LinkPolicy.forward_to); ``holders`` hold them."""
        frame = encode_frame(marker, payload)
        self.call_soon(self._forward_frame, frame, sender, spread, frozenset(holders))

    def announce_now(self):
        self.call_soon(self._announce, "ONLINE")

    def peers(self):
        """A snapshot of the peer table as dicts, linked peers first."""
        with self.lock:
            records = [peer.to_dict() for peer in self.peer_table.values()]
        return sorted(records, key=lambda record: (not record["connected"], record["name"]))

    def linked_peers(self):
        with self.lock:
            return [peer for peer in self.peer_table.values() if peer.connected]

    def stats(self):
        with self.lock:
            return dict(self.counters, links=len(self.io.links), dial_targets=len(self.dials),
                        connected_peers=sum(1 for p in self.peer_table.values() if p.connected))

    @property
    def broadcast_addresses(self):
        """Where announcements go (none without discovery)."""
        return [] if self.discovery is None else self.discovery.broadcast_addresses

    # -- the loop ------------------------------------------------------------

    def _select_timeout(self):
        """Seconds the loop may sleep: until a heartbeat, an announcement or a dial check is due
        (at most ``poll_interval``); an idle node wakes rarely."""
        due = min(self.heartbeats.next_due, self.dialer.next_check)
        if self.discovery is not None:
            due = min(due, self.discovery.next_due)
        return min(self.poll_interval, max(0.0, due - time.monotonic()))

    def _run_timers(self):
        now = time.monotonic()
        self._announce_if_due(now)
        if now >= self.heartbeats.next_due:
            self.heartbeats.beat(now)
        if now >= self.dialer.next_check:  # not at every frame or datagram: it walks every target
            self.dialer.check(now)

    # -- discovery -----------------------------------------------------------

    def hello_payload(self):
        payload = {
            "node_id": self.node_id, "name": self.name, "version": __version__,
            "protocol_version": PROTOCOL_VERSION, "tcp_port": self.tcp_port, "http_port": self.http_port,
            "has_llm": False, "models": [],
        }
        payload.update(self.listener.hello_extra())
        return payload

    def hello_frame(self, link):
        return encode_frame(HELLO, signed_hello(self.key, link, self.hello_payload()))


    def _announce(self, kind):
        if self.discovery is not None:
            self.discovery.announce(kind, self.hello_payload())

    def _announce_if_due(self, now):
        if self.discovery is not None and self.discovery.due(now):
            self._announce("ONLINE")

    def _receive_announcements(self):
        for ip, message in self.discovery.receive():
            self.dialer.heard(ip, message)

    # -- frames ----------------------------------------------------------------

    def link_frame(self, link, marker, payload):
        """Handle one frame from ``link``; a ProtocolError closes the link."""
        check_frame(marker, payload, link)
        if marker == HELLO:
            self.admission.hello(link, payload)
            return
        if link.peer_id is None:
            raise ProtocolError("%s frame before the handshake" % marker.decode("ascii"))
        peer = self.peer_table.get(link.peer_id)
        if peer is None:
            return
        # Frames on a duplicate link that is being retired are still handled (every handler is
        # idempotent): during a dial race the far end may briefly send on the other link.
        peer.last_seen = time.time()
        if marker == PING:
            self.heartbeats.ping(link, payload)
        elif marker == PONG:
            self.heartbeats.pong(peer, payload)
        elif marker == PEERS:
            self.peer_exchange.handle(peer, payload)
        elif marker == GOODBYE:
            if link.target is not None:
                self.dials.drop(link.target)
            self.dials.forget(peer.node_id)
            self.io.close(link, "peer said goodbye")
        elif marker == LLM_CAPS:
            peer.update(payload)
            self.listener.peer_changed(peer)
        else:
            self._pass_on(marker, peer, payload)

    def handle(self, marker, handler):
        """``handler(peer, payload)`` gets every ``marker`` frame, on the mesh thread (a
        ProtocolError raised there closes the link)."""
        self._handlers[marker] = handler

    def watch(self, listener):
        """``listener`` (a MeshListener) hears of peers from now on; register before ``start()``."""
        self.listener.add(listener)

    def rename(self, name):
        """This node's new name, in its HELO and announcements from now on."""
        self.name = name

    def serve_page_on(self, http_port):
        """The port of this node's page, told to peers in its HELO and announcements."""
        self.http_port = http_port

    def _pass_on(self, marker, peer, payload):
        try:
            handler = self._handlers.get(marker)
            if handler is None:
                self.listener.frame(marker, peer, payload)
            else:
                handler(peer, payload)
        except ProtocolError:
            raise
        except Exception:
            log.exception("error handling a %s frame from %s", marker.decode("ascii"), peer.name)

    def dial_relay(self, node_id, timeout):
        """A new relay connection to the linked peer ``node_id`` (blocks: call it off the mesh
        thread): a TLSStream proven as a link is, on which HTTP/1.1 requests to its /relay/... go."""
        peer = self.peer_table.get(node_id)
        if peer is None or not peer.address or not peer.tcp_port:
            raise ConnectionError("no address for the peer %s" % node_id[:8])
        return dial_relay(self.io.identity, self.room_key, self.key, (peer.address, peer.tcp_port), node_id, timeout)

    # -- sending and closing ---------------------------------------------------

    def _send_to_peer(self, peer_id, frame):
        peer = self.peer_table.get(peer_id)
        if peer is not None and peer.link is not None:
            self.io.queue(peer.link, frame)

    def _send_to_all(self, frame, exclude):
        for peer in list(self.peer_table.values()):
            if peer.link is not None and peer.node_id != exclude:
                self.io.queue(peer.link, frame)

    def _forward_frame(self, frame, sender, spread, holders):
        peer = self.peer_table.get(sender)
        linked = [node_id for node_id, other in self.peer_table.items() if other.link is not None]
        targets = LinkPolicy.forward_to(linked, sender, peer.links if peer is not None else None, spread, holders)
        self.counters["forwards_sent"] += len(targets)
        self.counters["forwards_spared"] += len(linked) - len(targets) - (sender in linked)
        for node_id in targets:
            self.io.queue(self.peer_table[node_id].link, frame)

    def link_outdated(self, link):
        """LinkIO met an earlier protocol on ``link``: say so once, naming the peer; mark it outdated."""
        self.peer_table.outdated(link)

    def link_closed(self, link, reason):
        """After LinkIO closed ``link``: back off or redial its target; its peer is down."""
        self.dialer.closed(link, reason)
        peer = self.peer_table.get(link.peer_id) if link.peer_id else None
        if peer is not None and peer.link is link:
            peer.link = None
            peer.rtt_ms = None
            peer.links = None
            peer.last_seen = time.time()
            log.info("lost %s: %s", safe_text(peer.name), reason)
            self.counters["peers_lost"] += 1
            self.listener.peer_down(peer, reason)
            if not self._stopping.is_set():
                self.peer_exchange.send()  # peers must not spare forwards on a link that is gone

    def _close_all(self):
        goodbye = encode_frame(GOODBYE, {"reason": "shutdown"})
        with self.lock:
            self.io.close_links(goodbye)
            try:
                self._announce("OFFLINE")
            finally:
                if self.discovery is not None:
                    self.discovery.close()
                self.io.close_sockets()


###############################################################################
# Events ######################################################################
###############################################################################


class EventBus:
    """Fans out events (peer up/down, new message, ...) to subscribers such as SSE clients.

    ``close()`` when the node stops: ``closed`` tells the subscribers' streams to end.
    """

    max_pending = 1000

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers = set()
        self._closed = threading.Event()

    def close(self):
        self._closed.set()

    @property
    def closed(self):
        return self._closed.is_set()

    def subscribe(self):
        inbox = queue.Queue(self.max_pending)
        with self._lock:
            self._subscribers.add(inbox)
        return inbox

    def unsubscribe(self, inbox):
        with self._lock:
            self._subscribers.discard(inbox)

    def publish(self, kind, data):
        event = {"type": kind, "data": data, "time": utc_now()}
        with self._lock:
            subscribers = list(self._subscribers)
        for inbox in subscribers:
            try:
                inbox.put_nowait(event)
            except queue.Full:  # a stuck client loses events, never the node
                pass

    @property
    def subscriber_count(self):
        with self._lock:
            return len(self._subscribers)


###############################################################################
# Sync ########################################################################
###############################################################################
#
# SYNC: {"vector": {origin: seq}, "gaps": [origin]}   the contiguous prefix of each origin's log
#                                    I hold; gaps: origins whose pushes came past it (send them now)
# FILE: {"entries": [entry, ...], "more": bool}   entries the receiver lacks, in bounded batches
#
# Each side sends SYNC on link-up, and every --sync-interval to a peer when it has news for it
# or the peer's last vector shows entries it lacks; the other answers with FILE when the
# vector lacks something. New entries are pushed at once ("spread": true) and forwarded once
# to the peers that may lack them (LinkPolicy.forward_to), so a chain A-B-C converges without
# an A-C link; periodic sync only heals what a push missed. An idle mesh sends no SYNC at all.
# A push that starts past what the receiver holds (it missed one, or was away) is dropped, and
# the receiver asks its sender at once with "gaps"; those origins are answered in full.


def vector_ahead(vector, other):
    """Whether ``vector`` holds an entry ``other`` lacks."""
    return any(seq > other.get(origin, 0) for origin, seq in vector.items())


def vector_holds(vector, entries):
    """Whether ``vector`` shows every one of ``entries`` held."""
    return all(vector.get(entry["origin"], 0) >= entry["seq"] for entry in entries)


class SyncRequests:
    """The SYNC: frames waiting for an answer, each a request (its vector and its gaps): at most
    one per peer (a newer one replaces the pending one), at most ``max_peers`` peers, each
    answered at most every ``gap`` seconds, and the same request of one peer not again within
    ``repeat_gap`` seconds: such a repeat is dropped, since answered late it would resend all
    the peer got meanwhile. Thread-safe."""

    def __init__(self, gap, repeat_gap, max_peers=1024):
        self.gap, self.repeat_gap, self.max_peers = gap, repeat_gap, max_peers
        self._lock = threading.Lock()
        self._pending = collections.OrderedDict()  # peer id -> newest vector, oldest first
        self._answered = {}  # peer id -> (monotonic time, vector) of the last answer

    def __len__(self):
        with self._lock:
            return len(self._pending)

    def put(self, peer_id, vector):
        """Keep ``vector`` as ``peer_id``'s request; returns "new", "merged", "repeated" or "dropped"."""
        with self._lock:
            last, last_vector = self._answered.get(peer_id, (None, None))
            if vector == last_vector and time.monotonic() < last + self.repeat_gap:
                return "repeated"
            if peer_id in self._pending:
                self._pending[peer_id] = vector
                return "merged"
            if len(self._pending) >= self.max_peers:
                return "dropped"
            self._pending[peer_id] = vector
            return "new"

    def take(self, now):
        """``(peer_id, vector)`` of a request due now, or None; and the seconds until the next is due."""
        with self._lock:
            wait = None
            for peer_id, vector in list(self._pending.items()):
                last, last_vector = self._answered.get(peer_id, (None, None))
                due = 0.0 if last is None else last + (self.repeat_gap if vector == last_vector else self.gap)
                if due <= now:
                    del self._pending[peer_id]
                    self._answered[peer_id] = (now, vector)
                    return (peer_id, vector), 0.0
                wait = due - now if wait is None else min(wait, due - now)
            return None, wait

    def forget(self, peer_id):
        with self._lock:
            self._pending.pop(peer_id, None)
            self._answered.pop(peer_id, None)


class SyncWorker(MeshListener):
    """Runs the store side of sync on its own thread, so the mesh loop never waits on SQLite.

    It registers itself where it is built: with the store, to hear each local write (pushed to
    peers, then published to the pages: ``local_written``), and with the mesh, for SYNC: and
    FILE: frames (``handle_sync``/``handle_file``) and to hear peers link and leave
    (``peer_up``, ``peer_down``). Methods for the caller: ``start()``, ``shutdown()``. A peer
    cannot swamp it: its SYNC: requests are merged and answered at most every ``answer_gap``
    seconds (see SyncRequests), and at most ``max_files_per_peer`` of its FILE: frames wait
    (more are dropped: the next sync round heals that).
    """

    batch_bytes = 1 * MiB
    batch_entries = MAX_FRAME_ENTRIES  # the most a FILE: frame may hold: fewer transactions per catch-up
    answer_gap = 0.2  # seconds between two answers to one peer
    max_wait = 5.0  # the longest the worker sleeps: a queued job or SYNC: wakes it sooner
    fresh_for = 1.0  # seconds a pushed entry is left out of SYNC: answers: its push is on the way
    max_fresh = 65536  # pushed entries remembered as fresh at most (a second of pushes is far fewer)
    max_jobs = 4096
    max_files_per_peer = 64

    def __init__(self, store, mesh, events, interval):
        self.store = store
        self.mesh = mesh
        self.events = events
        self.interval = interval
        self._jobs = queue.Queue(self.max_jobs)
        self.requests = SyncRequests(self.answer_gap, max(self.answer_gap, interval / 2.0))
        self._files_waiting = collections.Counter()  # peer id -> FILE: jobs queued
        self._files_lock = threading.Lock()
        self._vectors_lock = threading.Lock()
        self._their_vectors = {}  # peer id -> the vector its last SYNC: showed
        self._told_vectors = {}  # peer id -> the vector we last sent it
        self._asked = {}  # peer id -> (ours, theirs) when we last asked it for what it has more
        self._gaps_asked = {}  # peer id -> (ours, origins) when we last asked it for gaps below its pushes
        self._linked = {}  # peer id -> monotonic time its link came up: only later pushes reached it
        self._fresh = collections.OrderedDict()  # (origin, seq) -> monotonic time it was pushed here
        self._stop = threading.Event()
        self._thread = None
        self.counters = collections.Counter()
        store.writes.watch(self.local_written)
        mesh.handle(SYNC, self.handle_sync)
        mesh.handle(FILE, self.handle_file)
        mesh.watch(self)

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, name="neuromesh-sync", daemon=True)
        self._thread.start()

    def serve_forever(self):
        next_round = time.monotonic() + self.interval
        while not self._stop.is_set():
            try:
                next_round = self.run_once(next_round)
            except Exception:  # a bad batch must not stop syncing
                log.exception("sync job failed")

    def _step(self):
        """Run one queued job (a push or FILE:) and one due SYNC: answer: (whether any ran, the
        seconds until the next answer is due or None)."""
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            job = None
        if job is not None:
            job[0](*job[1:])
        request, wait = self.requests.take(time.monotonic())
        if request is not None:
            self._answer_sync(*request)
        return job is not None or request is not None, wait

    def run_once(self, next_round):
        """Run one queued job and one due SYNC: answer, or wait for either (a new job wakes it)
        until the next answer or round is due; then the sync round when due. Returns the time of
        the next round."""
        ran, wait = self._step()
        if not ran:
            timeout = min(self.max_wait, next_round - time.monotonic(), self.max_wait if wait is None else wait)
            try:
                job = self._jobs.get(timeout=max(0.0, timeout))
                job[0](*job[1:])
            except queue.Empty:
                pass
        if time.monotonic() >= next_round:
            next_round = time.monotonic() + self.interval
            self._sync_round()
        return next_round

    def run_ready(self):
        """Run every queued job and every SYNC: answer due now, without waiting (meshes
        driven by hand, as in the tests' simulated network)."""
        while self._step()[0]:
            pass

    def shutdown(self):
        self._stop.set()
        try:
            self._jobs.put_nowait((lambda: None,))  # wake the worker now rather than at its next timeout
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- called on other threads -------------------------------------------------

    def local_written(self, entries):
        """After a committed local write: push it to peers at once, then tell the pages."""
        self.push(entries)
        publish_entries(self.events, entries)

    def push(self, entries):
        """Send entries this node just wrote to every linked peer (private ones never leave)."""
        shared = [entry for entry in entries if self.store.is_shared(entry)]
        payload = self.store.batches.payload(shared) if shared else None
        if payload and payload["entries"]:
            payload["spread"] = True  # to every peer: receivers spare the peers linked to us
            self._mark_fresh(payload["entries"])
            self.mesh.broadcast(FILE, payload)

    def peer_up(self, peer):
        with self._vectors_lock:
            self._linked[peer.node_id] = time.monotonic()
        self._queue((self._send_vector, peer.node_id))

    def peer_down(self, peer, reason=None):
        self.requests.forget(peer.node_id)
        with self._vectors_lock:
            for known in (self._their_vectors, self._told_vectors, self._asked, self._gaps_asked, self._linked):
                known.pop(peer.node_id, None)

    def handle_sync(self, peer, payload):
        vector, gaps = payload.get("vector"), payload.get("gaps")
        if not isinstance(vector, dict):
            raise ProtocolError("SYNC: frame without a version vector")
        gaps = tuple(sorted({origin for origin in gaps if isinstance(origin, str)})) if isinstance(gaps, list) else ()
        outcome = self.requests.put(peer.node_id, (vector, gaps))
        self.counters["sync_requests_" + outcome] += 1
        if outcome == "new":
            self._queue((lambda: None,))  # wake the worker: the answer may be due now

    def handle_file(self, peer, payload):
        entries = payload.get("entries")
        if not isinstance(entries, list):
            raise ProtocolError("FILE: frame without an entry list")
        with self._files_lock:
            if self._files_waiting[peer.node_id] >= self.max_files_per_peer:
                self.counters["files_dropped"] += 1
                return
            self._files_waiting[peer.node_id] += 1
        if not self._queue((self._apply, peer.node_id, payload, payload.get("more") is True)):
            self._file_done(peer.node_id)

    def _queue(self, job):
        try:
            self._jobs.put_nowait(job)
            return True
        except queue.Full:
            self.counters["jobs_dropped"] += 1
            return False

    def _file_done(self, peer_id):
        with self._files_lock:
            count_down(self._files_waiting, peer_id)

    # -- jobs, on the sync thread ---------------------------------------------------

    def _send_vector(self, peer_id, ours=None):
        """Send ``ours`` (default: the store's vector), with the gaps we asked ``peer_id`` for
        while it is still our vector: a newer SYNC: replaces a waiting one, and must not lose them."""
        ours = self.store.version_vector() if ours is None else ours
        payload = {"vector": ours}
        with self._vectors_lock:
            self._told_vectors[peer_id] = ours
            held, gaps = self._gaps_asked.get(peer_id, (None, None))
        if gaps and held == ours:
            payload["gaps"] = gaps
        self.mesh.send(peer_id, SYNC, payload)
        self.counters["vectors_sent"] += 1

    def _sync_round(self):
        """Send our vector to each peer that has not heard it, or whose vector shows more."""
        ours = self.store.version_vector()
        self.counters["sync_rounds"] += 1
        for peer in self.mesh.linked_peers():
            with self._vectors_lock:
                told = self._told_vectors.get(peer.node_id)
                theirs = self._their_vectors.get(peer.node_id, {})
            if told != ours or vector_ahead(theirs, ours):
                self._send_vector(peer.node_id, ours)
            else:
                self.counters["vectors_spared"] += 1

    def _answer_sync(self, peer_id, request):
        vector, gaps = request
        clean = {str(origin): seq for origin, seq in vector.items()
                 if isinstance(seq, int) and not isinstance(seq, bool)}
        ours = self.store.version_vector()
        with self._vectors_lock:
            self._their_vectors[peer_id] = clean
            ask = vector_ahead(clean, ours) and self._asked.get(peer_id) != (ours, clean)
            if ask:  # the same request for the same two states is never repeated: a stuck gap must not loop
                self._asked[peer_id] = (ours, clean)
        self.counters["sync_answers"] += 1
        view = self._without_fresh(peer_id, clean, gaps)
        if vector_ahead(ours, view):  # else nothing to send: no store query
            payload = self.store.batches.missing(view, self.batch_bytes, self.batch_entries)
            if payload["entries"]:
                self.mesh.send(peer_id, FILE, payload)
                self.counters["entries_sent"] += len(payload["entries"])
        if ask:
            self._send_vector(peer_id, ours)

    def _mark_fresh(self, entries):
        now = time.monotonic()
        with self._vectors_lock:
            for entry in entries:
                key = (entry["origin"], entry["seq"])
                self._fresh.pop(key, None)
                self._fresh[key] = now
            self._forget_stale(now)

    def _forget_stale(self, now):
        fresh = self._fresh
        while fresh and (len(fresh) > self.max_fresh or next(iter(fresh.values())) < now - self.fresh_for):
            fresh.popitem(last=False)

    def _without_fresh(self, peer_id, vector, gaps):
        """``vector`` as if it held the entries that directly follow what it holds and were
        pushed here within ``fresh_for`` seconds, after ``peer_id`` linked: their push is on the
        way, and answering them would only send a second copy. Each entry counts on its own (a
        node that writes all the time must not make a returning peer look as if it held all),
        and none of the origins in ``gaps``: the peer got pushes past its gap, so none is on the way."""
        now = time.monotonic()
        view = dict(vector)
        with self._vectors_lock:
            self._forget_stale(now)
            since = max(now - self.fresh_for, self._linked.get(peer_id, now))
            for origin in {origin for origin, _seq in self._fresh}.difference(gaps):
                seq = view.get(origin, 0)
                while self._fresh.get((origin, seq + 1), since - 1.0) >= since:
                    seq += 1
                if seq:
                    view[origin] = seq
        return view

    def _holders(self, entries):
        """The peers whose last vector shows every one of ``entries``."""
        with self._vectors_lock:
            return [peer_id for peer_id, vector in self._their_vectors.items() if vector_holds(vector, entries)]

    def _apply(self, peer_id, payload, more):
        self._file_done(peer_id)
        before = self.store.version_vector() if more else None
        try:
            forward, new = self.store.batches.apply(payload)
        except BatchRejected as rejected:
            log.warning("sync: rejected a batch from peer %s (origin %s): %s; unlinking it",
                        peer_id, rejected.origin or "-", rejected.reason)
            self.counters["batches_rejected"] += 1
            self.mesh.unlink(peer_id, "sent a batch that failed verification: %s" % rejected.reason)
            return
        self.counters["entries_received"] += len(payload.get("entries") or ())
        self.counters["entries_new"] += len(new)
        if forward:  # every stored entry: a refused snapshot is still a link of its chain
            spread = payload.get("spread") is True
            forward["spread"] = True
            self._mark_fresh(new)
            self.mesh.forward(FILE, forward, peer_id, spread, self._holders(forward["entries"]))
        if new:
            publish_entries(self.events, new)
        if more or len(new) < len(payload["entries"]):
            self._ask_again(peer_id, payload["entries"], before)

    def _ask_again(self, peer_id, entries, before):
        """After a batch from ``peer_id``: ask it at once for the gaps below the entries it sent
        past what this node holds (a push after a missed one, or after time away), else for the
        rest when it said there is more (``before``: our vector then). The same question is not
        asked twice for the same state: a stuck gap must not loop; the next round heals it."""
        held = self.store.version_vector()
        gaps = sorted({entry["origin"] for entry in entries if held.get(entry["origin"], 0) < entry["seq"]})
        with self._vectors_lock:
            if gaps and self._gaps_asked.get(peer_id) == (held, gaps):
                gaps = None
            elif gaps:
                self._gaps_asked[peer_id] = (held, gaps)
        if gaps:
            self.counters["gaps_asked"] += 1
            self._send_vector(peer_id, held)
        elif before is not None and held != before:
            self._send_vector(peer_id, held)


def publish_entries(events, entries):
    """Tell the page what changed: one event per conversation change, and one per conversation
    for its new messages (the last of them), not one per message: a catch-up brings a thousand
    at once, and the page reloads a conversation whatever the count (an SSE client's queue holds
    at most EventBus.max_pending events)."""
    last_messages = collections.OrderedDict()  # conversation id -> its last new message here
    for entry in entries:
        if entry["conversation_id"].endswith((POLICY_SUFFIX, SHARES_SUFFIX)):
            events.publish("room", {"origin": entry["origin"]})  # pages ask /api/room what it means
        elif entry.get("kind") == "message":
            last_messages.pop(entry["conversation_id"], None)
            last_messages[entry["conversation_id"]] = entry
        else:
            events.publish("conversation", {"conversation_id": entry["conversation_id"],
                                            "deleted": bool(entry["data"].get("deleted")),
                                            "private": bool(entry["data"].get("private"))})
    for entry in last_messages.values():
        events.publish("message", {"conversation_id": entry["conversation_id"], "origin": entry["origin"],
                                   "seq": entry["seq"], "role": entry["data"].get("role")})


###############################################################################
# LLM backends and routing ####################################################
###############################################################################
#
# A chat is answered by the best LLM on the mesh: this node's own backend (Ollama, or an
# OpenAI-compatible server) first, else a peer's, reached through the peer's HTTP relay
# with a token the peer granted over the link (LLMC: -> LREQ: -> LRES:). Every backend
# streams the same events, as dicts:
#   {"type": "queued", "position": n, "node_name"}   waiting for a free slot
#   {"type": "start", "node_id", "node_name", "model"}
#   {"type": "token", "content"}
#   {"type": "done", "node_id", "node_name", "model", "tokens_per_second", "eval_count", ...}
# and the Router adds, when another host takes over an answer whose host failed mid-way:
#   {"type": "continued", "node_id", "node_name", "model", "after_tokens", "from_node_name"}

SAMPLING_DEFAULTS = {"temperature": 0.2, "top_k": 10, "top_p": 0.8, "num_ctx": 2048}
RELAY_PATH = "/relay/chat"
NO_LLM_HELP = ("No LLM is reachable on the mesh. To add one, install Ollama on any machine of "
               "the room (https://ollama.com, or copy its installer), run `ollama pull llama3.2:1b`, "
               "and start NeuroMesh there too; it is found within seconds.")


class LLMError(NeuroMeshError):
    """A chat could not be answered; ``status`` is the HTTP status to report."""

    def __init__(self, message, status=503, partial=False):
        NeuroMeshError.__init__(self, message)
        self.status = status
        self.partial = partial


class _UpstreamRefused(LLMError):
    """This backend cannot answer now (refused, failed or busy before the first token): try the next.
    ``down``: nothing answers at its address (the server is stopped), so it is shown down at once."""

    def __init__(self, message, status=503, partial=False, down=False):
        LLMError.__init__(self, message, status, partial)
        self.down = down


def unreachable(backend, exc):
    """The _UpstreamRefused for a call to ``backend`` that got no answer (``exc``): one sentence
    naming the computer and what to do, no exception names."""
    name = backend.node_name
    if not backend.local:
        return _UpstreamRefused("%s did not answer (its NeuroMesh may have stopped, or the network "
                                "between is down)" % name)
    if isinstance(exc, requests.Timeout):
        return _UpstreamRefused("the LLM on %s did not answer in time" % name)
    if isinstance(exc, requests.ConnectionError):
        return _UpstreamRefused("the LLM on %s has stopped: ask whoever uses %s to start it" % (name, name),
                                down=True)
    return _UpstreamRefused("the LLM on %s cannot be reached: check its address (--ollama-url, --openai-url)"
                            % name)


def failures_text(failures):
    """What each host said, once each, as one sentence."""
    return "; ".join(collections.OrderedDict.fromkeys(failures)) or "no LLM could answer"


def normalize_ollama_url(value):
    """``OLLAMA_HOST``-style text (``host``, ``host:port``, ``http://host:port``) to a base URL."""
    text = (value or "").strip()
    if text.lower() in ("", "none", "off", "false", "0"):
        return None
    if "://" not in text:
        text = "http://" + text
    scheme, rest = text.split("://", 1)
    hostport = rest.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or "]" in port:
        host, port = hostport, "11434"
    if host in ("0.0.0.0", "", "[::]"):
        host = "127.0.0.1"
    return "%s://%s:%s" % (scheme, host, port)


MAX_STREAM_LINE = 4 * MiB  # one line of an LLM's streamed answer


def iter_lines_live(response, max_line=MAX_STREAM_LINE):
    """Lines of a streamed HTTP body as they arrive (``iter_lines`` would wait for 512 bytes).
    A line longer than ``max_line`` raises requests.RequestException: nothing is that long; a
    body cut off raises requests.ConnectionError (urllib3's own errors are not requests')."""
    buffer = b""
    raw = response.raw
    while True:
        try:
            chunk = raw.read1(65536)
        except (requests.packages.urllib3.exceptions.HTTPError, OSError) as exc:  # the host went away mid-body
            raise requests.ConnectionError("the stream broke off: %s" % type(exc).__name__) from exc
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > max_line and b"\n" not in buffer:
            raise requests.RequestException("a streamed line is over %d bytes" % max_line)
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.rstrip(b"\r")
    if buffer.strip():
        yield buffer


def _error_text(payload):
    """The message of an Ollama ``{"error": text}`` or OpenAI ``{"error": {"message"}}`` reply."""
    error = payload.get("error") if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        error = error.get("message")
    return str(error)[:300]


def _http_error_text(response):
    try:
        return _error_text(response.json())
    except ValueError:
        return response.text[:300]


def tokens_per_second(count, seconds):
    return round(count / seconds, 2) if count and seconds and seconds > 0 else None


class Requester(collections.namedtuple("Requester", "node_id tag")):
    """Who asks for a chat: a node (its id, proven by its key) and a client on it: "owner" (the
    computer's own user), a guest's session id, "lan:ADDRESS" (an API client of the network)."""

    __slots__ = ()
    max_tag = 48

    @property
    def key(self):
        return "%s/%s" % (self.node_id, self.tag)

    @classmethod
    def clean_tag(cls, text):
        """A tag a peer sent (hostile text) as a short safe one; "node" when it gave none that fits."""
        if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9:._-]{1,%d}" % cls.max_tag, text):
            return "node"
        return text


# A place in a queue: the requester, its weight, ``first`` (the owner's chat: ahead of every
# other), ``remote`` (another's chat on this node's own LLM) and ``cap`` (--share-slots: how
# many slots remote chats may hold at once; None: all).
Turn = collections.namedtuple("Turn", "requester weight first remote cap")
OWNER_TURN = Turn(Requester("", "owner"), 1.0, True, False, None)


class QueueStats:
    """What a queue did lately, for /api/health and /metrics: waits (sum, count, histogram),
    chats started per requester, and the shares of the last ``window`` chats started."""

    buckets = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    window = 200
    max_requesters = 500  # started counts kept; the least active go first

    def __init__(self):
        self.wait_sum = 0.0
        self.wait_count = 0
        self.wait_buckets = [0] * len(self.buckets)
        self.started = collections.OrderedDict()  # requester key -> chats started
        self.recent = collections.deque(maxlen=self.window)  # (requester key, wait) of the last chats
        self.refused = 0

    def record(self, key, waited):
        self.wait_sum += waited
        self.wait_count += 1
        for index, bound in enumerate(self.buckets):
            if waited <= bound:
                self.wait_buckets[index] += 1
        self.started[key] = self.started.pop(key, 0) + 1
        while len(self.started) > self.max_requesters:
            self.started.popitem(last=False)
        self.recent.append((key, waited))

    def shares(self):
        """``{requester key: fraction of the last chats started}``."""
        counts = collections.Counter(key for key, _w in self.recent)
        total = float(len(self.recent)) or 1.0
        return {key: round(count / total, 4) for key, count in counts.items()}

    def median_wait(self):
        waits = sorted(wait for _k, wait in self.recent)
        return round(waits[len(waits) // 2], 3) if waits else None


class _Ticket:
    """One chat waiting in Slots: its turn, virtual start tag, arrival order and time."""

    __slots__ = ("turn", "tag", "seq", "since", "refused")

    def __init__(self, turn, tag, seq):
        self.turn, self.tag, self.seq = turn, tag, seq
        self.since = time.monotonic()
        self.refused = None

    def order(self):
        return (0 if self.turn.first else 1, self.tag, self.seq)


class Slots:
    """A concurrency limit with a fair queue: at most ``limit`` holders, the rest wait their turn.

    The owner's chats (``Turn.first``) go first. Every other chat waits its turn round-robin
    across requesters, weighted (start-time fair queueing: a requester's next chat gets the
    virtual tag ``max(clock, its last finish)``, its finish the tag plus ``1 / weight``; the
    smallest tag goes next; the clock is the tag last served). Remote turns (others' chats on
    this node's own LLM) hold at most ``Turn.cap`` slots at once (--share-slots).
    Methods for the caller: ``acquire(cancel, on_position, turn)`` / ``release(turn)``,
    ``load()``, ``by_requester()``, ``rounds_before(turn)``, ``refuse_remote(text)``, ``watch(listener)``.
    """

    poll = 0.25  # seconds between looks at a cancel Event while waiting

    def __init__(self, limit):
        self.limit = max(1, int(limit))
        self.in_flight = 0
        self.remote_in_flight = 0
        self._waiting = []
        self._finish = {}  # requester key -> finish tag of its last chat
        self._clock = 0.0
        self._running = collections.Counter()  # requester key -> slots held
        self._seq = itertools.count()
        self.stats = QueueStats()
        self._condition = threading.Condition()
        self._watchers = []

    def watch(self, listener):
        """``listener()`` whenever the load changes, outside the lock (the Router registers itself)."""
        self._watchers.append(listener)

    def on_change(self):
        for listener in self._watchers:
            listener()

    @property
    def queued(self):
        return len(self._waiting)

    def acquire(self, cancel=None, on_position=None, turn=None):
        """Wait for a slot; ``on_position(n)`` hears each change of place (1 = next). A remote
        turn refused while it waits (sharing paused) raises _UpstreamRefused."""
        turn = turn or OWNER_TURN
        with self._condition:
            ticket = self._enqueue(turn)
            reported = None
            try:
                while True:
                    if ticket.refused:  # 409, not 503: the LLM itself is not full
                        raise _UpstreamRefused(ticket.refused, status=409)
                    if self._may_start(ticket):
                        break
                    position = self._position(ticket)
                    if position != reported and on_position is not None:
                        reported = position
                        self._unlocked(functools.partial(on_position, position))
                        continue
                    if cancel is not None and self._unlocked(cancel.is_set):
                        raise LLMError("the request was cancelled while queued", status=499)
                    self._condition.wait(self.poll)
                self._start(ticket)
            except BaseException:
                self._forget(ticket)
                raise
            finally:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                self._condition.notify_all()
        self.on_change()

    def _unlocked(self, function):
        """``function()`` with this queue's lock let go: a re-placement check looks at other
        queues, and two of them looking at each other under their own locks would deadlock."""
        self._condition.release()
        try:
            return function()
        finally:
            self._condition.acquire()

    def release(self, turn=None):
        turn = turn or OWNER_TURN
        with self._condition:
            self.in_flight -= 1
            self.remote_in_flight -= 1 if turn.remote else 0
            count_down(self._running, turn.requester.key)
            self._condition.notify_all()
        self.on_change()

    def _enqueue(self, turn):
        key = turn.requester.key
        tag = max(self._clock, self._finish.get(key, 0.0))
        self._finish[key] = tag + 1.0 / max(turn.weight, 0.01)
        ticket = _Ticket(turn, tag, next(self._seq))
        self._waiting.append(ticket)
        return ticket

    def _forget(self, ticket):
        """A chat that leaves the queue gives its virtual time back."""
        key = ticket.turn.requester.key
        if self._finish.get(key) == ticket.tag + 1.0 / max(ticket.turn.weight, 0.01):
            self._finish[key] = ticket.tag

    def _blocked(self, ticket):
        turn = ticket.turn
        return turn.remote and turn.cap is not None and self.remote_in_flight >= turn.cap

    def _may_start(self, ticket):
        if self.in_flight >= self.limit or self._blocked(ticket):
            return False
        ahead = ticket.order()
        return not any(other.order() < ahead and not self._blocked(other) for other in self._waiting)

    def _position(self, ticket):
        ahead = ticket.order()
        return 1 + sum(1 for other in self._waiting if other.order() < ahead)

    def _start(self, ticket):
        self._clock = max(self._clock, ticket.tag)
        for key in [key for key, finish in self._finish.items() if finish <= self._clock]:
            del self._finish[key]  # it would get the clock as its next tag anyway
        self.in_flight += 1
        self.remote_in_flight += 1 if ticket.turn.remote else 0
        self._running[ticket.turn.requester.key] += 1
        self.stats.record(ticket.turn.requester.key, time.monotonic() - ticket.since)

    def refuse_remote(self, text):
        """Send every waiting remote turn away with ``text`` (sharing was paused)."""
        with self._condition:
            for ticket in self._waiting:
                if ticket.turn.remote:
                    ticket.refused = text
                    self.stats.refused += 1
            self._condition.notify_all()

    def rounds_before(self, turn):
        """About how many answers' time a new chat of ``turn`` would wait: 0 when it starts at once."""
        with self._condition:
            tag = max(self._clock, self._finish.get(turn.requester.key, 0.0))
            order = (0 if turn.first else 1, tag, float("inf"))
            ahead = sum(1 for other in self._waiting if other.order() < order)
            rounds = max(0, self.in_flight + ahead - self.limit + 1) / float(self.limit)
            if turn.remote and turn.cap is not None:
                rounds = max(rounds, max(0, self.remote_in_flight + ahead - turn.cap + 1) / float(turn.cap))
            return rounds

    def load(self):
        with self._condition:
            return {"in_flight": self.in_flight, "queued": len(self._waiting), "parallel": self.limit}

    def by_requester(self):
        """``{requester key: {"queued": n, "running": m}}``: counts only, never what they asked."""
        with self._condition:
            counts = collections.defaultdict(lambda: {"queued": 0, "running": 0})
            for ticket in self._waiting:
                counts[ticket.turn.requester.key]["queued"] += 1
            for key, running in self._running.items():
                counts[key]["running"] = running
            return dict(counts)


class Backend:
    """One LLM server this node can reach: what models it has and how to stream a chat from it.

    Methods to override: ``probe()`` (refresh ``models``; raise on failure) and
    ``_stream(model, messages, options, cancel)`` (yield events, raise _UpstreamRefused when
    nothing was produced). ``chat()`` adds the concurrency limit and bookkeeping.
    """

    kind = "?"
    local = True
    probe_timeout = 2.0
    connect_timeout = 3.0
    read_timeout = 300.0  # a model may take minutes to load into memory

    def __init__(self, url, node_id, node_name, parallel=1):
        self.url = url.rstrip("/") if url else url
        self.node_id = node_id
        self.node_name = node_name
        self.models = []
        self.available = False
        self.answered = False  # it answered once: down now means stopped, not never installed
        self.error = None
        self.slots = Slots(parallel)
        self.recent_latency = None  # seconds to first token, smoothed
        self.recent_tps = None  # tokens per second of its answers, smoothed
        self.recent_tokens = None  # tokens per answer, smoothed
        self.loaded = set()  # models in memory (Ollama's /api/ps), or that answered lately
        self.busy_until = 0.0  # monotonic time until which it counts as full (it answered 503)
        self._probing = threading.Lock()  # a chat waits for a probe under way to finish
        self.session = requests.Session()
        self.session.trust_env = False  # never send the room's LLM traffic through a proxy

    def abort(self):
        """End the chats in flight at once (a peer's relay, whose link went down; a local server has none to end)."""

    def describe(self):
        load = self.slots.load()
        return {"backend": self.kind, "url": self.url, "available": self.available, "models": list(self.models),
                "error": self.error, "in_flight": load["in_flight"], "queued": load["queued"],
                "parallel": load["parallel"], "loaded": sorted(self.loaded), "tokens_per_second": self.recent_tps}

    def refresh(self):
        """Probe the server; returns True when what it offers changed.

        A backend that is answering is not probed: it is plainly up, and llama.cpp's server
        interrupts the answer it is streaming when any other request arrives.
        """
        with self._probing:
            if self.available and self.slots.in_flight:
                return False
            before = (self.available, tuple(self.models))
            try:
                self.models = self.probe()
                self.available, self.answered, self.error = True, True, None
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                self.available, self.models = False, []
                self.error = "%s at %s is not reachable: %s" % (self.kind, self.url, type(exc).__name__)
            try:
                self.loaded = self.probe_loaded() if self.available else set()
            except (requests.RequestException, ValueError, AttributeError):
                pass  # an older server without /api/ps: what answered lately stays
            return before != (self.available, tuple(self.models))

    def mark_down(self):
        """A call found nothing answering: shown down now, not at the next probe."""
        self.available, self.models = False, []
        self.error = "%s at %s is not reachable: ConnectionError" % (self.kind, self.url)

    def chat(self, model, messages, options, cancel, on_queue=None, turn=None, on_slot=None):
        """Stream events for one chat, holding one of this backend's slots (``turn``: whose chat;
        ``on_slot()`` hears that the chat holds its slot)."""
        self.slots.acquire(cancel, None if on_queue is None else
                           (lambda position: on_queue({"type": "queued", "position": position,
                                                       "node_name": self.node_name})), turn)
        if on_slot is not None:
            on_slot()
        try:
            with self._probing:
                pass
            started = time.monotonic()
            first = True
            for event in self._stream_for(turn, model, messages, options, cancel):
                if first and event["type"] == "token":
                    first = False
                    latency = time.monotonic() - started
                    self.recent_latency = (latency if self.recent_latency is None else
                                           0.7 * self.recent_latency + 0.3 * latency)
                if event["type"] == "done":
                    self._measured(model, event)
                yield event
        finally:
            self.slots.release(turn)

    busy_pause = 10.0  # seconds a backend that answered 503 (its queue is full) is placed last

    def _stream_for(self, turn, model, messages, options, cancel):
        """The events of ``_stream``; a backend that passes the requester on overrides it."""
        return self._stream(model, messages, options, cancel)

    def _measured(self, model, done):
        """An answer ended: its model is loaded, and its speed and length teach the placement."""
        self.loaded.add(model)
        rate, count = finite_or_none(done.get("tokens_per_second"), 1e6), done.get("eval_count")
        if rate:
            self.recent_tps = rate if self.recent_tps is None else round(0.7 * self.recent_tps + 0.3 * rate, 2)
        if type(count) is int and count > 0:
            self.recent_tokens = count if self.recent_tokens is None else 0.7 * self.recent_tokens + 0.3 * count

    def answer_seconds(self):
        """About how long one answer takes here: tokens per answer over tokens per second."""
        if not self.recent_tps:
            return self.default_answer_seconds
        return (self.recent_tokens or 200.0) / self.recent_tps

    default_answer_seconds = 10.0

    def probe_loaded(self):
        """The models in memory now (override where the server tells it)."""
        return set(self.loaded)

    def _post(self, path, body, headers=None):
        try:
            response = self.session.post(self.url + path, json=body, stream=True, headers=headers,
                                         timeout=(self.connect_timeout, self.read_timeout))
        except requests.RequestException as exc:
            raise unreachable(self, exc)
        if response.status_code != 200:
            text = _http_error_text(response)
            response.close()
            if response.status_code == 404:
                raise _UpstreamRefused("%s does not have that model: %s" % (self.node_name, text), status=404)
            raise _UpstreamRefused("%s answered HTTP %d: %s" % (self.node_name, response.status_code, text),
                                   status=response.status_code)
        return response

    def _start_event(self, model):
        return {"type": "start", "node_id": self.node_id, "node_name": self.node_name, "model": model}

    def forward(self, path, body):
        """An Upstream answering an Ollama-shaped request (see MeshCalls); _UpstreamRefused if it cannot."""
        raise _UpstreamRefused("%s cannot answer %s" % (self.node_name, path), status=501)

    def info(self, path):
        """What the server says to ``/api/tags``, ``/api/ps`` or ``/api/version`` (Ollama's shapes)."""
        return {"models": []}


class OllamaBackend(Backend):
    """Ollama's native API: ``/api/tags`` for models, streaming ``/api/chat``."""

    kind = "ollama"

    def probe(self):
        response = self.session.get(self.url + "/api/tags", timeout=self.probe_timeout)
        response.raise_for_status()
        return sorted({entry.get("model") or entry["name"] for entry in response.json()["models"]})

    def probe_loaded(self):
        response = self.session.get(self.url + "/api/ps", timeout=self.probe_timeout)
        response.raise_for_status()
        return {entry.get("model") or entry.get("name") for entry in response.json().get("models") or []
                if isinstance(entry, dict) and isinstance(entry.get("model") or entry.get("name"), str)}

    def version(self):
        try:
            return self.session.get(self.url + "/api/version", timeout=self.probe_timeout).json()["version"]
        except (requests.RequestException, ValueError, KeyError):
            return None

    def _stream(self, model, messages, options, cancel):
        response = self._post("/api/chat", {"model": model, "messages": messages, "options": options,
                                            "stream": True})
        yield from stream_ollama_lines(response, self._start_event(model), cancel, self.node_name)

    def forward(self, path, body):
        return post_upstream(self, path, body)

    def info(self, path):
        if path == "/api/version":
            return {"version": self.version()}
        response = self.session.get(self.url + path, timeout=self.probe_timeout)
        response.raise_for_status()
        return response.json()


def chunk_thinking(chunk):
    """A reasoning model's thinking in an Ollama chunk (``message.thinking``, or generate's ``thinking``)."""
    said = chunk.get("message") if isinstance(chunk.get("message"), dict) else chunk
    return said.get("thinking") if isinstance(said.get("thinking"), str) else ""


def stream_ollama_lines(response, start_event, cancel, node_name, lines=None):
    """Events from an Ollama-style NDJSON chat stream (Ollama itself, or a peer's relay);
    ``lines`` (default: those of ``response`` as they arrive) are read, ``response`` closed."""
    produced = False
    try:
        for line in iter_lines_live(response) if lines is None else lines:
            if cancel is not None and cancel.is_set():
                return
            if not line.strip():
                continue
            try:
                chunk = parse_json(line, "a line from %s" % node_name, MAX_STREAM_LINE)
            except ValueError:
                raise LLMError("%s sent a line that is not JSON" % node_name, partial=produced)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                error = _error_text(chunk)
                if produced:
                    raise LLMError("%s failed mid-answer: %s" % (node_name, error), partial=True)
                status = chunk.get("status")
                raise _UpstreamRefused(error if node_name in error else "%s: %s" % (node_name, error),
                                       status=status if type(status) is int and 400 <= status < 600 else 503)
            if "queued" in chunk:
                position, name = chunk["queued"], chunk.get("node_name")
                yield {"type": "queued", "position": position if type(position) is int else 1,
                       "node_name": name[:100] if isinstance(name, str) else node_name}
                continue
            if not produced:
                produced = True
                yield start_event
            thinking = chunk_thinking(chunk)
            if thinking:
                yield {"type": "thinking", "content": thinking}
            content = _chunk_content(chunk)
            if content:
                yield {"type": "token", "content": content}
            if chunk.get("done"):
                count, duration = chunk.get("eval_count"), chunk.get("eval_duration")
                count = count if type(count) is int and count >= 0 else None
                duration = finite_or_none(duration, 1e15) or 0
                done = dict(start_event, type="done", eval_count=count, done_reason=chunk.get("done_reason"),
                            tokens_per_second=tokens_per_second(count, (duration or 0) / 1e9))
                if type(chunk.get("prompt_eval_count")) is int:
                    done["prompt_eval_count"] = chunk["prompt_eval_count"]
                if finite_or_none(chunk.get("tokens_per_second"), 1e9) is not None:
                    done["tokens_per_second"] = chunk["tokens_per_second"]
                yield done
                return
    except requests.RequestException:
        if produced:
            raise LLMError("%s stopped answering mid-way" % node_name, partial=True)
        raise _UpstreamRefused("%s stopped answering" % node_name)
    finally:
        response.close()
    if produced:
        raise LLMError("%s stopped answering mid-way" % node_name, partial=True)
    raise _UpstreamRefused("%s closed the connection without answering" % node_name)


def _chunk_content(chunk):
    """The text of one Ollama stream chunk ("" when it has none, or something else than text)."""
    message = chunk.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    content = content or chunk.get("response") or ""
    return content if isinstance(content, str) else ""


class OpenAIBackend(Backend):
    """An OpenAI-compatible server (llama.cpp, LM Studio, vLLM): ``/v1/models``, ``/v1/chat/completions``."""

    kind = "openai"

    def probe(self):
        response = self.session.get(self.url + "/v1/models", timeout=self.probe_timeout)
        response.raise_for_status()
        return sorted(entry["id"] for entry in response.json()["data"])

    def forward(self, path, body):
        return OpenAITranslation(self).forward(path, body)

    def info(self, path):
        """An OpenAI-compatible server tells its models' names only: sizes and digests stay unknown."""
        if path == "/api/version":
            return {}
        names = self.models if path == "/api/tags" else (self.models if self.slots.in_flight else [])
        return {"models": [{"name": name, "model": name, "size": 0, "digest": "",
                            "details": {"format": "", "family": "", "parameter_size": "", "quantization_level": ""},
                            "neuromesh_backend": "openai-compatible"} for name in names]}

    def _stream(self, model, messages, options, cancel):
        if any(message.get("images") for message in messages):  # pictures as OpenAI's image parts
            messages = openai_messages(messages)
        body = {"model": model, "messages": messages, "stream": True}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("num_predict", "max_tokens")):
            if ours in options:
                body[theirs] = options[ours]
        response = self._post("/v1/chat/completions", body)
        produced, count, first_at, finished, finish_reason = False, 0, None, False, None
        start = self._start_event(model)
        try:
            for line in iter_lines_live(response):
                if cancel is not None and cancel.is_set():
                    return
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    finished = True
                    break
                try:
                    chunk = parse_json(data, "a line from %s" % self.node_name, MAX_STREAM_LINE)
                except ValueError:
                    continue
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    raise (LLMError if produced else _UpstreamRefused)(
                        "%s: %s" % (self.node_name, _error_text(chunk)), partial=produced)
                for choice in chunk.get("choices") or []:
                    finish_reason = choice.get("finish_reason") or finish_reason
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if not produced:
                            produced, first_at = True, time.monotonic()
                            yield start
                        count += 1
                        yield {"type": "token", "content": content}
        except requests.RequestException:
            if produced:
                raise LLMError("%s stopped answering mid-way" % self.node_name, partial=True)
            raise _UpstreamRefused("%s stopped answering" % self.node_name)
        finally:
            response.close()
        if not finished or finish_reason is None:  # llama.cpp ends an interrupted answer with [DONE] alone
            if produced:
                raise LLMError("%s stopped answering mid-way" % self.node_name, partial=True)
            raise _UpstreamRefused("%s closed the connection without answering" % self.node_name)
        if not produced:
            yield start
        elapsed = time.monotonic() - first_at if first_at else 0
        yield dict(start, type="done", eval_count=count, done_reason=finish_reason,
                   tokens_per_second=tokens_per_second(count - 1, elapsed))


def cut_response(response):
    """Shut the socket a streamed ``requests`` response reads from: a read under way ends at once.
    The socket is the connection's, or (a reply that closes the connection) only its body's reader's."""
    raw = getattr(response, "raw", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        reader = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RelayConnections:
    """Kept-alive relay connections to one peer (RelayConnection: TLS to its mesh port), spoken
    with ``http.client`` itself: requests and urllib3 cost about 0.7 ms of Python per chat
    before the first token, on the path every relayed answer waits on. ``take()`` is an idle
    connection the peer still holds open (or None), ``open()`` a fresh one; ``give_back()``
    keeps one whose answer was read to its end and left open (RelayServer keeps it open);
    ``close()`` drops the idle ones."""

    keep = 64  # idle connections kept: the chats this node's users run on one host at once

    def __init__(self, dial, connect_timeout, read_timeout):
        self.dial = dial  # Mesh.dial_relay for one peer: TLS to its mesh port
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle = []
        self._lock = threading.Lock()

    def open(self):
        connection = RelayConnection(self.dial, self.connect_timeout)
        try:
            connection.connect()
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.sock.settimeout(self.read_timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    def take(self):
        """An idle connection the peer still holds open, or None."""
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None or self._alive(connection):
                return connection
            connection.close()

    @staticmethod
    def _alive(connection):
        """An idle connection has nothing to read: a byte (TLS's close alert) or its end means
        the peer closed it."""
        sock = connection.sock
        if sock is None:
            return False
        try:
            return not select.select([sock], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def idle(self):
        with self._lock:
            return len(self._idle)

    def give_back(self, connection):
        """Keep ``connection`` for the next request, its read timeout as ``open()`` set it: a
        short request's timeout (RoomHolders, MeshInfo) would cut a chat waiting in the host's queue."""
        try:
            connection.sock.settimeout(self.read_timeout)
        except (AttributeError, OSError):  # no socket left (the reply closed it)
            connection.close()
            return
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(connection)
                return
        connection.close()

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class RelayConnection(http.client.HTTPConnection):
    """http.client on a relay connection (``dial(timeout)``, Mesh.dial_relay for one peer): TLS
    to the peer's mesh port, proven as a link is, so the chat is private and who asks is known."""

    def __init__(self, dial, timeout):
        http.client.HTTPConnection.__init__(self, "neuromesh-relay", timeout=timeout)
        self._dial = dial

    def connect(self):
        self.sock = self._dial(self.timeout)


class RelayResponse:
    """A relay's streamed answer read straight from ``http.client`` (see RelayConnections).
    ``raw.read1`` as ``iter_lines_live`` reads it (a broken body raises ConnectionError);
    ``close()`` gives the connection back once the body was read to its end, else closes it."""

    def __init__(self, connections, connection, response):
        self.raw = self
        self._connections, self._connection, self._response = connections, connection, response
        self.response = response

    def set_timeout(self, timeout):
        if self._connection is not None and self._connection.sock is not None:
            self._connection.sock.settimeout(timeout)

    def read1(self, size):
        try:
            return self._response.read1(size)
        except http.client.HTTPException as exc:  # a bad chunk, a body cut short
            raise ConnectionError("the relay's answer broke off: %s" % type(exc).__name__) from exc

    def finish(self, timeout, limit=64 * 1024):
        """Read the body's end (at most ``limit`` bytes, for at most about ``timeout`` s)."""
        connection = self._connection
        if connection is None or connection.sock is None:
            return
        try:
            connection.sock.settimeout(timeout)
            while limit > 0 and not self._response.isclosed():
                limit -= len(self._response.read1(limit) or b"x")
        except (OSError, http.client.HTTPException):
            pass

    def close(self):
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._response.isclosed() and not self._response.will_close:
            self._connections.give_back(connection)
        else:
            self._response.close()
            connection.close()


def cut_socket(sock):
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RelayWatch:
    """The one thread that watches the relay calls under way, every ``RelayCall.poll`` seconds:
    it cuts a call whose chat was cancelled, and aborts one whose peer's mesh link fell silent
    while no line came (its host froze). It runs only while calls are under way."""

    def __init__(self):
        self._calls = set()
        self._lock = threading.Lock()
        self._running = False

    def add(self, call):
        with self._lock:
            self._calls.add(call)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._watch, name="neuromesh-relay-watch", daemon=True).start()

    def discard(self, call):
        with self._lock:
            self._calls.discard(call)

    def _watch(self):
        while True:
            time.sleep(RelayCall.poll)
            with self._lock:
                calls = list(self._calls)
                if not calls:
                    self._running = False
                    return
            for call in calls:
                call.check()


class RelayCall:
    """One chat sent to a peer's relay, posted and read on the chat's own thread (a thread hop
    per line would cost the first token about a millisecond). It gives up at once when the peer
    goes down: ``abort()`` shuts the socket, so a frozen peer does not hold the read for
    ``Backend.read_timeout`` (300 s). ``lines(cancel)`` yields the answer's lines and raises
    requests.ConnectionError after ``abort()``, or once the peer's mesh link is silent for the
    peer timeout while no line comes (RelayWatch looks); ``close()`` when done with it."""

    poll = 0.1  # seconds between looks at cancel and a silent link while no line arrives
    settle = 1.0  # at most this long, close() after the last line reads the body's end

    _LAST_LINE = (b'"done": true', b'"done":true')  # the relay's final line (RelayApi._done_line)

    def __init__(self, backend, body, headers, path=RELAY_PATH):
        self.backend = backend
        self._body, self._headers, self._path = body, headers, path
        self._aborted = threading.Event()
        self._cancel = None
        self._last_line = False  # the answer's final line was read
        self._heard = time.monotonic()  # when the last line (or the call's start) was
        self._response = None
        self._connection = None  # the one the chat is posted on
        self._socket = None  # its socket, cut by abort(); None once close() let go of it
        self._socket_lock = threading.Lock()  # RelayWatch must not cut a connection gone back to the pool

    def lines(self, cancel):
        self._cancel = cancel
        RELAY_WATCH.add(self)
        try:
            if self._aborted.is_set():
                raise requests.ConnectionError("%s went down" % self.backend.node_name)
            self._response = self.post()
            for line in iter_lines_live(self._response):
                self._heard = time.monotonic()
                if any(mark in line for mark in self._LAST_LINE):
                    self._last_line = True
                if cancel is not None and cancel.is_set():
                    return
                yield line
        except (requests.RequestException, _UpstreamRefused):
            if cancel is not None and cancel.is_set():
                return
            if self._aborted.is_set():
                raise requests.ConnectionError("%s went down" % self.backend.node_name)
            raise
        finally:
            RELAY_WATCH.discard(self)

    def check(self):
        """RelayWatch's look: cut a cancelled call; abort one whose host froze."""
        if self._cancel is not None and self._cancel.is_set():
            self._cut()
        elif time.monotonic() - self._heard > self.poll and self.backend.link_silent():
            self.abort()  # its host froze: go on elsewhere now

    def post(self):
        return self._post(json.dumps(self._body).encode("utf-8"), self._headers)

    def _post(self, payload, headers):
        """The relay's answer once its status line came (_UpstreamRefused when it is not 200, or
        for another path than the chat's, a 400 that is the request's own fault).
        A kept-alive connection the peer closed meanwhile is replaced by a fresh one, once."""
        connections, name = self.backend.connections, self.backend.node_name
        headers = dict(headers, **{"Content-Type": "application/json"})
        reused = connections.take()
        for connection in ([reused] if reused else []) + [None]:
            try:
                self._connection = connection = connection or connections.open()
                with self._socket_lock:
                    self._socket = connection.sock  # http.client lets go of it for a reply that closes
                if self._aborted.is_set():
                    cut_socket(connection.sock)
                connection.request("POST", self._path, body=payload, headers=headers)
                response = connection.getresponse()
                break
            except (OSError, http.client.HTTPException) as exc:
                if self._connection is not None:
                    self._connection.close()
                self._connection = None
                if reused is None or connection is not reused or self._aborted.is_set():
                    raise unreachable(self.backend, exc)
        if response.status != 200 and (self._path == RELAY_PATH or response.status in (401, 404)
                                       or response.status >= 500):
            try:
                text = _relay_error_text(response.read(64 * 1024))
            except (OSError, http.client.HTTPException):
                text = "no reason given"
            self._connection.close()
            self._connection = None
            if response.status == 404:
                raise _UpstreamRefused("%s does not have that model: %s" % (name, text), status=404)
            raise _UpstreamRefused("%s answered HTTP %d: %s" % (name, response.status, text),
                                   status=response.status)
        return RelayResponse(connections, connection, response)

    def abort(self):
        """The peer is down: fail the chat now, and cut the post or read under way."""
        self._aborted.set()
        self._cut()

    def _cut(self):
        with self._socket_lock:
            cut_socket(self._socket)

    def close(self):
        RELAY_WATCH.discard(self)
        with self._socket_lock:
            self._socket = None
        response, self._response = self._response, None
        if response is not None:
            if self._last_line and not self._aborted.is_set():
                # The body's end follows the final line at once: read, the kept-alive
                # connection goes back to the backend for the next answer.
                response.finish(self.settle)
            response.close()
        elif self._connection is not None:
            self._connection.close()


RELAY_WATCH = RelayWatch()


def _relay_error_text(body):
    try:
        return _error_text(json.loads(body.decode("utf-8", "replace")))
    except ValueError:
        return body.decode("utf-8", "replace")[:300]


class PeerBackend(Backend):
    """A peer's LLM, reached through that peer's relay with the token it granted.
    ``abort()`` (its peer went down) fails its chats under way, and every later one."""

    kind = "peer"
    local = False

    def __init__(self, peer, grant, dial, stall_timeout=None):
        # stall_timeout: seconds of a silent mesh link that mean its host froze (--peer-timeout)
        Backend.__init__(self, "http://%s:%d" % (grant["llm_host"], grant["llm_port"]), peer.node_id, peer.name,
                         parallel=max(1, (getattr(peer, "load", None) or {}).get("parallel", 1)))  # the host queues
        self.token = grant["token"]
        self.stall_timeout = stall_timeout
        self.peer = peer  # its models are peer.models, kept current by LLMC:
        self.available = True
        self.connections = RelayConnections(dial, self.connect_timeout, self.read_timeout)
        self._calls = set()
        self._calls_lock = threading.Lock()
        self._down = False

    def _stream(self, model, messages, options, cancel, requester=None):
        body = {"model": model, "messages": messages, "options": options}
        if requester is not None:
            body["requester"] = requester.tag  # the host knows our node id from the token
        call = RelayCall(self, body, {"Authorization": "Bearer " + self.token})
        with self._calls_lock:
            self._calls.add(call)
            if self._down:
                call.abort()
        try:
            yield from stream_ollama_lines(call, self._start_event(model), cancel, self.node_name,
                                           call.lines(cancel))
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def link_silent(self):
        """Whether the peer's mesh link has heard nothing (not even a PONG) for ``stall_timeout``:
        the heartbeat closes such a link at its next round (every third of the timeout), and a
        chat waiting for this peer's next word need not wait for that."""
        link = getattr(self.peer, "link", None)
        return (self.stall_timeout is not None and link is not None
                and time.monotonic() - link.last_received > self.stall_timeout)
    def _stream_for(self, turn, model, messages, options, cancel):
        return self._stream(model, messages, options, cancel, None if turn is None else turn.requester)

    def abort(self):
        with self._calls_lock:
            self._down = True
            calls = list(self._calls)
        for call in calls:
            call.abort()
        self.connections.close()

    def forward(self, path, body):
        upstream = self._post(RELAY_FORWARD_PATH, {"path": path, "body": body}, self.read_timeout)
        with self._calls_lock:
            self._calls.add(upstream)  # abort() cuts it too
            down = self._down
        if down:
            upstream.abort()
        upstream.on_close(lambda: self._forget(upstream))
        return upstream

    def _forget(self, call):
        with self._calls_lock:
            self._calls.discard(call)

    def info(self, path, timeout=2.0):
        try:
            return self._post(RELAY_FORWARD_PATH, {"path": path}, timeout).json()
        except _UpstreamRefused as exc:
            raise requests.ConnectionError(str(exc))

    def _post(self, path, body, timeout):
        """POST ``body`` to the peer's relay ``path``: an Upstream, or _UpstreamRefused (so the
        next host is tried) when it is down, lacks the model or fails (see RelayCall._post)."""
        call = RelayCall(self, body, {"Authorization": "Bearer " + self.token}, path)
        relay = call.post()
        relay.set_timeout(timeout)
        response = relay.response
        content_type = response.getheader("Content-Type") or "application/json"

        def chunks():
            try:
                while True:
                    chunk = relay.read1(65536)
                    if not chunk:
                        return
                    yield chunk
            except (OSError, ConnectionError) as exc:  # cut mid-way: say so, as Ollama does
                if "ndjson" not in content_type:
                    raise
                yield b"\n" + json.dumps({"error": "the host stopped answering mid-way (%s)"
                                                   % type(exc).__name__}).encode("utf-8") + b"\n"
        return Upstream(response.status, content_type, chunks(), relay.close, relay)


###############################################################################
# Any request kind, passed on as it is ########################################
###############################################################################
#
# Chats of the page go through Router.chat as events. Every other request of the Ollama
# API (show, embed, chats with tools or formats, raw generates) is passed on in Ollama's
# own shape to a host that serves the model: ``MeshCalls.call(path, body)`` picks the
# backend as Router.chat does and returns an ``Upstream`` (status, type, body pieces);
# a PeerBackend carries it through the peer's ``/relay/forward``, which calls
# MeshCalls there with its own backends only. An OpenAI-compatible host translates.

RELAY_FORWARD_PATH = "/relay/forward"
FORWARD_PATHS = ("/api/chat", "/api/generate", "/api/show", "/api/embed", "/api/embeddings")
INFO_PATHS = ("/api/tags", "/api/ps", "/api/version")
SLOT_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")  # work that holds a slot
GENERATION_PATHS = ("/api/chat", "/api/generate")  # what the teacher's rules govern
RECENT_OLLAMA_VERSION = "0.12.0"  # /api/version when no Ollama on the mesh tells its own
MAX_FORWARD_BODY = 32 * MiB  # a request with images


def model_aliases(name):
    """The names ``name`` may be listed as: ``x`` and ``x:latest`` are the same model."""
    if not isinstance(name, str) or not name:
        return []
    if name.endswith(":latest"):
        return [name, name[:-len(":latest")]]
    return [name] if ":" in name.rsplit("/", 1)[-1] else [name, name + ":latest"]


def version_key(text):
    return tuple(int(part) for part in re.findall(r"\d+", str(text or ""))[:4])


class Upstream:
    """A reply to pass on as it is: ``status``, ``content_type`` and the body's byte pieces.
    Iterate it once; it closes (running ``on_close`` functions) when read or dropped."""

    def __init__(self, status, content_type, chunks, close=None, response=None):
        self.status, self.content_type = status, content_type
        self._chunks = chunks
        self._closers = [close] if close else []
        self.response = response  # the requests response it reads, if any

    def abort(self):
        """Its host went down: end the read under way at once."""
        cut_response(self.response)

    def on_close(self, function):
        self._closers.append(function)

    def __iter__(self):
        try:
            for chunk in self._chunks:
                yield chunk
        finally:
            self.close()

    def close(self):
        closers, self._closers = self._closers, []
        for function in closers:
            function()

    def json(self):
        return parse_json(b"".join(self), "a reply", MAX_FORWARD_BODY)

    def error_text(self):
        """The message of an error reply, JSON or not."""
        body = b"".join(self)
        try:
            return _error_text(parse_json(body, "an error", MAX_FORWARD_BODY))
        except ValueError:
            return body.decode("utf-8", "replace")[:300]

    @classmethod
    def of_json(cls, payload, status=200):
        return cls(status, "application/json", iter([json.dumps(payload).encode("utf-8")]))

    @classmethod
    def of_lines(cls, payloads):
        return cls(200, "application/x-ndjson", iter([json.dumps(p).encode("utf-8") + b"\n" for p in payloads]))

    @classmethod
    def of_response(cls, response):
        content_type = response.headers.get("Content-Type") or "application/json"

        def chunks():
            try:
                while True:
                    chunk = response.raw.read1(65536)
                    if not chunk:
                        return
                    yield chunk
            except Exception as exc:  # cut mid-way (urllib3 and socket errors): say so, as Ollama does
                if "ndjson" not in content_type:
                    raise
                yield b"\n" + json.dumps({"error": "the host stopped answering mid-way (%s)"
                                                   % type(exc).__name__}).encode("utf-8") + b"\n"
        return cls(response.status_code, content_type, chunks(), response.close, response)


def post_upstream(backend, path, body):
    """POST to ``backend``: an Upstream, or _UpstreamRefused (so the next host is tried) when it is
    down, lacks the model or fails; a refusal of the request itself (400) is passed on."""
    try:
        response = backend.session.post(backend.url + path, json=body, stream=True,
                                        timeout=(backend.connect_timeout, backend.read_timeout))
    except requests.RequestException as exc:
        raise unreachable(backend, exc)
    if response.status_code == 404 or response.status_code >= 500 or response.status_code == 401:
        text = _http_error_text(response)
        response.close()
        what = ("does not have that model" if response.status_code == 404
                else "answered HTTP %d" % response.status_code)
        raise _UpstreamRefused("%s %s: %s" % (backend.node_name, what, text), status=response.status_code)
    return Upstream.of_response(response)


def ollama_tool_calls(calls):
    """OpenAI ``tool_calls`` (arguments as JSON text) as Ollama's (arguments as an object)."""
    result = []
    for call in calls or []:
        function = (call or {}).get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                arguments = {"arguments": arguments}
        result.append({"function": {"name": function.get("name", ""), "arguments": arguments or {}}})
    return result


def openai_tool_calls(calls, indexed=False):
    """Ollama ``tool_calls`` as OpenAI's: with an id and type, arguments as JSON text."""
    result = []
    for index, call in enumerate(calls or []):
        function = (call or {}).get("function") or {}
        arguments = function.get("arguments")
        entry = {"id": call.get("id") or "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": function.get("name", ""),
                              "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {})}}
        if indexed:
            entry["index"] = index
        result.append(entry)
    return result


def ollama_format(response_format):
    """OpenAI ``response_format`` as Ollama's ``format``: "json", a JSON schema, or None."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return "json"
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else "json"
    return None


def openai_response_format(fmt):
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": fmt}}
    return None


def ollama_messages(messages):
    """OpenAI chat messages as Ollama's: content parts to text and base64 images, tool calls."""
    result = []
    for message in messages or []:
        if not isinstance(message, dict):
            continue
        item = {"role": message.get("role"), "content": message.get("content") or ""}
        if isinstance(item["content"], list):
            parts = item["content"]
            item["content"] = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            images = [str((p.get("image_url") or {}).get("url", "")).split(",", 1)[-1] for p in parts
                      if isinstance(p, dict) and p.get("type") == "image_url"]
            if images:
                item["images"] = images
        if message.get("tool_calls"):
            item["tool_calls"] = ollama_tool_calls(message["tool_calls"])
        for key in ("tool_call_id", "name", "images"):
            if key in message and key not in item:
                item["tool_name" if key == "name" else key] = message[key]
        result.append(item)
    return result


def openai_messages(messages):
    """Ollama chat messages as OpenAI's (for an OpenAI-compatible host)."""
    result = []
    for message in messages or []:
        item = {"role": message.get("role"), "content": message.get("content") or ""}
        if message.get("images"):
            item["content"] = [{"type": "text", "text": item["content"]}] + [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}
                for image in message["images"]]
        if message.get("tool_calls"):
            item["tool_calls"] = openai_tool_calls(message["tool_calls"])
        if message.get("tool_call_id"):
            item["tool_call_id"] = message["tool_call_id"]
        result.append(item)
    return result


class OpenAITranslation:
    """Ollama-shaped requests answered by an OpenAI-compatible server (``OpenAIBackend.forward``).
    What such a server cannot do (a raw prompt, a template, a suffix) is refused in a clear error."""

    UNSUPPORTED = ("template", "raw", "suffix", "context")

    def __init__(self, backend):
        self.backend = backend

    def forward(self, path, body):
        if path == "/api/show":
            return Upstream.of_json(self.show(body["model"]))
        if path in ("/api/embed", "/api/embeddings"):
            return self.embed(path, body)
        if path == "/api/generate":
            given = [key for key in self.UNSUPPORTED if body.get(key)]
            if given:
                raise LLMError("%s serves %s through an OpenAI-compatible server, which cannot take %s"
                               % (self.backend.node_name, body["model"], ", ".join(given)), status=400)
            messages = [{"role": "user", "content": body.get("prompt") or "", "images": body.get("images")}]
            if body.get("system"):
                messages.insert(0, {"role": "system", "content": body["system"]})
            return self.chat(dict(body, messages=messages), "response")
        return self.chat(body, "message")

    def show(self, model):
        """What can be known honestly of a model behind an OpenAI-compatible server: its name."""
        return {"modelfile": "", "parameters": "", "template": "", "modified_at": ollama_timestamp(),
                "details": {"parent_model": "", "format": "", "family": "", "families": None,
                            "parameter_size": "", "quantization_level": ""},
                "model_info": {"general.architecture": "", "neuromesh.backend": "openai-compatible"},
                "capabilities": ["completion"]}

    def _json(self, path, body):
        upstream = post_upstream(self.backend, path, body)
        if upstream.status != 200:
            raise LLMError("%s: %s" % (self.backend.node_name, upstream.error_text()), status=upstream.status)
        return upstream.json()

    def embed(self, path, body):
        text = body.get("prompt") if path == "/api/embeddings" else body.get("input")
        reply = self._json("/v1/embeddings", {"model": body["model"], "input": text})
        vectors = [item.get("embedding") for item in sorted(reply.get("data") or [], key=lambda d: d.get("index", 0))]
        if path == "/api/embeddings":
            return Upstream.of_json({"embedding": vectors[0] if vectors else []})
        usage = reply.get("usage") or {}
        return Upstream.of_json({"model": body["model"], "embeddings": vectors,
                                 "prompt_eval_count": usage.get("prompt_tokens", 0)})

    def chat(self, body, key):
        request = {"model": body["model"], "messages": openai_messages(body.get("messages")), "stream": False}
        if body.get("tools"):
            request["tools"] = body["tools"]
        if openai_response_format(body.get("format")):
            request["response_format"] = openai_response_format(body["format"])
        options = body.get("options") or {}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("num_predict", "max_tokens"),
                             ("seed", "seed")):
            if ours in options:
                request[theirs] = options[ours]
        reply = self._json("/v1/chat/completions", request)
        choice = (reply.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        usage = reply.get("usage") or {}
        final = {"model": body["model"], "created_at": ollama_timestamp(), "done": True,
                 "done_reason": choice.get("finish_reason") or "stop",
                 "prompt_eval_count": usage.get("prompt_tokens", 0), "eval_count": usage.get("completion_tokens", 0)}
        text = message.get("content") or ""
        said = {"role": "assistant", "content": text}
        if message.get("tool_calls"):
            said["tool_calls"] = ollama_tool_calls(message["tool_calls"])
        if body.get("stream", True) is False:
            return Upstream.of_json(dict(final, **{key: said if key == "message" else text}))
        first = {"model": body["model"], "created_at": final["created_at"], "done": False,
                 key: said if key == "message" else text}
        return Upstream.of_lines([first, dict(final, **{key: {"role": "assistant", "content": ""}
                                                        if key == "message" else ""})])


class MeshCalls:
    """Requests in Ollama's shape, answered by a host of the mesh that serves their model."""

    def __init__(self, router):
        self.router = router

    def call(self, path, body, local_only=False, requester=None):
        """An Upstream from the first host that takes the request; LLMError when none does."""
        router = self.router
        model = router.resolve_model(body.get("model") or body.get("name"), local_only)
        body = dict(body, model=model)
        body.pop("name", None)
        governed = path in GENERATION_PATHS and not router.policy.is_owner(requester)
        if path in GENERATION_PATHS and (governed or model not in router.local_models()):  # its own LLM is the owner's
            router.room.admit(router.policy.requester(requester), model)  # the teacher's rules
        failures = []
        for backend in router.candidates(model, local_only, requester):
            try:
                asked = router.room.instruct_body(requester, path, body) if governed and backend.local else body
                return self._try(backend, path, asked, router.policy.turn(requester, backend,
                                                                         asking=path in SLOT_PATHS))
            except _UpstreamRefused as exc:
                failures.append((exc.status, str(exc)))
                log.warning("failing over: %s", exc)
                router.mark_down(backend, exc)
        if not failures:
            raise LLMError("model %r has no reachable host right now" % model, status=503)
        status = 404 if all(s == 404 for s, _t in failures) else 503
        raise LLMError(failures_text([t for _s, t in failures]), status=status)

    def _try(self, backend, path, body, turn):
        if path not in SLOT_PATHS:
            return backend.forward(path, body)
        backend.slots.acquire(turn=turn)
        self.router._count_peer_request(backend, +1)

        def done():
            self.router._count_peer_request(backend, -1)
            backend.slots.release(turn)
        try:
            upstream = backend.forward(path, body)
        except BaseException:
            done()
            raise
        upstream.on_close(done)
        return upstream


class ModelCapabilities:
    """What each model of the mesh can do (``completion``, ``vision``, ``thinking``, ``tools``,
    ``embedding``) as its host's ``/api/show`` says, kept a while: the page's model picker shows
    it, and offers pictures only for a vision model. ``of_all(names)`` asks the hosts of the
    models not known lately, in parallel, waiting ``wait_s`` at most: a slow host's model shows
    no capabilities until its answer arrives (kept for the next call)."""

    keep_s = 300.0
    failed_keep_s = 30.0  # a host that did not say is asked again soon
    wait_s = 3.0
    most = 512  # models remembered at once

    def __init__(self, router, clock=time.monotonic):
        self.router, self.clock = router, clock
        self._known = {}
        self._asking = set()
        self._lock = threading.Lock()

    def of_all(self, names):
        """``{name: [capabilities]}`` for ``names``."""
        threads = []
        with self._lock:
            for name in names:
                known = self._known.get(name)
                if (known is None or known[0] <= self.clock()) and name not in self._asking:
                    self._asking.add(name)
                    threads.append(threading.Thread(target=self._ask, args=(name,), daemon=True,
                                                    name="neuromesh-capabilities"))
        deadline = self.clock() + self.wait_s
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - self.clock()))
        with self._lock:
            return {name: list(self._known.get(name, (0, []))[1]) for name in names}

    def _ask(self, name):
        try:
            reply = MeshCalls(self.router).call("/api/show", {"model": name}).json()
            found = [c for c in reply.get("capabilities") or [] if isinstance(c, str) and len(c) <= 40][:16]
            keep = self.keep_s if isinstance(reply.get("capabilities"), list) else self.failed_keep_s
        except (LLMError, ValueError, AttributeError, requests.RequestException):
            found, keep = [], self.failed_keep_s
        except Exception:  # a bug: log it, keep the page's model list working
            log.exception("asking the capabilities of %s failed", safe_text(name))
            found, keep = [], self.failed_keep_s
        with self._lock:
            self._asking.discard(name)
            if len(self._known) >= self.most:
                self._known.clear()
            self._known[name] = (self.clock() + keep, found)


class MeshInfo:
    """``/api/tags``, ``/api/ps`` and ``/api/version`` of the mesh: this node's backends, and each
    sharing peer's (asked through its relay), merged."""

    peer_timeout = 2.0

    def __init__(self, router):
        self.router = router

    def local(self, path):
        """What this node's own backends say (the relay's answer to a peer)."""
        if not self.router.sharing:
            return {"models": []} if path != "/api/version" else {"version": None}
        replies = []
        for backend in self.router.local:
            try:
                replies.append(backend.info(path) if backend.available else {})
            except (requests.RequestException, ValueError) as exc:
                log_limited(logging.INFO, "info:" + backend.url, "%s did not say %s: %s", backend.url, path,
                            type(exc).__name__)
        replies = [reply for reply in replies if isinstance(reply, dict)]
        if path == "/api/version":
            versions = [r.get("version") for r in replies if r.get("version")]
            return {"version": max(versions, key=version_key) if versions else None}
        return {"models": [entry for r in replies for entry in r.get("models") or [] if isinstance(entry, dict)]}

    def _peer_replies(self, path):
        with self.router.lock:
            peers = [b for b in self.router.grants.values() if b.peer.connected]
        replies = []
        for backend in peers:
            try:
                replies.append((backend.peer.name, backend.info(path, self.peer_timeout)))
            except (requests.RequestException, ValueError, LLMError) as exc:
                log_limited(logging.INFO, "info:" + backend.node_id, "%s did not say %s: %s",
                            safe_text(backend.node_name), path, type(exc).__name__)
        return replies

    def _entries(self, path):
        """``{model name: (entry, [host names])}`` over this node and its sharing peers."""
        merged = collections.OrderedDict()
        replies = [(self.router.node_name, self.local(path))] + self._peer_replies(path)
        for host, reply in replies:
            for entry in reply.get("models") or []:
                name = entry.get("model") or entry.get("name") if isinstance(entry, dict) else None
                if isinstance(name, str):
                    merged.setdefault(name, (entry, []))[1].append(host)
        return merged

    def tags(self):
        known = self._entries("/api/tags")
        models = []
        for name, hosts in self.router.mesh_models().items():
            entry = next((known[alias][0] for alias in model_aliases(name) if alias in known), None) or {
                "modified_at": ollama_timestamp(), "size": 0, "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {"parent_model": "", "format": "", "family": "", "families": None,
                            "parameter_size": "", "quantization_level": ""}}
            models.append(dict(entry, name=name, model=name, neuromesh_hosts=[n for _i, n, _l in hosts]))
        return {"models": models}

    def ps(self):
        return {"models": [dict(entry, neuromesh_hosts=hosts) for entry, hosts in self._entries("/api/ps").values()]}

    def version(self):
        versions = [reply.get("version") for _h, reply in [("", self.local("/api/version"))] +
                    self._peer_replies("/api/version") if isinstance(reply.get("version"), str)]
        return {"version": max(versions, key=version_key) if versions else RECENT_OLLAMA_VERSION}


###############################################################################
# Routing: which LLM answers, fairly, with failover ###########################
###############################################################################


class AnswerSoFar:
    """What an answer has said so far, and which hosts said it: for mid-answer failover.

    A host that takes over an answer whose host went down is sent the partial answer as the
    start of the assistant's message (the last message of the chat), which Ollama, llama.cpp's
    server and vLLM continue rather than begin anew; so the answer goes on, with no text twice.
    Methods for the caller: ``note(event)`` (each event of the answer, in order; returns the event
    to pass on: a later host's "start" becomes "continued"), ``request()`` (messages and options
    for the next host), ``finish(done)``, ``record()`` (the hosts to store, or None) and ``text``.
    """

    def __init__(self, messages, options):
        self.messages, self.options = messages, options
        self.parts = []  # token texts
        self.thinking = []  # a reasoning model's thinking, apart from the answer
        self.hosts = []  # {"node_id", "name", "tokens"}, in the order they wrote

    @property
    def text(self):
        return "".join(self.parts)

    @property
    def tokens(self):
        return sum(host["tokens"] for host in self.hosts)

    def note(self, event):
        kind = event["type"]
        if kind in ("start", "continued"):
            if self.hosts:
                event = dict(event, type="continued", after_tokens=self.tokens,
                             from_node_name=self.hosts[-1]["name"])
            self.hosts.append({"node_id": event["node_id"], "name": event["node_name"], "tokens": 0})
        elif kind == "token" and self.hosts:
            self.parts.append(event["content"])
            self.hosts[-1]["tokens"] += 1
        elif kind == "thinking":
            self.thinking.append(event["content"])
        return event

    def request(self):
        """``(messages, options)`` for the next host: the partial answer as the assistant's
        message to continue, and what is left of a ``num_predict`` limit."""
        if not self.parts:
            return self.messages, self.options
        messages = list(self.messages)
        if messages and messages[-1].get("role") == "assistant":  # the client's own prefill goes on too
            messages[-1] = dict(messages[-1], content=(messages[-1].get("content") or "") + self.text)
        else:
            messages.append({"role": "assistant", "content": self.text})
        options = dict(self.options)
        limit = options.get("num_predict")
        if type(limit) is int and limit > 0:
            options["num_predict"] = max(1, limit - self.tokens)
        return messages, options

    def finish(self, done):
        """The done event of a continued answer counts the tokens of every host."""
        if len(self.hosts) < 2:
            return done
        last = self.hosts[-1]["tokens"]
        count = done.get("eval_count")
        return dict(done, eval_count=(count if type(count) is int else last) + self.tokens - last)

    def record(self):
        """``answered_by_hosts`` of the stored message (hosts that wrote some of it), or None
        when one host wrote it all."""
        hosts = [dict(host) for host in self.hosts if host["tokens"]][:MAX_ANSWER_HOSTS]
        return hosts if len(hosts) > 1 else None
class SharePolicy:
    """How this node shares its LLM: the owner's chats go first, each requester has a weight
    (--requester-weight), remote chats hold at most --share-slots slots, and the owner may
    pause sharing (remote chats are then refused, so their router places them elsewhere).

    Methods for the caller: ``turn(requester, backend)`` (the queue place of one chat),
    ``is_owner(requester)``, ``sharing_with(granted)``, ``pause(paused)``; ``paused`` tells.
    """

    active_window = 600.0  # seconds a remote requester counts as one we share with
    max_seen = 1000

    def __init__(self, node_id, share_slots=None, weights=None, paused=False):
        self.node_id = node_id
        self.share_slots = share_slots
        self.weights = dict(weights or {})
        self.paused = bool(paused)
        self._seen = collections.OrderedDict()  # remote requester key -> (node id, last chat, monotonic)
        self._lock = threading.Lock()

    def pause(self, paused):
        self.paused = bool(paused)

    def requester(self, requester):
        """``requester``, or this node's owner when None (a chat asked on this computer)."""
        return requester if requester is not None else Requester(self.node_id, "owner")

    def is_owner(self, requester):
        requester = self.requester(requester)
        return requester.node_id == self.node_id and requester.tag == "owner"

    def weight_of(self, requester):
        """The weight named for the requester's key, its node (an id prefix of 8+ characters), or its tag."""
        weights = self.weights
        if requester.key in weights:
            return weights[requester.key]
        for name, weight in weights.items():
            if len(name) >= 8 and requester.node_id.startswith(name):
                return weight
        return weights.get(requester.tag, 1.0)

    def turn(self, requester, backend, asking=True):
        """The queue place of a chat of ``requester`` on ``backend`` (``asking``: it is asked now,
        not only estimated)."""
        requester = self.requester(requester)
        owner = self.is_owner(requester)
        remote = bool(backend.local) and not owner
        if remote and asking:
            self._saw(requester)
        return Turn(requester, self.weight_of(requester), owner, remote, self.share_slots if remote else None)

    def _saw(self, requester):
        with self._lock:
            self._seen.pop(requester.key, None)
            self._seen[requester.key] = (requester.node_id, time.monotonic())
            while len(self._seen) > self.max_seen:
                self._seen.popitem(last=False)

    def sharing_with(self, granted=()):
        """How many students this node shares with: remote requesters of the last minutes, plus
        the nodes it granted access to that have not asked yet."""
        horizon = time.monotonic() - self.active_window
        with self._lock:
            active = [(node_id, key) for key, (node_id, when) in self._seen.items() if when >= horizon]
        nodes = {node_id for node_id, _key in active}
        return len(active) + len([node_id for node_id in set(granted) if node_id not in nodes])


POLICY_SUFFIX = "7e9c1a1e5a0b4d6f8c2e000000000024"  # <teacher id>.POLICY_SUFFIX holds the room policy
SHARES_SUFFIX = "7e9c1a1e5a0b4d6f8c2e000000005a4e"  # <node id>.SHARES_SUFFIX: chats its owner shows the teacher
_POLICY_TEXT = {"reason": 200, "instructions": 4000, "teacher_name": 40}


def clean_policy(raw):
    """The room policy of a record's ``policy`` field, each value checked (a damaged one falls back
    to its default, which governs least); never raises."""
    raw = raw if isinstance(raw, dict) else {}
    policy = {"paused": raw.get("paused") is True, "guests": raw.get("guests") is not False}
    for key, limit in _POLICY_TEXT.items():
        value = raw.get(key)
        policy[key] = value[:limit] if isinstance(value, str) else ""
    models = raw.get("models")
    policy["models"] = ([m for m in models if isinstance(m, str)][:100]
                        if isinstance(models, list) and models else None)
    quota = raw.get("quota")
    policy["quota"] = quota if type(quota) is int and 0 < quota < 10000 else None
    clear = raw.get("clear_guests")  # when the teacher last asked to clear guests' chats
    policy["clear_guests"] = clear if isinstance(clear, str) and 0 < len(clear) <= 40 else None
    node = raw.get("teacher_node")
    policy["teacher_node"] = node if isinstance(node, str) and re.fullmatch(r"[0-9a-f]{32}", node) else None
    return policy


class RoomRules:
    """The room's rules as its pinned teacher signed them, and their enforcement: the newest policy
    record of the teacher's log (verified like every entry, see BatchVerifier) decides. Without a
    pinned teacher nothing is governed; no one else's record is ever read.

    Methods for the caller: ``policy()`` (None: no teacher, or no policy yet), ``admit(requester,
    model)`` (LLMError when the policy refuses the chat; counts it for the quota),
    ``with_instructions(requester, messages)``, ``quota_left(requester)``.
    """

    quota_window = 3600.0
    max_counted = 2000  # requesters whose chats are counted; the least recent go first

    def __init__(self, store, teacher_id):
        self.store = store
        self.teacher_id = teacher_id
        self._chats = collections.OrderedDict()  # requester key -> deque of monotonic chat times
        self._lock = threading.Lock()

    def record(self):
        """The teacher's newest policy record (with ``seq``), or None."""
        if not self.teacher_id or self.store is None:
            return None
        return self.store.room.control_record(self.teacher_id, "%s.%s" % (self.teacher_id, POLICY_SUFFIX))

    def policy(self):
        record = self.record()
        return clean_policy(record.get("policy")) if record else None

    def governs(self, policy, requester):
        return policy is not None and not (requester.node_id == policy["teacher_node"] and requester.tag == "owner")

    def admit(self, requester, model):
        policy = self.policy()
        if not self.governs(policy, requester):
            return
        name = policy["teacher_name"] or "the teacher"
        if policy["paused"]:
            raise LLMError("%s paused the room's LLMs: %s" % (name, policy["reason"] or "no reason given"), status=403)
        if policy["models"] is not None and model not in policy["models"]:
            raise LLMError("%s allows only %s in this room, not %s" % (name, ", ".join(policy["models"]), model),
                           status=403)
        if not policy["guests"] and requester.tag.startswith("guest-"):
            raise LLMError("%s does not allow guests in this room now" % name, status=403)
        if policy["quota"] is not None:
            self._count(requester, policy["quota"], name)

    def _count(self, requester, quota, name):
        now = time.monotonic()
        with self._lock:
            times = self._chats.pop(requester.key, None) or collections.deque()
            self._chats[requester.key] = times
            while times and times[0] <= now - self.quota_window:
                times.popleft()
            if len(times) >= quota:
                wait = int(times[0] + self.quota_window - now) // 60 + 1
                raise LLMError("you used the %d chats an hour %s allows: the next one in %d minutes"
                               % (quota, name, wait), status=429)
            times.append(now)
            while len(self._chats) > self.max_counted:
                self._chats.popitem(last=False)

    def quota_left(self, requester):
        policy = self.policy()
        if policy is None or policy["quota"] is None:
            return None
        horizon = time.monotonic() - self.quota_window
        with self._lock:
            used = sum(1 for when in self._chats.get(requester.key, ()) if when > horizon)
        return max(policy["quota"] - used, 0)

    def shown_by(self, origin):
        """The conversation ids ``origin`` shows this room's teacher ("Show my teacher")."""
        record = self.store.room.control_record(origin, "%s.%s" % (origin, SHARES_SUFFIX)) if self.store else None
        return self._shown(origin, record)

    def _shown(self, origin, record):
        shown = (record or {}).get("shown_to_teacher")
        if not isinstance(shown, dict) or shown.get("teacher") != self.teacher_id or not self.teacher_id:
            return set()
        ids = shown.get("conversations")
        return ({cid for cid in ids[:1000] if isinstance(cid, str) and bound_owner(cid) == origin}
                if isinstance(ids, list) else set())

    _OWN_FIELDS = ("shown_to_teacher", "guest_chats", "guests_cleared")

    def write_own(self, **fields):
        """This node's record for the teacher, with ``fields`` changed: the chats its owner shows
        the teacher, how many chats its guests wrote, when it last cleared them."""
        origin = self.store.node_id
        cid = "%s.%s" % (origin, SHARES_SUFFIX)
        record = self.store.room.control_record(origin, cid) or {}
        kept = {key: record[key] for key in self._OWN_FIELDS if key in record}
        kept.update(fields)
        self.store.write_control(origin, cid, kept)

    def guest_chats(self):
        """The conversations of this node's guests that are still there."""
        return [cid for cid in self.store.guests.owners() if self.store.get_conversation_record(cid) is not None]

    def introduce_teacher(self, teacher_key, name, node_id):
        """The teacher's first start (or a new name): an open room's policy, so students see who
        their teacher is before any rule is set."""
        policy = self.policy()
        if policy is None or policy["teacher_name"] != name or policy["teacher_node"] != node_id:
            policy = dict(policy or {}, teacher_name=name, teacher_node=node_id)
            teacher = teacher_key.node_id
            self.store.write_control(teacher, "%s.%s" % (teacher, POLICY_SUFFIX), {"policy": policy})

    def clear_guests(self):
        """When the teacher asked to clear guests' chats after this node last did: delete them
        (each deletion syncs like any other); returns how many went."""
        policy = self.policy()
        asked = policy and policy["clear_guests"]
        origin = self.store.node_id
        if not asked or (self.store.room.control_record(origin, "%s.%s" % (origin, SHARES_SUFFIX)) or {}).get(
                "guests_cleared") == asked:
            return 0
        gone = 0
        for cid in self.guest_chats():
            try:
                self.store.delete_conversation(cid)
                gone += 1
            except StoreError as error:  # a guest chat of another node's log cannot be ours to delete
                log.warning("could not clear the guest chat %s: %s", cid, error)
        self.write_own(guests_cleared=asked, guest_chats=0)
        log.info("cleared %d guests' chats, as %s asked", gone, policy["teacher_name"] or "the teacher")
        return gone

    def guest_chat_counts(self):
        """{node id: guests' chats it reports} of every node of the room."""
        counts = {}
        for origin, record in self.store.room.control_records(SHARES_SUFFIX).items():
            count = record.get("guest_chats")
            if type(count) is int and 0 < count < 1 << 30:
                counts[origin] = count
        return counts

    def shared(self):
        """{conversation id: its owner} of every chat a student shows the teacher."""
        if self.store is None:
            return {}
        return {cid: origin for origin, record in self.store.room.control_records(SHARES_SUFFIX).items()
                for cid in self._shown(origin, record)}

    def instruct_body(self, requester, path, body):
        """An Ollama request ``body`` with the teacher's instructions: the first system message of a
        chat, the start of a generation's system prompt."""
        if path == "/api/chat":
            messages = body.get("messages") if isinstance(body.get("messages"), list) else []
            return dict(body, messages=self.with_instructions(requester, messages))
        policy = self.policy()
        if not self.governs(policy, requester) or not policy["instructions"]:
            return body
        system = body.get("system") if isinstance(body.get("system"), str) else ""
        return dict(body, system=policy["instructions"] + ("\n\n" + system if system else ""))

    def with_instructions(self, requester, messages):
        """``messages`` with the teacher's instructions as the first system message."""
        policy = self.policy()
        if not self.governs(policy, requester) or not policy["instructions"]:
            return messages
        return [{"role": "system", "content": policy["instructions"]}] + list(messages)


class Placement:
    """Ranks the backends of a model by when a new chat would start there, soonest first.

    The estimate: rounds of answers ahead of this requester (this node's queue for the backend,
    and for a peer the host's own queue as its LLMC: reports it, by requester), times how long
    an answer takes there (recent tokens per answer over recent tokens per second), plus the
    time to load a model that is not in memory (Ollama's /api/ps), plus a long pause for a host
    that answered 503 lately. Ties go to this node's own LLM, then the least busy.
    """

    load_seconds = 5.0  # about how long a model not in memory takes to load
    busy_seconds = 3600.0

    def __init__(self, router):
        self.router = router

    def rank(self, backends, model, requester):
        known = sorted(self.answer_seconds(b) for b in backends if self.answer_seconds(b) is not None)
        usual = known[len(known) // 2] if known else Backend.default_answer_seconds
        keyed = [(self.wait(backend, model, requester, usual), 0 if backend.local else 1,
                  backend.slots.in_flight + self.router.peer_in_flight[backend.node_id],
                  backend.recent_latency or 0.0, index, backend) for index, backend in enumerate(backends)]
        return [entry[-1] for entry in sorted(keyed, key=lambda entry: entry[:-1])]

    def rounds(self, backend, requester):
        """Answers' time before a chat of ``requester`` starts on ``backend`` (0: at once)."""
        turn = (self.router.policy.turn(requester, backend, asking=False) if backend.local
                else Turn(self.router.policy.requester(requester), 1.0, False, False, None))
        rounds = backend.slots.rounds_before(turn) + self.router.pending[backend] / float(backend.slots.limit)
        if not backend.local:
            rounds += self._host_rounds(backend, turn.requester)
        return rounds

    @staticmethod
    def answer_seconds(backend):
        """How long an answer takes on ``backend``, from its answers here or its host's own report;
        None while unknown."""
        if backend.recent_tps:
            return backend.answer_seconds()
        rate = finite_or_none(getattr(getattr(backend, "peer", None), "tokens_per_second", None), 1e6)
        return (backend.recent_tokens or 200.0) / rate if rate else None

    def wait(self, backend, model, requester, usual=Backend.default_answer_seconds):
        """Seconds until a chat would start on ``backend``; ``usual``: an answer's time where unknown
        (the median of the others: a host that has not answered yet is not slow for it)."""
        seconds = self.rounds(backend, requester) * (self.answer_seconds(backend) or usual)
        loaded = backend.loaded if backend.local else set(getattr(backend.peer, "loaded", ()) or ()) | backend.loaded
        if model not in loaded:
            seconds += self.load_seconds
        if backend.busy_until > time.monotonic():
            seconds += self.busy_seconds
        return seconds

    def _host_rounds(self, backend, requester):
        """The host's queue as it last told it: with fair queueing, each other requester goes
        before us at most once more than we already have waiting there."""
        peer = backend.peer
        load = getattr(peer, "load", None) or {}
        parallel = load.get("parallel") or 1
        in_flight = load.get("in_flight") or 0  # ours waiting for our slot to it count in Slots.rounds_before
        queue = getattr(peer, "queue", None) or {}
        if queue:
            mine = queue.get(requester.key, 0)
            ahead = mine + sum(min(count, mine + 1) for key, count in queue.items() if key != requester.key)
        else:
            ahead = load.get("queued") or 0
        return max(0, in_flight + ahead - parallel + 1) / float(parallel)

    def starts_now(self, backend, requester):
        return self.rounds(backend, requester) == 0 and backend.busy_until <= time.monotonic()


class _Attempt:
    """The cancel Event one try on one backend sees: set when the chat is cancelled, or, while
    it waits in a queue, when another host could start it now (``moved``: place it again)."""

    look_every = 0.2  # seconds between looks at the other hosts

    def __init__(self, cancel, elsewhere, settle):
        self.cancel = cancel
        self.elsewhere = elsewhere  # callable: the backend that would start the chat now, or None
        self._settle = settle  # called once: the chat is in the backend's queue or slot (or left)
        self.waiting = False
        self.moved = None  # the backend it moves to
        self._next_look = 0.0
        self._looking = threading.Lock()

    def is_set(self):
        if self.cancelled():
            return True
        with self._looking:  # the chat's thread and RelayWatch both ask; one look counts the move once
            if self.waiting and not self.moved and time.monotonic() >= self._next_look:
                self._next_look = time.monotonic() + self.look_every
                self.moved = self.elsewhere()
        return self.moved is not None

    def cancelled(self):
        return self.cancel is not None and self.cancel.is_set()

    def settle(self):
        settle, self._settle = self._settle, None
        if settle is not None:
            settle()

    def placed(self):
        """It holds a slot now: it stays."""
        self.waiting = False
        self.settle()

    def heard(self, on_queue):
        """``on_queue`` that first marks the chat as waiting."""
        def queued(event):
            self.waiting = True
            self.settle()
            if on_queue is not None:
                on_queue(event)
        return queued


class IssuedTokens:
    """The relay tokens this node gave peers (LRES:): one per peer, kept while it relinks but
    refused while it is away, at most ``limit`` (those of peers away go first)."""

    limit = 256

    def __init__(self):
        self.issued = {}  # peer node id -> its token
        self.away = set()  # holders not linked now: refused until they link again
        self._lock = threading.Lock()

    def give(self, node_id):
        """The token of the peer ``node_id`` (its old one when it relinks), honoured from now on."""
        with self._lock:
            token = self.issued.get(node_id)
            if token is None:
                if len(self.issued) >= self.limit:
                    for gone in self.away:
                        self.issued.pop(gone, None)
                    self.away.clear()
                token = self.issued[node_id] = secrets.token_urlsafe(24)
            self.away.discard(node_id)
            return token

    def left(self, node_id):
        with self._lock:
            if node_id in self.issued:
                self.away.add(node_id)

    def back(self, node_id):
        with self._lock:
            self.away.discard(node_id)

    def holders(self):
        with self._lock:
            return list(self.issued)

    def holder(self, token):
        """The node id of the linked peer we gave ``token`` to, or None."""
        with self._lock:
            for node_id, issued in self.issued.items():
                if token and secrets.compare_digest(token, issued):
                    return None if node_id in self.away else node_id
        return None


class LLMAccess(MeshListener):
    """Asks linked peers for their LLM and answers their asking for ours (LLMC: -> LREQ: -> LRES:):
    keeps the router's ``grants`` (guarded by its ``lock``) and gives peers ``tokens``.

    Methods for the caller: ``retry_requests()``, ``ask_again(backend)``,
    ``serve_relay_on(http_port)``, ``rename(name)``; it registers ``handle_request`` (LREQ) and
    ``handle_response`` (LRES) with the mesh it is given, and hears peers link, change and leave.
    """

    request_retry = 3.0

    def __init__(self, config, node_name, mesh, grants, lock, tokens, on_change):
        self.config = config
        self.node_name = node_name
        self.mesh = mesh
        self.grants = grants  # peer node id -> PeerBackend (what peers let us use)
        self.lock = lock
        self.tokens = tokens  # what we let peers use
        self.on_change = on_change
        self.requested = {}  # peer node id -> when we asked for access (monotonic)
        self.relay_port = 0  # the HTTP port peers reach the relay at, once it is bound (serve_relay_on)
        if mesh is not None:
            mesh.handle(LLM_REQUEST, self.handle_request)
            mesh.handle(LLM_RESPONSE, self.handle_response)
            mesh.watch(self)

    def serve_relay_on(self, http_port):
        """The port of this node's HTTP server, told to the peers this node grants its LLM."""
        self.relay_port = http_port

    def rename(self, name):
        """This node's new name, on its requests and answers from now on."""
        self.node_name = name

    def peer_up(self, peer):
        self.peer_changed(peer, relinked=True)

    def peer_changed(self, peer, relinked=False):
        """A peer's capability changed: ask for access when it offers an LLM we may not use yet.

        A request is asked again after ``request_retry`` seconds without an answer (a frame
        queued on a link that was just replaced by a newer one is lost), or at once on a new link.
        """
        now = time.monotonic()
        with self.lock:
            backend = self.grants.get(peer.node_id)
            if relinked:
                self.requested.pop(peer.node_id, None)
                self.tokens.back(peer.node_id)
            asked = self.requested.get(peer.node_id)
            offers = peer.has_llm or peer.shares_models  # an LLM, or models to copy
            if not offers or backend is not None or (asked is not None and now - asked < self.request_retry):
                return
            self.requested[peer.node_id] = now
        self.mesh.send(peer.node_id, LLM_REQUEST, {"peer_name": self.node_name,
                                                   "reason": "answer chats of this node's users"})

    def ask_again(self, backend):
        """A peer refused our token (it restarted, or its side of our link is down): ask anew."""
        with self.lock:
            if self.grants.get(backend.node_id) is backend:
                del self.grants[backend.node_id]
            self.requested.pop(backend.node_id, None)
        self.peer_changed(backend.peer)

    def retry_requests(self):
        for peer in self.mesh.linked_peers():
            self.peer_changed(peer)

    def peer_down(self, peer, reason=None):
        """The peer's grant to us dies with the link (we ask anew on the next one), and chats
        relayed to it fail over at once. The token we gave it is refused until it links again,
        then honoured: a link can close on this side only (the peer had replaced it by a newer
        one first, quietly), and the peer then still holds that token."""
        with self.lock:
            backend = self.grants.pop(peer.node_id, None)
            self.requested.pop(peer.node_id, None)
        self.tokens.left(peer.node_id)
        if backend is not None:
            backend.abort()
        self.on_change()

    def handle_request(self, peer, payload):
        """LREQ: from a peer. Grant automatically to private-network peers unless --no-share-llm
        (a paused node grants too: its relay refuses chats while paused)."""
        if self.config.no_share_llm:
            answer = {"granted": False, "message": "%s keeps its LLM to itself (--no-share-llm)" % self.node_name}
        elif not is_private_address(peer.address):
            answer = {"granted": False, "message": "LLM access is only granted on private networks"}
        else:
            token = self.tokens.give(peer.node_id)
            local_ip = peer.link.sock.getsockname()[0] if peer.link is not None else self.config.host
            answer = {"granted": True, "message": "welcome, %s" % safe_text(payload.get("peer_name"), 60),
                      "llm_host": local_ip, "llm_port": self.relay_port, "token": token}
            log.info("granted LLM access to %s", safe_text(peer.name))
        self.mesh.send(peer.node_id, LLM_RESPONSE, answer)

    def handle_response(self, peer, payload):
        """LRES: from a peer we asked: keep its relay address and token."""
        if payload.get("granted") is not True:
            log.info("%s did not grant LLM access: %s", safe_text(peer.name), safe_text(payload.get("message")))
            return
        host, port, token = payload.get("llm_host"), payload.get("llm_port"), payload.get("token")
        if not isinstance(host, str) or not isinstance(port, int) or not isinstance(token, str):
            raise ProtocolError("LRES: frame without llm_host, llm_port and token")
        if host in ("0.0.0.0", "") or not is_private_address(host):
            host = peer.address  # its view of itself is useless from here: use where we reach it
        backend = PeerBackend(peer, {"llm_host": host, "llm_port": port, "token": token},
                              functools.partial(self.mesh.dial_relay, peer.node_id), self.config.peer_timeout)
        with self.lock:
            self.grants[peer.node_id] = backend
        log.info("%s shares its LLM (%s)", safe_text(peer.name), ", ".join(peer.models) or "no models yet")
        self.on_change()


class Router:
    """Picks the LLM that answers a chat, and fails over to the next one.

    Owns this node's local backends, the grants peers gave us, and the tokens we gave peers;
    its ``access`` (LLMAccess) asks peers for theirs and grants ours.
    Methods for the caller: ``chat(model, messages, ...)`` (a generator of events),
    ``mesh_models()``, ``resolve_model(name)``, ``refresh_local()``, ``local_capability()``,
    ``watch(listener)``.
    """

    def __init__(self, config, node_id, node_name, mesh, room=None, local=None, sharing_paused=False):
        self.config = config
        self.node_id = node_id
        self.node_name = node_name
        self.mesh = mesh
        self.room = room or RoomRules(None, None)
        if local is None:  # this computer's LLM servers, from --ollama-url and --openai-url
            local = [OllamaBackend(url, node_id, node_name, config.llm_parallel)
                     for url in _string_list(config.ollama_url or "")]
            for url in _string_list(config.openai_url or ""):
                local.append(OpenAIBackend(url, node_id, node_name, config.llm_parallel))
                if getattr(config, "openai_key", None):
                    local[-1].session.headers["Authorization"] = "Bearer " + config.openai_key
        self.local = list(local)
        self.lock = threading.Lock()
        self.grants = {}    # peer node id -> PeerBackend (what peers let us use)
        self.tokens = IssuedTokens()  # what we let peers use
        self.peer_in_flight = collections.Counter()
        self.pending = collections.Counter()  # backend -> chats placed on it, not yet queued there
        self._placing = threading.Lock()
        self.policy = SharePolicy(node_id, config.share_slots, config.requester_weight, sharing_paused)
        self.placement = Placement(self)
        self.access = LLMAccess(config, node_name, mesh, self.grants, self.lock, self.tokens, self.on_change)
        self._watchers = []
        for backend in self.local:
            backend.slots.watch(self.on_change)

    def watch(self, listener):
        """``listener()`` whenever this node's LLM, its load, or the LLMs it may use change."""
        self._watchers.append(listener)

    def on_change(self):
        for listener in self._watchers:
            listener()

    def rename(self, name):
        """This node's new name, on its answers from now on."""
        self.node_name = name
        self.access.rename(name)
        for backend in self.local:
            backend.node_name = name

    # -- capability ----------------------------------------------------------------

    def refresh_local(self):
        changed = False
        for backend in self.local:
            changed = backend.refresh() or changed
        if changed:
            self.on_change()
        return changed

    @property
    def has_local_llm(self):
        return any(backend.available and backend.models for backend in self.local)

    def local_models(self):
        return sorted({model for backend in self.local if backend.available for model in backend.models})

    def local_load(self):
        loads = [backend.slots.load() for backend in self.local if backend.available]
        return {"in_flight": sum(l["in_flight"] for l in loads), "queued": sum(l["queued"] for l in loads),
                "parallel": sum(l["parallel"] for l in loads)}

    @property
    def sharing(self):
        """Whether peers may use this node's LLM now (not --no-share-llm, not paused)."""
        return not self.config.no_share_llm and not self.policy.paused

    def local_capability(self):
        """What HELO:, LLMC: and the announcements say about this node's LLM: also the models in
        memory, the recent speed, and the queue's counts by requester (for placement elsewhere)."""
        sharing = self.sharing
        available = [b for b in self.local if b.available]
        rates = [b.recent_tps for b in available if b.recent_tps]
        return {"has_llm": self.has_local_llm and sharing,
                "models": self.local_models() if sharing else [],
                "load": self.local_load(),
                "loaded": sorted({m for b in available for m in b.loaded})[:200] if sharing else [],
                "queue": self.queue_counts() if sharing else {},
                "tokens_per_second": max(rates) if rates and sharing else None,
                "shares_models": sharing and any(b.kind == "ollama" for b in self.local)}

    def queue_counts(self, limit=64):
        """``{requester key: chats waiting}`` over this node's own LLMs, the ``limit`` longest."""
        counts = collections.Counter()
        for backend in self.local:
            for key, count in backend.slots.by_requester().items():
                if count["queued"]:
                    counts[key[:128]] += count["queued"]
        return dict(counts.most_common(limit))

    def pause_sharing(self, paused):
        """The owner paused (or resumed) sharing: remote chats waiting here go elsewhere."""
        self.policy.pause(paused)
        if paused:
            for backend in self.local:
                backend.slots.refuse_remote("%s paused sharing its LLM: the chat goes to another host"
                                            % self.node_name)
        self.on_change()

    def mesh_models(self, local_only=False):
        """``{model: [(node_id, node_name, local)]}`` over this node and the peers that granted access."""
        models = collections.OrderedDict()
        for name in self.local_models():
            models.setdefault(name, []).append((self.node_id, self.node_name, True))
        with self.lock:
            grants = [] if local_only else [b for b in self.grants.values() if b.peer.connected]
        for backend in grants:
            for name in backend.peer.models:
                models.setdefault(name, []).append((backend.node_id, backend.peer.name, False))
        return models

    def stopped_hosts(self, local_only=False):
        """The names of the computers whose LLM went quiet: this one when its server answered once
        and is down now, and linked peers that granted access but offer no model now."""
        names = [self.node_name] if any(b.error and b.answered for b in self.local) else []
        with self.lock:
            grants = [] if local_only else list(self.grants.values())
        return names + [safe_text(b.peer.name, 64) for b in grants if b.peer.connected and not b.peer.models]

    def resolve_model(self, requested, local_only=False):
        """The model to use for ``requested`` (None: the preferred or first one); LLMError if none."""
        models = self.mesh_models(local_only)
        if not models:
            stopped = self.stopped_hosts(local_only)
            if stopped:
                raise LLMError("the LLM on %s is not answering now: ask whoever uses %s to start it (or to "
                               "share it again)" % (" and ".join(stopped), "it" if len(stopped) == 1 else "them"),
                               status=503)
            raise LLMError(NO_LLM_HELP, status=503)
        if requested:
            for name in model_aliases(requested):
                if name in models:
                    return name
            raise LLMError("model %r is not on the mesh; available: %s" % (requested, ", ".join(models)),
                           status=404)
        preferred = self.config.model
        if preferred and preferred in models:
            return preferred
        local = self.local_models()
        return local[0] if local else next(iter(models))

    # -- routing ---------------------------------------------------------------------

    def candidates(self, model, local_only=False, requester=None):
        """Backends that have ``model``, where a chat of ``requester`` starts soonest first (see
        Placement); this node's own LLM only for its owner while sharing is paused."""
        local = [b for b in self.local if b.available and model in b.models]
        if self.policy.paused and not self.policy.is_owner(requester):
            local = []
        with self.lock:
            peers = [] if local_only else [b for b in self.grants.values()
                                           if model in b.peer.models and b.peer.connected]
        return self.placement.rank(local + peers, model, requester)

    def _count_peer_request(self, backend, change):
        if not backend.local:
            with self.lock:
                self.peer_in_flight[backend.node_id] += change

    max_placements = 24  # tries of one chat: failovers and moves to a host that freed up first

    def chat(self, model, messages, options=None, cancel=None, on_queue=None, local_only=False, requester=None):
        """Answer on the candidate where the chat starts soonest; one that waits in a queue moves
        when another host can start it first. Events as documented at the section top.

        A host that fails mid-answer (it died, or its mesh link fell silent for the peer timeout,
        which aborts the relay) is failed over too: the next candidate, which serves the same model,
        continues the partial answer (see AnswerSoFar), announced by a "continued" event. When none
        can, LLMError(partial=True): what arrived is kept, marked cut off, and the student may retry.
        """
        model = self.resolve_model(model, local_only)
        if not (self.policy.is_owner(requester) and model in self.local_models()):  # its own LLM is the owner's
            self.room.admit(self.policy.requester(requester), model)
        merged = dict(SAMPLING_DEFAULTS)
        merged.update(options or {})
        answer, failures, failed, target = AnswerSoFar(messages, merged), [], [], None
        try:
            for _try in range(self.max_placements):
                if cancel is not None and cancel.is_set():
                    return
                backend, target = target or self._place(model, local_only, requester, failed), None
                if backend is None:
                    break
                attempt = _Attempt(cancel, functools.partial(self._starts_elsewhere, backend, model, local_only,
                                                             requester, failed),
                                   functools.partial(self._settle, backend))
                if (yield from self._try(backend, attempt, model, answer, on_queue, requester,
                                         failures, failed)):
                    return
                target = attempt.moved or None
        finally:
            if target is not None:
                self._settle(target)
        if answer.parts:
            raise LLMError("%s; no other host of %s could continue the answer: what arrived is kept, "
                           "retry to ask again" % (failures_text(failures), model), partial=True)
        if not failures:
            raise LLMError("model %r has no reachable host right now" % model, status=503)
        status = 404 if failures and all("does not have that model" in f for f in failures) else 503
        raise LLMError(failures_text(failures), status=status)

    def _try(self, backend, attempt, model, answer, on_queue, requester, failures, failed):
        """One try of a chat on ``backend``: yields its events; returns True when the chat is over
        (answered, or cancelled), False to place it again (it moved, the backend refused, or it
        failed mid-answer: the next host continues ``answer``)."""
        self._count_peer_request(backend, +1)
        messages, options = answer.request()
        if backend.local and not self.policy.is_owner(requester):  # the room's host adds the teacher's words
            messages = self.room.with_instructions(requester, messages)
        try:
            for event in backend.chat(model, messages, options, attempt, attempt.heard(on_queue),
                                      self.policy.turn(requester, backend), attempt.placed):
                if event["type"] == "queued":
                    attempt.heard(on_queue)(event)
                    continue
                attempt.placed()
                yield answer.finish(event) if event["type"] == "done" else answer.note(event)
            return not attempt.moved
        except LLMError as exc:
            host_failed = isinstance(exc, _UpstreamRefused) or exc.partial
            if not (attempt.moved or host_failed):
                raise
            if host_failed and not (attempt.moved or attempt.cancelled()):
                self._refused(backend, exc, failures, failed, mid_answer=bool(answer.parts))
        finally:
            attempt.settle()
            self._count_peer_request(backend, -1)
        if attempt.moved:
            log.info("a queued chat moves from %s to %s, free first", safe_text(backend.node_name),
                     safe_text(attempt.moved.node_name))
        return False

    def _place(self, model, local_only, requester, failed):
        """The backend where a chat starts soonest (None: none left), counted as on its way there
        until it queues or starts (so chats placed at the same moment spread out)."""
        with self._placing:
            candidates = [b for b in self.candidates(model, local_only, requester) if b not in failed]
            if candidates:
                self.pending[candidates[0]] += 1
            return candidates[0] if candidates else None

    def _settle(self, backend):
        """A chat placed on ``backend`` waits in its queue or holds a slot now (or left)."""
        with self._placing:
            count_down(self.pending, backend)

    def _refused(self, backend, exc, failures, failed, mid_answer=False):
        """A backend refused, or failed mid-answer: the chat goes to the next (which continues what
        arrived); one that is full (503) is placed last for a while."""
        failures.append(str(exc))
        failed.append(backend)
        if getattr(self.mesh, "stopping", False):  # the peers' links close because this node stops
            log.info("this node is stopping: the answer from %s ends here", safe_text(backend.node_name))
            return
        log.warning("failing over%s: %s", " mid-answer" if mid_answer else "", exc)
        self.mark_down(backend, exc)
        if exc.status == 503:
            backend.busy_until = time.monotonic() + Backend.busy_pause
        if exc.status == 401 and isinstance(backend, PeerBackend):
            self.access.ask_again(backend)

    def mark_down(self, backend, exc):
        """This computer's LLM server that refused a call is shown down now (to the page and the
        peers, which stop sending chats here), not at the next probe."""
        if backend.local and getattr(exc, "down", False) and backend.available:
            backend.mark_down()
            self.on_change()

    def _starts_elsewhere(self, backend, model, local_only, requester, failed):
        """Another host of ``model`` that would start a chat of ``requester`` now, counted as the
        chat's way there; None if there is none."""
        with self._placing:
            for other in self.candidates(model, local_only, requester):
                if other is not backend and other not in failed and self.placement.starts_now(other, requester):
                    self.pending[other] += 1
                    return other
        return None


def llm_host_count(mesh_models):
    """How many nodes serve the models of ``Router.mesh_models()``."""
    return len({node_id for hosts in mesh_models.values() for node_id, _name, _local in hosts})


###############################################################################
# Model transfer ##############################################################
###############################################################################
#
# A model travels across the room, with no internet. A node with a local Ollama
# reads Ollama's store read-only (ModelStore: the manifests and the content-addressed blobs
# ``sha256-<hex>``) and serves the models it shares on its relay (ModelRelayApi, with the relay
# token each peer got over the link). A pull (the CLI's ``pull``, the page's button and Ollama's
# ``/api/pull``: one ModelPull) fetches each blob in chunks from every peer that holds it, even
# in part (BlobFetch: several peers at once, rarest chunk first, each chunk's sha256 checked),
# keeps the chunks in the data dir (PartialBlob: a cut pull resumes), and hands the blob to this
# computer's Ollama through Ollama's own API (/api/blobs, then /api/create): NeuroMesh never
# writes into Ollama's folders.

MODELS_RELAY_PATH = "/relay/models"
BLOBS_RELAY_PATH = "/relay/blobs"
TRANSFER_CHUNK = 1 * MiB  # at most this much is fetched again after a cut
TRANSFERS_DIR = "transfers"  # in the data dir: the chunks of pulls under way
MODEL_LAYER = "application/vnd.ollama.image.model"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest_hex(digest):
    """The 64 hex digits of ``sha256:<hex>`` or ``sha256-<hex>`` (or of the hex alone); ValueError if none."""
    text = digest[7:] if isinstance(digest, str) and digest[:7] in ("sha256:", "sha256-") else digest
    if not isinstance(text, str) or not _HEX64.fullmatch(text):
        raise ValueError("not a sha256 digest: %r" % safe_text(str(digest), 80))
    return text


def ollama_model_dirs(environ=None, system=None, home=None):
    """Where this computer's Ollama keeps its models: OLLAMA_MODELS, else the usual places."""
    environ = os.environ if environ is None else environ
    if environ.get("OLLAMA_MODELS"):
        return [environ["OLLAMA_MODELS"]]
    dirs = [os.path.join(home or os.path.expanduser("~"), ".ollama", "models")]
    if (system or current_os()) == "linux":
        dirs.append("/usr/share/ollama/.ollama/models")  # the Linux installer's service
    return dirs


def model_name_of(parts):
    """The name Ollama lists for ``manifests/<host>/<namespace>/<name>/<tag>``."""
    host, namespace, name, tag = parts
    if host == "registry.ollama.ai":
        return "%s:%s" % (name if namespace == "library" else namespace + "/" + name, tag)
    return "%s/%s/%s:%s" % (host, namespace, name, tag)


def parse_manifest(data):
    """``{"layers": [{"digest", "size", "mediaType"}], "size"}`` of a manifest's bytes; ValueError if bad."""
    manifest = parse_json(data, "a model manifest", max_bytes=MiB, max_depth=8)
    listed = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(listed, list):
        raise ValueError("a manifest without layers")
    layers = []
    for layer in listed[:64] + [manifest.get("config") or {}]:
        if not isinstance(layer, dict):
            raise ValueError("a layer that is not an object")
        if not layer:
            continue
        size = layer.get("size")
        if type(size) is not int or size < 0:
            raise ValueError("a layer without a size")
        layers.append({"digest": "sha256:" + digest_hex(layer.get("digest")), "size": size,
                       "mediaType": safe_text(layer.get("mediaType"), 120)})
    if not any(layer["mediaType"] == MODEL_LAYER for layer in layers):
        raise ValueError("no model layer")
    return {"layers": layers, "size": sum(layer["size"] for layer in layers)}


class ModelStore:
    """This computer's Ollama model store, read only: its models and their blobs.

    Methods for the caller: ``models()`` ({name: manifest}), ``blob_path(hex)``,
    ``chunk_hashes(hex)`` (each chunk's sha256, once the whole blob was checked)."""

    def __init__(self, directories, chunk=TRANSFER_CHUNK):
        self.directories = list(directories)
        self.chunk = chunk
        self._hashes = collections.OrderedDict()  # (hex, size, mtime) -> chunk hashes, or None: damaged
        self._lock = threading.Lock()

    @property
    def root(self):
        return next((d for d in self.directories if os.path.isdir(os.path.join(d, "manifests"))), None)

    def models(self):
        root, found = self.root, {}
        if root is None:
            return found
        base = os.path.join(root, "manifests")
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = sorted(dirs)[:200]
            for tag in files[:200]:
                parts = os.path.relpath(os.path.join(dirpath, tag), base).split(os.sep)
                if len(parts) != 4:
                    continue
                try:
                    with open(os.path.join(dirpath, tag), "rb") as handle:
                        found[model_name_of(parts)] = parse_manifest(handle.read(MiB + 1))
                except (OSError, ValueError) as exc:
                    log_limited(logging.WARNING, "manifest " + tag, "skipping the model manifest %s: %s",
                                safe_text("/".join(parts)), exc)
        return found

    def blob_path(self, hex_digest):
        root = self.root
        path = root and os.path.join(root, "blobs", "sha256-" + digest_hex(hex_digest))
        return path if path and os.path.isfile(path) else None

    def chunk_hashes(self, hex_digest):
        """The chunks' sha256s of a blob whose whole sha256 matches its name; None if damaged or absent.
        One read of the blob, remembered while its size and time stay."""
        path = self.blob_path(hex_digest)
        if path is None:
            return None
        stat = os.stat(path)
        key = (hex_digest, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        whole, hashes = hashlib.sha256(), []
        with open(path, "rb") as handle:
            for piece in iter(lambda: handle.read(self.chunk), b""):
                whole.update(piece)
                hashes.append(hashlib.sha256(piece).hexdigest())
        if whole.hexdigest() != hex_digest:
            log_limited(logging.WARNING, "damaged " + hex_digest, "the blob sha256-%s in Ollama's store is "
                        "damaged (its sha256 differs): it is not served; `ollama pull` the model again", hex_digest)
            hashes = None
        with self._lock:
            self._hashes[key] = hashes
            while len(self._hashes) > 64:
                self._hashes.popitem(last=False)
        return hashes


class PartialBlob:
    """One blob being fetched, kept in the data dir so a cut pull resumes: its bytes so far
    (``<hex>.part``), its chunks' sha256s (``<hex>.chunks``) and the chunks that landed checked
    (``<hex>.have``, one index a line, appended after the chunk's bytes are on disk)."""

    def __init__(self, directory, hex_digest, size, hashes, chunk=TRANSFER_CHUNK):
        self.hex, self.size, self.chunk, self.hashes = digest_hex(hex_digest), size, chunk, list(hashes)
        self.count = max(1, -(-size // chunk))
        if len(self.hashes) != self.count or not all(_HEX64.fullmatch(h or "") for h in self.hashes):
            raise ValueError("the chunk list of sha256-%s does not fit its size" % self.hex)
        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, self.hex)
        self.path, self._have_path, self._chunks_path = stem + ".part", stem + ".have", stem + ".chunks"
        self._lock = threading.Lock()
        self.have = self._read_have()
        with open(self.path, "ab") as handle:
            handle.truncate(size)
        with open(self._chunks_path, "w", encoding="utf-8") as handle:
            json.dump({"size": size, "chunk": chunk, "hashes": self.hashes}, handle)

    @classmethod
    def resume(cls, directory, hex_digest, size):
        """The partial blob a cut pull left (None: none, or one of another size)."""
        try:
            with open(os.path.join(directory, digest_hex(hex_digest) + ".chunks"), encoding="utf-8") as handle:
                saved = json.load(handle)
            if saved["size"] != size or saved["chunk"] != TRANSFER_CHUNK:
                return None
            return cls(directory, hex_digest, size, saved["hashes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _read_have(self):
        try:
            with open(self._have_path, encoding="ascii", errors="replace") as handle:
                lines = handle.read().split()
        except OSError:
            return set()
        return {int(line) for line in lines if line.isdigit() and int(line) < self.count}

    def span(self, index):
        start = index * self.chunk
        return start, min(self.size, start + self.chunk)

    def write(self, index, data):
        start, _end = self.span(index)
        with self._lock:
            with open(self.path, "r+b") as handle:
                handle.seek(start)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            with open(self._have_path, "a", encoding="ascii") as handle:
                handle.write("%d\n" % index)
            self.have.add(index)

    def read(self, start, length):
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(length)

    @property
    def complete(self):
        return len(self.have) >= self.count

    def held(self):
        with self._lock:
            return "all" if self.complete else sorted(self.have)

    def check(self):
        """Whether the whole file's sha256 is its name."""
        whole = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for piece in iter(lambda: handle.read(MiB), b""):
                whole.update(piece)
        return whole.hexdigest() == self.hex

    def remove(self):
        for path in (self.path, self._have_path, self._chunks_path):
            try:
                os.remove(path)
            except OSError:
                pass


class TransferStats:
    """Bytes served and fetched, chunks thrown away, and the transfers under way (for /metrics,
    /api/health and ``status``)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.transfers = collections.OrderedDict()  # model -> its last progress record
        self._lock = threading.Lock()

    def add(self, key, count=1):
        with self._lock:
            self.counts[key] += count

    def progress(self, model, record):
        with self._lock:
            self.transfers[model] = dict(record, model=model, at=time.time())
            while len(self.transfers) > 32:
                self.transfers.popitem(last=False)

    def report(self):
        with self._lock:
            return {"counts": dict(self.counts), "transfers": [dict(t) for t in self.transfers.values()]}

    def metrics(self):
        """Prometheus text of the counts (appended to the queues' by MetricsApi)."""
        prom, counts = PromText(), self.report()["counts"]
        for key, text in (("served", "model bytes this node served to peers"),
                          ("fetched", "model bytes this node fetched from peers, checked"),
                          ("rejected", "chunks thrown away: their sha256 did not match")):
            unit = "chunks" if key == "rejected" else "bytes"
            prom.family("neuromesh_model_%s_%s_total" % (key, unit), "counter", text,
                        [({}, counts.get(key, 0))])
        return prom.render()


class ServeRate:
    """Paces the model bytes this node serves while it answers chats, and for ``linger`` seconds
    after (--transfer-rate bytes a second, over all transfers): the link then has room for the
    next chat's first words, not a queue of model bytes ahead of them. ``router``: whose
    local load says whether a chat is under way."""

    linger = 5.0

    def __init__(self, rate, router):
        self.rate, self.router = rate, router
        self._next = 0.0
        self._answered = None  # when a chat was last seen under way (monotonic)
        self._lock = threading.Lock()

    def busy(self):
        now = time.monotonic()
        if self.router.local_load()["in_flight"] > 0:
            self._answered = now
        return self._answered is not None and now - self._answered < self.linger

    def spend(self, count):
        if not self.busy():
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + count / float(self.rate)
        if start > now:
            time.sleep(min(start - now, 5.0))


class ModelShare:
    """What this node serves to the room: the models of its Ollama store it shares (none with
    --no-share-llm) and the chunks of the blobs it is fetching itself (a swarm, not a queue)."""

    piece = 64 * 1024  # bytes written to the client at a time (and paced by ServeRate)

    def __init__(self, store, router, config, partials, stats):
        self.store, self.router, self.config = store, router, config
        self.partials = partials  # hex -> PartialBlob of the pulls under way (ModelPulls owns it)
        self.stats = stats
        self.rate = ServeRate(config.transfer_rate, router)

    def shared_models(self):
        if self.config.no_share_llm:
            return {}
        served = set(self.router.local_models())
        return {name: manifest for name, manifest in self.store.models().items()
                if served.intersection(model_aliases(name))}

    def catalog(self):
        """``{"models": {name: manifest}, "blobs": {hex: {"size", "chunks": "all" | [index]}}}``."""
        models = self.shared_models()
        blobs = {}
        if not self.config.no_share_llm:
            for partial in list(self.partials.values()):
                blobs[partial.hex] = {"size": partial.size, "chunks": partial.held()}
            for manifest in models.values():
                for layer in manifest["layers"]:
                    if self.store.blob_path(layer["digest"][7:]):
                        blobs[layer["digest"][7:]] = {"size": layer["size"], "chunks": "all"}
        return {"models": models, "blobs": blobs, "chunk": TRANSFER_CHUNK}

    def _shared_blob(self, hex_digest):
        for manifest in self.shared_models().values():
            for layer in manifest["layers"]:
                if layer["digest"][7:] == hex_digest:
                    return layer["size"]
        return None

    def blob_size(self, hex_digest):
        """The size of a blob this node serves, whole or in part; None when it serves none of it."""
        if self.config.no_share_llm:
            return None
        partial = self.partials.get(hex_digest)
        return partial.size if partial is not None else self._shared_blob(hex_digest)

    def chunk_hashes(self, hex_digest):
        if self.config.no_share_llm:
            return None
        partial = self.partials.get(hex_digest)
        if partial is not None:
            return partial.hashes
        return self.store.chunk_hashes(hex_digest) if self._shared_blob(hex_digest) is not None else None

    def open_range(self, hex_digest, start, end):
        """``(size, reader)`` for the bytes ``start:end`` of a blob this node serves; LookupError
        when it does not serve them (not shared, or chunks it does not hold)."""
        if self.config.no_share_llm:
            raise LookupError("this node shares no models (--no-share-llm)")
        partial = self.partials.get(hex_digest)
        if partial is not None:
            first, last = start // partial.chunk, (max(start, end - 1)) // partial.chunk
            if not all(index in partial.have for index in range(first, last + 1)):
                raise LookupError("this node holds only part of that blob")
            return partial.size, self._pieces(lambda offset, n: partial.read(offset, n), start, end)
        size = self._shared_blob(hex_digest)
        path = size is not None and self.store.blob_path(hex_digest)
        if not path:
            raise LookupError("this node does not share that blob")
        return size, self._file_pieces(path, start, end)

    def _file_pieces(self, path, start, end):
        with open(path, "rb") as handle:
            yield from self._pieces(lambda offset, n: (handle.seek(offset), handle.read(n))[1], start, end)

    def _pieces(self, read, start, end):
        offset = start
        while offset < end:
            data = read(offset, min(self.piece, end - offset))
            if not data:
                return
            self.rate.spend(len(data))
            self.stats.add("served", len(data))
            offset += len(data)
            yield data


class RelayReply:
    """A peer relay's whole answer to a pull's request: ``status_code``, ``content`` and
    ``raise_for_status()``, as the pull reads it."""

    def __init__(self, status_code, content):
        self.status_code, self.content = status_code, content

    def raise_for_status(self):
        if not 200 <= self.status_code < 300:
            raise requests.HTTPError("the peer answered %d: %s" % (self.status_code,
                                                                  _relay_error_text(self.content[:64 * 1024])))


class RoomHolders:
    """The peers a pull may fetch from (those whose relay token this node holds), and what they hold.
    ``get`` and ``post`` are the one way a pull talks to a peer's relay."""

    timeout = 3.0

    def __init__(self, router):
        self.router = router

    def peers(self):
        with self.router.lock:
            return [backend for backend in self.router.grants.values()
                    if backend.peer.connected and hasattr(backend, "token")]

    def get(self, backend, path, timeout=None, headers=None):
        return self._request(backend, "GET", path, None, headers or {}, timeout or self.timeout)

    def post(self, backend, path, body, timeout=None):
        return self._request(backend, "POST", path, json.dumps(body).encode("utf-8"),
                             {"Content-Type": "application/json"}, timeout or self.timeout)

    @staticmethod
    def _request(backend, method, path, body, headers, timeout):
        """One request on the peer's relay connections (TLS to its mesh port, as relayed chats go),
        read whole: a RelayReply; requests.HTTPError for a status that is not 2xx,
        requests.ConnectionError when the peer cannot be reached or breaks off."""
        connections = backend.connections
        connection = connections.take()
        try:
            connection = connection or connections.open()
            connection.sock.settimeout(timeout)
            connection.request(method, path, body=body, headers=dict(headers, Authorization="Bearer " + backend.token))
            response = connection.getresponse()
            reply = RelayReply(response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            if connection is not None:
                connection.close()
            raise requests.ConnectionError("%s: %s" % (safe_text(backend.node_name), short_error(exc))) from exc
        connections.give_back(connection)
        reply.raise_for_status()
        return reply

    def catalogs(self):
        """``{backend: catalog}`` of every peer that answered ``/relay/models`` (asked at once)."""
        found, lock = {}, threading.Lock()

        def ask(backend):
            try:
                catalog = parse_json(self.get(backend, MODELS_RELAY_PATH).content, "a peer's models",
                                     max_bytes=8 * MiB, max_depth=16)
                if isinstance(catalog, dict) and isinstance(catalog.get("blobs"), dict):
                    with lock:
                        found[backend] = catalog
            except (requests.RequestException, ValueError) as exc:
                log.debug("%s did not list its models: %s", safe_text(backend.node_name), short_error(exc))

        threads = [threading.Thread(target=ask, args=(b,), daemon=True) for b in self.peers()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.timeout + 1)
        with lock:
            return dict(found)


class PullError(NeuroMeshError):
    """A pull cannot go on; its message says what to do."""


class BlobFetch:
    """Fetches the missing chunks of one PartialBlob from every peer that holds them, one chunk at
    a time per peer and several peers at once, the rarest chunk first (ties at random, so pullers
    spread out). A chunk whose sha256 is not on the chunk list is thrown away and its peer dropped
    from this fetch and reported in ``bad``. It waits up to ``patience`` seconds for a holder."""

    refresh = 0.5  # seconds between looks at who holds which chunks
    patience = 30.0

    def __init__(self, partial, holders, stats, on_chunk, stop):
        self.partial, self.holders, self.stats = partial, holders, stats
        self.on_chunk, self.stop = on_chunk, stop
        self.held = {}  # backend -> set of chunk indices it holds
        self.busy = set()  # chunks being fetched
        self.workers = {}  # backend -> thread
        self.bad = []  # names of peers that sent a chunk that did not match
        self._dropped = set()
        self._done = False  # the fetch ended: its workers leave
        self._cond = threading.Condition()

    def run(self):
        try:
            self._run()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _run(self):
        partial, waited = self.partial, time.monotonic()
        while not partial.complete:
            if self.stop.is_set():
                raise PullError("the pull was stopped; it resumes where it stopped when started again")
            self._look()
            with self._cond:
                if self.busy or any(self._wanted(b) for b in self.held):
                    waited = time.monotonic()
                elif time.monotonic() - waited > self.patience:
                    break
                self._cond.wait(self.refresh)
        if not partial.complete:
            raise PullError("no computer of the room holds the rest of the blob sha256-%s now (%d of %d chunks "
                            "here): start the pull again when its host is back, it resumes where it stopped"
                            % (partial.hex[:12], len(partial.have), partial.count))

    def _look(self):
        for backend, catalog in self.holders.catalogs().items():
            entry = catalog["blobs"].get(self.partial.hex)
            if not isinstance(entry, dict) or backend in self._dropped:
                continue
            chunks = entry.get("chunks")
            held = set(range(self.partial.count)) if chunks == "all" else {
                i for i in (chunks if isinstance(chunks, list) else [])[:100000]
                if type(i) is int and 0 <= i < self.partial.count}
            with self._cond:
                self.held[backend] = held
                self._cond.notify_all()
                if backend not in self.workers and self._wanted(backend):
                    thread = threading.Thread(target=self._work, args=(backend,), daemon=True,
                                              name="neuromesh-fetch")
                    self.workers[backend] = thread
                    thread.start()

    def _wanted(self, backend):
        return self.held.get(backend, set()) - self.partial.have - self.busy

    def _pick(self, backend):
        """The rarest chunk ``backend`` holds that is neither here nor on its way (under the lock)."""
        wanted = list(self._wanted(backend))
        if not wanted:
            return None
        rarity = collections.Counter(i for held in self.held.values() for i in held)
        random.shuffle(wanted)
        index = min(wanted, key=lambda i: rarity[i])
        self.busy.add(index)
        return index

    def _work(self, backend):
        try:
            while not self.stop.is_set() and not self.partial.complete:
                with self._cond:
                    index = self._pick(backend)
                    if index is None:
                        if self._done or backend not in self.held:
                            return
                        self._cond.wait(self.refresh)  # until a chunk lands or the next look
                        continue
                try:
                    ok = self._fetch(backend, index)
                finally:
                    with self._cond:
                        self.busy.discard(index)
                        self._cond.notify_all()
                if not ok:
                    return
        finally:
            with self._cond:
                self.workers.pop(backend, None)
                self._cond.notify_all()

    def _fetch(self, backend, index):
        start, end = self.partial.span(index)
        try:
            response = self.holders.get(backend, "%s/%s" % (BLOBS_RELAY_PATH, self.partial.hex), timeout=30.0,
                                        headers={"Range": "bytes=%d-%d" % (start, end - 1)})
            data = response.content
        except (requests.RequestException, OSError) as exc:
            log.info("fetching a chunk from %s failed (%s): another peer sends it",
                     safe_text(backend.node_name), short_error(exc))
            self._drop(backend)
            return False
        if hashlib.sha256(data).hexdigest() != self.partial.hashes[index]:
            log.warning("%s sent chunk %d of sha256-%s that does not match its sha256: thrown away, "
                        "fetched from another computer", safe_text(backend.node_name), index, self.partial.hex[:12])
            self.stats.add("rejected")
            self.bad.append(backend.node_name)
            self._drop(backend)
            return False
        self.partial.write(index, data)
        self.stats.add("fetched", len(data))
        self.on_chunk(len(data))
        return True

    def _drop(self, backend):
        with self._cond:
            self._dropped.add(backend)
            self.held.pop(backend, None)


def modelfile_parameters(text):
    """``{name: value}`` of /api/show's ``parameters`` text (``stop`` and repeated names as lists)."""
    found = {}
    for line in (text or "").splitlines()[:200]:
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        if not name or not value:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        else:
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
        if name == "stop" or name in found:
            previous = found.get(name, [])
            found[name] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            found[name] = value
    return found


class ModelPull:
    """One pull of a model from the room into this computer's Ollama. ``run()`` yields Ollama's
    own pull progress records (``pulling <digest>`` with total/completed, ``verifying sha256
    digest``, ``writing manifest``, ``success``) and raises PullError with a sentence for the user."""

    progress_every = 0.2  # seconds between progress records of one blob
    FETCHED = (MODEL_LAYER, "application/vnd.ollama.image.projector", "application/vnd.ollama.image.adapter")

    def __init__(self, model, pulls, stop):
        self.model, self.pulls, self.stop = model, pulls, stop
        self.ollama = pulls.ollama
        self.bad = []

    def run(self):
        yield {"status": "pulling manifest"}
        name, source, manifest = self._find()
        show = self._show(source, name)
        layers = [layer for layer in manifest["layers"] if layer["mediaType"] in self.FETCHED]
        missing = [layer for layer in layers if not self._ollama_has(layer["digest"])]
        self._check_space(missing)
        for layer in layers:
            if layer in missing:
                yield from self._fetch(layer, source)
            else:
                yield {"status": "pulling %s" % layer["digest"][7:19], "digest": layer["digest"],
                       "total": layer["size"], "completed": layer["size"]}
        yield {"status": "writing manifest"}
        self._create(name, layers, show)
        self.pulls.finished(layers)
        yield {"status": "success"}

    def _find(self):
        for backend, catalog in self.pulls.holders.catalogs().items():
            models = catalog.get("models") if isinstance(catalog.get("models"), dict) else {}
            for name in model_aliases(self.model):
                if isinstance(models.get(name), dict):
                    try:
                        manifest = parse_manifest(json.dumps({"layers": models[name].get("layers")}).encode())
                    except (ValueError, TypeError) as exc:
                        log.warning("%s listed a bad manifest of %s: %s", safe_text(backend.node_name),
                                    safe_text(name), exc)
                        continue
                    return name, backend, manifest
        raise PullError("no computer of the room shares the model %r: pull it on one computer first (by "
                        "`ollama pull` with internet, or from a USB stick), then every other can get it here"
                        % self.model)

    def _show(self, backend, name):
        try:
            response = self.pulls.holders.post(backend, RELAY_FORWARD_PATH,
                                               {"path": "/api/show", "body": {"model": name}}, timeout=30)
            show = parse_json(response.content, "a model's description", max_bytes=8 * MiB, max_depth=32)
            return show if isinstance(show, dict) else {}
        except (requests.RequestException, ValueError) as exc:
            raise PullError("%s did not describe %s (%s): try the pull again" % (backend.node_name, name,
                                                                                 short_error(exc)))

    def _ollama_has(self, digest):
        try:
            return self.ollama.session.head(self.ollama.url + "/api/blobs/" + digest, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def _check_space(self, layers):
        directory = self.pulls.directory
        os.makedirs(directory, exist_ok=True)
        needed = 0
        for layer in layers:
            partial = self.pulls.partials.get(layer["digest"][7:])
            held = len(partial.have) * partial.chunk if partial is not None else 0
            needed += max(0, layer["size"] - held) + layer["size"]  # the chunks here, then Ollama's copy
        free = shutil.disk_usage(directory).free
        if free < needed:
            raise PullError("this computer has %.1f GB free on %s, and %s needs %.1f GB: free some disk space, "
                            "then pull again" % (free / 1e9, directory, self.model, needed / 1e9))

    def _fetch(self, layer, source):
        hex_digest, size, status = layer["digest"][7:], layer["size"], "pulling %s" % layer["digest"][7:19]
        partial = self.pulls.partial(hex_digest, size, source)
        record = {"status": status, "digest": layer["digest"], "total": size}
        landed = queue.Queue()
        fetch = BlobFetch(partial, self.pulls.holders, self.pulls.stats, landed.put, self.stop)
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(self._outcome(fetch)), daemon=True,
                                  name="neuromesh-pull")
        thread.start()
        shown = 0.0
        while thread.is_alive() or not landed.empty():
            try:
                landed.get(timeout=self.progress_every)
            except queue.Empty:
                pass
            if time.monotonic() - shown >= self.progress_every or not thread.is_alive():
                shown = time.monotonic()
                done = min(size, sum(partial.span(i)[1] - partial.span(i)[0] for i in list(partial.have)))
                self.pulls.stats.progress(self.model, dict(record, completed=done, peers=len(fetch.workers)))
                yield dict(record, completed=done)
        self.bad.extend(fetch.bad)
        if outcome and outcome[0] is not None:
            raise outcome[0]
        yield {"status": "verifying sha256 digest"}
        if not partial.check():
            self.pulls.forget(partial, remove=True)
            raise PullError("the blob %s did not match its sha256 once whole: its chunks were thrown away, "
                            "pull again" % layer["digest"][:19])
        self._upload(partial, layer["digest"])

    @staticmethod
    def _outcome(fetch):
        try:
            fetch.run()
            return None
        except PullError as exc:
            return exc
        except Exception as exc:  # a full disk, a data dir gone
            log.exception("a model pull failed")
            return PullError("the pull failed on this computer: %s" % exc)

    def _upload(self, partial, digest):
        try:
            with open(partial.path, "rb") as handle:
                response = self.ollama.session.post(self.ollama.url + "/api/blobs/" + digest, data=handle,
                                                    timeout=(5, 600))
            if response.status_code not in (200, 201):
                raise PullError("this computer's Ollama refused the blob %s: %s" % (digest[:19],
                                                                                   _http_error_text(response)))
        except requests.RequestException as exc:
            raise PullError("this computer's Ollama at %s did not take the blob (%s): is it running?"
                            % (self.ollama.url, short_error(exc)))

    def _create(self, name, layers, show):
        adapter = "application/vnd.ollama.image.adapter"
        body = {"model": name, "stream": False,
                "files": {"model-%d.gguf" % i: layer["digest"] for i, layer in enumerate(layers)
                          if layer["mediaType"] != adapter}}
        adapters = {"adapter-%d.gguf" % i: l["digest"] for i, l in enumerate(layers) if l["mediaType"] == adapter}
        if adapters:
            body["adapters"] = adapters
        for key in ("template", "system"):
            if isinstance(show.get(key), str) and show[key]:
                body[key] = show[key]
        parameters = modelfile_parameters(show.get("parameters") if isinstance(show.get("parameters"), str) else "")
        if parameters:
            body["parameters"] = parameters
        try:
            response = self.ollama.session.post(self.ollama.url + "/api/create", json=body, timeout=(5, 600))
        except requests.RequestException as exc:
            raise PullError("this computer's Ollama at %s did not create %s (%s): is it running?"
                            % (self.ollama.url, name, short_error(exc)))
        if response.status_code != 200:
            raise PullError("this computer's Ollama did not create %s: %s" % (name, _http_error_text(response)))


class ModelPulls:
    """The pulls of this node (one at a time per model) and the partial blobs it keeps in its data
    dir, which its ModelShare serves too. ``pull(model)`` yields the progress of one ModelPull."""

    def __init__(self, router, store, directory, stats, ollama):
        self.router, self.store, self.directory, self.stats = router, store, directory, stats
        self.ollama = ollama  # this computer's OllamaBackend, or None
        self.holders = RoomHolders(router)
        self.partials = {}  # hex -> PartialBlob (served as they fill)
        self._running = set()
        self._lock = threading.Lock()
        self._load_left()

    def _load_left(self):
        """The chunks a cut pull left in the data dir: served again, and resumed by the next pull."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.endswith(".chunks") and _HEX64.fullmatch(name[:-7]):
                try:
                    with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                        size = json.load(handle)["size"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                partial = PartialBlob.resume(self.directory, name[:-7], size)
                if partial is not None:
                    self.partials[partial.hex] = partial

    def partial(self, hex_digest, size, source):
        """The partial blob of a pull: the one a cut pull left, else a new one with the source's chunk list."""
        partial = self.partials.get(hex_digest) or PartialBlob.resume(self.directory, hex_digest, size)
        if partial is None:
            try:
                listed = parse_json(self.holders.get(source, "%s/%s/chunks" % (BLOBS_RELAY_PATH, hex_digest),
                                                     timeout=120).content, "a chunk list", max_bytes=64 * MiB,
                                    max_depth=4)
                partial = PartialBlob(self.directory, hex_digest, size, listed.get("hashes") or [])
            except (requests.RequestException, ValueError, AttributeError) as exc:
                raise PullError("%s did not list the chunks of %s (%s): pull again" % (
                    source.node_name, hex_digest[:12], short_error(exc)))
        self.partials[hex_digest] = partial
        return partial

    def forget(self, partial, remove=False):
        self.partials.pop(partial.hex, None)
        if remove:
            partial.remove()

    def finished(self, layers):
        """A pull succeeded: Ollama lists the model now; the chunks stay served while Ollama's store
        lacks the blob (this node still seeds the room), else their files go."""
        self.router.refresh_local()
        for layer in layers:
            partial = self.partials.get(layer["digest"][7:])
            if partial is not None and self.store.blob_path(partial.hex):
                self.forget(partial, remove=True)

    def wanted(self, model):
        """Whether a pull of ``model`` copies it from the room: this computer's Ollama runs and lacks
        it, and a peer shares it."""
        if self.ollama is None or not self.ollama.available:
            return False
        names = set(model_aliases(model))
        if names & set(self.ollama.models):
            return False
        return any(isinstance(c.get("models"), dict) and names & set(c["models"])
                   for c in self.holders.catalogs().values())

    def room(self, own):
        """The page's list: each model of the room, the computers that have it, its size, and whether
        this computer can get it. ``own``: this node's shared models (ModelShare.shared_models())."""
        ready = self.ollama is not None and self.ollama.available
        sizes, here = {}, set(self.ollama.models if ready else ())
        for catalog in [{"models": own}] + list(self.holders.catalogs().values()):
            for name, manifest in (catalog.get("models") if isinstance(catalog.get("models"), dict) else {}).items():
                if isinstance(name, str) and isinstance(manifest, dict) and type(manifest.get("size")) is int:
                    sizes[name[:200]] = manifest["size"]
        mesh = self.router.mesh_models()
        with self._lock:
            running = set(self._running)
        rows = []
        for name in sorted(set(mesh) | set(sizes)):
            have = bool(here & set(model_aliases(name)))
            rows.append({"name": name, "hosts": [host for _id, host, _local in mesh.get(name, [])],
                         "size": sizes.get(name), "here": have, "pulling": name in running,
                         "can_get": ready and not have and name in sizes})
        return {"models": rows, "has_ollama": ready}

    def pull(self, model, stop=None):
        """The progress records of a pull of ``model``; PullError if it cannot start or go on."""
        if self.ollama is None:
            raise PullError("this computer has no Ollama to put the model in: install Ollama, start it, "
                            "and start NeuroMesh again")
        with self._lock:
            if model in self._running:
                raise PullError("a pull of %s is already under way on this computer" % model)
            self._running.add(model)
        stop = stop or threading.Event()
        try:
            pull = ModelPull(model, self, stop)
            yield from pull.run()
            self.stats.progress(model, {"status": "success", "bad_peers": pull.bad})
        except PullError as exc:
            self.stats.progress(model, {"status": "failed", "error": str(exc)})
            raise
        except GeneratorExit:  # its client left (Ctrl+C): the chunks stay for the next pull
            self.stats.progress(model, {"status": "stopped", "error": "stopped by its client; a new pull resumes"})
            raise
        finally:
            stop.set()
            with self._lock:
                self._running.discard(model)


###############################################################################
# Chat ########################################################################
###############################################################################
#
# Every HTTP API asks the ChatService, the one room where chats happen: it streams one
# answer's events (those of the router, plus {"type": "error", "error", "status",
# "partial"} when it fails), keeps a conversation's history within the model's context,
# and stores the answer when it is done.


class HTTPFailure(NeuroMeshError):
    """A request that cannot be served: ``status`` is its HTTP status, ``extra`` more fields of the reply."""

    def __init__(self, status, message, **extra):
        NeuroMeshError.__init__(self, message)
        self.status = status
        self.extra = extra


class ChatService:
    """The chat room: asks the mesh's LLMs, and keeps the questions and answers of conversations.

    ``local_llm`` (a LocalLLM, or None) says why this computer's own LLM is down, for errors.
    """

    history_budget = int(SAMPLING_DEFAULTS["num_ctx"] * 3)  # about 4 characters a token, room left to answer

    def __init__(self, router, store, host_info, max_queued=DEFAULTS["max_queued"], local_llm=None):
        self.router = router
        self.node_id = router.node_id
        self.store = store
        self.host_info = host_info  # callable: who asked, for a question asked on this node
        self.local_llm = local_llm
        self.max_queued = max_queued  # chats that may wait for their first answer event at once
        self.waiting = 0
        self._lock = threading.Lock()

    def admit(self):
        """An HTTPFailure 503 (with Retry-After, as Ollama does) when --max-queued chats already wait."""
        if self.waiting >= self.max_queued:
            raise HTTPFailure(503, "this node already has %d chats waiting for an LLM: try again shortly"
                              % self.waiting, retry_after=5)

    def _count_waiting(self, change):
        with self._lock:
            self.waiting += change

    # -- the events of one answer ----------------------------------------------------

    def stream(self, model, messages, options=None, local_only=False, requester=None):
        """Runs ``router.chat`` on a worker thread and yields its events as they happen.
        ``requester``: who asks (a Requester; None: this computer's owner), for the fair queues.

        Queue positions arrive while the worker waits for a slot; an LLMError becomes an
        error event. Closing this generator (the client went away) cancels the upstream request.
        """
        events, cancel = queue.Queue(), threading.Event()
        self._count_waiting(1)
        waiting = True
        threading.Thread(target=self._work, args=(events, cancel, model, messages, options, local_only, requester),
                         name="neuromesh-chat", daemon=True).start()
        try:
            while True:
                event = events.get()
                if event is None:
                    return
                if waiting and event["type"] != "queued":
                    waiting = False
                    self._count_waiting(-1)
                yield event
        finally:
            if waiting:
                self._count_waiting(-1)
            cancel.set()

    def _work(self, events, cancel, model, messages, options, local_only, requester=None):
        try:
            for event in self.router.chat(model, messages, options, cancel, on_queue=events.put,
                                          local_only=local_only, requester=requester):
                events.put(event)
                if cancel.is_set():
                    break
        except LLMError as exc:
            problem = (None if exc.partial or exc.status == 499 or local_only or self.local_llm is None
                       else self.local_llm.state()[1])
            error = self._error_text(str(exc), problem)
            events.put({"type": "error", "error": error, "status": exc.status, "partial": exc.partial})
        except Exception as exc:  # a bug: report it to the client, keep the node up
            log.exception("chat failed")
            events.put({"type": "error", "error": "internal error: %s" % exc, "status": 500, "partial": False})
        finally:
            events.put(None)

    def _error_text(self, error, problem):
        """The chat's error for this computer's user: when its own LLM is stopped (``problem``, how
        to start it) and the error is about this computer alone, the problem says it all."""
        if not problem:
            return error
        about_here = error == NO_LLM_HELP or (self.router.node_name in error and ";" not in error)
        problem = problem[0].upper() + problem[1:]
        return problem if about_here else "%s. %s" % (error.rstrip("."), problem)

    def begin(self, model, messages, options=None, requester=None):
        """``(first event, all events)`` of an answer that started; an HTTPFailure if it cannot.

        Queue positions are left out: clients of the Ollama and OpenAI APIs cannot show them,
        and the reply's status depends on whether an answer starts.
        """
        events = self.stream(model, messages, options, requester=requester)
        first = next((event for event in events if event["type"] != "queued"),
                     {"type": "error", "error": "no answer", "status": 503, "partial": False})
        if first["type"] == "error":
            raise HTTPFailure(first["status"], first["error"])
        return first, itertools.chain([first], events)

    @staticmethod
    def whole(events):
        """``(token texts, done event)`` of an answer read to its end (the done event with the
        model's ``thinking``, if it thought); an HTTPFailure if it fails."""
        parts, thoughts = [], []
        for event in events:
            if event["type"] == "token":
                parts.append(event["content"])
            elif event["type"] == "thinking":
                thoughts.append(event["content"])
            elif event["type"] == "done":
                return parts, dict(event, thinking="".join(thoughts)) if thoughts else event
            elif event["type"] == "error":
                raise HTTPFailure(502, event["error"])
        raise HTTPFailure(503, "the answer ended without a result")

    @staticmethod
    def stored_answer(events, **extra):
        """The stored message of a conversation's answer read to its end; an HTTPFailure (with
        ``extra`` fields) if it fails."""
        for event in events:
            if event["type"] == "error":
                raise HTTPFailure(event["status"] if not event["partial"] else 502, event["error"], **extra)
            if event["type"] == "done":
                return event["message"]
        raise HTTPFailure(503, "the answer ended without a result")

    # -- conversations ---------------------------------------------------------------

    def conversation(self, conversation_id):
        conversation = self.store.get_conversation(conversation_id)
        if conversation is None:
            raise HTTPFailure(404, "no conversation %s" % safe_text(conversation_id, 80))
        return conversation

    def seed_peer_conversations(self):
        """``{peer name: conversation}`` in the original's shape, one per origin that is not us."""
        merged = {}
        for record in self.store.list_conversations():
            if record["own"] and not record.get("peer_label"):
                continue
            label = record.get("peer_label") or record["origin_name"] or record["origin"]
            conversation = self.store.get_conversation(record["id"])
            merged.setdefault(label, []).append(conversation)
        result = {}
        for label, conversations in merged.items():
            messages = sorted((m for c in conversations for m in c["messages"]), key=lambda m: m["timestamp"])
            result[label] = seed_conversation({"id": label, "origin_name": label, "messages": messages})
        return result

    def record(self, conversation_id):
        """The conversation's record without its messages (cheap however long it is), or a 404."""
        record = self.store.get_conversation_record(conversation_id)
        if record is None:
            raise HTTPFailure(404, "no conversation %s" % safe_text(conversation_id, 80))
        return record

    def add_question(self, conversation_id, content, sender, replaces=None, images=None):
        """Stores a question asked on this node; returns it as a message. ``replaces``: the id of
        the conversation's last question, which this edited one takes the place of; ``images``:
        base64 pictures for a vision model (_message_images)."""
        self.record(conversation_id)
        marks = {"images": images} if images else {}
        if replaces is not None:
            if self.store.messages.last_question_id(conversation_id) != replaces:
                raise HTTPFailure(409, "only the last question of a conversation can be edited")
            marks["replaces"] = replaces
        entry = self.store.add_message(conversation_id, "user", content, sender, host_info=self.host_info(),
                                       **marks)
        return self.store.messages.message_from_entry(entry)

    @staticmethod
    def history_of(messages):
        """What the LLM is told of a conversation: a question that got no answer (it failed) is
        left out unless it is the last one, and so is a question replaced by its edit, with its answers."""
        replaced = {m.get("replaces") for m in messages if m.get("replaces")}
        history, skipping, pictured = [], False, None
        for index, message in enumerate(messages):
            if message["role"] == "user":
                last = index == len(messages) - 1
                answered = not last and messages[index + 1]["role"] == "assistant"
                skipping = message["id"] in replaced or not (answered or last)
            if not skipping:
                history.append({"role": message["role"], "content": message["content"]})
                if message.get("images"):
                    pictured = (history[-1], message["images"])
        if pictured:  # pictures cost the model much: only the newest question with some carries them on
            pictured[0]["images"] = pictured[1]
        return history

    def answer(self, conversation_id, model, regenerate=False, requester=None):
        """Events of one answer in a conversation; the answer is stored when it is done.

        The request is checked here, before any reply is sent; the events come from a generator.
        ``regenerate`` answers the last question again, without the answers it had.
        """
        self.record(conversation_id)
        # Twice the budget: history_of may leave some out, fit_history then cuts to the budget.
        history = self.history_of(self.store.messages.recent_messages(conversation_id, 2 * self.history_budget))
        if regenerate:
            while history and history[-1]["role"] == "assistant":
                history.pop()
            if not history:
                raise HTTPFailure(400, "nothing to regenerate: the conversation has no question yet")
        return self._stored_events(conversation_id, model, history, requester)

    def ask_default(self, content, sender, model, requester=None):
        """The original NeuroMesh's chat: a question in the default conversation; its stored answer."""
        conversation = self.store.default_conversation()
        self.add_question(conversation["id"], content, sender)
        return self.stored_answer(self.answer(conversation["id"], model, requester=requester))

    def _stored_events(self, conversation_id, model, history, requester=None):
        """The answer's events; what arrived of an answer cut off (Stop closes this generator, or
        its host went down) is stored too, marked ``cut_off``. The start event, and the stored
        answer, tell how long the chat waited for its host (``waited_s``)."""
        answer, started, finished = AnswerSoFar(history, {}), {}, False  # started: the host writing now
        asked, waited = time.monotonic(), None
        events = self.stream(model, self.fit_history(history, self.history_budget), requester=requester)
        try:
            for event in events:
                if event["type"] == "start":
                    waited = round(time.monotonic() - asked, 2)
                    event = dict(event, waited_s=waited)
                answer.note(event)
                if event["type"] in ("start", "continued"):
                    started = event
                elif event["type"] == "error" and answer.parts:
                    finished = True
                    message = self._store_cut_off(conversation_id, answer, started, waited)
                    event = dict(event, message=message) if message else event
                elif event["type"] == "done":
                    finished = True
                    try:
                        message = self._store_answer(conversation_id, answer, event, waited_s=waited)
                    except StoreError as exc:  # e.g. the conversation was deleted while it was answered
                        yield {"type": "error", "error": "the answer could not be stored: %s" % exc,
                               "status": 409, "partial": True}
                        return
                    event = dict(event, message=message)
                yield event
        finally:
            events.close()
            if answer.parts and not finished:  # the client went away (Stop): keep what it read
                self._store_cut_off(conversation_id, answer, started, waited)

    def _store_cut_off(self, conversation_id, answer, started, waited):
        wrote = [host for host in answer.hosts if host["tokens"]][-1:]  # not a host that took over, then failed
        done = {"node_name": wrote[0]["name"] if wrote else started.get("node_name") or "",
                "node_id": wrote[0]["node_id"] if wrote else started.get("node_id"), "model": started.get("model")}
        try:
            return self._store_answer(conversation_id, answer, done, cut_off=True, waited_s=waited)
        except StoreError as exc:
            log.warning("the cut-off answer could not be stored: %s", exc)
            return None

    def _store_answer(self, conversation_id, answer, done, **marks):
        """Stores ``answer`` (an AnswerSoFar). ``answered_by`` names the host that wrote its end;
        ``answered_by_hosts`` every host, when others began it (mid-answer failover)."""
        text, hosts = answer.text, answer.record()
        if hosts:
            marks["answered_by_hosts"] = hosts
        if answer.thinking:
            marks["thinking"] = "".join(answer.thinking)
        entry = self.store.add_message(
            conversation_id, "assistant", text or "(empty answer)", "LLM",
            host_info={"hostname": done["node_name"] or "LLM", "ip_address": "", "is_llm_host": True},
            model=done["model"], answered_by=done["node_id"], answered_by_name=done["node_name"] or None,
            tokens_per_second=done.get("tokens_per_second"), **marks)
        return self.store.messages.message_from_entry(entry)

    @staticmethod
    def fit_history(messages, budget_chars):
        """The newest messages that fit the context budget (the last one always, cut if it must be)."""
        kept, used = [], 0
        for message in reversed(messages):
            size = len(message["content"])
            if kept and used + size > budget_chars:
                break
            kept.append(message)
            used += size
        kept.reverse()
        if kept and len(kept[-1]["content"]) > budget_chars:
            kept[-1] = dict(kept[-1], content=kept[-1]["content"][-budget_chars:])
        return kept


###############################################################################
# HTTP APIs ###################################################################
###############################################################################
#
# One Bottle app, merged from one small app per API: the page's API, the Ollama API and
# the OpenAI API of the whole mesh, and the relay peers use. Each turns the chat room's
# events into its own format; ErrorReplies turns every error into an HTTP reply.


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors of the log for the diagnostics page."""

    def __init__(self, size=50):
        logging.Handler.__init__(self, logging.WARNING)
        self._records = collections.deque(maxlen=size)

    def emit(self, record):
        try:
            self._records.append({"time": datetime.fromtimestamp(record.created, timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"), "level": record.levelname, "message": record.getMessage()[:500]})
        except Exception:  # logging must never raise
            pass

    def records(self):
        return list(self._records)


CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class GatedChannel(waitress.server.HTTPChannel):
    """A waitress connection that notes when its current request began to arrive (for the
    server's request deadline) and tells its server when it closes (for the per-address count)."""

    request_began = 0.0

    def received(self, data):
        if self.request is None:  # the first bytes of a new request
            self.request_began = time.time()
        return waitress.server.HTTPChannel.received(self, data)

    def service(self):
        waitress.server.HTTPChannel.service(self)
        self.request_began = time.time()  # a request read ahead in the same packet: its time starts now

    def del_channel(self, map=None):
        counted = self._fileno in self.server.active_channels
        waitress.server.HTTPChannel.del_channel(self, map)
        if counted:
            self.server.connection_closed(self.addr[0])


class GatedWSGIServer(waitress.server.TcpWSGIServer):
    """waitress's TCP server with a gate at accept and a deadline for receiving a request.

    Another machine may hold ``per_address`` connections, and all other machines together the
    connection limit less a share kept for ``is_owner(host)`` (loopback: this computer's page
    and tools), so the owner always finds room; a connection past either is reset as soon as
    it is accepted. A request whose headers and body are not all in ``request_deadline``
    seconds after its first byte is closed, however steadily it trickles; a connection whose
    request is being answered (a stream may last minutes) is never timed.

    Methods for the caller: ``connection_closed(host)`` (from the channel).
    Class variables: ``accepts_per_wake``, ``owner_share``, ``warn_every``.
    """

    channel_class = GatedChannel
    accepts_per_wake = 64  # drain a flood's backlog quickly, so the owner's connect waits little
    owner_share = 8        # the owner keeps 1/8 of the connection limit (at most 200) to itself
    warn_every = 60.0

    def __init__(self, app, sock, dispatcher, adj, request_deadline, per_address, is_owner, map):
        self.request_deadline, self.per_address, self.is_owner = request_deadline, per_address, is_owner
        self.stranger_limit = adj.connection_limit - 2 - min(200, adj.connection_limit // self.owner_share)
        self.held, self.strangers, self.warned = collections.Counter(), 0, {}
        waitress.server.TcpWSGIServer.__init__(
            self, app, map, True, sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
            sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))

    def handle_accept(self):
        for _ in range(self.accepts_per_wake):
            if len(self._map) >= self.adj.connection_limit:
                return
            try:
                pair = self.accept()
            except OSError:  # EMFILE, or a connection already gone: the next wake tries again
                return
            if pair is None:
                return
            conn, addr = pair
            if not self._admit(addr[0]):
                try:  # a reset, and no TIME_WAIT kept for it here
                    linger = struct.pack("HH" if os.name == "nt" else "ii", 1, 0)  # Windows: two u_shorts
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                except OSError:
                    pass
                conn.close()
                continue
            try:
                self.channel_class(self, conn, addr, self.adj, map=self._map)
            except OSError:
                conn.close()
                continue
            self.held[addr[0]] += 1
            self.strangers += not self.is_owner(addr[0])

    def _admit(self, host):
        if self.is_owner(host):
            return True
        if self.held[host] < self.per_address and self.strangers < self.stranger_limit:
            return True
        now = time.time()
        if now - self.warned.get(host, 0) > self.warn_every:
            self.warned[host] = now
            if self.held[host] >= self.per_address:
                log.warning("%s holds %d HTTP connections, the most one machine may: refusing more (raise "
                            "--max-connections-per-address if it is a proxy for many devices)",
                            safe_text(host, 60), self.held[host])
            else:
                log.warning("other machines hold %d HTTP connections, all but the share kept for this "
                            "computer: refusing %s", self.strangers, safe_text(host, 60))
        return False

    def connection_closed(self, host):
        self.held[host] -= 1
        if self.held[host] <= 0:
            del self.held[host]
        self.strangers -= not self.is_owner(host)

    def maintenance(self, now):
        """Close connections idle past the idle timeout, or slower than the request deadline."""
        idle_since, late_since = now - self.adj.channel_timeout, now - self.request_deadline
        for channel in list(self.active_channels.values()):
            if channel.requests:  # being answered
                continue
            if channel.last_activity < idle_since or (
                    channel.request is not None and channel.request_began < late_since):
                channel.handle_close()  # at once: will_close waits for a writable socket
        self.warned = {host: at for host, at in self.warned.items() if now - at <= self.warn_every}


class HTTPServer:
    """A WSGI app served by waitress, with the limits a classroom node needs.

    waitress reads and parses every request on one non-blocking poll() loop, so an idle,
    half-sent or garbage connection costs a file descriptor but no thread; it is closed after
    ``idle_timeout`` idle, or ``request_deadline`` after its request began however steadily it
    trickles, and another machine holds at most ``per_address`` of them (GatedWSGIServer).
    Only complete, valid requests reach the ``threads`` workers. It
    answers a bad Content-Length with 400 and a body (chunked or not) over ``max_body`` with
    413 before the app runs. A streamed response (SSE, NDJSON) holds its worker until it
    ends, so ``threads`` covers every long-lived stream plus the short requests beside them.

    The socket is bound here (OSError/errno reach the caller; port 0 works); ``server_port``
    is the bound port. ``serve_forever()`` runs the loop until ``shutdown()`` (from any
    thread); ``server_close()`` frees the socket.
    """

    def __init__(self, host, port, app, threads=96, connection_limit=256, idle_timeout=30,
                 max_body=4 * MiB, backlog=2048, max_header=64 * 1024, request_deadline=20, per_address=128,
                 is_owner=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name != "nt":  # Windows' SO_REUSEADDR lets a second server steal the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        self.server_port = self.port = sock.getsockname()[1]
        self._map = {}
        self._stopping, self._stopped = threading.Event(), threading.Event()
        self._stopped.set()
        self._closed = False
        adj = waitress.server.Adjustments(
            sockets=[sock], threads=threads,
            connection_limit=connection_limit + 2,  # waitress counts its listener and wake-up pipe
            backlog=backlog,  # a connect burst queues in the kernel: a full queue drops the owner's SYN too (1 s retry)
            channel_timeout=idle_timeout, cleanup_interval=1,
            max_request_body_size=max_body, max_request_header_size=max_header,
            asyncore_use_poll=True,  # select() breaks past fd 1024
            outbuf_high_watermark=4 * MiB, ident="NeuroMesh", expose_tracebacks=False,
            clear_untrusted_proxy_headers=True)
        dispatcher = waitress.server.ThreadedTaskDispatcher()
        dispatcher.set_thread_count(threads)
        self._server = GatedWSGIServer(app, sock, dispatcher, adj, request_deadline, per_address,
                                       is_owner or is_loopback, self._map)

    def serve_forever(self, poll_interval=0.5):
        self._stopped.clear()
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=poll_interval, map=self._map, use_poll=True, count=1)
        finally:
            self._stopped.set()

    def shutdown(self, timeout=5):
        """Stop serve_forever, drop every connection (streams see ClientDisconnected)."""
        self._stopping.set()
        try:
            self._server.pull_trigger()
        except OSError:
            pass
        self._stopped.wait(timeout)
        self.server_close(timeout)

    def server_close(self, timeout=5):
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._stopped.wait(timeout)
        wasyncore.close_all(self._map)  # listener, trigger and every open channel
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)


def http_connection_limit(wanted=2000, spare=200):
    """Connections the HTTP server may hold open. On POSIX the soft open-files limit is raised
    toward ``wanted`` + ``spare`` where the hard limit allows (a flood of idle sockets then
    waits for the idle timeout without shutting out everyone else); Windows' select() takes 512."""
    try:
        import resource
    except ImportError:
        return 400
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    target = wanted + spare if hard == unlimited else min(hard, wanted + spare)
    if soft != unlimited and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(64, min(wanted, (wanted + spare if soft == unlimited else soft) - spare))


def quiet_waitress_logs(level=logging.ERROR):
    """waitress logs a WARNING per queued task and INFO per gone client: keep them out."""
    logging.getLogger("waitress.queue").setLevel(level)
    logging.getLogger("waitress").setLevel(logging.WARNING)


def read_json_body(limit=4 * MiB):
    """The request's JSON object, or an HTTPFailure saying what is wrong with it."""
    raw_length = bottle.request.environ.get("CONTENT_LENGTH") or "0"
    if not raw_length.isdigit():
        raise HTTPFailure(400, "Content-Length must be a whole number of bytes, not %r" % safe_text(raw_length, 40))
    length = int(raw_length)
    if length > limit:
        raise HTTPFailure(413, "request body of %d bytes is over the limit of %d" % (length, limit))
    raw = bottle.request.environ["wsgi.input"].read(length) if length else b""
    if not raw.strip():
        return {}
    try:
        body = parse_json(raw, "the request body", limit, MAX_JSON_DEPTH)
    except JSONInputError as exc:
        raise HTTPFailure(400, safe_text(str(exc), 240))
    if not isinstance(body, dict):
        raise HTTPFailure(400, "the request body must be a JSON object")
    return body


def body_text(body, key, required=False, limit=None):
    """``body[key]`` as text, or an HTTPFailure; ``limit`` in characters, or None for a message's
    text (check_message_size)."""
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise HTTPFailure(400, "%r must be a non-empty string" % key)
    if limit is None:
        return check_message_size(value)
    if len(value) > limit:
        raise HTTPFailure(413, "%r is longer than %d characters" % (key, limit))
    return value


def check_message_size(text):
    """``text``, or an HTTPFailure 413 when it is over MAX_CONTENT_BYTES of UTF-8: the one message
    limit, with one wording, at every door (the store holds synced entries to it as well)."""
    if len(text) * 4 <= MAX_CONTENT_BYTES:  # short enough whatever it holds
        return text
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONTENT_BYTES:
        raise HTTPFailure(413, "message is %d bytes, over the limit of %d bytes (%d KiB): shorten it"
                          % (size, MAX_CONTENT_BYTES, MAX_CONTENT_BYTES // 1024))
    return text


def check_message_sizes(body):
    """check_message_size on every message of an Ollama/OpenAI chat or generate body, before it
    is answered or passed on: each of ``messages`` (text, or OpenAI's text parts), ``prompt``
    (a text, or OpenAI's list of them) and ``system``."""
    messages = body.get("messages")
    for item in messages if isinstance(messages, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):
            content = "".join(part["text"] for part in content
                              if isinstance(part, dict) and isinstance(part.get("text"), str))
        if isinstance(content, str):
            check_message_size(content)
    prompt = body.get("prompt")
    for text in (prompt if isinstance(prompt, list) else [prompt]) + [body.get("system")]:
        if isinstance(text, str):
            check_message_size(text)


def clean_chat_messages(value):
    """Messages of an Ollama/OpenAI request as ``[{role, content}]``, or an HTTPFailure."""
    if not isinstance(value, list) or not value:
        raise HTTPFailure(400, "'messages' must be a non-empty list of {role, content}")
    messages = []
    for item in value:
        if not isinstance(item, dict) or item.get("role") not in ("system", "user", "assistant", "tool"):
            raise HTTPFailure(400, "each message needs a role: system, user, assistant or tool")
        content = item.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise HTTPFailure(400, "message content must be text")
        messages.append({"role": item["role"], "content": check_message_size(content)})
        if item.get("images") is not None:
            images = _message_images(item["images"])
            if images is None:
                raise HTTPFailure(400, "'images' must be a list of 1 to %d base64 images, %d KiB together at most"
                                  % (MAX_MESSAGE_IMAGES, MAX_IMAGES_BYTES // 1024))
            messages[-1]["images"] = images
    return messages


def translate(events, handlers):
    """Each event through the handler of its type; events of other types are left out."""
    for event in events:
        handler = handlers.get(event["type"])
        if handler is not None:
            yield handler(event)


def ndjson(items):
    for item in items:
        yield json.dumps(item) + "\n"


def sse_format(event):
    """One Server-Sent Event: ``event:`` line, one ``data:`` line of JSON, a blank line."""
    return "event: %s\ndata: %s\n\n" % (event["type"], json.dumps(event))


def set_security_headers():
    bottle.response.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    bottle.response.set_header("X-Content-Type-Options", "nosniff")


class ArchivedFiles:
    """The page's files read from inside the .pyz (bottle.static_file needs a real folder).

    Read once on first use: the page is a few hundred KiB, and a zip is not opened per request.
    """

    folder = "neuromesh_static/"

    def __init__(self, archive):
        self.archive = archive
        self._files = None
        self._lock = threading.Lock()

    def files(self):
        with self._lock:
            if self._files is None:
                with zipfile.ZipFile(self.archive) as bundle:
                    self._files = {name[len(self.folder):]: bundle.read(name) for name in bundle.namelist()
                                   if name.startswith(self.folder) and not name.endswith("/")}
            return self._files

    def response(self, name):
        """The file ``name`` of the page as a Bottle reply, or a 404 like bottle.static_file's."""
        body = self.files().get(name.replace("\\", "/").lstrip("/"))
        if body is None:
            return bottle.HTTPError(404, "File does not exist.")
        mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if mimetype.startswith("text/") or mimetype in ("application/javascript", "image/svg+xml"):
            mimetype += "; charset=UTF-8"
        return bottle.HTTPResponse(body, 200, {"Content-Type": mimetype, "Content-Length": str(len(body))})


_ARCHIVED_FILES = ArchivedFiles(ARCHIVE) if ARCHIVE else None


def static_file(name):
    """A file of the chat page: from neuromesh_static/, or from inside the .pyz run as one file."""
    if _ARCHIVED_FILES is not None:
        return _ARCHIVED_FILES.response(name)
    return bottle.static_file(name, root=STATIC_DIR)


class ErrorReplies:
    """The one place errors become HTTP replies, in the error format of the API that was asked.

    A Bottle plugin: a route's HTTPFailure (or StoreError: a store operation refused) becomes
    ``{"error": text}``, or for the OpenAI API ``{"error": {"message", "type", "param", "code"}}``;
    a dict or list it returns becomes JSON. ``guard``, if given, runs before each route and
    refuses a request by raising HTTPFailure. The not_found, not_allowed and server_error
    methods answer Bottle's own errors.
    """

    api = 2
    OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 403: "permission_error",
                    413: "invalid_request_error"}

    ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                       404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                       503: "overloaded_error"}

    def __init__(self, shape="json", guard=None):
        self.shape = shape  # "json", "openai" or "anthropic"
        self.guard = guard

    def apply(self, callback, route):
        return functools.partial(self.answer, callback)

    def answer(self, callback, *args, **kwargs):
        try:
            if self.guard is not None:
                self.guard()
            result = callback(*args, **kwargs)
        except HTTPFailure as exc:
            return self.reply(exc.status, str(exc), exc.extra)
        except StoreError as exc:
            return self.reply(400, str(exc))
        if isinstance(result, (dict, list)):
            bottle.response.content_type = "application/json"
            return json.dumps(result)
        return result

    def reply(self, status, message, extra=None):
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        if (extra or {}).get("retry_after"):
            bottle.response.set_header("Retry-After", str(extra["retry_after"]))
        if self.shape == "openai":
            return json.dumps({"error": {"message": message, "type": self.OPENAI_TYPES.get(status, "api_error"),
                                         "param": None, "code": "model_not_found" if status == 404 else None}})
        if self.shape == "anthropic":
            return json.dumps({"type": "error", "error": {"type": self.ANTHROPIC_TYPES.get(status, "api_error"),
                                                          "message": message}})
        body = {"error": message}
        body.update(extra or {})
        return json.dumps(body)

    def not_found(self, error):
        return self.reply(404, "not found: %s" % bottle.request.path)

    def not_allowed(self, error):
        return self.reply(405, "method %s is not allowed on %s" % (bottle.request.method, bottle.request.path))

    def server_error(self, error):
        log.error("HTTP 500 on %s: %s", bottle.request.path, error.exception)
        return self.reply(500, "internal error: %s" % (error.exception or error.body))


###############################################################################
# Who is asking: the access model #############################################
###############################################################################
#
# The client is the socket's peer address (REMOTE_ADDR from the server), never a header.
# Loopback is the owner of this computer and may do everything. Another machine gets the
# chat page only with --guests and a room code, the Ollama/OpenAI APIs only with --lan-api
# (plus ``Authorization: Bearer <mesh key>`` once a mesh key is set); the relay checks its
# own tokens. Every request must name this machine in Host (DNS rebinding), and a
# state-changing one must not come from another site (Origin, JSON content type).

Client = collections.namedtuple("Client", "role address guest")  # role: owner guest visitor lan peer
GUEST_CODE_FILE = "guest_code"
GUEST_SESSIONS_FILE = "guest_sessions.json"
GUEST_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"


def is_loopback(address):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def guest_code(config):
    """The code guests enter: this node's own, kept in the data dir. Never the room code (--mesh-key),
    which lets a computer run a node of the room: a guest gets the chat page only."""
    path = os.path.join(config.data_dir, GUEST_CODE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            code = handle.read().strip()
        if len(code) >= 6:
            return code
    except OSError:
        pass
    code = "".join(secrets.choice(GUEST_CODE_ALPHABET) for _ in range(8))
    os.makedirs(config.data_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(code + "\n")
    os.replace(path + ".tmp", path)
    return code


def guest_reach(config):
    """Why guests cannot open this node's page, with the flag that fixes it; None when they can."""
    if config.host == "localhost" or is_loopback(config.host):
        return ("this node listens on %s only, which no other computer can reach: start it with --host 0.0.0.0 "
                "(the default) for guests" % config.host)
    if config.host in ("0.0.0.0", "") and not lan_addresses():
        return "this computer has no network address yet: connect it to the classroom network"
    return None


class RateLimit:
    """At most ``limit`` events per ``window`` seconds per key; keys are bounded in number."""

    def __init__(self, limit, window=60.0, max_keys=10000):
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self._hits = collections.OrderedDict()
        self._lock = threading.Lock()

    def hit(self, key, now=None):
        """Counts one event of ``key``: 0 if allowed, else the seconds to wait (it is not counted)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.pop(key, None) or collections.deque()
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            self._hits[key] = hits
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            if len(hits) >= self.limit:
                return max(1, int(hits[0] + self.window - now + 1))
            hits.append(now)
            return 0


class GuestDoor:
    """Guest sessions: a right guest code gives a random token in an HttpOnly cookie.

    Sessions outlive a restart of the node: they are kept in the data dir (GUEST_SESSIONS_FILE),
    each as the SHA-256 of its token and its expiry (wall clock), at most ``max_sessions`` (the
    oldest go first), each for ``ttl`` seconds. They are kept under a fingerprint of the guest
    code and the room code's public hash, so changing either signs every guest out. Wrong codes
    are limited per address.
    """

    cookie = "neuromesh_guest"

    def __init__(self, config, ttl=12 * 3600, max_sessions=1000):
        self.config = config
        self.ttl, self.max_sessions = ttl, max_sessions
        self.path = os.path.join(config.data_dir, GUEST_SESSIONS_FILE)
        self._lock = threading.Lock()
        self.wrong_codes = RateLimit(10, window=300.0)
        self._room = None  # the fingerprint of the codes, computed once (a PBKDF2 of the room code)
        self._sessions = None  # SHA-256 of the token -> (guest id, expiry), read at first use

    @property
    def code(self):
        return guest_code(self.config)

    def codes(self):
        """Which code does what, for the owner's invite dialog (never the room code itself)."""
        mesh_key = self.config.mesh_key
        return {
            "guest": {"code": self.code, "lets": "open this computer's chat page in a browser (phones, "
                      "Chromebooks): it cannot run a node nor join the room"},
            "room": {"set": bool(mesh_key), "key_hash": room_status(derive_room_key(mesh_key))["key_hash"]
                     if mesh_key else None,
                     "lets": "run a node of this room (--mesh-key): give it only to the computers of the room"},
        }

    def _fingerprint(self):
        if self._room is None:
            mesh_key = self.config.mesh_key
            room = room_status(derive_room_key(mesh_key))["key_hash"] if mesh_key else "open"
            self._room = hashlib.sha256(("neuromesh guests v1\0%s\0%s" % (self.code.upper(), room))
                                        .encode("utf-8")).hexdigest()
        return self._room

    def _loaded(self):
        """The sessions (under the lock): read from the data dir once; the ones of other codes,
        expired or malformed are dropped."""
        if self._sessions is None:
            self._sessions = collections.OrderedDict()
            try:
                with open(self.path, encoding="utf-8") as handle:
                    saved = parse_json(handle.read(), "the guest sessions", 4 * MiB, 4)
            except (OSError, ValueError):
                saved = {}
            now = time.time()
            if isinstance(saved, dict) and saved.get("room") == self._fingerprint():
                for item in saved.get("sessions") if isinstance(saved.get("sessions"), list) else []:
                    if (isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) for x in item[:2])
                            and isinstance(item[2], (int, float)) and item[2] > now):
                        self._sessions[item[0]] = (item[1], float(item[2]))
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return self._sessions

    def _save(self):
        """Write the sessions (under the lock), owner-readable only, replaced at once."""
        now = time.time()
        sessions = [[digest, guest, round(expiry, 3)] for digest, (guest, expiry) in self._sessions.items()
                    if expiry > now]
        try:
            os.makedirs(self.config.data_dir, exist_ok=True)
            descriptor = os.open(self.path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump({"room": self._fingerprint(), "sessions": sessions}, handle)
            os.replace(self.path + ".tmp", self.path)
        except OSError as exc:
            log_limited(logging.WARNING, "guest sessions", "cannot keep the guest sessions in %s (%s): guests "
                        "sign in again after a restart", self.path, exc.strerror or exc)

    @staticmethod
    def _digest(token):
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    def login(self, address, code):
        """``(token, guest id)`` for the right code; an HTTPFailure otherwise."""
        if not isinstance(code, str) or not code.strip():
            raise HTTPFailure(400, "enter the guest code: {\"code\": \"...\"}")
        if not hmac.compare_digest(code.strip().upper().encode("utf-8"), self.code.upper().encode("utf-8")):
            wait = self.wrong_codes.hit(address)
            if wait:
                raise HTTPFailure(429, "too many wrong codes: try again in %d seconds" % wait, retry_after=wait)
            raise HTTPFailure(403, "wrong guest code: ask the teacher for the guest code shown on the NeuroMesh computer")
        token, guest = secrets.token_urlsafe(32), "guest-" + secrets.token_hex(8)
        with self._lock:
            sessions = self._loaded()
            sessions[self._digest(token)] = (guest, time.time() + self.ttl)
            while len(sessions) > self.max_sessions:
                sessions.popitem(last=False)
            self._save()
        return token, guest

    def guest_of(self, token):
        if not token or not isinstance(token, str) or len(token) > 256:
            return None
        digest = self._digest(token)
        with self._lock:
            sessions = self._loaded()
            session = sessions.get(digest)
            if session is None or session[1] < time.time():
                sessions.pop(digest, None)
                return None
            return session[0]


class Gatekeeper:
    """Decides, for each request, who is asking and whether they may (the ``guard`` of ErrorReplies).

    ``check(kind)`` raises HTTPFailure or records the Client in the WSGI environ; ``kind`` is
    "page", "llm" or "relay". ``admit_chat()`` and ``admit_relay(requester)`` hold chats to
    their rates (429). Also WSGI middleware (``wrap``) that caps the requests one other
    machine has in progress at once.
    """

    OPEN_PAGE_PATHS = ("/", "/api/guest/login", "/api/health")  # and /static/: what a guest needs to log in
    UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
    # Relayed chats: each requester (the node its relay token names, plus the tag it sends) gets
    # the clients' --chat-rate (100 a minute); a node, whatever tags it makes up, gets this many
    # times that (3,200 a minute): a teacher's node relaying for a class of 30 guests, itself and one spare.
    RELAY_CLASS_SIZE = 32

    def __init__(self, config, door=None, relay_rate=None, relay_node_rate=None):
        self.config = config
        self.door = door or GuestDoor(config)
        self.chat_rate = RateLimit(config.chat_rate)
        self.relay_rate = RateLimit(relay_rate or config.chat_rate)
        self.relay_node_rate = RateLimit(relay_node_rate or self.RELAY_CLASS_SIZE * self.relay_rate.limit)
        self.names = {"localhost", socket.gethostname().lower(), socket.gethostname().lower() + ".local"}
        self._in_flight = collections.Counter()
        self._lock = threading.Lock()

    @staticmethod
    def client():
        return bottle.request.environ.get("neuromesh.client") or Client("owner", "127.0.0.1", None)

    def check(self, kind):
        request = bottle.request
        address = request.environ.get("REMOTE_ADDR") or ""
        self._check_host(request.environ.get("HTTP_HOST"))
        if kind != "relay" and request.method in self.UNSAFE:
            self._check_same_site(request, kind)
        if is_loopback(address):
            client = Client("owner", address, None)
        elif kind == "relay":
            client = Client("peer", address, None)
        elif kind == "llm":
            client = self._lan_client(request, address)
        else:
            client = self._guest_client(request, address)
        request.environ["neuromesh.client"] = client

    def _check_host(self, host):
        if not host:
            return  # HTTP/1.0 without Host: not a browser
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower().rstrip(".")
        if name in self.names:
            return
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise HTTPFailure(421, "this node answers requests for its IP address, localhost or %s only, not "
                                   "%r: open it by its address" % (socket.gethostname(), safe_text(host, 100)))

    @staticmethod
    def _check_same_site(request, kind):
        origin = request.headers.get("Origin")
        host = request.headers.get("Host") or ""
        if (origin is not None and origin.lower() not in ("http://" + host.lower(), "https://" + host.lower())
                or request.headers.get("Sec-Fetch-Site") == "cross-site"):
            raise HTTPFailure(403, "cross-site request refused: only this node's own page may change things here")
        ctype = (request.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        refused = ("text/plain", "multipart/form-data") if kind == "llm" else None
        if (request.method in ("POST", "PATCH", "PUT") and (request.environ.get("CONTENT_LENGTH") or "0") != "0"
                and (ctype in refused if refused else ctype != "application/json")):
            raise HTTPFailure(415, "send the request body as JSON (Content-Type: application/json)")

    def _lan_client(self, request, address):
        if not (self.config.lan_api and is_private_address(address)):
            raise HTTPFailure(403, "this node's LLM API answers only this computer; start it with --lan-api "
                                   "to serve the local network")
        mesh_key = self.config.mesh_key
        if mesh_key:
            header = request.headers.get("Authorization", "")
            given = header[7:].strip() if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode("utf-8"), mesh_key.encode("utf-8")):
                raise HTTPFailure(401, "this node's LLM API needs the room code: send the header "
                                       "'Authorization: Bearer <mesh key>'")
        return Client("lan", address, None)

    def _guest_client(self, request, address):
        if not self.config.guests:
            raise HTTPFailure(403, "this node's chat page answers only this computer; start it with --guests "
                                   "to let the room's phones and Chromebooks in with a code")
        guest = self.door.guest_of(request.get_cookie(GuestDoor.cookie))
        if guest is not None:
            return Client("guest", address, guest)
        if request.path in self.OPEN_PAGE_PATHS or request.path.startswith("/static/"):
            return Client("visitor", address, None)
        raise HTTPFailure(401, "enter the guest code first (the chat page asks for it)", guest_login=True)

    def admit_chat(self):
        """Per-client chat rate (not for the owner or peers): an HTTPFailure 429 past it."""
        client = self.client()
        if client.role in ("owner", "peer"):
            return
        wait = self.chat_rate.hit(client.guest or client.address)
        if wait:
            raise HTTPFailure(429, "too many chats: at most %d a minute; try again in %d seconds"
                              % (self.config.chat_rate, wait), retry_after=wait)

    def admit_relay(self, requester):
        """Rate of the chats a peer relays: an HTTPFailure 429 past its node's ceiling or its requester's rate."""
        wait = self.relay_node_rate.hit(requester.node_id)  # first: a refused node adds no tag keys
        if wait:
            raise HTTPFailure(429, "too many relayed chats from your node: at most %d a minute for all its "
                              "users together; try again in %d seconds" % (self.relay_node_rate.limit, wait),
                              retry_after=wait)
        wait = self.relay_rate.hit(requester.key)
        if wait:
            raise HTTPFailure(429, "too many relayed chats from one user of your node: at most %d a minute; "
                              "try again in %d seconds" % (self.relay_rate.limit, wait), retry_after=wait)

    def wrap(self, app):
        """WSGI middleware: at most --max-requests-per-address requests in progress per other machine."""
        def capped(environ, start_response):
            address = environ.get("REMOTE_ADDR") or ""
            if is_loopback(address):
                return app(environ, start_response)
            with self._lock:
                if self._in_flight[address] >= self.config.max_requests_per_address:
                    start_response("429 Too Many Requests", [("Content-Type", "application/json"),
                                                             ("Retry-After", "1")])
                    return [json.dumps({"error": "too many requests in progress from %s: at most %d at once"
                                        % (address, self.config.max_requests_per_address)}).encode("utf-8")]
                self._in_flight[address] += 1
            return _Released(app(environ, start_response), functools.partial(self._release, address))
        return capped

    def _release(self, address):
        with self._lock:
            count_down(self._in_flight, address)


class _Released:
    """A WSGI response that calls ``release`` once, when the server closes it."""

    def __init__(self, result, release):
        self.result, self.release = result, release

    def __iter__(self):
        return iter(self.result)

    def close(self):
        try:
            if hasattr(self.result, "close"):
                self.result.close()
        finally:
            release, self.release = self.release, None
            if release is not None:
                release()


###############################################################################
# The API units ###############################################################
###############################################################################


def event_stream_reply(events):
    """``events`` (Server-Sent Events text) as the reply, marked so no cache keeps it."""
    bottle.response.content_type = "text/event-stream"
    bottle.response.set_header("Cache-Control", "no-cache")
    return events


class HttpApi:
    """One HTTP API: its routes, on a Bottle app of its own that answers errors in its format.

    Each gets the router, the chat room and the Gatekeeper, and a subclass what else it uses.
    Subclasses list their routes in ``routes()``; the callbacks are their own methods.
    """

    error_shape = "json"
    kind = "page"  # for the Gatekeeper: "page", "llm" (Ollama and OpenAI APIs) or "relay"

    def __init__(self, router, chat, gate):
        self.router = router
        self.chat = chat
        self.gate = gate

    def routes(self):
        """``[(method, path, callback)]``."""
        raise NotImplementedError

    def admit_chat(self):
        """Refuses a chat past the client's rate (429) or the node's queue (503)."""
        self.gate.admit_chat()
        self.chat.admit()

    def requester(self):
        """Who asks, for the fair queues: this node and its client (the owner, a guest, a LAN client)."""
        client = self.gate.client()
        if client.role == "owner":
            tag = "owner"
        elif client.guest:
            tag = client.guest
        else:
            tag = "lan:" + client.address
        return Requester(self.chat.node_id, Requester.clean_tag(tag))

    def build(self):
        app = bottle.Bottle()
        app.install(ErrorReplies(self.error_shape, functools.partial(self.gate.check, self.kind)))
        for method, path, callback in self.routes():
            app.route(path, method, callback)
        return app


class PageApi(HttpApi):
    """The chat page and its API: conversations, their messages and answers, models, live events.

    ``conversations``: the Store's conversations; ``room``: the RoomRules; ``teacher``: the
    teacher's key on the teacher's computer, else None; ``report``: what this node says of
    itself (NodeReport: ``health()``, ``urls()``); ``controls``: what its owner changes
    (OwnerControls: ``rename(name)``, ``pause_sharing(paused)``).
    """

    sse_keepalive = 15.0  # seconds between SSE comments; a gone client is noticed on a write (or at stop)

    def __init__(self, router, chat, gate, conversations, events, mesh, room, report, controls, teacher=None):
        HttpApi.__init__(self, router, chat, gate)
        self.conversations = conversations
        self.bus = events  # the EventBus (``events`` is the route)
        self.mesh = mesh
        self.room = room
        self.report = report
        self.controls = controls
        self.teacher = teacher
        self.capabilities = ModelCapabilities(router)

    def routes(self):
        conversation = "/api/conversations/<conversation_id>"
        return [("GET", "/", self.index), ("GET", "/static/<path:path>", self.static),
                ("GET", "/api/health", self.health), ("GET", "/api/peers", self.peers),
                ("GET", "/api/conversations", self.list_conversations),
                ("POST", "/api/conversations", self.create_conversation),
                ("GET", conversation, self.get_conversation), ("PATCH", conversation, self.patch_conversation),
                ("DELETE", conversation, self.delete_conversation), ("GET", "/peers", self.seed_peers),
                ("POST", conversation + "/messages", self.post_message),
                ("POST", conversation + "/regenerate", self.regenerate),
                ("GET", "/api/models", self.models), ("GET", "/api/events", self.events),
                ("POST", "/api/guest/login", self.guest_login), ("GET", "/api/guests", self.guests),
                ("PATCH", "/api/node", self.rename_node), ("GET", "/api/search", self.search),
                ("GET", conversation + "/download", self.download)]

    def index(self):
        """The page for browsers (and ``Accept: */*``); "Ollama is running" for the tools that probe an
        Ollama asking for something else (the Ollama clients send ``Accept: application/json``)."""
        accept = bottle.request.headers.get("Accept", "")
        if accept and "text/html" not in accept and "*/*" not in accept:
            bottle.response.content_type = "text/plain; charset=utf-8"
            return "Ollama is running"
        return static_file("index.html")

    def static(self, path):
        return static_file(path)

    def health(self):
        return self.report.health()

    def peers(self):
        return self.mesh.peers()

    def seed_peers(self):
        """The original NeuroMesh's view: ``{peer: conversation}`` of what peers wrote."""
        if self.teacher is not None:
            raise HTTPFailure(404, "the teacher's computer shows only the chats students share")
        return self.chat.seed_peer_conversations()

    # -- conversations -------------------------------------------------------------

    def _teacher_may_read(self, record):
        """On the teacher's computer only its own chats and those a student shows it."""
        if self.teacher is None:
            return True
        return record["own"] or record["id"] in self.room.shared()

    def list_conversations(self):
        records = [record for record in self.conversations.list_conversations() if self._teacher_may_read(record)]
        guest = self.gate.client().guest
        if guest is None:
            return records
        owners = self.conversations.guests.owners()
        return [dict(record, own=owners.get(record["id"]) == guest) for record in records
                if owners.get(record["id"]) == guest or not record["private"]]

    def create_conversation(self):
        body = read_json_body()
        title = body_text(body, "title", limit=200) or "New chat"
        record = self.conversations.create_conversation(title=title, private=bool(body.get("private")))
        guest = self.gate.client().guest
        if guest is not None:
            self.conversations.guests.record(record["id"], guest)
            if self.room.teacher_id:  # the teacher's count for "Clear guests' chats"
                self.room.write_own(guest_chats=len(self.room.guest_chats()))
        bottle.response.status = 201
        return record

    def _readable(self, conversation_id, conversation=None):
        """The conversation, if this client may read it: a guest reads their own and shared ones."""
        conversation = conversation or self.chat.record(conversation_id)
        if not self._teacher_may_read(conversation):
            raise HTTPFailure(404, "no conversation %s: a student has not shown it to you" % safe_text(conversation_id, 80))
        guest = self.gate.client().guest
        if guest is not None:
            owned = self.conversations.guests.owners().get(conversation_id) == guest
            if not owned and conversation["private"]:
                raise HTTPFailure(404, "no conversation %s" % safe_text(conversation_id, 80))
            conversation["own"] = owned
        return conversation

    def _writable(self, conversation_id):
        """The conversation, if this client may change it: this node's own, and for a guest their own."""
        conversation = self._readable(conversation_id)
        if not conversation["own"]:
            raise HTTPFailure(403, "conversation %s belongs to %s: you can read it, not change it"
                              % (safe_text(conversation_id, 80), "someone else" if self.gate.client().guest
                                 and conversation["origin"] == self.chat.node_id else conversation["origin_name"]))
        return conversation

    page_default = 200  # messages of a conversation sent at once, newest first; ?limit=N&before=<id> for more

    def get_conversation(self, conversation_id):
        """``?limit=N&before=<message id>``: a page of messages, never more than 1000 at once."""
        query = bottle.request.query
        limit = query.get("limit") or str(self.page_default)
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise HTTPFailure(400, "'limit' must be a whole number from 1 to 1000")
        limit = int(limit)
        try:
            page = self.conversations.get_conversation_page(conversation_id, limit, query.get("before") or None)
        except StoreError as exc:
            raise HTTPFailure(400, str(exc))
        if page is None:
            raise HTTPFailure(404, "no conversation %s" % safe_text(conversation_id, 80))
        return self._readable(conversation_id, page)

    def download(self, conversation_id):
        """``GET .../download?format=md|json``: one conversation as a file to keep."""
        conversation = self._readable(conversation_id, self.chat.conversation(conversation_id))
        kind = bottle.request.query.get("format") or "md"
        if kind not in ("md", "json"):
            raise HTTPFailure(400, "'format' must be md or json")
        name = (re.sub(r"[^\w-]+", "-", conversation["title"], flags=re.UNICODE).strip("-")[:60] or "conversation")
        bottle.response.set_header("Content-Disposition", 'attachment; filename="%s.%s"'
                                   % (name.encode("ascii", "replace").decode("ascii").replace("?", "_"), kind))
        if kind == "json":
            bottle.response.content_type = "application/json; charset=utf-8"
            return json.dumps(conversation, ensure_ascii=False, indent=2)
        bottle.response.content_type = "text/markdown; charset=utf-8"
        return conversation_markdown(conversation)

    def search(self):
        """``GET /api/search?q=text``: conversations whose title or messages hold ``text``."""
        text = (bottle.request.query.getunicode("q") or "").strip()[:200]
        if not text:
            return []
        readable = {record["id"] for record in self.list_conversations()}
        return [found for found in self.conversations.search(text, limit=100) if found["id"] in readable][:50]

    def patch_conversation(self, conversation_id):
        body = read_json_body()
        self._writable(conversation_id)
        title = body_text(body, "title", limit=200)
        private = body.get("private")
        if private is not None and not isinstance(private, bool):
            raise HTTPFailure(400, "'private' must be true or false")
        try:
            return self.conversations.update_conversation(conversation_id, title=title, private=private)
        except StoreError as exc:
            raise HTTPFailure(403, str(exc))

    def delete_conversation(self, conversation_id):
        self._writable(conversation_id)
        try:
            return self.conversations.delete_conversation(conversation_id)
        except StoreError as exc:
            raise HTTPFailure(403, str(exc))

    # -- chat in a conversation ---------------------------------------------------------

    def post_message(self, conversation_id):
        body = read_json_body()
        content = body_text(body, "content", required=True)
        sender = body_text(body, "sender", limit=100) or "user"
        model = body_text(body, "model", limit=200)
        replaces = body_text(body, "replaces", limit=100)
        images = body.get("images") or None
        if images is not None and _message_images(images) is None:
            raise HTTPFailure(413 if isinstance(images, list) and all(isinstance(i, str) for i in images) else 400,
                              "'images' must be 1 to %d base64 pictures, %d KiB together at most: send fewer or "
                              "smaller ones" % (MAX_MESSAGE_IMAGES, MAX_IMAGES_BYTES // 1024))
        self._writable(conversation_id)
        if body.get("answer") is not False:
            self.admit_chat()
        question = self.chat.add_question(conversation_id, content, sender, replaces=replaces, images=images)
        if body.get("answer") is False:
            bottle.response.status = 201
            return question
        return self._answer_reply(question, self.chat.answer(conversation_id, model, requester=self.requester()))

    def regenerate(self, conversation_id):
        body = read_json_body()
        model = body_text(body, "model", limit=200)
        self._writable(conversation_id)
        self.admit_chat()
        return self._answer_reply(None, self.chat.answer(conversation_id, model, regenerate=True,
                                                         requester=self.requester()))

    def rename_node(self):
        """``PATCH /api/node {"name"}``: the owner names this computer, e.g. "Ana's laptop";
        ``{"sharing_paused": true|false}`` pauses or resumes sharing its LLM."""
        body = read_json_body()
        if self.gate.client().role != "owner":
            raise HTTPFailure(403, "only this computer's owner may rename it or pause its sharing")
        paused = body.get("sharing_paused")
        if paused is not None and not isinstance(paused, bool):
            raise HTTPFailure(400, "'sharing_paused' must be true or false")
        if paused is None or "name" in body:
            try:
                reply = {"name": self.controls.rename(body_text(body, "name", required=True, limit=200))}
            except ValueError as exc:
                raise HTTPFailure(400, "%s." % exc)
        else:
            reply = {"name": self.router.node_name}
        if paused is not None:
            reply["sharing_paused"] = self.controls.pause_sharing(paused)
        return reply

    # -- guests ------------------------------------------------------------------------

    def guest_login(self):
        """``POST /api/guest/login {"code"}``: a session cookie for a guest who knows the room code."""
        body = read_json_body()
        client = self.gate.client()
        if client.role == "owner":
            return {"role": "owner"}
        token, guest = self.gate.door.login(client.address, body.get("code"))
        bottle.response.set_cookie(GuestDoor.cookie, token, path="/", httponly=True, samesite="strict",
                                   max_age=self.gate.door.ttl)
        return {"role": "guest", "guest": guest}

    def guests(self):
        """Owner only: whether guests may come in, the URLs they open and the code they enter."""
        if self.gate.client().role != "owner":
            raise HTTPFailure(403, "only this computer's owner may see the room code")
        lan = self.report.urls()[1]
        return {"guests": bool(self.gate.config.guests), "urls": lan, "code": self.gate.door.code,
                "code_is_mesh_key": False, "codes": self.gate.door.codes(),
                "reachable": bool(lan), "why_not": None if lan else guest_reach(self.gate.config)}

    def _answer_reply(self, question, events):
        """SSE to a page that asked for it, else one JSON reply once the answer is stored."""
        if "text/event-stream" in bottle.request.headers.get("Accept", ""):
            return event_stream_reply(self._answer_stream(question, events))
        answer = self.chat.stored_answer(events, user=question)
        bottle.response.status = 201
        return {"user": question, "assistant": answer}

    @staticmethod
    def _answer_stream(question, events):
        try:
            if question is not None:
                yield "event: user\ndata: %s\n\n" % json.dumps({"message": question})
            for event in events:
                yield sse_format(event)
        finally:
            events.close()  # the page pressed Stop: what arrived is stored now

    def models(self):
        router = self.router
        mesh_models = router.mesh_models()
        try:
            default = router.resolve_model(None)
        except LLMError:
            default = None
        capabilities = self.capabilities.of_all(list(mesh_models))
        return {"models": [{"name": name, "hosts": [{"node_id": i, "name": n, "local": l} for i, n, l in entries],
                            "capabilities": capabilities[name]} for name, entries in mesh_models.items()],
                "default": default, "llm_hosts": llm_host_count(mesh_models)}

    # -- live events -------------------------------------------------------------------

    def events(self):
        bottle.response.content_type = "text/event-stream"
        bottle.response.set_header("Cache-Control", "no-cache")
        bottle.response.set_header("X-Accel-Buffering", "no")
        return self._event_stream(self.bus.subscribe())

    def _event_stream(self, inbox):
        try:
            yield sse_format({"type": "hello", "data": {"node_id": self.chat.node_id, "name": self.router.node_name},
                              "time": utc_now()})
            while not self.bus.closed:
                try:
                    event = inbox.get(timeout=self.sse_keepalive)
                except queue.Empty:
                    yield ": keep-alive\n\n"  # also how a gone client is noticed
                    continue
                yield sse_format(event)
        finally:
            self.bus.unsubscribe(inbox)


def mesh_call(router, path, body, local_only=False, requester=None):
    """``MeshCalls.call`` for an HTTP route: an LLMError becomes an HTTPFailure."""
    try:
        return MeshCalls(router).call(path, body, local_only, requester)
    except LLMError as exc:
        raise HTTPFailure(exc.status, str(exc))


def pass_on(upstream):
    """Reply with what the host answered, as it answered it (status, type, streamed body)."""
    bottle.response.status = upstream.status
    bottle.response.content_type = upstream.content_type
    return iter(upstream)


def upstream_objects(upstream):
    """The JSON objects of an NDJSON (or one-object JSON) Upstream, as they arrive."""
    buffer = b""
    for chunk in upstream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield parse_json(line, "a line of the answer", MAX_STREAM_LINE)
    if buffer.strip():
        yield parse_json(buffer, "the answer", MAX_FORWARD_BODY)


def pull_help(name, mesh_models):
    """The error of ``/api/pull`` for a model no host serves: which hosts there are, what to run there."""
    hosts = sorted({host for entries in mesh_models.values() for _id, host, _local in entries})
    if not hosts:
        return "model %r is not on the mesh, and no machine of the room shares an LLM yet. " % name + NO_LLM_HELP
    return ("model %r is not on the mesh, and NeuroMesh does not download models. Run `ollama pull %s` on "
            "one of the machines that serve LLMs (%s): the mesh offers it within seconds."
            % (name, name, ", ".join(hosts)))


def conversation_markdown(conversation):
    """A conversation as a Markdown document a person can read, keep and print."""
    lines = ["# %s" % conversation["title"], "",
             "*From %s, %s messages, exported %s.*" % (conversation["origin_name"], len(conversation["messages"]),
                                                       utc_now()[:16].replace("T", " ")), ""]
    for message in conversation["messages"]:
        when = message["timestamp"][:16].replace("T", " ")
        if message["role"] == "assistant":
            who = "Answer by %s" % (message.get("answered_by_name") or message["host_info"]["hostname"] or "the mesh")
            if message.get("answered_by_hosts"):
                names = [host["name"] or host["node_id"][:8] for host in message["answered_by_hosts"]]
                who = "Answer by %s, continued on %s" % (names[0], ", ".join(names[1:]))
            who += " with %s" % message["model"] if message.get("model") else ""
        else:
            who = "%s on %s" % (message["sender"], message["host_info"]["hostname"] or "?")
        lines += ["## %s · %s" % (who, when), "", message["content"], ""]
        if message.get("cut_off"):
            lines += ["*(cut off: this answer stopped before it was complete)*", ""]
    return "\n".join(lines)


def ollama_timestamp():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def ollama_final(model, done, started, key):
    """The closing chunk of an Ollama stream (durations in nanoseconds)."""
    elapsed = int((time.monotonic() - started) * 1e9)
    count = done.get("eval_count") or 0
    rate = done.get("tokens_per_second")
    final = {"model": model, "created_at": ollama_timestamp(), "done": True,
             "done_reason": done.get("done_reason") or "stop", "total_duration": elapsed, "load_duration": 0,
             "prompt_eval_count": done.get("prompt_eval_count") or 0, "prompt_eval_duration": 0, "eval_count": count,
             "eval_duration": int(count / rate * 1e9) if rate else elapsed}
    final.update(key(""))
    return final


class OllamaApi(HttpApi):
    """Ollama's API, answered by the whole mesh (and the original NeuroMesh's ``/api/chat``)."""

    kind = "llm"

    # Chats with any other field (think, format, tools, keep_alive, logprobs, truncate, ...) or
    # messages with any (images, thinking, tool_calls, tool_name) go to the host as they are.
    PLAIN_CHAT = ("model", "messages", "stream", "options")
    PLAIN_GENERATE = ("model", "prompt", "system", "stream", "options")

    def __init__(self, router, chat, gate, pulls):
        HttpApi.__init__(self, router, chat, gate)
        self.pulls = pulls  # ModelPulls: models copied from the room

    def routes(self):
        return [("GET", "/api/tags", self.tags), ("GET", "/api/ps", self.ps), ("GET", "/api/version", self.version),
                ("POST", "/api/chat", self.post_chat), ("POST", "/api/generate", self.post_generate),
                ("POST", "/api/show", self.passed), ("POST", "/api/embed", self.passed),
                ("POST", "/api/embeddings", self.passed), ("POST", "/api/pull", self.pull)]

    def tags(self):
        return MeshInfo(self.router).tags()

    def ps(self):
        return MeshInfo(self.router).ps()

    def version(self):
        return MeshInfo(self.router).version()

    def passed(self, body=None):
        """A request the host that serves its model answers, passed on both ways as it is."""
        body = read_json_body(MAX_FORWARD_BODY) if body is None else body
        if not isinstance(body.get("model") or body.get("name"), str):
            raise HTTPFailure(400, "model is required")
        if bottle.request.path in SLOT_PATHS:
            self.admit_chat()
        return pass_on(mesh_call(self.router, bottle.request.path, body, requester=self.requester()))

    def pull(self):
        """A model a peer shares is copied into this computer's Ollama from the room (ModelPull);
        without an Ollama here, a model on the mesh is "pulled" at once, another is an error."""
        body = read_json_body()
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise HTTPFailure(400, "model is required")
        if self.pulls.wanted(name):
            return self._pull_from_room(name, body.get("stream", True) is not False)
        try:
            self.router.resolve_model(name)
        except LLMError:
            raise HTTPFailure(404, pull_help(name, self.router.mesh_models()))
        if body.get("stream", True) is False:
            return {"status": "success"}
        bottle.response.content_type = "application/x-ndjson"
        return ndjson([{"status": "success"}])

    def _pull_from_room(self, name, stream):
        records = self.pulls.pull(name)
        if not stream:
            try:
                for record in records:
                    pass
            except PullError as exc:
                raise HTTPFailure(500, str(exc))
            return record
        bottle.response.content_type = "application/x-ndjson"
        return ndjson(self._until_error(records))

    @staticmethod
    def _until_error(records):
        try:
            yield from records
        except PullError as exc:
            yield {"error": str(exc)}

    def post_chat(self):
        body = read_json_body(MAX_FORWARD_BODY)
        if isinstance(body.get("message"), str) and "messages" not in body and "model" not in body:
            return self._seed_chat(body)
        check_message_sizes(body)
        messages = body.get("messages")
        if self._others(body, self.PLAIN_CHAT) or not messages or (isinstance(messages, list) and any(
                isinstance(m, dict) and (self._others(m, ("role", "content")) or m.get("role") == "tool")
                for m in messages)):
            return self.passed(body)
        return self._answer(body, clean_chat_messages(messages), self._chat_text)

    def post_generate(self):
        body = read_json_body(MAX_FORWARD_BODY)
        check_message_sizes(body)
        if self._others(body, self.PLAIN_GENERATE) or not body.get("prompt"):
            return self.passed(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise HTTPFailure(400, "prompt must be text")
        messages = [{"role": "user", "content": prompt}]
        if isinstance(body.get("system"), str) and body["system"]:
            messages.insert(0, {"role": "system", "content": body["system"]})
        return self._answer(body, messages, self._generate_text)

    @staticmethod
    def _others(body, plain):
        """True when ``body`` holds a field (not null or empty) other than the ``plain`` ones."""
        return any(key not in plain and value is not None and value != [] and value != {} and value != ""
                   for key, value in body.items())

    def _seed_chat(self, body):
        """The original NeuroMesh's ``POST /api/chat {message, sender}``, kept in the default conversation."""
        content = body_text(body, "message", required=True)
        sender = body_text(body, "sender", limit=100) or "user"
        self.admit_chat()
        return seed_message(self.chat.ask_default(content, sender, body_text(body, "model", limit=200),
                                                  requester=self.requester()))

    def _answer(self, body, messages, key):
        """Streams (NDJSON) or returns one JSON object, as Ollama does; ``key`` shapes the text."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPFailure(400, "model is required")
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        started = time.monotonic()
        self.admit_chat()
        first, events = self.chat.begin(model, messages, options, requester=self.requester())
        model = first.get("model", model)
        if body.get("stream", True) is False:
            parts, done = self.chat.whole(events)
            final = ollama_final(model, done, started, key)
            final.update(key("".join(parts)))
            if done.get("thinking"):
                (final["message"] if "message" in final else final)["thinking"] = done["thinking"]
            return final
        bottle.response.content_type = "application/x-ndjson"
        return ndjson(translate(events, {"token": functools.partial(self._token_chunk, model, key),
                                         "thinking": functools.partial(self._thinking_chunk, model, key),
                                         "done": functools.partial(ollama_final, model, started=started, key=key),
                                         "error": self._error_chunk}))

    @staticmethod
    def _token_chunk(model, key, event):
        chunk = {"model": model, "created_at": ollama_timestamp(), "done": False}
        chunk.update(key(event["content"]))
        return chunk

    @staticmethod
    def _thinking_chunk(model, key, event):
        chunk = {"model": model, "created_at": ollama_timestamp(), "done": False}
        chunk.update(key(""))
        (chunk["message"] if "message" in chunk else chunk)["thinking"] = event["content"]
        return chunk

    @staticmethod
    def _error_chunk(event):
        return {"error": event["error"]}

    @staticmethod
    def _chat_text(text):
        return {"message": {"role": "assistant", "content": text}}

    @staticmethod
    def _generate_text(text):
        return {"response": text}


class OllamaModelsApi(HttpApi):
    """Ollama's model management (``/api/create``, ``/api/copy``, ``/api/delete``, ``/api/push``,
    ``/api/blobs/<digest>``) on this computer's own Ollama, for its owner only (this computer, or
    a --lan-api client with the room code): anyone else gets a 403, never a silent no-op. And
    ``/api/status``: this node's Ollama API at a glance."""

    kind = "llm"
    BLOB_PIECE = 1 * MiB

    def routes(self):
        blob = "/api/blobs/<digest>"
        return [("GET", "/api/status", self.status), ("POST", "/api/create", self.manage),
                ("POST", "/api/copy", self.manage), ("DELETE", "/api/delete", self.manage),
                ("POST", "/api/push", self.manage), ("HEAD", blob, self.blob), ("POST", blob, self.blob)]

    def status(self):
        models = self.router.mesh_models()
        return {"status": "running", "version": MeshInfo(self.router).version()["version"],
                "cloud": {"disabled": True, "source": "neuromesh"},
                "local_models": self.router.local_models(), "mesh_models": len(models),
                "llm_hosts": len({host for entries in models.values() for _id, host, _local in entries})}

    def _own_ollama(self):
        """This computer's Ollama, if the client is its owner; an HTTPFailure saying why not."""
        client = self.gate.client()
        name = self.router.node_name
        if client.role != "owner" and not (client.role == "lan" and self.gate.config.mesh_key):
            raise HTTPFailure(403, "%s changes the models of %s's own Ollama, which only its owner may do: run it "
                                   "on %s itself (or start that node with --lan-api and a room code, and send it)"
                              % (bottle.request.path, name, name))
        backends = [b for b in self.router.local if isinstance(b, OllamaBackend)]
        if not backends:
            raise HTTPFailure(503, "%s runs no Ollama of its own to change: start Ollama there, or ask on the "
                                   "computer that serves the model" % name)
        return backends[0]

    def _send(self, backend, data, **kwargs):
        method, path = bottle.request.method, bottle.request.path
        try:
            response = backend.session.request(method, backend.url + path, data=data, stream=True,
                                               timeout=(backend.connect_timeout, backend.read_timeout), **kwargs)
        except requests.RequestException as exc:
            raise HTTPFailure(502, "the Ollama of %s did not answer %s (%s): is it running?"
                              % (self.router.node_name, path, type(exc).__name__))
        upstream = Upstream.of_response(response)
        if method != "HEAD" and response.status_code < 300:
            upstream.on_close(self.router.refresh_local)  # the mesh hears of the new or gone model
        return pass_on(upstream)

    def manage(self):
        backend = self._own_ollama()
        body = read_json_body(MAX_FORWARD_BODY)
        return self._send(backend, json.dumps(body), headers={"Content-Type": "application/json"})

    def blob(self, digest):
        backend = self._own_ollama()
        if not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
            raise HTTPFailure(400, "a blob's name is sha256:<64 hex digits>, not %r" % safe_text(digest, 80))
        if bottle.request.method == "HEAD":
            return self._send(backend, None)
        length = bottle.request.environ.get("CONTENT_LENGTH") or ""
        if not length.isdigit():
            raise HTTPFailure(411, "send the blob with its Content-Length")
        return self._send(backend, self._pieces(bottle.request.environ["wsgi.input"], int(length)),
                          headers={"Content-Type": "application/octet-stream"})  # sent chunked

    def _pieces(self, source, length):
        """The request body read in pieces (a model file is gigabytes): never all in memory."""
        while length > 0:
            piece = source.read(min(self.BLOB_PIECE, length))
            if not piece:
                return
            length -= len(piece)
            yield piece


class OpenAIApi(HttpApi):
    """The OpenAI API (``/v1/models``, ``/v1/chat/completions``), answered by the whole mesh."""

    error_shape = "openai"
    kind = "llm"
    OPTIONS = (("temperature", "temperature"), ("top_p", "top_p"), ("max_tokens", "num_predict"),
               ("max_completion_tokens", "num_predict"), ("seed", "seed"))

    def __init__(self, router, chat, gate, started):
        HttpApi.__init__(self, router, chat, gate)
        self.created = int(started)  # the models' "created": when this node started (wall clock)

    def routes(self):
        return [("GET", "/v1/models", self.models), ("POST", "/v1/chat/completions", self.post_chat),
                ("GET", "/v1/models/<model_id:path>", self.model), ("POST", "/v1/completions", self.post_completion),
                ("POST", "/v1/embeddings", self.post_embeddings)]

    def models(self):
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": hosts[0][1]}
            for name, hosts in self.router.mesh_models().items()]}

    def model(self, model_id):
        try:
            name = self.router.resolve_model(model_id)
        except LLMError:
            raise HTTPFailure(404, "The model %r does not exist on the mesh" % model_id)
        return {"id": name, "object": "model", "created": self.created,
                "owned_by": self.router.mesh_models()[name][0][1]}

    def _request(self, body):
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPFailure(400, "model is required")
        options = {ours: body[theirs] for theirs, ours in self.OPTIONS
                   if isinstance(body.get(theirs), (int, float)) and not isinstance(body.get(theirs), bool)}
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        return model, options, bool(include_usage)

    def post_chat(self):
        body = read_json_body(MAX_FORWARD_BODY)
        check_message_sizes(body)
        if OpenAIShapes.is_structured(body):
            return OpenAIShapes(self).structured(body)
        messages = clean_chat_messages(body.get("messages"))
        model, options, include_usage = self._request(body)
        self.admit_chat()
        first, events = self.chat.begin(model, messages, options, requester=self.requester())
        reply = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()),
                 "model": first.get("model", model), "include_usage": include_usage}
        if body.get("stream") is True:
            return event_stream_reply(self._stream(reply, events))
        parts, done = self.chat.whole(events)
        return {"id": reply["id"], "object": "chat.completion", "created": reply["created"],
                "model": reply["model"], "system_fingerprint": "neuromesh",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "finish_reason": openai_finish(done)}],
                "usage": openai_usage(done, len(parts))}

    def post_completion(self):
        """``/v1/completions``: the prompt asked as one user message of a chat."""
        body = read_json_body()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise HTTPFailure(400, "prompt must be a string (or a list of one string)")
        check_message_size(prompt)
        model, options, include_usage = self._request(body)
        self.admit_chat()
        first, events = self.chat.begin(model, [{"role": "user", "content": prompt}], options,
                                        requester=self.requester())
        reply = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                 "model": first.get("model", model)}
        if body.get("stream") is True:
            bottle.response.content_type = "text/event-stream"
            return OpenAIShapes.completion_stream(reply, events, include_usage)
        parts, done = self.chat.whole(events)
        return dict(reply, choices=[{"text": "".join(parts), "index": 0, "logprobs": None,
                                     "finish_reason": openai_finish(done)}], usage=openai_usage(done, len(parts)))

    def post_embeddings(self):
        body = read_json_body(MAX_FORWARD_BODY)
        model, _options, _usage = self._request(body)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise HTTPFailure(400, "input must be a string or a list of strings")
        self.admit_chat()
        upstream = mesh_call(self.router, "/api/embed", {"model": model, "input": inputs},
                             requester=self.requester())
        if upstream.status != 200:
            raise HTTPFailure(upstream.status, upstream.error_text())
        reply = upstream.json()
        packed = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(struct.pack("<%df" % len(vector), *vector)).decode("ascii")
                 if packed else vector} for index, vector in enumerate(reply.get("embeddings") or [])]
        count = reply.get("prompt_eval_count") or 0
        return {"object": "list", "data": data, "model": reply.get("model") or model,
                "usage": {"prompt_tokens": count, "total_tokens": count}}

    def _stream(self, reply, events):
        yield self._chunk(reply, {"role": "assistant", "content": ""})
        yield from translate(events, {"token": functools.partial(self._token_chunk, reply),
                                      "done": functools.partial(self._stop_chunk, reply),
                                      "error": self._error_line})
        yield "data: [DONE]\n\n"

    @staticmethod
    def _chunk(reply, delta, finish=None):
        return "data: %s\n\n" % json.dumps({
            "id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"],
            "model": reply["model"], "system_fingerprint": "neuromesh",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def _token_chunk(self, reply, event):
        return self._chunk(reply, {"content": event["content"]})

    def _stop_chunk(self, reply, event):
        usage = ""
        if reply.get("include_usage"):
            usage = "data: %s\n\n" % json.dumps({
                "id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"],
                "model": reply["model"], "choices": [], "usage": openai_usage(event, event.get("eval_count") or 0)})
        return self._chunk(reply, {}, openai_finish(event)) + usage

    @staticmethod
    def _error_line(event):
        return "data: %s\n\n" % json.dumps({"error": {"message": event["error"], "type": "api_error"}})


def openai_finish(done, tool_calls=False):
    if tool_calls:
        return "tool_calls"
    return "length" if done.get("done_reason") == "length" else "stop"


def openai_usage(done, fallback_count=0):
    """OpenAI ``usage`` from a done event or Ollama's final chunk (the host's own counts)."""
    prompt = done.get("prompt_eval_count") if type(done.get("prompt_eval_count")) is int else 0
    completion = done.get("eval_count") if type(done.get("eval_count")) is int else fallback_count
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIShapes:
    """OpenAI chats with tools, JSON output or images: asked as Ollama ``/api/chat`` of a host
    (MeshCalls), the answer turned back into OpenAI's shape, streamed or not."""

    def __init__(self, api):
        self.api = api

    @staticmethod
    def is_structured(body):
        fmt = body.get("response_format")
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        return bool(body.get("tools")) or bool(ollama_format(fmt)) or any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool" or (
                isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image_url"
                                                           for p in m["content"]))) for m in messages)

    def structured(self, body):
        model, options, include_usage = self.api._request(body)
        request = {"model": model, "messages": ollama_messages(body.get("messages")),
                   "stream": body.get("stream") is True, "options": options}
        if body.get("tools"):
            request["tools"] = body["tools"]
        if ollama_format(body.get("response_format")):
            request["format"] = ollama_format(body["response_format"])
        self.api.admit_chat()
        upstream = mesh_call(self.api.router, "/api/chat", request, requester=self.api.requester())
        if upstream.status != 200:
            raise HTTPFailure(upstream.status, upstream.error_text())
        reply = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": model}
        if request["stream"]:
            bottle.response.content_type = "text/event-stream"
            return self.chat_stream(reply, upstream_objects(upstream), include_usage)
        answer = upstream.json()
        said = answer.get("message") or {}
        message = {"role": "assistant", "content": said.get("content") or ""}
        if said.get("tool_calls"):
            message["tool_calls"] = openai_tool_calls(said["tool_calls"])
            message["content"] = message["content"] or None
        return {"id": reply["id"], "object": "chat.completion", "created": reply["created"], "model": model,
                "system_fingerprint": "neuromesh",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": openai_finish(answer, bool(said.get("tool_calls")))}],
                "usage": openai_usage(answer)}

    @staticmethod
    def chat_stream(reply, chunks, include_usage):
        called = False
        yield OpenAIApi._chunk(reply, {"role": "assistant", "content": ""})
        try:
            for chunk in chunks:
                if "error" in chunk:
                    yield OpenAIApi._error_line({"error": _error_text(chunk)})
                    break
                said = chunk.get("message") or {}
                if said.get("content"):
                    yield OpenAIApi._chunk(reply, {"content": said["content"]})
                if said.get("tool_calls"):
                    called = True
                    yield OpenAIApi._chunk(reply, {"tool_calls": openai_tool_calls(said["tool_calls"], indexed=True)})
                if chunk.get("done"):
                    yield OpenAIApi._chunk(reply, {}, openai_finish(chunk, called))
                    if include_usage:
                        yield "data: %s\n\n" % json.dumps(dict(reply, object="chat.completion.chunk", choices=[],
                                                                 usage=openai_usage(chunk)))
        except ValueError as exc:
            yield OpenAIApi._error_line({"error": "the host sent a broken answer: %s" % exc})
        yield "data: [DONE]\n\n"

    @staticmethod
    def completion_stream(reply, events, include_usage):
        def line(text, finish=None, **extra):
            return "data: %s\n\n" % json.dumps(dict(reply, choices=[
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], **extra))
        for event in events:
            if event["type"] == "token":
                yield line(event["content"])
            elif event["type"] == "done":
                yield line("", openai_finish(event))
                if include_usage:
                    yield "data: %s\n\n" % json.dumps(dict(reply, choices=[], usage=openai_usage(event)))
            elif event["type"] == "error":
                yield OpenAIApi._error_line(event)
        yield "data: [DONE]\n\n"


###############################################################################
# Anthropic's Messages and OpenAI's Responses APIs ############################
###############################################################################


class OllamaChats:
    """One chat in Ollama's ``/api/chat`` shape, for the APIs that translate (Anthropic, Responses),
    answered as a stream of Ollama's chunks: a plain chat through ChatService (fair queue,
    mid-answer failover), one with tools, images, thinking or a format passed to its host as it
    is (MeshCalls: fair queue, failover before the first byte)."""

    PASSED = ("tools", "format", "think")

    def __init__(self, api):
        self.api = api

    def is_plain(self, request):
        return not any(request.get(key) is not None for key in self.PASSED) and all(
            set(message) <= {"role", "content"} for message in request["messages"])

    def chunks(self, request):
        """``(model, chunks)`` of an answer that started; an HTTPFailure if none can start."""
        api = self.api
        check_message_sizes(request)
        api.admit_chat()
        if self.is_plain(request):
            first, events = api.chat.begin(request["model"], clean_chat_messages(request["messages"]),
                                           request.get("options") or {}, requester=api.requester())
            return first.get("model", request["model"]), self._of_events(events)
        upstream = mesh_call(api.router, "/api/chat", dict(request, stream=True), requester=api.requester())
        if upstream.status != 200:
            raise HTTPFailure(upstream.status, upstream.error_text())
        return request["model"], self._of_upstream(upstream)

    @staticmethod
    def _of_events(events):
        for event in events:
            if event["type"] in ("token", "thinking"):
                key = "content" if event["type"] == "token" else "thinking"
                yield {"message": {"role": "assistant", key: event["content"]}, "done": False}
            elif event["type"] == "done":
                yield dict({key: event.get(key) for key in ("done_reason", "eval_count", "prompt_eval_count")},
                           done=True)
            elif event["type"] == "error":
                yield {"error": event["error"]}

    @staticmethod
    def _of_upstream(upstream):
        try:
            for chunk in upstream_objects(upstream):
                yield chunk if isinstance(chunk, dict) else {"error": "the host sent a broken answer"}
        except ValueError as exc:
            yield {"error": "the host sent a broken answer: %s" % exc}

    @staticmethod
    def whole(chunks):
        """``{content, thinking, tool_calls, done}`` of an answer read to its end; an HTTPFailure if it fails."""
        answer = {"content": [], "thinking": [], "tool_calls": []}
        for chunk in chunks:
            if "error" in chunk:
                raise HTTPFailure(502, _error_text(chunk))
            texts, calls = said_in(chunk, ("thinking", "content"))
            for key, text in texts:
                answer[key].append(text)
            answer["tool_calls"] += [call for call in calls if isinstance(call, dict)]
            if chunk.get("done"):
                return dict(answer, content="".join(answer["content"]), thinking="".join(answer["thinking"]),
                            done=chunk)
        raise HTTPFailure(503, "the answer ended without a result")


def said_in(chunk, names):
    """What one Ollama chat chunk said: ``[(name, text)]`` of its thinking (``names[0]``) and its
    content (``names[1]``) where they hold text, and its tool calls (a list, whatever the host sent)."""
    said = chunk.get("message") if isinstance(chunk.get("message"), dict) else {}
    texts = [(name, said[key]) for name, key in zip(names, ("thinking", "content"))
             if isinstance(said.get(key), str) and said[key]]
    return texts, tool_calls_of(said)


def tool_calls_of(said):
    """The tool calls of an Ollama message from a host (a list, whatever the host sent)."""
    return said.get("tool_calls") if isinstance(said.get("tool_calls"), list) else []


def number_options(body, names):
    """``{ours: body[theirs]}`` for the numbers of ``names`` (``(theirs, ours)`` pairs) the body holds."""
    return {ours: body[theirs] for theirs, ours in names
            if isinstance(body.get(theirs), (int, float)) and not isinstance(body.get(theirs), bool)}


def text_of_parts(content, kinds=("text",)):
    """A message's text: a string as it is, or the text of the content parts of ``kinds``."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if isinstance(part, dict)
                   and part.get("type") in kinds and isinstance(part.get("text") or "", str))


def tool_call_of(call_id, name, arguments):
    """An Ollama tool call; ``arguments`` an object or its JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise HTTPFailure(400, "the arguments of tool call %s are not JSON" % safe_text(call_id, 80))
    call = {"function": {"name": name if isinstance(name, str) else "",
                         "arguments": arguments if isinstance(arguments, dict) else {}}}
    if isinstance(call_id, str):
        call["id"] = call_id
    return call


def check_image(data):
    """Base64 image data as Ollama takes it, or an HTTPFailure."""
    if not isinstance(data, str) or not data or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", data[:4096]):
        raise HTTPFailure(400, "an image must be base64 data (a data: URL or Anthropic's base64 source)")
    return data


class AnthropicShapes:
    """Anthropic Messages requests as Ollama chats, and Ollama's answers back as Anthropic's
    messages (whole, or as its server-sent events: ``answer(model, body)``). What Claude Code and
    the tools built on Anthropic's SDKs speak."""

    path, error_shape = "/v1/messages", "anthropic"
    STOP_REASONS = {"length": "max_tokens"}

    @staticmethod
    def answer(model, _body):
        return AnthropicStream("msg_" + uuid.uuid4().hex[:24], model)

    @classmethod
    def request(cls, body):
        """The Ollama ``/api/chat`` body of a Messages request; an HTTPFailure for what is wrong."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPFailure(400, "model: a model name is required")
        if type(body.get("max_tokens")) is not int or body["max_tokens"] < 1:
            raise HTTPFailure(400, "max_tokens: a whole number of at least 1 is required")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise HTTPFailure(400, "messages: a non-empty list of {role, content} is required")
        messages, names = [], {}
        system = text_of_parts(body.get("system")) if isinstance(body.get("system"), (str, list)) else ""
        if system:
            messages.append({"role": "system", "content": system})
        for message in body["messages"]:
            messages += cls.message(message, names)
        options = dict(number_options(body, (("temperature", "temperature"), ("top_p", "top_p"),
                                             ("top_k", "top_k"))), num_predict=body["max_tokens"])
        stops = body.get("stop_sequences")
        if isinstance(stops, list) and stops:
            options["stop"] = [stop for stop in stops if isinstance(stop, str)]
        request = {"model": model, "messages": messages, "options": options}
        tools = [{"type": "function", "function": {"name": tool["name"], "description": tool.get("description") or "",
                                                   "parameters": tool.get("input_schema") or {"type": "object"}}}
                 for tool in body.get("tools") or [] if isinstance(tool, dict) and isinstance(tool.get("name"), str)]
        if tools:
            request["tools"] = tools
        thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
        if thinking.get("type") in ("enabled", "adaptive", "between_tools", "disabled"):
            request["think"] = thinking["type"] != "disabled"
        output = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
        if isinstance(output.get("format"), dict) and isinstance(output["format"].get("schema"), dict):
            request["format"] = output["format"]["schema"]
        return request

    @staticmethod
    def message(message, names):
        """The Ollama messages of one Anthropic message: tool results become ``tool`` messages."""
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise HTTPFailure(400, "messages: each message's role must be user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            return [{"role": message["role"], "content": content}]
        if not isinstance(content, list):
            raise HTTPFailure(400, "messages: content must be text or a list of content blocks")
        results, item = [], {"role": message["role"], "content": text_of_parts(content)}
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "image":
                source = block.get("source") if isinstance(block.get("source"), dict) else {}
                if source.get("type") != "base64":
                    raise HTTPFailure(400, "images must be sent as base64 data (source type base64): "
                                           "the LLMs of the mesh cannot fetch a URL")
                item.setdefault("images", []).append(check_image(source.get("data")))
            elif kind == "tool_use":
                names[block.get("id")] = block.get("name")
                item.setdefault("tool_calls", []).append(tool_call_of(block.get("id"), block.get("name"),
                                                                      block.get("input")))
            elif kind == "tool_result":
                results.append({"role": "tool", "content": text_of_parts(block.get("content")),
                                "tool_name": names.get(block.get("tool_use_id")) or ""})
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                item["thinking"] = item.get("thinking", "") + block["thinking"]
        return results + ([item] if item["content"] or len(item) > 2 or not results else [])

    @classmethod
    def reply(cls, reply_id, model, answer):
        """The whole Anthropic message of an answer (OllamaChats.whole)."""
        blocks = [{"type": "thinking", "thinking": answer["thinking"], "signature": ""}] if answer["thinking"] else []
        if answer["content"] or not answer["tool_calls"]:
            blocks.append({"type": "text", "text": answer["content"]})
        blocks += [cls.tool_use(call) for call in answer["tool_calls"]]
        return dict(cls.start(reply_id, model), content=blocks,
                    stop_reason=cls.stop_reason(answer["done"], answer["tool_calls"]),
                    usage=cls.usage(answer["done"]))

    @staticmethod
    def start(reply_id, model):
        return {"id": reply_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}

    @classmethod
    def stop_reason(cls, done, called):
        reason = done.get("done_reason")
        return "tool_use" if called else cls.STOP_REASONS.get(reason if isinstance(reason, str) else "", "end_turn")

    @staticmethod
    def usage(done):
        usage = openai_usage(done)
        return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}

    @staticmethod
    def tool_use(call):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = {"arguments": arguments}
        return {"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                "name": function.get("name") or "", "input": arguments if isinstance(arguments, dict) else {}}


class AnthropicStream:
    """Ollama's chunks as Anthropic's server-sent events: ``message_start``, a block (thinking,
    text, tool use) started, filled by deltas and stopped each time the kind of output changes,
    then ``message_delta`` (stop reason, usage) and ``message_stop``; ``error`` if the answer fails.
    ``whole(answer)``: the same answer as one Message, for a client that did not ask for a stream."""

    DELTAS = {"thinking": ("thinking_delta", "thinking"), "text": ("text_delta", "text")}

    def __init__(self, reply_id, model):
        self.reply_id, self.model = reply_id, model
        self.index, self.open = -1, None

    def whole(self, answer):
        return AnthropicShapes.reply(self.reply_id, self.model, answer)

    @staticmethod
    def event(kind, **data):
        return "event: %s\ndata: %s\n\n" % (kind, json.dumps(dict(data, type=kind)))

    def _stop(self):
        if self.open is not None:
            self.open = None
            yield self.event("content_block_stop", index=self.index)

    def _begin(self, block):
        yield from self._stop()
        self.index += 1
        self.open = block["type"]
        yield self.event("content_block_start", index=self.index, content_block=block)

    def _text(self, kind, text):
        if self.open != kind:
            yield from self._begin({"type": kind, kind: ""} if kind == "text" else
                                   {"type": kind, kind: "", "signature": ""})
        delta, key = self.DELTAS[kind]
        yield self.event("content_block_delta", index=self.index, delta={"type": delta, key: text})

    def events(self, chunks):
        yield self.event("message_start", message=AnthropicShapes.start(self.reply_id, self.model))
        called = False
        for chunk in chunks:
            if "error" in chunk:
                yield from self._stop()
                yield self.event("error", error={"type": "api_error", "message": _error_text(chunk)})
                return
            texts, calls = said_in(chunk, ("thinking", "text"))
            for kind, text in texts:
                yield from self._text(kind, text)
            for call in calls:
                called = True
                block = AnthropicShapes.tool_use(call if isinstance(call, dict) else {})
                yield from self._begin(dict(block, input={}))
                yield self.event("content_block_delta", index=self.index,
                                 delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                yield from self._stop()
            if chunk.get("done"):
                yield from self._stop()
                yield self.event("message_delta", delta={"stop_reason": AnthropicShapes.stop_reason(chunk, called),
                                                         "stop_sequence": None}, usage=AnthropicShapes.usage(chunk))
                yield self.event("message_stop")
                return
        yield from self._stop()
        yield self.event("error", error={"type": "api_error", "message": "the answer ended without a result"})


class TranslatedApi(HttpApi):
    """Another vendor's chat API, answered by the whole mesh in the shapes of its ``dialect``
    (AnthropicShapes: Anthropic's Messages API; ResponsesShapes: OpenAI's Responses API, stateless
    as Ollama's is): ``dialect.request(body)`` makes the request an Ollama chat, and what
    ``dialect.answer(model, body)`` returns turns the answer back, streamed or whole."""

    kind = "llm"

    def __init__(self, router, chat, gate, dialect):
        HttpApi.__init__(self, router, chat, gate)
        self.dialect = dialect
        self.error_shape = dialect.error_shape

    def routes(self):
        return [("POST", self.dialect.path, self.post)]

    def post(self):
        body = read_json_body(MAX_FORWARD_BODY)
        model, chunks = OllamaChats(self).chunks(self.dialect.request(body))
        answer = self.dialect.answer(model, body)
        if body.get("stream") is True:
            return event_stream_reply(answer.events(chunks))
        return answer.whole(OllamaChats.whole(chunks))


class ResponsesShapes:
    """OpenAI Responses requests as Ollama chats (stateless, as Ollama's are), and Ollama's
    answers back as a Response: reasoning, message and function-call output items, whole or as
    server-sent events (``answer(model, body)``)."""

    OPTIONS = (("temperature", "temperature"), ("top_p", "top_p"), ("max_output_tokens", "num_predict"))
    path, error_shape = "/v1/responses", "openai"

    @classmethod
    def answer(cls, model, body):
        return ResponsesStream(cls.skeleton("resp_" + uuid.uuid4().hex[:24], model, body))

    @classmethod
    def request(cls, body):
        if body.get("previous_response_id") is not None:
            raise HTTPFailure(400, "previous_response_id is not supported: the mesh keeps no responses (it is "
                                   "stateless, as Ollama is); send the whole conversation in 'input'")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPFailure(400, "model is required")
        messages = [{"role": "system", "content": body["instructions"]}] if isinstance(
            body.get("instructions"), str) and body["instructions"] else []
        given = body.get("input")
        if isinstance(given, str):
            messages.append({"role": "user", "content": given})
        elif isinstance(given, list) and given:
            names, thinking = {}, []
            for item in given:
                messages += cls.item(item, names, thinking)
        else:
            raise HTTPFailure(400, "input must be text or a non-empty list of input items")
        request = {"model": model, "messages": messages, "options": number_options(body, cls.OPTIONS)}
        tools = [{"type": "function", "function": {"name": tool["name"], "description": tool.get("description") or "",
                                                   "parameters": tool.get("parameters") or {"type": "object"}}}
                 for tool in body.get("tools") or []
                 if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("name"), str)]
        if tools:
            request["tools"] = tools
        fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            request["format"] = fmt.get("schema") if isinstance(fmt.get("schema"), dict) else "json"
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            request["format"] = "json"
        effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
        if effort in ("low", "medium", "high"):
            request["think"] = effort
        elif effort in ("none", "minimal"):
            request["think"] = False
        return request

    @staticmethod
    def item(item, names, thinking):
        """The Ollama messages of one input item (a message, a function call or its output)."""
        if not isinstance(item, dict):
            raise HTTPFailure(400, "each input item must be an object")
        kind = item.get("type") or "message"
        if kind == "reasoning":
            thinking += [part.get("text") or "" for part in item.get("summary") or [] if isinstance(part, dict)]
            return []
        if kind == "function_call":
            names[item.get("call_id")] = item.get("name")
            said = {"role": "assistant", "content": "",
                    "tool_calls": [tool_call_of(item.get("call_id"), item.get("name"), item.get("arguments"))]}
        elif kind == "function_call_output":
            output = item.get("output")
            return [{"role": "tool", "content": output if isinstance(output, str) else text_of_parts(
                output, ("input_text", "output_text")), "tool_name": names.get(item.get("call_id")) or ""}]
        elif kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            content = item.get("content")
            said = {"role": "system" if item["role"] == "developer" else item["role"],
                    "content": text_of_parts(content, ("input_text", "output_text", "text"))}
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and part.get("type") == "input_image":
                    url = part.get("image_url")
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise HTTPFailure(400, "an input_image must be a base64 data: URL: the LLMs of the mesh "
                                               "cannot fetch a URL or a file id")
                    said.setdefault("images", []).append(check_image(url.split(",", 1)[-1]))
        else:
            raise HTTPFailure(400, "input items of type %r are not supported here" % safe_text(str(kind), 40))
        if said["role"] == "assistant" and thinking:
            said["thinking"] = "".join(thinking)
            del thinking[:]
        return [said]

    @staticmethod
    def skeleton(response_id, model, body, status="in_progress"):
        text = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
        return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
                "model": model, "output": [], "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "metadata": {}, "parallel_tool_calls": True,
                "temperature": body.get("temperature"), "top_p": body.get("top_p"), "tool_choice": "auto",
                "tools": body.get("tools") or [], "text": text, "store": False,
                "max_output_tokens": body.get("max_output_tokens"), "previous_response_id": None, "usage": None}

    @staticmethod
    def usage(done):
        usage = openai_usage(done)
        return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}

    @staticmethod
    def reasoning(item_id, text):
        return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}]}

    @staticmethod
    def message(item_id, text, status="completed"):
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def function_call(call):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24],
                "call_id": call.get("id") or "call_" + uuid.uuid4().hex[:24], "name": function.get("name") or "",
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
                "status": "completed"}

    @classmethod
    def reply(cls, skeleton, answer):
        output = [cls.reasoning("rs_" + uuid.uuid4().hex[:24], answer["thinking"])] if answer["thinking"] else []
        if answer["content"] or not answer["tool_calls"]:
            output.append(cls.message("msg_" + uuid.uuid4().hex[:24], answer["content"]))
        output += [cls.function_call(call) for call in answer["tool_calls"]]
        return cls.finished(skeleton, output, answer["done"])

    @classmethod
    def finished(cls, skeleton, output, done):
        cut = done.get("done_reason") == "length"
        return dict(skeleton, status="incomplete" if cut else "completed", output=output, usage=cls.usage(done),
                    incomplete_details={"reason": "max_output_tokens"} if cut else None)


class ResponsesStream:
    """Ollama's chunks as the Responses API's server-sent events: ``response.created``, each output
    item added, filled (``response.reasoning_summary_text.delta``, ``response.output_text.delta``,
    ``response.function_call_arguments.*``) and done, then ``response.completed``; ``error`` and
    ``response.failed`` if the answer fails. ``whole(answer)``: the same answer as one Response."""

    def __init__(self, skeleton):
        self.skeleton = skeleton
        self.sequence = 0
        self.output, self.open, self.text = [], None, []

    def whole(self, answer):
        return ResponsesShapes.reply(self.skeleton, answer)

    def event(self, kind, **data):
        self.sequence += 1
        return "event: %s\ndata: %s\n\n" % (kind, json.dumps(dict(data, type=kind, sequence_number=self.sequence)))

    def _close(self):
        if self.open is None:
            return
        item, text = self.open, "".join(self.text)
        index = len(self.output)
        self.open, self.text = None, []
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            yield self.event("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                             summary_index=0, text=text)
            yield self.event("response.reasoning_summary_part.done", item_id=item["id"], output_index=index,
                             summary_index=0, part=part)
            done = ResponsesShapes.reasoning(item["id"], text)
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            yield self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=text, logprobs=[])
            yield self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                             part=part)
            done = ResponsesShapes.message(item["id"], text)
        self.output.append(done)
        yield self.event("response.output_item.done", output_index=index, item=done)

    def _text(self, kind, text):
        index = len(self.output)
        if self.open is None or self.open["type"] != kind:
            yield from self._close()
            if kind == "reasoning":
                self.open = dict(ResponsesShapes.reasoning("rs_" + uuid.uuid4().hex[:24], ""), summary=[])
                yield self.event("response.output_item.added", output_index=index, item=self.open)
                yield self.event("response.reasoning_summary_part.added", item_id=self.open["id"], output_index=index,
                                 summary_index=0, part={"type": "summary_text", "text": ""})
            else:
                self.open = dict(ResponsesShapes.message("msg_" + uuid.uuid4().hex[:24], "", "in_progress"),
                                 content=[])
                yield self.event("response.output_item.added", output_index=index, item=self.open)
                yield self.event("response.content_part.added", item_id=self.open["id"], output_index=index,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                        "logprobs": []})
        self.text.append(text)
        if kind == "reasoning":
            yield self.event("response.reasoning_summary_text.delta", item_id=self.open["id"], output_index=index,
                             summary_index=0, delta=text)
        else:
            yield self.event("response.output_text.delta", item_id=self.open["id"], output_index=index,
                             content_index=0, delta=text, logprobs=[])

    def _call(self, call):
        yield from self._close()
        item, index = ResponsesShapes.function_call(call), len(self.output)
        yield self.event("response.output_item.added", output_index=index,
                         item=dict(item, arguments="", status="in_progress"))
        yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=item["arguments"])
        yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         name=item["name"], arguments=item["arguments"])
        self.output.append(item)
        yield self.event("response.output_item.done", output_index=index, item=item)

    def events(self, chunks):
        yield self.event("response.created", response=self.skeleton)
        yield self.event("response.in_progress", response=self.skeleton)
        for chunk in chunks:
            if "error" in chunk:
                yield from self._close()
                message = _error_text(chunk)
                yield self.event("error", code="api_error", message=message, param=None)
                yield self.event("response.failed", response=dict(self.skeleton, status="failed", output=self.output,
                                                                  error={"code": "server_error", "message": message}))
                return
            texts, calls = said_in(chunk, ("reasoning", "message"))
            for kind, text in texts:
                yield from self._text(kind, text)
            for call in calls:
                yield from self._call(call if isinstance(call, dict) else {})
            if chunk.get("done"):
                yield from self._close()
                final = ResponsesShapes.finished(self.skeleton, self.output, chunk)
                yield self.event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                                 response=final)
                return
        yield from self._close()
        yield self.event("error", code="api_error", message="the answer ended without a result", param=None)


class RelayApi(HttpApi):
    """The relay: peers that were granted access (LREQ:) chat with this node's own LLM."""

    kind = "relay"

    def routes(self):
        return [("POST", RELAY_PATH, self.post_chat), ("POST", RELAY_FORWARD_PATH, self.post_forward)]

    def _check_token(self):
        """The node id the token was given to. 403 for a request that did not come on a relay
        connection (the HTTP port: plain text on the LAN); 401 for no valid token, or one given
        to another node than the relay connection's (RelayServer: who asks comes from it)."""
        connected = bottle.request.environ.get(RelayServer.PEER_KEY)
        if connected is None:
            raise HTTPFailure(403, "%s's relay answers peers only on their TLS connection to its mesh port, "
                                   "never over plain HTTP" % self.router.node_name)
        header = bottle.request.headers.get("Authorization", "")
        holder = self.router.tokens.holder(header[7:] if header.startswith("Bearer ") else "")
        if holder is None or holder != connected:
            raise HTTPFailure(401, "no valid LLM access token: ask for access over the mesh link (LREQ:)")
        return holder

    def _admit(self, requester):
        """503 while the owner paused sharing (the peer's router places the chat elsewhere), 429
        past the requester's or its node's rate (Gatekeeper.admit_relay), 503 when --max-queued
        chats already wait here."""
        if self.router.policy.paused:
            raise HTTPFailure(503, "%s paused sharing its LLM for now: the chat goes to another host"
                              % self.router.node_name, retry_after=30)
        self.gate.admit_relay(requester)
        self.chat.admit()

    def post_forward(self):
        """Any request kind of MeshCalls (``{"path", "body"}``), answered by this node's own LLMs,
        the answer passed back as the LLM gave it: text, tool calls, JSON, embeddings."""
        holder = self._check_token()
        body = read_json_body(MAX_FORWARD_BODY)
        path, inner = body.get("path"), body.get("body") if isinstance(body.get("body"), dict) else {}
        if path in INFO_PATHS:
            return MeshInfo(self.router).local(path)
        if path not in FORWARD_PATHS:
            raise HTTPFailure(404, "the relay does not carry %s" % safe_text(path, 80))
        check_message_sizes(inner)
        requester = self.requester_of(holder, body)
        if path in SLOT_PATHS:
            self._admit(requester)
        return pass_on(mesh_call(self.router, path, inner, local_only=True, requester=requester))

    @staticmethod
    def requester_of(holder, body):
        """The peer the token names, and the client on it that the body tags (its own business)."""
        return Requester(holder, Requester.clean_tag(body.get("requester")))

    def post_chat(self):
        holder = self._check_token()
        body = read_json_body()
        messages = clean_chat_messages(body.get("messages"))
        model = body.get("model") if isinstance(body.get("model"), str) else None
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        requester = self.requester_of(holder, body)
        self._admit(requester)
        events = self.chat.stream(model, messages, options, local_only=True, requester=requester)
        bottle.response.content_type = "application/x-ndjson"
        return ndjson(translate(events, {"queued": self._queued_line, "token": self._token_line,
                                         "thinking": self._thinking_line, "done": self._done_line,
                                         "error": self._error_line}))

    @staticmethod
    def _queued_line(event):
        return {"queued": event["position"], "node_name": event["node_name"]}

    @staticmethod
    def _token_line(event):
        return {"message": {"role": "assistant", "content": event["content"]}, "done": False}

    @staticmethod
    def _thinking_line(event):
        return {"message": {"role": "assistant", "content": "", "thinking": event["content"]}, "done": False}

    @staticmethod
    def _done_line(event):
        return {"done": True, "done_reason": event.get("done_reason") or "stop",
                "eval_count": event.get("eval_count"), "tokens_per_second": event.get("tokens_per_second"),
                "prompt_eval_count": event.get("prompt_eval_count")}

    @staticmethod
    def _error_line(event):
        return {"error": event["error"], "status": event["status"]}


###############################################################################
# The teacher's room ##########################################################
###############################################################################


ROOM_FILE = "room.json"  # inside a room's .pyz: its room code and teacher
_RUNTIME_PACKAGES = ("bottle", "waitress", "ifaddr", "requests", "ecdsa", "six",
                     "urllib3", "idna", "charset_normalizer", "certifi")


def bundled_room():
    """``{"mesh_key", "teacher"}`` of the room file inside this bundle ({} when run otherwise)."""
    try:
        if ARCHIVE is not None:
            with zipfile.ZipFile(ARCHIVE) as archive:
                text = archive.read(ROOM_FILE).decode("utf-8")
        elif BUNDLED:
            with open(os.path.join(HERE, ROOM_FILE), encoding="utf-8") as handle:
                text = handle.read()
        else:
            return {}
        room = parse_json(text, "room file")
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return {}
    return {key: room[key] for key in ("mesh_key", "teacher") if isinstance(room.get(key), str)}


class RoomBundle:
    """The room's .pyz: this program, its page and its runtime packages, with the room code and the
    teacher's fingerprint inside (``room.json``), so students run one file and obey this teacher."""

    def __init__(self, mesh_key, teacher):
        self.room = {"mesh_key": mesh_key, "teacher": teacher}

    def build(self):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            if ARCHIVE is not None:
                with zipfile.ZipFile(ARCHIVE) as source:
                    for name in source.namelist():
                        if name != ROOM_FILE:
                            archive.writestr(name, source.read(name))
            else:
                self._add_sources(archive)
            archive.writestr(ROOM_FILE, json.dumps(self.room))
        return b"#!/usr/bin/env python3\n" + out.getvalue()

    @staticmethod
    def _add_sources(archive):
        archive.write(os.path.abspath(__file__), "neuromesh.py")
        archive.writestr("__main__.py", "import sys\nsys.dont_write_bytecode = True\nimport neuromesh\n"
                                        "sys.exit(neuromesh.main())\n")
        for name in sorted(os.listdir(STATIC_DIR)):
            archive.write(os.path.join(STATIC_DIR, name), "neuromesh_static/" + name)
        for package in _RUNTIME_PACKAGES:
            module = sys.modules.get(package) or importlib.import_module(package)
            path = module.__file__
            if os.path.basename(path) != "__init__.py":
                archive.write(path, os.path.basename(path))
                continue
            top = os.path.dirname(path)
            for folder, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    if not name.endswith((".pyc", ".so", ".pyd")):
                        full = os.path.join(folder, name)
                        archive.write(full, os.path.join(package, os.path.relpath(full, top)))


class RoomApi(HttpApi):
    """The room as pages see it: a student's view of the teacher's rules and their "Show my teacher"
    shares; on the teacher's own computer, the teacher's view, which holds counts and names, never a
    student's text unless that student shared that one chat. ``teacher``: the teacher's key on the
    teacher's computer, else None."""

    def __init__(self, router, chat, gate, conversations, mesh, room, teacher=None):
        HttpApi.__init__(self, router, chat, gate)
        self.conversations = conversations
        self.mesh = mesh
        self.rules = room
        self.teacher = teacher

    def routes(self):
        return [("GET", "/api/room", self.room), ("POST", "/api/room/share", self.share),
                ("GET", "/api/teacher", self.overview), ("POST", "/api/teacher/policy", self.set_policy),
                ("GET", "/api/teacher/shared/<conversation_id>", self.shared_conversation),
                ("GET", "/api/teacher/room.pyz", self.bundle),
                ("POST", "/api/teacher/clear-guests", self.clear_guests)]

    def room(self):
        """The rules this page's chats obey: the teacher, pause and reason, instructions, quota left."""
        rules = self.rules
        policy = rules.policy()
        answer = {"teacher": rules.teacher_id, "is_teacher": self.teacher is not None,
                  "policy": policy, "shown": sorted(rules.shown_by(self.chat.node_id)),
                  "quota_left": rules.quota_left(self.requester())}
        if not rules.teacher_id:
            answer["message"] = "no teacher in this room"
        elif policy is None:
            answer["message"] = "the teacher has set no rules yet"
        answer["teacher_name"] = (policy or {}).get("teacher_name") or None
        return answer

    def share(self):
        """``POST /api/room/share {"conversation_id", "shown"}``: show this node's own chat to the
        teacher, or take it back."""
        body = read_json_body()
        if self.gate.client().guest is not None:
            raise HTTPFailure(403, "only the owner of %s can show a chat to the teacher" % self.router.node_name)
        cid, shown = body_text(body, "conversation_id", required=True, limit=100), body.get("shown") is not False
        record = self.chat.record(cid)
        if not record["own"] or record["private"]:
            raise HTTPFailure(403, "only your own shared (not private) chats can be shown to the teacher")
        if not self.rules.teacher_id:
            raise HTTPFailure(409, "no teacher in this room: there is no one to show it to")
        current = self.rules.shown_by(self.chat.node_id)
        wanted = (current | {cid}) if shown else (current - {cid})
        self.rules.write_own(shown_to_teacher={"teacher": self.rules.teacher_id, "conversations": sorted(wanted)})
        return {"shown": sorted(wanted)}

    def _teacher(self):
        if self.teacher is None or self.gate.client().role != "owner":
            raise HTTPFailure(403, "the teacher's view is only on the teacher's own computer (`neuromesh.py teacher`)")

    def overview(self):
        """Aggregates, not transcripts: who is up, chats and longest wait per student in the last hour,
        each host's queue, and the chats students chose to show."""
        self._teacher()
        since = format_timestamp(datetime.now(timezone.utc) - timedelta(hours=1))
        activity = self.conversations.room.activity_since(since)
        peers = self.mesh.peers()
        students = [{"node_id": p["node_id"], "name": p["name"], "online": p["connected"],
                     "chats_last_hour": activity.get(p["node_id"], {}).get("chats", 0),
                     "longest_wait_s": activity.get(p["node_id"], {}).get("waited", 0.0)}
                    for p in peers]
        hosts = [{"name": p["name"], "up": p["connected"], "models": p["models"], "load": p["load"]}
                 for p in peers if p["has_llm"] or p["models"]]
        if self.router.has_local_llm:
            hosts.insert(0, {"name": self.router.node_name, "up": True, "models": self.router.local_models(),
                             "load": self.router.local_load()})
        waited = max(students, key=lambda s: s["longest_wait_s"], default=None)
        names = {p["node_id"]: p["name"] for p in peers}
        shared = [dict(self._shared_record(cid), shared_by=names.get(owner) or owner[:8])
                  for cid, owner in sorted(self.rules.shared().items())]
        return {"students": students, "hosts": hosts, "policy": self.rules.policy(),
                "waited_longest": waited["name"] if waited and waited["longest_wait_s"] else None,
                "shared": [record for record in shared if record.get("id")],
                "guest_chats": sum(self.rules.guest_chat_counts().values()),
                "teacher": self.rules.teacher_id}

    def _shared_record(self, cid):
        try:
            record = self.conversations.get_conversation_record(cid)
        except StoreError:
            return {}
        return {"id": cid, "title": record["title"]} if record else {}

    def shared_conversation(self, conversation_id):
        self._teacher()
        owner = self.rules.shared().get(conversation_id)
        if owner is None:
            raise HTTPFailure(404, "no student shows you the chat %s" % safe_text(conversation_id, 80))
        conversation = self.conversations.get_conversation(conversation_id)
        if conversation is None:
            raise HTTPFailure(404, "the chat %s has not reached this computer yet" % safe_text(conversation_id, 80))
        names = {p["node_id"]: p["name"] for p in self.mesh.peers()}
        return dict(conversation, shared_by=names.get(owner) or conversation.get("origin_name"))

    def set_policy(self):
        """``POST /api/teacher/policy``: the room's new rules, signed with the teacher key."""
        self._teacher()
        body = read_json_body()
        asked = (self.rules.policy() or {}).get("clear_guests")  # nodes offline then still clear later
        policy = clean_policy(dict(body, teacher_name=self.router.node_name, teacher_node=self.chat.node_id,
                                   clear_guests=asked))
        teacher = self.teacher.node_id
        self.conversations.write_control(teacher, "%s.%s" % (teacher, POLICY_SUFFIX), {"policy": policy})
        return self.rules.policy()

    def clear_guests(self):
        """``POST /api/teacher/clear-guests {"count"}``: every node deletes the chats its guests
        wrote; ``count`` is the number the teacher confirmed (the page names it)."""
        self._teacher()
        body = read_json_body()
        count = sum(self.rules.guest_chat_counts().values())
        if body.get("count") != count:
            raise HTTPFailure(409, "the room holds %d guests' chats now, not %s: confirm that number"
                              % (count, safe_text(body.get("count"), 20)))
        policy = dict(self.rules.policy() or {}, clear_guests=utc_now())
        teacher = self.teacher.node_id
        self.conversations.write_control(teacher, "%s.%s" % (teacher, POLICY_SUFFIX), {"policy": policy})
        self.rules.clear_guests()
        return {"clearing": count}

    def bundle(self):
        """``GET /api/teacher/room.pyz``: NeuroMesh for this room, to hand to students."""
        self._teacher()
        data = RoomBundle(self.gate.config.mesh_key, self.teacher.node_id).build()
        bottle.response.content_type = "application/zip"
        bottle.response.set_header("Content-Disposition", 'attachment; filename="neuromesh-room.pyz"')
        return data


class ModelRelayApi(RelayApi):
    """Model transfer on the relay: peers holding this node's relay token read what it
    shares (``/relay/models``), a blob's chunk list, and a blob's bytes by range. Read only."""

    def __init__(self, router, chat, gate, share):
        RelayApi.__init__(self, router, chat, gate)
        self.share = share  # ModelShare: what this node shares of its Ollama's models

    def routes(self):
        return [("GET", MODELS_RELAY_PATH, self.models),
                ("GET", BLOBS_RELAY_PATH + "/<digest>/chunks", self.chunks),
                ("GET", BLOBS_RELAY_PATH + "/<digest>", self.blob)]

    def models(self):
        self._check_token()
        return self.share.catalog()

    def chunks(self, digest):
        self._check_token()
        hashes = self.share.chunk_hashes(self._hex(digest))
        if hashes is None:
            raise HTTPFailure(404, "%s does not share that blob" % self.router.node_name)
        return {"chunk": TRANSFER_CHUNK, "hashes": hashes}

    def blob(self, digest):
        self._check_token()
        hex_digest = self._hex(digest)
        share = self.share
        size = share.blob_size(hex_digest)
        if size is None:
            raise HTTPFailure(404, "%s does not share that blob" % self.router.node_name)
        start, end = self._range(bottle.request.headers.get("Range"), size)
        try:
            _size, pieces = share.open_range(hex_digest, start, end)
        except LookupError as exc:
            raise HTTPFailure(404, "%s: %s" % (self.router.node_name, exc))
        bottle.response.content_type = "application/octet-stream"
        bottle.response.headers["Content-Length"] = str(end - start)
        bottle.response.headers["Accept-Ranges"] = "bytes"
        if bottle.request.headers.get("Range"):
            bottle.response.status = 206
            bottle.response.headers["Content-Range"] = "bytes %d-%d/%d" % (start, end - 1, size)
        return pieces

    @staticmethod
    def _hex(digest):
        try:
            return digest_hex(digest)
        except ValueError as exc:
            raise HTTPFailure(400, str(exc))

    @staticmethod
    def _range(header, size):
        """``(start, end)`` of one ``bytes=A-B`` range (the whole blob without one); 416 if it does not fit."""
        if not header:
            return 0, size
        match = re.fullmatch(r"bytes=(\d{1,19})-(\d{0,19})", header.strip())
        if not match:
            raise HTTPFailure(416, "only one byte range (bytes=START-END) is served")
        start = int(match.group(1))
        end = min(size, int(match.group(2)) + 1) if match.group(2) else size
        if start >= end:
            raise HTTPFailure(416, "that range is outside the blob (%d bytes)" % size)
        return start, end



class ModelPageApi(HttpApi):
    """The page's list of the room's models (``GET /api/room-models``): who has each, its size,
    and whether this computer can get it; the page's button then pulls through Ollama's /api/pull."""

    def __init__(self, router, chat, gate, pulls, share):
        HttpApi.__init__(self, router, chat, gate)
        self.pulls = pulls
        self.share = share

    def routes(self):
        return [("GET", "/api/room-models", self.room_models)]

    def room_models(self):
        reply = self.pulls.room(self.share.shared_models())
        reply["may_pull"] = self.gate.client().role == "owner"  # /api/pull is the owner's (or --lan-api's)
        return reply


class RelayServer(MeshListener):
    """Serves peers' relay connections (TLSStream: TLS to the mesh port, proven as links are),
    one thread each: HTTP/1.1 requests to the app's /relay/... routes, kept alive, answers
    chunked. The peer's node id goes in the environ (``PEER_KEY``), so who asks comes from the
    connection, not from anything the request says. The mesh it is given hands it each
    connection (``relay_connection``)."""

    PEER_KEY = "neuromesh.relay_peer"
    max_line = 8192
    max_per_peer = 128  # relay connections one peer may hold open (a thread each)
    idle_timeout = 600.0  # seconds a relay connection may wait for its next request

    def __init__(self, app, mesh):
        self.app = app
        self._open = collections.Counter()
        self._lock = threading.Lock()
        mesh.watch(self)

    def relay_connection(self, stream, node_id, address):
        with self._lock:
            if self._open[node_id] >= self.max_per_peer:
                log_limited(logging.WARNING, ("relay connections", node_id), "refusing a relay connection of %s: "
                            "it holds %d already", node_id[:8], self.max_per_peer)
                stream.close()
                return True
            self._open[node_id] += 1
        threading.Thread(target=self._serve, args=(stream, node_id, address), name="neuromesh-relay-conn",
                         daemon=True).start()
        return True

    def _serve(self, stream, node_id, address):
        reader = io.BufferedReader(stream, 65536)
        stream.sock.settimeout(self.idle_timeout)
        try:
            while self._one(reader, stream, node_id, address):
                pass
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.debug("relay connection of %s ended: %s", node_id[:8], exc)
        except Exception:
            log.exception("error serving the relay connection of %s", node_id[:8])
        finally:
            stream.close()
            with self._lock:
                count_down(self._open, node_id)

    def _one(self, reader, stream, node_id, address):
        """Serve one request; False once the peer closed the connection."""
        line = reader.readline(self.max_line)
        if not line:
            return False
        method, target, _version = line.decode("latin-1").split()
        headers = http.client.parse_headers(reader)
        length = int(headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_FORWARD_BODY:
            raise ValueError("a relay request of %d bytes" % length)
        path, _, query = target.partition("?")
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SCRIPT_NAME": "",
                   "CONTENT_TYPE": headers.get("Content-Type") or "", "CONTENT_LENGTH": str(length),
                   "SERVER_NAME": "neuromesh-relay", "SERVER_PORT": "0", "SERVER_PROTOCOL": "HTTP/1.1",
                   "REMOTE_ADDR": address, "wsgi.input": io.BytesIO(reader.read(length)), "wsgi.errors": sys.stderr,
                   "wsgi.version": (1, 0), "wsgi.url_scheme": "https", "wsgi.multithread": True,
                   "wsgi.multiprocess": False, "wsgi.run_once": False, self.PEER_KEY: node_id}
        for name, value in headers.items():
            if name.lower() not in ("host", "content-type", "content-length"):
                environ["HTTP_" + name.upper().replace("-", "_")] = value
        if not path.startswith("/relay/"):
            environ["PATH_INFO"] = "/relay/not-a-relay-route"  # only the relay's routes cross here
        reply = []
        body = self.app(environ, lambda status, response_headers, exc_info=None: reply.extend(
            (status, response_headers)))
        try:
            status, response_headers = reply
            head = "".join("%s: %s\r\n" % (name, value) for name, value in response_headers
                           if name.lower() not in ("content-length", "connection", "transfer-encoding"))
            stream.sendall(("HTTP/1.1 %s\r\n%sTransfer-Encoding: chunked\r\n\r\n" % (status, head)).encode("latin-1"))
            for chunk in body:
                if chunk:
                    stream.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            stream.sendall(b"0\r\n\r\n")
        finally:
            if hasattr(body, "close"):
                body.close()
        return True


###############################################################################
# Queues on view: health and metrics ##########################################
###############################################################################


class QueueReport:
    """The LLM queues of the mesh as this node sees them: its own LLMs exactly (counts by
    requester, waits, speed, shares), each sharing peer's as its LLMC: last told. Counts only:
    never what anyone asked. ``health()`` for /api/health, ``metrics()`` for /metrics."""

    def __init__(self, router, mesh=None):
        self.router = router
        self.names = {router.node_id: router.node_name}
        for peer in (mesh.linked_peers() if mesh is not None else []):
            self.names[peer.node_id] = peer.name

    def requester_name(self, key):
        """``node id/tag`` in words: the node's name, and what kind of client asked there."""
        node_id, _sep, tag = key.partition("/")
        name = self.names.get(node_id) or node_id[:8] or "this computer"
        if tag in ("owner", "node"):
            return name
        if tag.startswith("guest-"):
            return "%s · guest %s" % (name, tag[6:10])
        if tag.startswith("lan:"):
            return "%s · API client %s" % (name, tag[4:])
        return "%s · %s" % (name, tag)

    def hosts(self):
        """One record per LLM host: this node's backends, then the peers that share theirs."""
        router, hosts = self.router, []
        for backend in router.local:
            load, stats = backend.slots.load(), backend.slots.stats
            shares = stats.shares()
            counts = backend.slots.by_requester()
            keys = sorted(set(counts) | set(shares))
            hosts.append(dict(load, node_id=router.node_id, name=router.node_name, local=True, url=backend.url,
                              tokens_per_second=backend.recent_tps, median_wait_s=stats.median_wait(),
                              loaded=sorted(backend.loaded), requesters=[
                                  {"requester": key, "name": self.requester_name(key),
                                   "queued": counts.get(key, {}).get("queued", 0),
                                   "running": counts.get(key, {}).get("running", 0),
                                   "share": shares.get(key, 0.0)} for key in keys]))
        with router.lock:
            peers = [b.peer for b in router.grants.values() if b.peer.connected]
        for peer in peers:
            load, queue = peer.load or {}, peer.queue or {}
            hosts.append({"node_id": peer.node_id, "name": peer.name, "local": False,
                          "in_flight": load.get("in_flight", 0), "queued": load.get("queued", 0),
                          "parallel": load.get("parallel", 1),
                          "tokens_per_second": peer.tokens_per_second, "loaded": list(peer.loaded or []),
                          "requesters": [{"requester": key, "name": self.requester_name(key), "queued": count}
                                         for key, count in sorted(queue.items())]})
        return hosts

    def health(self):
        policy = self.router.policy
        with self.router.lock:
            granted = self.router.tokens.holders()
        return {"sharing_paused": policy.paused, "share_slots": policy.share_slots,
                "sharing_with": policy.sharing_with(granted) if self.router.sharing else 0,
                "weights": dict(policy.weights), "hosts": self.hosts()}

    def metrics(self):
        """The Prometheus text format (version 0.0.4), written by hand."""
        text = PromText()
        policy, hosts = self.router.policy, self.hosts()
        with self.router.lock:
            granted = self.router.tokens.holders()
        text.family("neuromesh_sharing_paused", "gauge", "1 while the owner paused sharing this node's LLM",
                    [({}, int(policy.paused))])
        text.family("neuromesh_sharing_with", "gauge", "students this node's LLM serves (recent remote "
                    "requesters and granted nodes)", [({}, policy.sharing_with(granted) if self.router.sharing else 0)])
        for name, field, help_text in (("neuromesh_queue_waiting", "queued", "chats waiting for a slot of an LLM host"),
                                       ("neuromesh_queue_running", "in_flight", "chats an LLM host answers now"),
                                       ("neuromesh_queue_slots", "parallel", "chats an LLM host answers at once")):
            text.family(name, "gauge", help_text, [(self._host_labels(h), h.get(field) or 0) for h in hosts])
        text.family("neuromesh_tokens_per_second", "gauge", "recent answer speed of an LLM host",
                    [(self._host_labels(h), h["tokens_per_second"]) for h in hosts if h.get("tokens_per_second")])
        text.family("neuromesh_requester_waiting", "gauge", "chats of one requester waiting at an LLM host",
                    [(dict(self._host_labels(h), requester=r["requester"], requester_name=r["name"]), r["queued"])
                     for h in hosts for r in h["requesters"]])
        local = [(h, b) for h, b in zip(hosts, self.router.local)]
        text.family("neuromesh_requester_running", "gauge", "chats of one requester this node's LLM answers now",
                    [(dict(self._host_labels(h), requester=r["requester"]), r["running"])
                     for h, _b in local for r in h["requesters"]])
        text.family("neuromesh_requester_share", "gauge", "a requester's share of the last chats this node's "
                    "LLM started", [(dict(self._host_labels(h), requester=r["requester"]), r["share"])
                                    for h, _b in local for r in h["requesters"]])
        text.family("neuromesh_requester_chats_started_total", "counter", "chats of one requester this node's LLM "
                    "started", [(dict(self._host_labels(h), requester=key), count)
                                for h, b in local for key, count in b.slots.stats.started.items()])
        text.family("neuromesh_chats_refused_total", "counter", "queued remote chats sent elsewhere (sharing "
                    "paused)", [(self._host_labels(h), b.slots.stats.refused) for h, b in local])
        text.histogram("neuromesh_queue_wait_seconds", "seconds chats waited for a slot of this node's LLM",
                       [(self._host_labels(h), b.slots.stats) for h, b in local])
        return text.render()

    @staticmethod
    def _host_labels(host):
        labels = {"host": host["name"], "node_id": host["node_id"]}
        if host.get("url"):
            labels["backend"] = host["url"]
        return labels


class PromText:
    """Lines of the Prometheus text exposition format: HELP, TYPE, then samples with escaped labels."""

    def __init__(self):
        self.lines = []

    @staticmethod
    def _escape(value):
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    @staticmethod
    def _number(value):
        if value is None:
            return "NaN"
        if isinstance(value, bool):
            return str(int(value))
        return repr(float(value)) if isinstance(value, float) else str(int(value))

    def _sample(self, name, labels, value):
        inner = ",".join('%s="%s"' % (key, self._escape(val)) for key, val in sorted(labels.items()))
        self.lines.append("%s%s %s" % (name, "{%s}" % inner if inner else "", self._number(value)))

    def family(self, name, kind, help_text, samples):
        self.lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\").replace("\n", " ")))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            self._sample(name, labels, value)

    def histogram(self, name, help_text, series):
        """``series``: (labels, QueueStats) pairs; QueueStats buckets are cumulative already."""
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s histogram" % name)
        for labels, stats in series:
            for bound, count in zip(stats.buckets, stats.wait_buckets):
                self._sample(name + "_bucket", dict(labels, le=repr(float(bound))), count)
            self._sample(name + "_bucket", dict(labels, le="+Inf"), stats.wait_count)
            self._sample(name + "_sum", labels, round(stats.wait_sum, 6))
            self._sample(name + "_count", labels, stats.wait_count)

    def render(self):
        return "\n".join(self.lines) + "\n"


class MetricsApi(HttpApi):
    """``GET /metrics``: the queues for Prometheus (this computer; the network with --lan-api)."""

    kind = "llm"

    def __init__(self, router, chat, gate, mesh, transfers):
        HttpApi.__init__(self, router, chat, gate)
        self.mesh = mesh
        self.transfers = transfers  # TransferStats of the model transfers

    def routes(self):
        return [("GET", "/metrics", self.metrics)]

    def metrics(self):
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return QueueReport(self.router, self.mesh).metrics() + self.transfers.metrics()


def build_app(config, router, chat, conversations, events, mesh, room, report, controls, pulls, share, transfers,
              started, teacher=None):
    """Every API's routes on one Bottle app, one chat room and one Gatekeeper behind them (the
    WSGI app returned: the Bottle app, capped per address); each API gets only what it uses
    (see each class for its arguments)."""
    gate = Gatekeeper(config)
    apis = [PageApi(router, chat, gate, conversations, events, mesh, room, report, controls, teacher),
            OllamaApi(router, chat, gate, pulls), OllamaModelsApi(router, chat, gate),
            OpenAIApi(router, chat, gate, started), TranslatedApi(router, chat, gate, AnthropicShapes),
            TranslatedApi(router, chat, gate, ResponsesShapes),
            RelayApi(router, chat, gate), ModelRelayApi(router, chat, gate, share),
            ModelPageApi(router, chat, gate, pulls, share), MetricsApi(router, chat, gate, mesh, transfers),
            RoomApi(router, chat, gate, conversations, mesh, room, teacher)]
    app = bottle.Bottle()
    for api in apis:
        app.merge(api.build())
    app.add_hook("after_request", set_security_headers)
    errors = ErrorReplies()
    app.error(404, errors.not_found)
    app.error(405, errors.not_allowed)
    app.error(500, errors.server_error)
    return gate.wrap(app)


###############################################################################
# Node ########################################################################
###############################################################################


class LocalLLM:
    """The truth about this computer's own LLM, in words for the page, the APIs' errors and the
    terminal: answering, installed but stopped (and how to start it), or none (normal on a
    student's laptop). ``check()`` after each probe logs a change once."""

    def __init__(self, router, config):
        self.router = router
        self.config = config
        self.last = None

    def state(self):
        """("running" | "stopped" | "none" | "off", a sentence or None)."""
        backends = self.router.local
        if any(backend.available for backend in backends):
            return "running", None
        if not backends:
            return "off", None
        refused = [b for b in backends if "ConnectionError" in (b.error or "")]
        ollama = [b for b in refused if b.kind == "ollama"]
        if ollama and shutil.which("ollama"):
            return "stopped", ("Ollama is installed on this computer but not running (nothing answers at %s): "
                               "start it with `ollama serve` (or open the Ollama app)" % ollama[0].url)
        if refused and (not ollama or self.config.ollama_url != DEFAULTS["ollama_url"]):
            return "stopped", ("nothing answers at %s: start the LLM server there" % refused[0].url)
        return "none", None

    def describe(self):
        """One line for the start-up banner: what this node will use to answer."""
        state, problem = self.state()
        if state == "running":
            backend = next(b for b in self.router.local if b.available)
            return "answers with %s on this computer (%s at %s)%s" % (
                ", ".join(backend.models) or "no model yet", backend.kind, backend.url,
                "" if not self.config.no_share_llm else ", kept to itself (--no-share-llm)")
        if state == "stopped":
            return "uses the LLMs of the mesh for now: %s" % problem
        return "has no LLM of its own: the LLMs of other computers of the mesh answer (that is normal)"

    def check(self):
        """Log when this computer's LLM stops or comes back (once per change)."""
        state, problem = self.state()
        if state == self.last:
            return
        if self.last is not None and state == "running":
            log.info("this computer's LLM is back: %s", self.describe())
        elif state == "stopped":
            log.warning("%s", problem)
        self.last = state


class LLMNews(MeshListener):
    """Tells peers and pages when this node's LLM, its load, or the LLMs it may use change (it
    watches the Router), each only when what they are told changed: a load change is not news
    to a page. Each HELO and announcement carries the same capability (``hello_extra``)."""

    def __init__(self, router, mesh, events, local_llm):
        self.router = router
        self.mesh = mesh
        self.events = events
        self.local_llm = local_llm
        self._told_capability = None  # what peers last heard of this node's LLM
        self._told_offer = None  # what pages last heard of the mesh's models
        router.watch(self.changed)
        mesh.watch(self)

    def hello_extra(self):
        return self.router.local_capability()

    def changed(self):
        self.local_llm.check()
        capability = self.router.local_capability()
        if capability != self._told_capability:
            self._told_capability = capability
            self.mesh.broadcast(LLM_CAPS, capability)
        models = self.router.mesh_models()
        offer = {name: sorted(node_id for node_id, _n, _l in hosts) for name, hosts in models.items()}
        offer["~local"] = [self.local_llm.last]  # the page also hears this computer's LLM stop or return
        if offer != self._told_offer:
            self._told_offer = offer
            self.events.publish("llm", {"llm_hosts": llm_host_count(models)})


class PeerNews(MeshListener):
    """Tells the pages when a peer links, changes (a new name, a new LLM, its first round trip)
    or leaves. Built after the other rooms that hear of peers, so a page that asks at once
    finds them up to date."""

    def __init__(self, mesh, events):
        self.events = events
        mesh.watch(self)

    def peer_up(self, peer):
        self.events.publish("peer_up", peer.to_dict())

    def peer_down(self, peer, reason):
        self.events.publish("peer_down", dict(peer.to_dict(), reason=reason))

    def peer_changed(self, peer):
        self.events.publish("peer_update", peer.to_dict())

    def peer_measured(self, peer):
        self.events.publish("peer_update", peer.to_dict())


def running_node_info(data_dir):
    """What a node running on ``data_dir`` wrote at start (``runtime.json``), or None when none runs."""
    try:
        with open(os.path.join(data_dir, RUNTIME_FILE), encoding="utf-8") as handle:
            info = json.load(handle)
        pid = info["pid"] = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if os.name == "posix" and pid != os.getpid():  # on Windows os.kill would end the process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # left behind by a node that was killed
        except PermissionError:
            pass
    return info


class RuntimeFile:
    """``runtime.json`` in the data dir while the node runs: who it is and its ports, read by
    ``status`` and by a second start on the same data dir (see running_node_info)."""

    def __init__(self, config, node_id, mesh):
        self.config = config
        self.node_id = node_id
        self.mesh = mesh
        self.path = os.path.join(config.data_dir, RUNTIME_FILE)

    def write(self):
        info = {"pid": os.getpid(), "node_id": self.node_id, "name": self.mesh.name,
                "http_port": self.mesh.http_port, "tcp_port": self.mesh.tcp_port,
                "udp_port": self.config.udp_port, "host": self.config.host, "started": utc_now()}
        with open(self.path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(info, handle)
        os.replace(self.path + ".tmp", self.path)

    def remove(self):
        try:
            os.remove(self.path)
        except OSError:
            pass


class OwnerControls:
    """Carries out what the owner changes from the page: this node's name and whether its LLM is
    shared, each kept in the data dir (read again at the next start) and told to peers and pages."""

    def __init__(self, data_dir, node_id, mesh, router, store, events, runtime_file):
        self.data_dir = data_dir
        self.node_id = node_id
        self.mesh = mesh
        self.router = router
        self.store = store
        self.events = events
        self.runtime_file = runtime_file

    def rename(self, name):
        """The owner named this node: kept in the data dir, told to peers and pages."""
        name = clean_node_name(name)
        path = os.path.join(self.data_dir, NAME_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(name + "\n")
        os.replace(path + ".tmp", path)
        log.info("this node is now called %s", safe_text(name))
        self.mesh.rename(name)
        self.router.rename(name)
        self.store.rename_node(name)
        self.runtime_file.write()
        # Linked peers hear the new name now (Peer.update reads it), the others at the announcement.
        self.mesh.broadcast(LLM_CAPS, dict(self.router.local_capability(), name=name))
        self.mesh.announce_now()
        self.events.publish("node", {"node_id": self.node_id, "name": name})
        return name

    def pause_sharing(self, paused):
        """The owner paused (or resumed) sharing this computer's LLM: peers stop placing chats here."""
        path = os.path.join(self.data_dir, SHARING_FILE)
        if paused:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("paused from the page at %s\n" % utc_now())
        elif os.path.exists(path):
            os.remove(path)
        log.info("sharing this computer's LLM is %s", "paused" if paused else "on again")
        self.router.pause_sharing(paused)
        self.mesh.announce_now()
        self.events.publish("node", {"node_id": self.node_id, "name": self.mesh.name, "sharing_paused": bool(paused)})
        return bool(paused)


class NodeReport:
    """What this node says of itself, reading its rooms and changing nothing: ``health()`` for
    /api/health and ``status``, ``llm_status()``, ``urls()`` to print at start and show guests,
    and ``host_info()`` for the questions asked on this node."""

    def __init__(self, config, node_id, mesh, router, sync, store, events, local_llm, transfers, recent_errors):
        self.config = config
        self.node_id = node_id
        self.generic_name = "NeuroMesh-" + node_id[:4]
        self.mesh = mesh
        self.router = router
        self.sync = sync
        self.store = store
        self.events = events
        self.local_llm = local_llm
        self.transfers = transfers  # TransferStats of the model transfers
        self.recent_errors = recent_errors
        self.started = time.monotonic()

    def host_info(self):
        """The original's ``host_info`` of this node (the display name, never the hostname)."""
        return {"hostname": self.mesh.name, "ip_address": self.config.host, "is_llm_host": self.router.has_local_llm}

    def health(self):
        stats = self.mesh.stats()
        return {
            "status": "ok", "node_id": self.node_id, "name": self.mesh.name, "version": __version__,
            "name_is_generic": self.mesh.name == self.generic_name,
            "protocol_version": PROTOCOL_VERSION, "room": room_status(self.mesh.room_key),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "peer_count": stats["connected_peers"], "has_llm": self.router.has_local_llm,
            "llm": self.llm_status(), "llm_hosts": llm_host_count(self.router.mesh_models()),
            "interfaces": [{"name": name, "ip": ip, "prefix": prefix,
                            "broadcast": directed_broadcast(ip, prefix) if prefix < 31 else None}
                           for name, ip, prefix in local_ipv4_interfaces()],
            "recent_errors": self.recent_errors.records(),
            "memory_rss_bytes": memory_rss_bytes(), "threads": threading.active_count(),
            "ports": {"http": self.mesh.http_port or None, "tcp": self.mesh.tcp_port,
                      "udp": None if self.config.no_discovery else self.config.udp_port},
            "discovery": not self.config.no_discovery,
            "broadcast_addresses": list(self.mesh.broadcast_addresses),
            "counters": {key: value for key, value in stats.items()
                         if key not in ("connected_peers",)},
            "event_subscribers": self.events.subscriber_count,
            "sync": dict(self.sync.counters), "messages": self.store.message_count(),
            "python": sys.version.split()[0], "queues": QueueReport(self.router, self.mesh).health(),
            "models_transfer": self.transfers.report(),
        }

    def llm_status(self):
        """The local LLM backends, for /api/health and the diagnostics page."""
        backends = [backend.describe() for backend in self.router.local]
        available = [b for b in backends if b["available"]]
        summary = dict(available[0] if available else (backends[0] if backends else
                       {"backend": None, "url": None, "available": False, "models": [],
                        "error": "no local LLM configured (--ollama-url none)"}))
        summary["backends"] = backends
        summary["state"], summary["problem"] = self.local_llm.state()
        summary["sharing"] = not self.config.no_share_llm
        summary["sharing_paused"] = self.router.policy.paused
        summary["share_slots"] = self.config.share_slots
        with self.router.lock:
            granted = self.router.tokens.holders()
        summary["sharing_with"] = self.router.policy.sharing_with(granted) if self.router.sharing else 0
        summary["models"] = self.router.local_models()
        return summary

    def urls(self):
        """The URLs to print at start: this machine, then the LAN addresses others can use."""
        port = self.mesh.http_port
        local = ["http://127.0.0.1:%d/" % port]
        if self.config.host in ("0.0.0.0", ""):
            return local, ["http://%s:%d/" % (ip, port) for ip in lan_addresses()]
        own = "http://%s:%d/" % (self.config.host, port)
        return [own], [] if is_loopback(self.config.host) else [own]


class Housekeeping:
    """Re-probes the local LLM servers every announce interval (each probe times out in 2 s), asks
    again for LLM access that was not answered, and clears guests' chats when the teacher asked:
    ``serve_forever()`` on a thread of its own until ``shutdown()``."""

    def __init__(self, config, router, mesh, room):
        self.config = config
        self.router = router
        self.mesh = mesh
        self.room = room
        self._stop = threading.Event()

    def serve_forever(self):
        next_probe = time.monotonic() + self.config.announce_interval
        while not self._stop.wait(min(1.0, self.config.announce_interval)):
            try:
                if self.router.local and time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + self.config.announce_interval
                    if self.router.refresh_local():
                        self.mesh.announce_now()
                self.router.access.retry_requests()
                self.room.clear_guests()
            except Exception:
                log.exception("housekeeping failed")

    def shutdown(self):
        self._stop.set()


class Node:
    """One NeuroMesh node: builds its rooms (identity, store, mesh, sync, router, web server),
    constructor by constructor, and starts and stops them. Each room registers itself where it
    is built, with the store, the mesh or the router it is given (see their docstrings)."""

    def __init__(self, config):
        self.config = config
        self._refuse_shared_data_dir()
        self.key = load_node_key(config.data_dir)
        self.node_id = self.key.node_id
        name = config.name or load_saved_name(config.data_dir) or "NeuroMesh-" + self.node_id[:4]
        self.recent_errors = RecentErrors()
        log.addHandler(self.recent_errors)
        self.events = EventBus()
        self.teacher_key = load_teacher_key(config)
        self.store = Store(os.path.join(config.data_dir, DATABASE_FILE), self.node_id, name, self.key,
                           self.teacher_key)
        self.room = RoomRules(self.store, config.teacher)
        if self.teacher_key is not None:
            self.room.introduce_teacher(self.teacher_key, name, self.node_id)
        self.mesh = Mesh(config, self.node_id, key=self.key, name=name)
        self.sync = SyncWorker(self.store, self.mesh, self.events, config.sync_interval)
        self.router = Router(config, self.node_id, name, self.mesh, self.room,
                             sharing_paused=os.path.exists(os.path.join(config.data_dir, SHARING_FILE)))
        self.local_llm = LocalLLM(self.router, config)
        self.llm_news = LLMNews(self.router, self.mesh, self.events, self.local_llm)
        self.peer_news = PeerNews(self.mesh, self.events)
        self.transfer_stats = TransferStats()
        model_store = ModelStore(ollama_model_dirs())
        self.model_pulls = ModelPulls(self.router, model_store, os.path.join(config.data_dir, TRANSFERS_DIR),
                                      self.transfer_stats,
                                      next((b for b in self.router.local if b.kind == "ollama"), None))
        self.model_share = ModelShare(model_store, self.router, config, self.model_pulls.partials, self.transfer_stats)
        self.report = NodeReport(config, self.node_id, self.mesh, self.router, self.sync, self.store, self.events,
                                 self.local_llm, self.transfer_stats, self.recent_errors)
        self.runtime_file = RuntimeFile(config, self.node_id, self.mesh)
        self.controls = OwnerControls(config.data_dir, self.node_id, self.mesh, self.router, self.store,
                                      self.events, self.runtime_file)
        self.chat = ChatService(self.router, self.store, self.report.host_info, max_queued=config.max_queued,
                                local_llm=self.local_llm)
        self.housekeeping = Housekeeping(config, self.router, self.mesh, self.room)
        self.started_wall = time.time()
        self.http_server = None
        self.http_port = None
        self._threads = []
        self._stop = threading.Event()

    def _refuse_shared_data_dir(self):
        """Two running nodes on one data dir would share an identity and a database."""
        info = running_node_info(self.config.data_dir)
        if info is None or os.name != "posix" or info["pid"] == os.getpid():  # Windows: no live check
            return
        raise NeuroMeshError("another NeuroMesh (pid %d) is running with the data dir %s: stop it, or give "
                             "this one its own with --data-dir" % (info["pid"], self.config.data_dir))

    def _bind_web(self):
        """The web app and its server, bound to --http-port (errors name the flag to change); a
        peer's relay connection is served by the same app (RelayServer hears of it from the mesh)."""
        app = build_app(self.config, self.router, self.chat, self.store, self.events, self.mesh, self.room,
                        self.report, self.controls, self.model_pulls, self.model_share, self.transfer_stats,
                        self.started_wall, self.teacher_key)
        RelayServer(app, self.mesh)
        try:
            return HTTPServer(self.config.host, self.config.http_port, app,
                              idle_timeout=self.config.http_idle_timeout,
                              request_deadline=self.config.http_request_deadline,
                              per_address=self.config.max_connections_per_address,
                              connection_limit=http_connection_limit())
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError("HTTP port %d is already in use (another NeuroMesh or web server "
                                     "on this machine?): pick another with --http-port"
                                     % self.config.http_port)
            raise NeuroMeshError("cannot listen on %s:%d: %s (check --host)"
                                 % (self.config.host, self.config.http_port, exc.strerror))

    def start(self):
        """Bind every port (errors name the flag to change), then start the threads."""
        self.http_server = self._bind_web()
        self.http_port = self.http_server.server_port
        self.mesh.serve_page_on(self.http_port)
        self.router.access.serve_relay_on(self.http_port)
        if log.getEffectiveLevel() > logging.DEBUG:
            quiet_waitress_logs()
        self.router.refresh_local()
        self.local_llm.check()
        for backend in self.router.local:
            log.debug("%s", "LLM: %s at %s offers %s" % (backend.kind, backend.url, ", ".join(backend.models))
                      if backend.available else backend.error)
        try:
            self.mesh.start()
        except Exception:
            self.http_server.server_close()
            raise
        self._spawn("neuromesh-mesh", self.mesh.serve_forever)
        # shutdown() wakes the loop through waitress's trigger, and so does every finished response:
        # the poll timeout only paces waitress's idle-connection cleanup (its own default is 1 s).
        self._spawn("neuromesh-http", functools.partial(self.http_server.serve_forever, poll_interval=1.0))
        self.sync.start()
        self._spawn("neuromesh-housekeeping", self.housekeeping.serve_forever)
        self.runtime_file.write()
        return self

    def _spawn(self, name, target):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait(self, timeout=None):
        """Block until ``stop()`` is asked for (from a signal handler or another thread)."""
        return self._stop.wait(timeout)

    def request_stop(self):
        self._stop.set()

    def stop(self):
        """Say goodbye to peers and stop every thread; safe to call twice."""
        self._stop.set()
        self.housekeeping.shutdown()
        self.events.close()
        self.mesh.shutdown()
        self.sync.shutdown()
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self.store.close()
        log.removeHandler(self.recent_errors)
        self.runtime_file.remove()


###############################################################################
# Firewall, doctor and status #################################################
###############################################################################
#
# What a user runs when peers do not appear: `doctor` checks this machine and the network,
# `status` asks a running node, `firewall` opens the ports for the local subnet. Each
# OS-specific step is one small function below, given the OS, so tests build every OS's
# commands without running them (and never touch this machine's firewall).

FIREWALL_GROUP = "NeuroMesh"
MACOS_SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"


def current_os():
    """``"windows"``, ``"macos"`` or ``"linux"`` (another Unix counts as linux): the one place that asks."""
    if sys.platform.startswith("win"):
        return "windows"
    return "macos" if sys.platform == "darwin" else "linux"


def mesh_ports(config):
    """``[(protocol, port, flag)]`` that peers and browsers reach: discovery, links, the page."""
    ports = [("tcp", config.tcp_port, "--tcp-port"), ("tcp", config.http_port, "--http-port")]
    if not config.no_discovery:
        ports.insert(0, ("udp", config.udp_port, "--udp-port"))
    return ports


def local_subnets():
    """This machine's private IPv4 subnets (``10.1.2.0/24``), the only sources the rules let in."""
    subnets = []
    for _name, ip, prefix in local_ipv4_interfaces():
        if ip.startswith("127.") or prefix >= 32 or not is_private_address(ip):
            continue
        subnet = str(ipaddress.ip_network("%s/%d" % (ip, prefix), strict=False))
        if subnet not in subnets:
            subnets.append(subnet)
    return subnets


@dataclasses.dataclass
class FirewallSteps:
    """What ``firewall`` does on one OS: commands it runs (argv lists), commands it only shows
    (for the user to run: no tool it can drive), and notes to read."""

    run: list = dataclasses.field(default_factory=list)
    show: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)


def windows_firewall_steps(ports, remove=False):
    """PowerShell's New-NetFirewallRule, in the NeuroMesh group, from the local subnet only."""
    steps = FirewallSteps()
    if remove:
        steps.run.append(["powershell", "-NoProfile", "-Command",
                          "Remove-NetFirewallRule -Group '%s' -ErrorAction SilentlyContinue" % FIREWALL_GROUP])
        return steps
    for protocol, port, _flag in ports:
        name = "NeuroMesh %s %d" % (protocol.upper(), port)
        steps.run.append(["powershell", "-NoProfile", "-Command",
                          "New-NetFirewallRule -DisplayName '%s' -Group '%s' -Direction Inbound -Action Allow "
                          "-Protocol %s -LocalPort %d -RemoteAddress LocalSubnet -Profile Domain,Private"
                          % (name, FIREWALL_GROUP, protocol.upper(), port)])
    steps.notes.append("Windows classes a new network as Public, where these rules do not apply. On the "
                       "classroom network, set it to Private (Settings > Network & internet > the network > "
                       "Private network), or, if you must, allow Public too: "
                       "Set-NetFirewallRule -Group NeuroMesh -Profile Any")
    steps.notes.append("Run PowerShell as Administrator. Remove the rules with: " + RUN + " firewall "
                       "--uninstall")
    return steps


def macos_firewall_steps(python, ports, remove=False):
    """macOS's application firewall allows programs, not ports: it lets this Python accept connections."""
    steps = FirewallSteps()
    if remove:
        steps.run.append(["sudo", MACOS_SOCKETFILTERFW, "--remove", python])
        return steps
    steps.run.append(["sudo", MACOS_SOCKETFILTERFW, "--add", python])
    steps.run.append(["sudo", MACOS_SOCKETFILTERFW, "--unblockapp", python])
    steps.notes.append("The macOS application firewall allows a program, not a port or a subnet: this lets %s "
                       "accept connections (it asks for your password). A third-party firewall (Little Snitch, "
                       "LuLu) needs its own rule for %s." % (python, ", ".join(
                           "%s %d" % (protocol.upper(), port) for protocol, port, _flag in ports)))
    return steps


def linux_firewall_steps(ports, subnets, which=shutil.which, remove=False):
    """ufw or firewalld where present (rules per local subnet); else the nftables commands to run."""
    steps = FirewallSteps()
    if not subnets:
        steps.notes.append("No private IPv4 subnet found on this machine's interfaces: connect to the "
                           "classroom network first, then run this again.")
        return steps
    rules = [(subnet, protocol, port) for subnet in subnets for protocol, port, _flag in ports]
    if which("ufw"):
        for subnet, protocol, port in rules:
            verb = ["delete", "allow"] if remove else ["allow"]
            steps.run.append(["ufw"] + verb + ["from", subnet, "to", "any", "port", str(port), "proto", protocol])
        return steps
    if which("firewall-cmd"):
        option = "--remove-rich-rule" if remove else "--add-rich-rule"
        for subnet, protocol, port in rules:
            steps.run.append(["firewall-cmd", "--permanent", "%s=rule family=ipv4 source address=%s port port=%d "
                              "protocol=%s accept" % (option, subnet, port, protocol)])
        steps.run.append(["firewall-cmd", "--reload"])
        return steps
    if remove:
        # nftables deletes a rule by its handle only: list them, then delete the NeuroMesh ones.
        steps.show += ["nft -a list chain inet filter input | grep NeuroMesh",
                       "nft delete rule inet filter input handle HANDLE    (for each handle listed)"]
    else:
        # An accept in a table of NeuroMesh's own would not override a drop in the distribution's
        # filter chain, so the rules go into that chain, marked with a comment.
        steps.show += ['nft insert rule inet filter input ip saddr %s %s dport %d accept comment "NeuroMesh"'
                       % (subnet, protocol, port) for subnet, protocol, port in rules]
    steps.notes.append("Neither ufw nor firewalld is installed: if this machine filters with nftables, run the "
                       "commands above as root (they assume the usual `inet filter input` chain; add them to "
                       "/etc/nftables.conf to keep them after a reboot). With no firewall, nothing is needed.")
    return steps


def firewall_steps(system, ports, subnets=(), which=shutil.which, python=None, remove=False):
    """The FirewallSteps for ``system`` (see current_os), built without running anything."""
    if system == "windows":
        return windows_firewall_steps(ports, remove)
    if system == "macos":
        return macos_firewall_steps(python or sys.executable, ports, remove)
    return linux_firewall_steps(ports, list(subnets), which, remove)


def short_error(exc):
    """What went wrong with an HTTP request, in a few words."""
    if isinstance(exc, requests.Timeout):
        return "no answer in time"
    if isinstance(exc, requests.ConnectionError):
        return "nothing answers there"
    return safe_text(str(exc), 160)


def run_command(argv, timeout=30):
    """``(exit code, output)`` of a command; a missing program is exit 127, never an exception."""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                              universal_newlines=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return 127, str(exc)
    return done.returncode, done.stdout or ""


def linux_firewall_state(which=shutil.which, run=run_command):
    if which("ufw"):
        code, out = run(["ufw", "status"])
        if code != 0:
            return "ufw is installed; its state needs root: sudo ufw status"
        return "ufw: " + " ".join(out.split()[:2] if "inactive" in out else [line.strip() for line in
                                  out.splitlines() if "Status" in line or "5000" in line or "7878" in line][:6])
    if which("firewall-cmd"):
        code, out = run(["firewall-cmd", "--state"])
        return "firewalld: %s" % (out.strip() or "unknown (needs root)")
    if which("nft"):
        code, out = run(["nft", "list", "ruleset"])
        if code != 0:
            return "nftables is installed; its rules need root to read: sudo nft list ruleset"
        return "nftables: %s" % ("no rules" if not out.strip() else "%d rules loaded; check they allow UDP/TCP "
                                 "from the local subnet" % out.count("\n"))
    return "no ufw, firewalld or nftables found: nothing on this machine filters"


def macos_firewall_state(run=run_command):
    code, out = run([MACOS_SOCKETFILTERFW, "--getglobalstate"])
    return out.strip() or "application firewall: unknown"


def windows_firewall_state(run=run_command):
    code, out = run(["powershell", "-NoProfile", "-Command",
                     "(Get-NetFirewallRule -Group '%s' -ErrorAction SilentlyContinue | Measure-Object).Count; "
                     "(Get-NetConnectionProfile).NetworkCategory" % FIREWALL_GROUP])
    lines = out.split()
    if code != 0 or not lines or not lines[0].isdigit():
        return "Windows Defender Firewall: state unknown (%s)" % safe_text(out.strip() or "no output")
    state = "%s NeuroMesh rules" % lines[0]
    if "Public" in lines[1:]:
        state += "; this network is Public, where the rules do not apply (make it Private)"
    return state


def firewall_state(system, which=shutil.which, run=run_command):
    """One line on this OS's firewall, for doctor (reads only; never changes a rule)."""
    if system == "windows":
        return windows_firewall_state(run)
    if system == "macos":
        return macos_firewall_state(run)
    return linux_firewall_state(which, run)


def run_firewall(config, remove=False, assume_yes=False, dry_run=False, system=None, run=run_command):
    """``firewall``: show the commands, ask, then run them; ``--uninstall`` removes the rules."""
    system = system or current_os()
    steps = firewall_steps(system, mesh_ports(config), local_subnets(), python=sys.executable, remove=remove)
    what = "remove NeuroMesh's firewall rules" if remove else "open %s for the local subnet only" % ", ".join(
        "%s %d" % (protocol.upper(), port) for protocol, port, _flag in mesh_ports(config))
    print("To %s on %s:" % (what, system))
    for argv in steps.run:
        print("  " + " ".join(argv if argv[0] != "powershell" else argv[3:]))
    for line in steps.show:
        print("  " + line)
    for note in steps.notes:
        print("Note: " + note)
    if not steps.run or dry_run:
        return 0 if steps.run or steps.show else 1
    if not assume_yes:
        if not sys.stdin.isatty():
            print("Nothing changed: run again with --yes to apply these commands.", file=sys.stderr)
            return 1
        if input("Run these commands now? [y/N] ").strip().lower() not in ("y", "yes"):
            print("Nothing changed.")
            return 1
    failed = 0
    for argv in steps.run:
        code, out = run(argv)
        if code != 0:
            failed += 1
            print("failed (%d): %s\n%s" % (code, " ".join(argv), out.strip()), file=sys.stderr)
    if failed:
        print("Some commands failed: run this as %s." % ("Administrator" if system == "windows" else "root (sudo)"),
              file=sys.stderr)
        return 1
    print("Done." if remove else "Done: peers of the local subnet can reach this node.")
    return 0


def port_in_use(host, protocol, port):
    """The OSError binding ``port`` gives, or None when it is free (the socket is closed at once).
    UDP binds the way Discovery does, so a running node's shared discovery socket is no clash."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM)
    try:
        if protocol == "udp" or os.name == "posix":  # Windows' SO_REUSEADDR would steal a TCP port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if protocol == "udp" and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("" if protocol == "udp" else host, port))
        return None
    except OSError as exc:
        return exc
    finally:
        sock.close()


def probe_hello(host, port, room_key, timeout=3.0):
    """The HELO of the node at ``host:port``, proven: the doctor dials it, runs TLS and the key
    proof with ``room_key`` and checks the HELO's signature, as a node would, then hangs up
    without a HELO of its own. OSError when it cannot connect or read in ``timeout``;
    ProtocolError when the key proof or the HELO fails (another room code, or not a NeuroMesh)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    link = None
    try:
        context = TLSIdentity._context(ssl.PROTOCOL_TLS_CLIENT, None)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the key proof binds it
        sock = context.wrap_socket(sock)
        link = BlockingLink.dialing(sock, room_key)
        link.prove()
        return link.hello()
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLError):
        raise ProtocolError("it closed the link %s: its room code differs, it runs an older NeuroMesh, "
                            "or it is not a NeuroMesh"
                            % ("before its HELO" if link is not None and link.handshake.done
                               else "during the key proof")) from None
    finally:
        close_quietly(sock)


@dataclasses.dataclass
class Finding:
    """One line of doctor's report; a ``problem`` blocks the mesh (doctor then exits 1)."""

    level: str  # "ok", "note" or "problem"
    text: str
    fix: str = None
    details: list = dataclasses.field(default_factory=list)


class Doctor:
    """Checks what the mesh needs on this machine and its network, and says how to fix each problem.

    Methods for the caller: ``run()`` (every check, in order; returns the findings).
    Nothing here changes the machine: ports are bound only to see whether they are free, one
    probe datagram goes to each broadcast address, and each peer heard gets one link, which runs
    the key proof with this machine's room code, reads the peer's HELO (its name and LLM: what a
    closed room tells only its members) and is closed at once. Class variables: the timeouts.
    """

    connect_timeout = 3.0
    llm_timeout = 3.0
    max_heard = 1000  # distinct node ids kept from announcements (a flood of made-up ids stays bounded)
    max_dialed = 32  # peers whose TCP port is tried (3 s each at worst)
    probe = b"NeuroMesh doctor probe"  # no announcement: nodes drop it unread

    def __init__(self, config, system=None, out=None):
        self.config = config
        self.system = system or current_os()
        self.out = out or functools.partial(print, flush=True)
        self.findings = []
        self.running = running_node_info(config.data_dir)
        self.heard = {}  # node id -> (ip, announcement)
        self.met = {}  # node id -> (ip, proven HELO) of the peers whose key proof passed
        self.room_key = OPEN_ROOM_KEY
        self.other_room = 0
        self.local_models = []

    def add(self, level, text, fix=None, details=()):
        finding = Finding(level, text, fix, list(details))
        self.findings.append(finding)
        self.out("[%s] %s" % (level, text) if level != "ok" else "[ok] %s" % text)
        for line in finding.details:
            self.out("      " + line)
        if fix:
            self.out("      fix: " + fix)
        return finding

    @property
    def problems(self):
        return [finding for finding in self.findings if finding.level == "problem"]

    def run(self):
        self.out("NeuroMesh doctor %s: checks this machine and its network (it changes nothing)." % __version__)
        for check in (self.check_python, self.check_data_dir, self.check_ports, self.check_room, self.check_privacy,
                      self.check_firewall, self.check_llm, self.check_network, self.check_mesh_llm):
            try:
                check()
            except BrokenPipeError:  # `doctor | head`: the reader is gone
                raise
            except Exception as exc:  # one broken check must not hide the others
                log.debug("doctor check %s failed", check.__name__, exc_info=True)
                self.add("note", "%s could not run: %s" % (check.__name__[6:], safe_text(str(exc))))
        if self.problems:
            self.out("\n%d problem(s) block the mesh: see the fixes above." % len(self.problems))
        else:
            self.out("\nNothing blocks the mesh.")
        return self.findings

    # -- this machine --------------------------------------------------------------

    def check_python(self):
        self.add("ok", "Python %s at %s" % (sys.version.split()[0], sys.executable),
                 details=version_report().splitlines()[2:])

    def check_data_dir(self):
        folder = self.config.data_dir
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, ".doctor-%d" % os.getpid())
            with open(probe, "w", encoding="utf-8") as handle:
                handle.write("ok")
            os.remove(probe)
        except OSError as exc:
            self.add("problem", "the data dir %s is not writable (%s)" % (folder, exc.strerror or exc),
                     "give a folder you can write with --data-dir (or NEUROMESH_DATA_DIR)")
            return
        self.add("ok", "data dir %s is writable" % folder)

    def check_ports(self):
        running = self.running or {}
        for protocol, port, flag in mesh_ports(self.config):
            name = "%s port %d (%s)" % (protocol.upper(), port, flag)
            if port == 0:
                self.add("ok", "%s: chosen when the node starts" % name)
                continue
            error = port_in_use(self.config.host, protocol, port)
            held = running.get({"--http-port": "http_port", "--tcp-port": "tcp_port",
                                "--udp-port": "udp_port"}[flag]) == port
            if error is None:
                self.add("ok", "%s is free" % name)
            elif held:
                self.add("ok", "%s is held by the running node (pid %s)" % (name, running.get("pid")))
            else:
                self.add("problem", "%s is in use by another program (%s)" % (name, error.strerror or error),
                         "stop that program, or start NeuroMesh with %s %d (every node of the room needs the "
                         "same UDP port; TCP ports may differ)" % (flag, port + 1))

    def check_room(self):
        if not self.config.mesh_key:
            self.add("ok", "room: open (no --mesh-key): any NeuroMesh on this network may join")
            return
        status = room_status(derive_room_key(self.config.mesh_key))
        self.add("ok", "room: closed by a room code, key hash %s (every machine of the room shows the same hash)"
                 % status["key_hash"])

    def check_privacy(self):
        """Whether peer links are private: TLS in this Python, and each link of the running node."""
        newest = "1.3" if getattr(ssl, "HAS_TLSv1_3", False) and self.config.tls_max != "1.2" else "1.2"
        self.add("ok", "peer links and relayed chats are private: TLS %s at most with %s (ECDSA certificate in %s)"
                 % (newest, ssl.OPENSSL_VERSION, os.path.join(self.config.data_dir, TLS_FILE)))
        if not (self.running and self.running.get("http_port")):
            return
        try:
            peers = requests.get("http://127.0.0.1:%d/api/peers" % self.running["http_port"],
                                 timeout=self.llm_timeout).json()
        except (requests.RequestException, ValueError):
            return
        for peer in _records(peers):
            name = safe_text(peer.get("name") or peer.get("node_id"), 60)
            if peer.get("connected") is True:
                self.add("ok", "the link to %s is private: %s" % (name, _tls_text(peer.get("tls"))))
            elif peer.get("outdated") is True:
                self.add("note", "%s is not linked: it runs an older NeuroMesh without private links" % name,
                         "upgrade NeuroMesh on %s" % name)
        if self.config.guests:
            self.add("note", "guests' browsers reach the chat page over plain HTTP on the LAN (browsers refuse a "
                     "self-signed certificate)", "use a network only the class can join (WPA2/3 with its own "
                     "password), or let guests use a node on their own computer")

    def check_firewall(self):
        self.add("note", "firewall (%s): %s" % (self.system, firewall_state(self.system)),
                 "if peers cannot reach this machine: %s firewall" % RUN)

    def check_llm(self):
        config = self.config
        backends = [("Ollama", url, "/api/tags") for url in _string_list(config.ollama_url or "")]
        backends += [("OpenAI-compatible server", url, "/v1/models") for url in _string_list(config.openai_url or "")]
        if not backends:
            self.add("note", "no LLM backend configured on this machine (--ollama-url none)")
        headers = {"Authorization": "Bearer " + config.openai_key} if config.openai_key else {}
        for kind, url, path in backends:
            try:
                response = requests.get(url + path, timeout=self.llm_timeout,
                                        headers=headers if path == "/v1/models" else {})
                response.raise_for_status()
                payload = response.json()
                entries = payload.get("models") if path == "/api/tags" else payload.get("data")
                models = [safe_text(entry.get("name") or entry.get("id"), 100) for entry in entries or []
                          if isinstance(entry, dict)]
            except (requests.RequestException, ValueError, AttributeError) as exc:
                self.add("note", "%s at %s is not reachable (%s)" % (kind, url, short_error(exc)),
                         "start it (`ollama serve`), or point --ollama-url / --openai-url at it")
                continue
            self.local_models += models
            self.add("ok" if models else "note", "%s at %s answers; models: %s" % (kind, url, ", ".join(models)
                     or "none"), None if models else "pull one: ollama pull llama3.2:1b")

    # -- the network ---------------------------------------------------------------

    def check_network(self):
        config = self.config
        interfaces = ["%s %s/%d%s" % (name, ip, prefix, "" if prefix >= 31 else " broadcast " +
                                      directed_broadcast(ip, prefix)) for name, ip, prefix in local_ipv4_interfaces()]
        self.add("ok", "%d IPv4 interface(s)" % len(interfaces), details=interfaces)
        if config.no_discovery:
            self.add("note", "discovery is off (--no-discovery): peers come only from --peer")
            self.check_static_peers()
            return
        self.room_key = room_key = derive_room_key(config.mesh_key) if config.mesh_key else OPEN_ROOM_KEY
        discovery = Discovery(config.udp_port, config.broadcast, "doctor-" + secrets.token_hex(8),
                              config.announce_interval, room_key=room_key, allow_public=config.allow_public)
        try:
            discovery.open()
        except (PortInUseError, OSError) as exc:
            self.add("problem", "cannot listen for announcements on UDP %d: %s" % (config.udp_port, exc),
                     "free UDP %d, or use --udp-port on every node of the room" % config.udp_port)
            return
        try:
            if self.send_probes(discovery):
                self.listen(discovery, 2 * config.announce_interval)
        finally:
            discovery.close()
        self.judge_peers()

    def send_probes(self, discovery):
        """One probe to each broadcast address: proof that a broadcast can leave this machine."""
        if not discovery.broadcast_addresses:
            self.add("problem", "no network interface with a broadcast address: discovery can find nobody",
                     "connect to the classroom network, or link by hand: --peer HOST:%d" % self.config.tcp_port)
            return False
        sent = []
        for address in discovery.broadcast_addresses:
            try:
                discovery.sock.sendto(self.probe, (address, self.config.udp_port))
                sent.append(address)
            except OSError as exc:
                self.add("problem", "cannot send a broadcast to %s:%d (%s)" % (address, self.config.udp_port,
                                                                             exc.strerror or exc),
                         "a firewall on this machine blocks outgoing broadcasts: allow UDP %d, or link by hand: "
                         "--peer HOST:%d" % (self.config.udp_port, self.config.tcp_port))
        if sent:
            self.add("ok", "a broadcast can be sent to %s (UDP %d)" % (", ".join(sent), self.config.udp_port))
        return bool(sent)

    def listen(self, discovery, seconds):
        self.out("      listening %.0f s for announcements (two announce intervals)..." % seconds)
        selector = selectors.DefaultSelector()
        try:
            selector.register(discovery.sock, selectors.EVENT_READ)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if selector.select(max(0.0, min(0.25, deadline - time.monotonic()))):
                    for ip, message in discovery.receive():
                        if message["node_id"] in self.heard or len(self.heard) < self.max_heard:
                            self.heard[message["node_id"]] = (ip, message)
        finally:
            selector.close()
        self.other_room = discovery.counters.get("unauthenticated_datagrams", 0)

    def reachable(self, host, port):
        """None when a TCP connection to ``host:port`` opens (closed at once), else the error."""
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as exc:
            return exc
        close_quietly(sock)
        return None

    @staticmethod
    def label(node_id, ip, info):
        return "%s (%s)" % (safe_text(info.get("name") or node_id[:8], 64), ip)

    def judge_peers(self):
        own = (self.running or {}).get("node_id")
        peers = {node_id: heard for node_id, heard in self.heard.items() if node_id != own}
        if own in self.heard:
            self.add("ok", "this machine's running node is announcing")
        if len(peers) > self.max_dialed:
            self.add("note", "heard %d peers; trying the TCP port of the first %d" % (len(peers), self.max_dialed))
        for node_id, (ip, message) in sorted(peers.items())[:self.max_dialed]:
            self.meet(node_id, ip, message)
        if peers:
            return
        if self.other_room:
            self.add("problem", "heard %d announcement(s) from another room: their room code differs from this "
                     "machine's" % self.other_room,
                     "give every machine of the room the same --mesh-key (doctor shows its key hash)")
        elif self.check_static_peers():
            self.add("note", "no announcement heard: broadcasts are blocked on this network (client isolation?), "
                     "but the --peer given links the mesh")
        else:
            self.add("problem", "no announcement heard: broadcasts are blocked on this network (client "
                     "isolation?), use --peer (or no other node runs on this network)",
                     "start the others with --peer %s:%d (one reachable peer is enough)"
                     % ((lan_addresses() or ["THIS-MACHINE"])[0], self.config.tcp_port))

    def meet(self, node_id, ip, message):
        """Link to one peer heard, run the key proof, and report it by the name its HELO proves."""
        port = message["tcp_port"]
        try:
            hello = probe_hello(ip, port, self.room_key, self.connect_timeout)
        except ProtocolError as exc:
            self.add("problem", "%s answers on TCP %d but the link fails: %s" % (self.label(node_id, ip, message),
                                                                                port, safe_text(str(exc))),
                     "give every machine of the room the same --mesh-key (doctor shows its key hash)")
            return
        except OSError as exc:
            label = self.label(node_id, ip, message)
            self.add("problem", "heard but cannot connect: TCP %d is blocked on %s (%s)"
                     % (port, label, exc.strerror or exc),
                     "on %s, open the firewall: %s firewall" % (label, RUN))
            return
        self.met[hello["node_id"]] = (ip, hello)
        what = ("has the LLM (%s)" % ", ".join(hello.get("models") or ["no model"]) if hello.get("has_llm")
                else "no LLM")
        self.add("ok", "peer %s heard, and TCP %d reaches it: %s; %s"
                 % (self.label(node_id, ip, hello), port, "it proved the room code" if self.config.mesh_key
                    else "it linked", safe_text(what, 200)))

    def check_static_peers(self):
        """Tries each --peer; True when one answers."""
        answered = False
        for host, port in self.config.static_peers:
            error = self.reachable(host, port)
            answered = answered or error is None
            if error is None:
                self.add("ok", "--peer %s:%d answers" % (host, port))
            else:
                self.add("problem", "--peer %s:%d cannot be reached (%s)" % (host, port, error.strerror or error),
                         "check the address, and open TCP %d on that machine" % port)
        return answered

    def check_mesh_llm(self):
        """Names the computers with an LLM: this one, the peers met, and those the running node
        knows; a problem only when there is none."""
        hosts = ["this computer (%s)" % ", ".join(self.local_models)] if self.local_models else []
        named = set()
        for node_id, (ip, hello) in sorted(self.met.items()):
            if hello.get("has_llm"):
                named.add(node_id)
                hosts.append("%s: %s" % (self.label(node_id, ip, hello), _names(hello.get("models"), 100)))
        for peer in self.running_node_peers():
            if peer.get("has_llm") is True and peer.get("node_id") not in named:
                hosts.append("%s: %s" % (self.label(str(peer.get("node_id")), safe_text(peer.get("address"), 64),
                                                    peer), _names(peer.get("models"), 100)))
        if hosts:  # each part is escaped already: escaping the whole again would double its backslashes
            listed = "; ".join(hosts)
            self.add("ok", "LLM on the mesh: %s" % (listed if len(listed) <= 1000 else listed[:1000] + "..."))
            return
        self.add("problem", "no LLM: none answers on this machine and no computer of the room has one",
                 "install Ollama on one machine of the room (https://ollama.com) and pull a model "
                 "(ollama pull llama3.2:1b), or point --ollama-url / --openai-url at a running one")

    def running_node_peers(self):
        """The peers the node running on this machine knows (its /api/peers), or []."""
        if not (self.running and self.running.get("http_port")):
            return []
        try:
            peers = requests.get("http://127.0.0.1:%d/api/peers" % self.running["http_port"],
                                 timeout=self.llm_timeout).json()
        except (requests.RequestException, ValueError):
            return []
        return [peer for peer in peers if isinstance(peer, dict)] if isinstance(peers, list) else []


def run_doctor(config, system=None):
    """``doctor``: exit 1 when something blocks the mesh."""
    doctor = Doctor(config, system)
    doctor.run()
    return 1 if doctor.problems else 0


def format_table(headers, rows):
    """Rows of text as aligned columns under ``headers``, two spaces apart."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[index]) for row in rows]) for index, header in enumerate(headers)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [list(headers)] + rows]


def format_uptime(seconds):
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    return ("%dh%02dm" % (hours, rest // 60)) if hours else "%dm%02ds" % divmod(rest, 60)


def _record(value):
    return value if isinstance(value, dict) else {}


def _records(value):
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _names(values, limit):
    return ", ".join(safe_text(value, limit) for value in (values if isinstance(values, list) else []))


def status_header(health):
    """The node's name, id, version, uptime, room and own LLM, from its /api/health."""
    room, llm = _record(health.get("room")), _record(health.get("llm"))
    uptime = health.get("uptime_s") if isinstance(health.get("uptime_s"), (int, float)) else 0
    first = "%s (node %s), NeuroMesh %s, up %s, room %s" % (
        safe_text(health.get("name"), 64), safe_text(health.get("node_id"), 64)[:8],
        safe_text(health.get("version"), 20), format_uptime(uptime),
        "closed (key hash %s)" % safe_text(room.get("key_hash"), 16) if room.get("closed") else "open")
    if llm.get("available"):
        own = "%s at %s, models: %s" % (safe_text(llm.get("backend"), 40), safe_text(llm.get("url"), 100),
                                        _names(llm.get("models"), 100) or "none")
    else:
        own = "none (%s)" % safe_text(llm.get("error") or llm.get("problem") or "not configured")
    return [first, "LLM on this node: " + own]


def peers_table(peers):
    peers = _records(peers)
    lines = ["Peers: %d linked, %d known" % (sum(1 for peer in peers if peer.get("connected") is True), len(peers))]
    rows = [(safe_text(peer.get("name"), 40), safe_text(peer.get("node_id"), 64)[:8],
             safe_text(peer.get("address"), 64), safe_text(peer.get("tcp_port"), 8),
             "yes" if peer.get("connected") is True else "no", "yes" if peer.get("has_llm") is True else "no",
             "-" if peer.get("rtt_ms") is None else safe_text(peer.get("rtt_ms"), 12), _tls_text(peer.get("tls")),
             _names(peer.get("models"), 60) or "-") for peer in peers]
    if rows:
        lines += ["  " + line for line in format_table(
            ("NAME", "NODE", "ADDRESS", "TCP", "LINKED", "LLM", "RTT MS", "TLS", "MODELS"), rows)]
    return lines


def _tls_text(tls):
    """A link's TLS as status shows it, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; "-" when unlinked."""
    if not isinstance(tls, dict):
        return "-"
    return "%s %s" % (safe_text(tls.get("version"), 12), safe_text(tls.get("cipher"), 40))


def models_table(models):
    entries = _records(models.get("models"))
    lines = ["LLM hosts on the mesh: %s" % safe_text(models.get("llm_hosts", 0), 12)]
    rows = [(safe_text(entry.get("name"), 100), ", ".join(
        safe_text(host.get("name"), 40) + (" (this node)" if host.get("local") is True else "")
        for host in _records(entry.get("hosts")))) for entry in entries]
    if rows:
        lines += ["  " + line for line in format_table(("MODEL", "HOSTS"), rows)]
    return lines


def transfers_table(health):
    """The model pulls of this node (its /api/health's ``models_transfer``), when there were any."""
    transfers = _records(_record(health.get("models_transfer")).get("transfers"))
    rows = [(safe_text(t.get("model"), 100), safe_text(t.get("status"), 40),
             progress_line(t, 10).split(" ", 2)[-1] if isinstance(t.get("total"), int) else "-",
             safe_text(t.get("error") or ", ".join(_names(t.get("bad_peers"), 40).split(", ")[:3]) or "-", 100))
            for t in transfers]
    if not rows:
        return []
    return [""] + ["Model transfers:"] + ["  " + line for line in format_table(("MODEL", "STATUS", "DONE", "NOTE"),
                                                                                rows)]


def status_report(health, peers, models):
    """The lines ``status`` prints from a node's /api/health, /api/peers and /api/models (each reply
    is checked for shape: a field of the wrong type shows as text, never as a crash)."""
    return (status_header(_record(health)) + [""] + peers_table(peers) + [""] + models_table(_record(models))
            + transfers_table(_record(health)))


def run_status(config, port=None):
    """``status``: asks the node on this computer (its HTTP port, on loopback) and prints tables."""
    running = running_node_info(config.data_dir)
    port = port or (running or {}).get("http_port") or config.http_port
    base = "http://127.0.0.1:%d" % port
    try:
        replies = [requests.get(base + path, timeout=5) for path in ("/api/health", "/api/peers", "/api/models")]
        for reply in replies:
            reply.raise_for_status()
        health, peers, models = [reply.json() for reply in replies]
    except (requests.RequestException, ValueError) as exc:
        print("neuromesh: error: no NeuroMesh answers at %s (%s).\nStart one with `%s`, or name "
              "its port: %s status --http-port PORT (or its --data-dir)."
              % (base, short_error(exc), RUN, RUN), file=sys.stderr)
        return 1
    print("\n".join(status_report(health, peers, models)))
    return 0


###############################################################################
# CLI #########################################################################
###############################################################################


def version_report():
    lines = ["NeuroMesh %s (protocol %d)" % (__version__, PROTOCOL_VERSION),
             "Python %s at %s" % (sys.version.split()[0], sys.executable)]
    for module in (bottle, requests, ifaddr, waitress):
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as distribution_version
                version = distribution_version(module.__name__)
            except Exception:  # metadata missing (copied by hand): the path still helps
                version = "?"
        lines.append("%s %s from %s" % (module.__name__, version, os.path.dirname(os.path.abspath(module.__file__))))
    return "\n".join(lines)


def install_signal_handlers(node):
    """First Ctrl+C (or SIGTERM) stops gracefully; a second Ctrl+C exits at once."""
    state = {"asked": False}

    def handle(signum, _frame):
        if state["asked"] and signum == signal.SIGINT:
            os._exit(130)
        state["asked"] = True
        print("\nStopping NeuroMesh (press Ctrl+C again to quit at once)...", file=sys.stderr, flush=True)
        node.request_stop()

    signal.signal(signal.SIGINT, handle)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handle)


def run_node(config):
    node = Node(config).start()
    install_signal_handlers(node)
    local, lan = node.report.urls()
    print("NeuroMesh %s is running as %s." % (__version__, node.mesh.name), flush=True)
    print("  LLM: this node %s." % node.local_llm.describe(), flush=True)
    print("  Chat page on this computer: %s" % local[0], flush=True)
    for url in lan:
        print("  For others on the network: %s" % url, flush=True)
    if config.guests and lan:
        print("  Guests (phones, Chromebooks) open %s and enter the guest code: %s"
              % (lan[0] if len(lan) == 1 else "one of the addresses above", guest_code(config)), flush=True)
    elif config.guests:
        print("  Guests cannot come in: %s." % guest_reach(config), flush=True)
    else:
        print("  Other machines are refused: start with --guests (chat page) or --lan-api (LLM API).", flush=True)
    if config.no_discovery:
        print("  Discovery is off; static peers: %s" % (", ".join(config.peer) or "none"), flush=True)
    else:
        print("  Announcing on UDP %d to %s" % (config.udp_port, ", ".join(node.mesh.broadcast_addresses)
                                                or "nobody"), flush=True)
    room = room_status(node.mesh.room_key)
    if room["closed"]:
        print("  Room: closed by a room code (key hash %s): only nodes with the same --mesh-key join"
              % room["key_hash"], flush=True)
    else:
        print("  Room: open (no --mesh-key): any NeuroMesh on this network can join", flush=True)
    print("  Press Ctrl+C to stop.", flush=True)
    if not config.no_browser:
        threading.Thread(target=webbrowser.open, args=(local[0],), name="neuromesh-browser",
                         daemon=True).start()
    try:
        while not node.wait(1.0):
            pass
    finally:
        node.stop()
    print("NeuroMesh stopped.", file=sys.stderr, flush=True)
    return 0


def node_base_url(config, port=None):
    """The HTTP address of the node running on this computer (its port from --http-port or its data dir)."""
    running = running_node_info(config.data_dir)
    return "http://127.0.0.1:%d" % (port or (running or {}).get("http_port") or config.http_port)


def progress_line(record, width=30):
    """One line of ``pull``'s progress: the status, and a bar once a blob's size is known."""
    total, done = record.get("total"), record.get("completed") or 0
    if not isinstance(total, int) or total <= 0 or not isinstance(done, int):
        return safe_text(record.get("status"), 100)
    filled = min(width, width * done // total)
    return "%s %3d%% [%s%s] %d/%d MB" % (safe_text(record.get("status"), 40), 100 * done // total,
                                         "#" * filled, "." * (width - filled), done // MiB, total // MiB)


def run_pull(config, model, port=None, out=None):
    """``pull MODEL``: the node on this computer gets MODEL from the room's computers into this
    computer's Ollama, with a progress bar; Ctrl+C stops it, and the same command resumes it."""
    out = out or sys.stdout
    if not model:
        raise ConfigError("pull needs a model: python neuromesh.py pull MODEL")
    base = node_base_url(config, port)
    try:
        with requests.post(base + "/api/pull", json={"model": model}, stream=True, timeout=(5, 300)) as reply:
            if reply.status_code != 200:
                print("neuromesh: error: %s" % _http_error_text(reply), file=sys.stderr)
                return 1
            last = None
            for line in reply.iter_lines():
                record = parse_json(line, "a progress line", MAX_STREAM_LINE) if line.strip() else {}
                if "error" in record:
                    print("\nneuromesh: error: %s" % safe_text(record["error"], 500), file=sys.stderr)
                    return 1
                text = progress_line(record)
                if text and text != last:
                    out.write(("\r" if last and record.get("total") else "\n" if last else "") + text)
                    out.flush()
                    last = text
            out.write("\n")
            return 0 if last == "success" else 1
    except KeyboardInterrupt:
        print("\nstopped: run the same command again, and the pull goes on where it stopped", file=sys.stderr)
        return 130
    except (requests.RequestException, ValueError) as exc:
        print("neuromesh: error: no NeuroMesh answers at %s (%s): start it first with `python neuromesh.py`"
              % (base, short_error(exc)), file=sys.stderr)
        return 1


def run_transfer(config, command, directory):
    """``export DIR`` / ``import DIR``: the original NeuroMesh's file layout, to and from the store."""
    if not directory:
        raise ConfigError("%s needs a directory: %s %s DIR" % (command, RUN, command))
    key = load_node_key(config.data_dir)
    node_id = key.node_id
    store = Store(os.path.join(config.data_dir, DATABASE_FILE), node_id, config.name or "NeuroMesh-" + node_id[:4], key)
    try:
        if command == "export":
            summary = SeedFiles(store).export_layout(directory)
        else:
            summary = SeedFiles(store).import_layout(directory)
    finally:
        store.close()
    print("%sed %s: %s" % (command, directory, ", ".join("%s %s" % (value, key) for key, value in summary.items())))
    if command == "import":
        print("A running node shares the imported conversations at its next sync round.")
    return 0


def unknown_option(parser, argv):
    """The error for the first ``--option`` in ``argv`` that the parser does not know, with the
    closest known one; None when all are known. (argparse would first misread the option's value
    as a command: "invalid choice: '8081'".)"""
    known = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    for word in argv:
        if word == "--":
            return None
        flag = word.split("=", 1)[0]
        if not flag.startswith("--") or any(option.startswith(flag) for option in known):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return "unknown option %s%s" % (safe_text(flag, 60), " (did you mean %s?)" % close[0] if close else "")
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if command_help(argv):
        print(command_help(argv), end="")
        return 0
    parser = build_arg_parser()
    unknown = unknown_option(parser, argv)
    if unknown:
        print("%s: error: %s.\nRun `%s --help` to see every option." % (PROGRAM, unknown, RUN), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.version:
        print(version_report())
        return 0
    try:
        config = load_config(args)
    except ConfigError as exc:
        print("%s: error: %s.\nRun `%s --help` to see every option." % (PROGRAM, exc, RUN),
              file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return run_node(config)
        if args.command == "doctor":
            return run_doctor(config)
        if args.command == "status":
            return run_status(config, config.http_port if args.http_port is not None else None)
        if args.command == "pull":
            return run_pull(config, args.directory, config.http_port if args.http_port is not None else None)
        if args.command == "firewall":
            return run_firewall(config, remove=args.uninstall, assume_yes=args.yes, dry_run=args.dry_run)
        if args.command == "teacher":
            config.teacher = NodeKey.load_or_create(config.data_dir, TEACHER_KEY_FILE).node_id
            print("You are this room's teacher: key fingerprint %s. The teacher's room is /static/teacher.html\n"
                  "on this node's page; students run the room file it offers, or pin --teacher." % config.teacher,
                  flush=True)
            return run_node(config)
        return run_transfer(config, args.command, args.directory)
    except BrokenPipeError:  # `doctor | head` closed the pipe: stop quietly (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except NeuroMeshError as exc:
        print("neuromesh: error: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
