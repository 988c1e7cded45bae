"""Fan-out benchmarks of NeuroMesh (issue 14, parts 3 and 4); prints a table of figures with goals.

    PYTHONPATH=_vendor python3 bench/bench_fanout.py [--quick] [--script PATH]

Figures: FILE: copies per message in a full mesh of N real processes (goal at most 2(N-1)),
the time a message takes to reach all N nodes (medians of 3), 1,000 simulated nodes with
bounded links (the mesh's own link choice and forwarding rule, no sockets), and the idle CPU
of a 50-node mesh at default intervals. ``--script`` runs the processes from another copy of
neuromesh.py (a baseline of the same run). Every node binds 127.0.0.1 and broadcasts to
127.255.255.255 only; every loop is bounded in count and time. Figures are noisy on a shared
2-core machine: each is a median, and the table says so.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

import conftest  # noqa: E402
import neuromesh as nm  # noqa: E402
from conftest import Cluster, NodeProcess, wait_for  # noqa: E402

LINK_FLAGS = True  # False for a baseline script that has no --max-links
DEFAULT_INTERVALS = {"announce_interval": "30", "peer_timeout": "60", "sync_interval": "30"}


class Mesh:
    """N node processes on loopback sharing one discovery port, started a few at a time."""

    def __init__(self, tmp, count, settings=None, extra=(), starters=6):
        self.cluster = Cluster(Path(tmp))
        args = self.cluster.node_args(True, settings or DEFAULT_INTERVALS, list(extra))
        args[args.index("debug")] = "warning"  # the logs of 100 nodes would cost more than the mesh
        self.nodes = [NodeProcess(Path(tmp) / ("n%d" % index), args, "n%d" % index) for index in range(count)]
        self.cluster.nodes = self.nodes
        with ThreadPoolExecutor(starters) as pool:
            list(pool.map(lambda node: node.start(timeout=60), self.nodes))

    def health(self):
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda node: node.json("/api/health", timeout=30), self.nodes))

    def wait_linked(self, links_each, timeout):
        """Wait until every node has at least ``links_each`` links; returns the seconds it took."""
        started = time.monotonic()
        wait_for(lambda: all(h["peer_count"] >= links_each for h in self.health()), timeout=timeout,
                 interval=0.5, message="%d nodes with %d links each" % (len(self.nodes), links_each))
        return time.monotonic() - started

    def wait_settled(self, timeout, quiet=3):
        """Wait until no node's link count changed for ``quiet`` polls in a row (links chosen)."""
        deadline, last, same = time.monotonic() + timeout, None, 0
        while time.monotonic() < deadline and same < quiet:
            try:
                counts = [h["peer_count"] for h in self.health()]
            except requests.RequestException:  # a node too busy linking to answer: not settled
                counts = None
            same = same + 1 if counts and counts == last and min(counts) > 0 else 0
            last = counts
            time.sleep(1.0)
        if same < quiet:
            raise AssertionError("links still changing after %.0f s" % timeout)

    def close(self):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda node: node.stop(timeout=10), self.nodes))
        self.cluster.udp_reservation.close()


class ArrivalWatch:
    """One SSE stream per node: the monotonic time each node first told of a message in a conversation."""

    def __init__(self, nodes):
        self.nodes = nodes
        self.arrivals = {}  # (node label, conversation id) -> monotonic time
        self.lock = threading.Lock()
        self.ready = threading.Semaphore(0)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._listen, args=(node,), daemon=True) for node in nodes]
        for thread in self.threads:
            thread.start()
        for _ in nodes:
            if not self.ready.acquire(timeout=30):
                raise AssertionError("an event stream did not open")

    def _listen(self, node):
        try:
            self._read_events(node)
        except requests.RequestException:  # the node stopped: the measurement is over
            pass

    def _read_events(self, node):
        with requests.get(node.url + "/api/events", stream=True, timeout=(5, 120)) as response:
            self.ready.release()
            for line in response.iter_lines(chunk_size=1, decode_unicode=True):
                if self.stop.is_set():
                    return
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] in ("message", "conversation"):
                    key = (node.label, event["type"], event["data"]["conversation_id"])
                    with self.lock:
                        self.arrivals.setdefault(key, time.monotonic())

    def reach_time(self, conversation_id, started, kind="message", timeout=20.0):
        """Seconds from ``started`` until every node told of a ``kind`` event in ``conversation_id``."""
        def everyone():
            with self.lock:
                times = [self.arrivals.get((node.label, kind, conversation_id)) for node in self.nodes]
            return None if None in times else max(times)
        return wait_for(everyone, timeout=timeout, interval=0.005, message="the message on every node") - started

    def close(self):
        self.stop.set()


def sync_totals(healths):
    """Entries received (every FILE: copy counts), and of them forwarded ones and sync answers
    (counters of the new code only), summed over the mesh."""
    received = sum(h["sync"].get("entries_received", 0) for h in healths)
    forwarded = sum(h["counters"].get("forwards_sent", 0) for h in healths)
    answered = sum(h["sync"].get("entries_sent", 0) for h in healths)
    return received, (forwarded, answered)


