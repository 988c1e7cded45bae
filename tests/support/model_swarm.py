"""A room of computers in the test's own network namespaces for model transfers: one
source that has the models in its Ollama store, and pullers with an empty Ollama each; every
host's link capped by ``tc`` on both ends of its veth, so the network, not the CPU, is the limit.
Used by tests/e2e/test_model_swarm.py and bench/bench_models.py; needs root and iproute2 (Linux)."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))

from conftest import NodeProcess, wait_for  # noqa: E402
from support.model_store import write_store  # noqa: E402


def can_make_namespaces():
    """None when this machine can run the room, else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root for `ip netns`"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the `ip` and `tc` commands (iproute2)"
    return None


class SwarmRoom:
    """``count`` hosts on a bridge in a namespace of its own, each link capped at ``rate_mbit`` each
    way; host 1 is the source (its store holds ``models``, each ``size`` bytes), the others pull.
    Use as a context manager; every process it started is killed, every namespace deleted."""

    def __init__(self, tmp_path, count=8, models=("swarm-one:1b", "swarm-all:1b"), size=16 * 1024 * 1024,
                 rate_mbit=40, token_delay=0.05, source_rate="10MiB", first_token_delay=0.0):
        tag = uuid.uuid4().hex[:6]
        self.tmp_path, self.models, self.size = tmp_path, list(models), size
        self.rate_mbit, self.token_delay, self.source_rate = rate_mbit, token_delay, source_rate
        self.first_token_delay = first_token_delay  # the source's fixed time to a chat's first word
        self.hub = "nmhub" + tag
        self.hosts = ["nm%s%d" % (tag, i) for i in range(1, count + 1)]
        self.subnet = "10.78.%d" % (int(tag[:2], 16) % 250 + 1)
        self.processes, self.nodes, self.digests = [], [], {}

    def ip(self, *args):
        subprocess.run(["ip"] + list(args), check=True, capture_output=True, timeout=20)

    def __enter__(self):
        try:
            self._create()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        self.ip("netns", "add", self.hub)
        self.ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.hub, "link", "set", "br0", "up")
        cap = ["root", "tbf", "rate", "%dmbit" % self.rate_mbit, "burst", "64kb", "latency", "20ms"]
        for index, host in enumerate(self.hosts, start=1):
            self.ip("netns", "add", host)
            veth = "veth%d" % index
            self.ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host)
            self.ip("-n", self.hub, "link", "set", veth, "master", "br0")
            self.ip("-n", self.hub, "link", "set", veth, "up")
            self.ip("-n", host, "link", "set", "lo", "up")
            self.ip("-n", host, "addr", "add", "%s.%d/24" % (self.subnet, index), "brd", "+", "dev", "eth0")
            self.ip("-n", host, "link", "set", "eth0", "up")
            # the host's download (the hub's side sends to it) and its upload (its own side sends)
            subprocess.run(["ip", "netns", "exec", self.hub, "tc", "qdisc", "add", "dev", veth] + cap,
                           check=True, capture_output=True, timeout=20)
            subprocess.run(["ip", "netns", "exec", host, "tc", "qdisc", "add", "dev", "eth0"] + cap,
                           check=True, capture_output=True, timeout=20)

    def _start(self):
        for model in self.models:
            self.digests[model] = write_store(str(self.tmp_path / "store-source"), model, self.size,
                                              seed=model.encode())
        for index, host in enumerate(self.hosts, start=1):
            models = ",".join(self.models) if index == 1 else ""
            fake = [sys.executable, os.path.join(HERE, "fake_ollama.py"), "--port", "11434", "--models", models,
                    "--token-delay", str(self.token_delay), "--first-token-delay", str(self.first_token_delay),
                    "--max-seconds", "600"]
            log = open(str(self.tmp_path / ("fake-%d.log" % index)), "ab")
            self.processes.append(subprocess.Popen(["ip", "netns", "exec", host] + fake, stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=ROOT))
            log.close()
        for index, host in enumerate(self.hosts, start=1):
            store = str(self.tmp_path / ("store-source" if index == 1 else "store-%d" % index))
            os.makedirs(store, exist_ok=True)
            node = NodeProcess(self.tmp_path / host, ["--announce-interval", "0.5", "--peer-timeout", "3",
                                                      "--log-level", "debug", "--name", "host%d" % index,
                                                      "--transfer-rate", self.source_rate],
                               host, prefix=["ip", "netns", "exec", host, "env", "OLLAMA_MODELS=" + store])
            self.nodes.append(node)
            node.start(timeout=30)
        wait_for(self._granted_everywhere, timeout=60, interval=0.5, message="every puller granted by every peer")

    def run_in(self, index, code, timeout=120):
        """Run Python ``code`` in host ``index`` (1-based); its stdout."""
        result = subprocess.run(["ip", "netns", "exec", self.hosts[index - 1], sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError("host %d: %s" % (index, result.stderr[-2000:]))
        return result.stdout

    def get(self, index, path, port=8080):
        code = "import urllib.request;print(urllib.request.urlopen(%r, timeout=10).read().decode())" % (
            "http://127.0.0.1:%d%s" % (port, path))
        return json.loads(self.run_in(index, code))

    def _granted_everywhere(self):
        for index in range(2, len(self.hosts) + 1):
            models = {m["name"]: m for m in self.get(index, "/api/models")["models"]}
            if not all(model in models for model in self.models):
                return False
        return all(peer["connected"] for index in (1, 2) for peer in self.get(index, "/api/peers"))

    def pull_code(self, model):
        return ("import json,time,urllib.request\nstarted=time.monotonic()\n"
                "reply=urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8080/api/pull', "
                "data=json.dumps({'model': %r}).encode(), headers={'Content-Type': 'application/json'}), timeout=300)\n"
                "last=[json.loads(l) for l in reply.read().splitlines() if l.strip()][-1]\n"
                "print(json.dumps({'last': last, 'seconds': time.monotonic()-started}))" % model)

    def pull(self, indices, model):
        """Pull ``model`` on every host of ``indices`` at once: (wall seconds, each one's last record)."""
        started = time.monotonic()
        runs = [subprocess.Popen(["ip", "netns", "exec", self.hosts[i - 1], sys.executable, "-c",
                                  self.pull_code(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in indices]
        outs = []
        for run in runs:
            out, err = run.communicate(timeout=300)
            if run.returncode != 0:
                raise AssertionError(err[-2000:])
            outs.append(json.loads(out))
        return time.monotonic() - started, [out["last"] for out in outs]

    def first_token_seconds(self, index, model):
        """Seconds until the first word of a chat asked on host ``index`` (answered by the source)."""
        code = ("import json,time,urllib.request\nstarted=time.monotonic()\n"
                "reply=urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8080/api/chat', data=json.dumps("
                "{'model': %r, 'messages': [{'role': 'user', 'content': 'hello there'}]}).encode(), "
                "headers={'Content-Type': 'application/json'}), timeout=60)\n"
                "line=reply.readline()\nprint(time.monotonic()-started)\nreply.read()" % model)
        return float(self.run_in(index, code).strip())

    def close(self):
        for node in self.nodes:
            node.kill()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for name in self.hosts + [self.hub]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def measure(tmp_path, pullers=7, size=16 * 1024 * 1024, rate_mbit=40, chats=0, source_rate="10MiB",
            first_token_delay=0.2):
    """One transfer, then ``pullers`` at once, in the same room: seconds and MB/s of each. With
    ``chats``, one more computer (that pulls nothing) asks the source that many chats with no
    transfer, then while one computer pulls a third model: the median first-token times."""
    count = pullers + (2 if chats else 1)
    models = ("swarm-one:1b", "swarm-all:1b", "swarm-chat:1b")[:3 if chats else 2]
    with SwarmRoom(tmp_path, count=count, models=models, size=size, rate_mbit=rate_mbit,
                   source_rate=source_rate, first_token_delay=first_token_delay if chats else 0.0) as room:
        single, lasts = room.pull([2], models[0])
        swarm_seconds, more = room.pull(range(2, pullers + 2), models[1])
        result = {"size": size, "single_s": single, "swarm_s": swarm_seconds, "pullers": pullers,
                  "single_mb_s": size / 1e6 / single, "swarm_mb_s": pullers * size / 1e6 / swarm_seconds,
                  "lasts": lasts + more}
        if chats:
            result.update(chat_figures(room, count, models, chats))
        return result


def chat_figures(room, count, models, chats):
    """Median first-token seconds of a chat the source answers: with no transfer, then while host 2 pulls."""
    quiet = sorted(room.first_token_seconds(count, models[0]) for _ in range(chats))[chats // 2]
    run = subprocess.Popen(["ip", "netns", "exec", room.hosts[1], sys.executable, "-c", room.pull_code(models[2])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    busy = []
    while len(busy) < chats and run.poll() is None:
        busy.append(room.first_token_seconds(count, models[0]))
    run.communicate(timeout=300)
    return {"first_token_quiet_s": quiet, "busy_chats": len(busy),
            "first_token_busy_s": sorted(busy)[len(busy) // 2] if busy else None}
