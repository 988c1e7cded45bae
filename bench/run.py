"""Every NeuroMesh benchmark in one command, on loopback: one table, each figure beside its goal.

    python bench/run.py [--quick] [--only NAME ...] [--json bench/results.json]

Runs the figure groups below one after the other (each bounded in count and time), prints one
table (figure, value, unit, goal, met, note) and writes it to bench/results.json with the machine
it ran on. Timings are medians (the note says of how many); a comparison runs its baseline in
the same run and reports the ratio. ``--quick`` (CI) uses fewer rounds and smaller loads and
finishes in under 3 minutes; the note of each figure says what it measured.

Groups: post (a long conversation against a new one), reads (health and sidebar), http (32 clients), classroom (30 SSE pages
and 8 chats), relay (first token through a peer's relay against Ollama directly), tls (one link's
frames and MB/s, link-up, 16 streaming clients through the relay against the host's API), catchup (a new
peer's catch-up), mesh (bench_mesh.py: frames, link-up, sync of 3 writers, memory), fanout
(bench/bench_fanout.py, issue 14 parts 3-4, when present: frames per message, reach-all,
idle CPU of a 50-node mesh), models (bench_models.py, issue 26: MB/s of one model transfer and of
7 pulling at once, in network namespaces; needs root). Every node binds 127.0.0.1 and broadcasts to 127.255.255.255 only.
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT / "_vendor", ROOT / "tests", ROOT, BENCH):
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "_vendor"), os.environ.get("PYTHONPATH")) if p)

NOISE = "2 shared cores: noisy"


def row(figure, value, unit, goal, met, note=""):
    """One line of the table (the format bench_fanout.collect() returns too)."""
    return {"figure": figure, "value": None if value is None else round(float(value), 4), "unit": unit,
            "goal": goal, "met": met, "note": note}


# -- the groups: each returns rows ------------------------------------------------------------


def post_rows(quick):
    import bench_post
    messages, posts, rounds = 10000, (30 if quick else 100), 3
    result = bench_post.measure(messages, posts, rounds)
    return [row("POST into a %d-message conversation / into a new one" % messages, result["ratio"], "ratio",
                ">= 0.8", result["ratio"] >= 0.8, "median of %d rounds of %d posts: %.0f/s against %.0f/s"
                % (rounds, posts, result["long"], result["new"]))]


def read_rows(quick):
    import bench_post
    messages = 20000 if quick else 100000
    costs = bench_post.read_costs(messages)
    ratio = costs["big"] / costs["small"]
    return [row("health count + sidebar after a post: %d messages / 10" % messages, ratio, "ratio", "-", None,
                "medians of 9: %.2f ms against %.2f ms (in-process)" % (costs["big"] * 1e3, costs["small"] * 1e3))]


def http_rows(quick):
    import bench_http
    rounds, seconds = 3, (2.0 if quick else 5.0)
    figures, runs = bench_http.measure_clients(32, seconds, rounds)
    slow = sum(run["slow"] for run in runs)
    errors = sum(run["errors"] for run in runs)
    return [row("32 concurrent clients, GET /api/peers, p95", figures["p95_ms"], "ms", "< 50, none >= 0.9 s",
                figures["p95_ms"] < 50 and slow == 0 and errors == 0,
                "median of %d loads of %g s, keep-alive; %d requests of 0.9 s or more, %d errors; p50 %.1f ms,"
                " %.0f requests/s; %s" % (rounds, seconds, slow, errors, figures["p50_ms"],
                                          figures["requests"] / seconds, NOISE))]


def classroom_rows(quick):
    import bench_http
    questions = 3 if quick else 5
    room = bench_http.classroom(pages=30, chats=8, questions=questions)
    all_served = room["served"] == room["asked"] and not room["failed"] and room["pages"] == 30
    p95 = room["update_p95_ms"]
    return [row("30 open SSE pages + 8 chats at once: page updates, p95", p95, "ms", "all served, < 100",
                all_served and not room["missing_updates"] and p95 is not None and p95 < 100,
                "%d of %d chats served, %d pages open, %d of %d updates missing; p50 %.1f ms, max %.1f ms;"
                " median answer %.0f ms; %s" % (room["served"], room["asked"], room["pages"],
                                                room["missing_updates"], room["updates"] + room["missing_updates"],
                                                room["update_p50_ms"] or 0, room["update_max_ms"] or 0,
                                                room["answer_median_ms"] or 0, NOISE))]


def relay_rows(quick):
    import bench_mesh
    rounds = 7 if quick else 21
    with tempfile.TemporaryDirectory() as folder:
        figures = bench_mesh.bench_relay(Path(folder), rounds)
    direct, host, relay = (figures[label][0] * 1e3 for label in ("direct", "host", "relay"))
    return [
        row("first token via a peer's relay minus direct", relay - direct, "ms", "< 2", relay - direct < 2,
            "medians of %d: relay %.1f ms, direct %.1f ms (fake Ollama, ~70 tokens)" % (rounds, relay, direct)),
        row("first token via the host's own Ollama API minus direct", host - direct, "ms", "-", None,
            "median of %d: %.1f ms" % (rounds, host)),
    ]


def tls_rows(quick):
    import bench_tls
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        small, bulk = bench_tls.link_throughput(tmp, 30000 if quick else 100000, 32 if quick else 64)
        up = bench_tls.link_up(tmp)
        load = bench_tls.concurrent(tmp, 16, 4.0 if quick else 6.0)
    (host, host_p50, host_p95), (relay, relay_p50, relay_p95) = load["host"], load["relay"]
    return [
        row("one link (TLS): small frames a second", small, "frames/s", "-", None, "60-byte SYNC: frames, in process"),
        row("one link (TLS): bulk", bulk, "MB/s", "-", None, "1 MiB frames, in process"),
        row("link-up: start with --peer until both linked", up * 1e3, "ms", "-", None, "median of 5, in process"),
        row("16 streaming clients through a node without an LLM / the host's own API", relay / host, "ratio",
            ">= 0.9", relay / host >= 0.9, "%.1f against %.1f chats/s; first token p50 %.0f/%.0f ms, p95 %.0f/%.0f ms"
            % (relay, host, relay_p50, host_p50, relay_p95, host_p95)),
    ]


def catchup_rows(quick):
    import bench_catchup
    messages = 20000 if quick else 100000
    results = bench_catchup.measure(messages, 3)
    (unsigned_wall, _), (signed_wall, _) = results[False], results[True]
    goal = 3.0 * messages / 100000
    return [
        row("catch-up of %d messages (signed sync)" % messages, signed_wall, "s", "< %g" % goal,
            signed_wall < goal, "%.0f msg/s; one run%s" % (messages / signed_wall,
                                                            "; the goal is 3 s per 100,000" if quick else "")),
        row("catch-up, signed / unsigned store primitives", signed_wall / unsigned_wall, "ratio", "<= 1.5",
            signed_wall / unsigned_wall <= 1.5, "unsigned %.2f s in the same run" % unsigned_wall),
    ]


def mesh_rows(quick):
    import bench_mesh
    frames = bench_mesh.bench_frames()
    rows = [row("frame decoding / plain json.loads", frames["ratio"], "x time", "-", None,
                "%.0f MB/s against %.0f MB/s" % (frames["mb_per_s"], frames["json_mb_per_s"]))]
    if quick:  # the 3-node mesh runs in the full run only
        return rows
    with tempfile.TemporaryDirectory() as folder:
        mesh = bench_mesh.bench_mesh(Path(folder))
    return rows + [
        row("3-node mesh: fully linked after the last start", mesh["link_up_s"], "s", "-", None, "one run"),
        row("3 writers, %d messages: all nodes hold all after the last ack" % mesh["messages"],
            mesh["converged_s"], "s", "-", None, "%.0f msg/s written, median ack %.1f ms"
            % (mesh["write_rate"], mesh["ack_median_ms"])),
        row("memory per node (RSS), idle / after the sync", mesh["rss_idle_mb"], "MB", "-", None,
            "%.0f MB after; medians of 3 nodes" % mesh["rss_busy_mb"]),
    ]


def fanout_rows(quick):
    path = BENCH / "bench_fanout.py"
    if not path.exists():
        return [row("fan-out figures (frames per message, reach-all N, idle CPU of 50 nodes)", None, "", "-", None,
                    "skipped: bench/bench_fanout.py is not in this tree")]
    spec = importlib.util.spec_from_file_location("bench_fanout", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.collect(quick))


def models_rows(quick):
    import bench_models
    return bench_models.collect(quick, row)


GROUPS = [("post", post_rows), ("reads", read_rows), ("http", http_rows), ("classroom", classroom_rows), ("relay", relay_rows),
          ("tls", tls_rows), ("catchup", catchup_rows), ("mesh", mesh_rows), ("fanout", fanout_rows),
          ("models", models_rows)]


# -- running and reporting ----------------------------------------------------------------------


def run_group(name, collect, quick):
    """The group's rows, or one row saying why it failed (the other groups still run)."""
    started = time.monotonic()
    print("==> %s" % name, flush=True)
    try:
        rows = collect(quick)
    except Exception as exc:  # a broken group must not hide the others' figures
        traceback.print_exc()
        rows = [row("%s: failed" % name, None, "", "-", False, "%s: %s" % (type(exc).__name__, exc))]
    print("    %s took %.0f s" % (name, time.monotonic() - started), flush=True)
    return rows