def message_rounds(mesh, rounds):
    """Post ``rounds`` messages, each on another node: (reach-all times, FILE: copies per entry)."""
    watch = ArrivalWatch(mesh.nodes)
    times, copies = [], []
    try:
        for index in range(rounds):
            writer = mesh.nodes[(index * 7) % len(mesh.nodes)]
            conversation = writer.post("/api/conversations", json={"title": "fanout %d" % index}).json()["id"]
            watch.reach_time(conversation, time.monotonic(), "conversation")
            time.sleep(0.5)  # let the conversation's own copies settle before counting
            before, (forwards_before, answers_before) = sync_totals(mesh.health())
            started = time.monotonic()
            reply = writer.post("/api/conversations/%s/messages" % conversation,
                                json={"content": "round %d" % index, "answer": False})
            assert reply.status_code == 201, reply.text
            times.append(watch.reach_time(conversation, started))
            time.sleep(0.5)  # late (redundant) copies still count
            after, (forwards_after, answers_after) = sync_totals(mesh.health())
            copies.append(after - before)
            print("round %d: %d copies, %d forwarded, %d in sync answers" % (
                index, after - before, forwards_after - forwards_before, answers_after - answers_before),
                file=sys.stderr)
    finally:
        watch.close()
    return times, copies


def process_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(mesh, seconds):
    """Percent of one core the whole mesh used while idle for ``seconds``."""
    pids = [node.process.pid for node in mesh.nodes]
    before = sum(process_cpu_seconds(pid) for pid in pids)
    started = time.monotonic()
    time.sleep(seconds)
    used = sum(process_cpu_seconds(pid) for pid in pids) - before
    return 100.0 * used / (time.monotonic() - started)


def row(figure, value, unit, goal, met, note=""):
    return {"figure": figure, "value": None if value is None else round(float(value), 4), "unit": unit,
            "goal": goal, "met": met, "note": note}


def full_mesh_rows(count, quick, reach_goal, extra=(), idle_seconds=None):
    """Frames per message and reach-all time in a full mesh of ``count`` processes; with
    ``idle_seconds``, its idle CPU too (--quick: one mesh for both)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="nm-fanout-") as tmp:
        mesh = Mesh(tmp, count, extra=(["--max-links", str(count)] if LINK_FLAGS else []) + list(extra))
        try:
            link_up = mesh.wait_linked(count - 1, timeout=60 + 2 * count)
            mesh.wait_settled(timeout=60)
            time.sleep(3.0)  # the link-ups' peer exchanges (N frames each) are read
            times, copies = message_rounds(mesh, 3)
            bound = 2 * (count - 1)
            per = statistics.median(copies)
            rows.append(row("FILE: copies per message, full mesh of %d" % count, per, "frames", "<= %d" % bound,
                            per <= bound, "median of 3; full mesh linked %.1f s after start" % link_up))
            reach = statistics.median(times)
            rows.append(row("message reaches all %d (full mesh)" % count, reach, "s", "< %g" % reach_goal,
                            reach < reach_goal, "median of 3 (%s); 2 shared cores: noisy"
                            % ", ".join("%.3f" % t for t in times)))
            if idle_seconds:
                time.sleep(3.0)
                cpu = idle_cpu(mesh, idle_seconds)
                rows.append(row("idle CPU, %d-node full mesh, default intervals" % count, cpu, "% of a core", "< 5",
                                cpu < 5.0, "--quick: over %d s, on the full mesh (--max-links %d), all processes"
                                % (idle_seconds, count)))
        finally:
            mesh.close()
    return rows


def bounded_mesh_rows(count, reach_goal, degree):
    """Reach-all time with bounded links (the default --max-links unless ``degree``)."""
    with tempfile.TemporaryDirectory(prefix="nm-fanout-") as tmp:
        mesh = Mesh(tmp, count, extra=["--max-links", str(degree)])
        try:
            link_up = mesh.wait_linked(2, timeout=60 + 2 * count)
            mesh.wait_settled(timeout=120)
            time.sleep(3.0)
            times, copies = message_rounds(mesh, 3)
            reach = statistics.median(times)
            return [row("message reaches all %d (--max-links %d)" % (count, degree), reach, "s",
                        "< %g" % reach_goal, reach < reach_goal,
                        "median of 3; %.0f FILE: copies per message; linked in %.1f s; noisy"
                        % (statistics.median(copies), link_up))]
        finally:
            mesh.close()


def idle_rows(count, seconds, settings=None, label="default intervals"):
    with tempfile.TemporaryDirectory(prefix="nm-fanout-") as tmp:
        mesh = Mesh(tmp, count, settings=settings)
        try:
            mesh.wait_settled(timeout=120 + 2 * count)
            time.sleep(5.0)  # the link-up's sync rounds end
            cpu = idle_cpu(mesh, seconds)
            return [row("idle CPU, %d-node mesh, %s" % (count, label), cpu, "% of a core", "< 5", cpu < 5.0,
                        "measured over %d s, all processes summed" % seconds)]
        finally:
            mesh.close()


def measured_hop_costs(rounds=20):
    """Median seconds a node takes to verify and store one pushed message (real keyed Stores),
    and to encode one copy of it: the simulated mesh's per-hop and per-frame costs."""
    applies, sends = [], []
    for index in range(rounds):
        writer, _key = conftest.keyed_store(name="writer")
        reader, _other = conftest.keyed_store(name="reader")
        conversation = writer.create_conversation("costs")["id"]
        reader.batches.apply(writer.batches.missing({}, 1 << 20, 500))
        before = writer.version_vector()
        writer.add_message(conversation, "user", "question %d" % index, "student")
        push = writer.batches.missing(before, 1 << 20, 500)
        started = time.perf_counter()
        nm.encode_frame(nm.FILE, push)  # TLS encrypts it in C, in the batch of its link's next write
        sends.append(time.perf_counter() - started)
        started = time.perf_counter()
        reader.batches.apply(json.loads(json.dumps(push)))
        applies.append(time.perf_counter() - started)
        writer.close()
        reader.close()
    return statistics.median(applies), statistics.median(sends)


def simulated_rows(count=1000):
    from support.mesh_simulation import SimulatedMesh
    degree = nm.DEFAULTS["max_links"]
    hop, send = measured_hop_costs()
    started = time.perf_counter()
    mesh = SimulatedMesh(count, degree=degree, seed=14)
    built = time.perf_counter() - started
    result = mesh.flood(origin=0, hop_seconds=hop + 0.0002, send_seconds=send)  # + a loopback hop's latency
    diameter = mesh.diameter()
    return [
        row("%d simulated nodes: reach-all" % count, result.seconds, "s", "< 1", result.reached == count
            and result.seconds < 1.0, "%d of %d reached in %d hops, %.1f FILE: copies per node; simulated time "
            "from measured costs (store %.2f ms a hop, %.3f ms a copy sent); links chosen in %.1f s"
            % (result.reached, count, result.hops, result.frames / count, hop * 1e3, send * 1e3, built)),
        row("%d simulated nodes: diameter" % count, diameter, "hops", "<= 4", diameter <= 4,
            "degree %d; most links of one node %d" % (nm.DEFAULTS["max_links"], mesh.most_links())),
    ]


def collect(quick: bool) -> list:
    """Every fan-out figure as table rows (see bench/run.py); --quick leaves out N=100 and
    measures idle CPU briefly on the 50-node full mesh instead of a mesh at default settings."""
    rows = []
    rows += full_mesh_rows(20, quick, 0.1)
    rows += full_mesh_rows(50, quick, 0.2, idle_seconds=15 if quick else None)
    if not quick:
        rows += bounded_mesh_rows(100, 0.4, nm.DEFAULTS["max_links"])
    rows += simulated_rows(1000)
    if not quick:
        rows += idle_rows(50, 60)
    return rows


def print_table(rows):
    print("%-52s %10s %-12s %-8s %-5s %s" % ("figure", "value", "unit", "goal", "met", "note"))
    for item in rows:
        value = "-" if item["value"] is None else "%.4g" % item["value"]
        met = "-" if item["met"] is None else ("yes" if item["met"] else "NO")
        print("%-52s %10s %-12s %-8s %-5s %s" % (item["figure"], value, item["unit"], item["goal"], met, item["note"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=20 and 50 only, a shorter idle window")
    parser.add_argument("--script", help="run the node processes from this neuromesh.py (a baseline)")
    parser.add_argument("--only", choices=("frames", "idle", "simulated", "bounded"), help="one figure group")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--peer-timeout", help="idle: this --peer-timeout (and a sync interval half of it)")
    options = parser.parse_args()
    if options.script:
        global LINK_FLAGS
        conftest.SCRIPT = os.path.abspath(options.script)
        LINK_FLAGS = False
    if options.only is None:
        rows = collect(options.quick)
    elif options.only == "frames":
        rows = full_mesh_rows(options.nodes, True, 0.1 if options.nodes <= 20 else 0.2)
    elif options.only == "idle":
        settings = dict(DEFAULT_INTERVALS)
        label = "default intervals"
        if options.peer_timeout:
            settings.update(peer_timeout=options.peer_timeout, sync_interval=str(float(options.peer_timeout) / 2))
            label = "peer timeout %s s" % options.peer_timeout
        rows = idle_rows(options.nodes, options.seconds, settings, label)
    elif options.only == "bounded":
        rows = bounded_mesh_rows(options.nodes, 0.4, nm.DEFAULTS["max_links"])
    else:
        rows = simulated_rows(options.nodes)
    print_table(rows)


if __name__ == "__main__":
    main()