def machine():
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": None if load is None else [round(value, 2) for value in load]}


def format_value(value):
    if value is None:
        return "-"
    return "%.3g" % value if abs(value) < 100 else "%.0f" % value


def table(rows):
    """The table as Markdown (printed, and pasted into docs/performance.md)."""
    lines = ["| figure | value | unit | goal | met | note |", "|---|---|---|---|---|---|"]
    for item in rows:
        met = {True: "yes", False: "**no**", None: ""}[item["met"]]
        lines.append("| %s | %s | %s | %s | %s | %s |" % (item["figure"], format_value(item["value"]), item["unit"],
                                                          item["goal"], met, item["note"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller loads: under 3 minutes")
    parser.add_argument("--only", action="append", choices=[name for name, _ in GROUPS], help="one group (repeatable)")
    parser.add_argument("--json", default=str(BENCH / "results.json"), help="where to write the results")
    parser.add_argument("--budget", type=float, help="seconds after which groups not yet started are skipped"
                        " (default: 150 with --quick, 1800 without)")
    options = parser.parse_args(argv)
    budget = options.budget or (150.0 if options.quick else 1800.0)
    started = time.monotonic()
    info = machine()
    rows = []
    for name, collect in GROUPS:
        if options.only and name not in options.only:
            continue
        if time.monotonic() - started > budget:
            rows.append(row("%s: not run" % name, None, "", "-", None, "skipped: the run was past its budget of"
                            " %.0f s (--budget)" % budget))
            continue
        group = run_group(name, collect, options.quick)
        print(table(group), flush=True)
        rows += group
    seconds = time.monotonic() - started
    print("\nNeuroMesh benchmarks (%s), %s, %d CPUs, Python %s, load average at start %s; took %.0f s."
          " Timings are medians unless the note says otherwise.\n"
          % ("--quick" if options.quick else "full", info["platform"], info["cpus"] or 0, info["python"],
             info["load_average_at_start"], seconds))
    print(table(rows))
    with open(options.json, "w", encoding="utf-8") as handle:
        json.dump({"quick": options.quick, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "seconds": round(seconds, 1), "machine": info, "rows": rows}, handle, indent=2)
    print("\nwritten: %s" % options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
