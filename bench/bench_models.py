"""Model transfer figures (issue 26): MB/s of one peer-to-peer transfer and of 7 computers pulling
at once, and a chat's first-token time at the source host without and during the swarm. Runs the
room of tests/support/model_swarm.py (network namespaces with tc-capped links: needs root on Linux).

    sudo python bench/bench_models.py [--quick]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for folder in (BENCH.parent / "_vendor", BENCH.parent / "tests", BENCH.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def collect(quick, row):
    from support.model_swarm import can_make_namespaces, measure
    why = can_make_namespaces()
    if why:
        return [row("model transfer figures", None, "", "-", None, "skipped: %s" % why)]
    size, mbit = 16 * 1024 * 1024, 40
    with tempfile.TemporaryDirectory() as folder:
        result = measure(Path(folder), pullers=7, size=size, rate_mbit=mbit, chats=7 if quick else 11,
                         source_rate="1MiB")
    link = "links capped at %d Mbit/s each way (tc), %d MB model" % (mbit, size // (1024 * 1024))
    ratio = result["swarm_s"] / result["single_s"]
    quiet, busy = result["first_token_quiet_s"], result["first_token_busy_s"]
    rows = [row("model transfer, one peer to one", result["single_mb_s"], "MB/s", "-", None,
                "%s: %.1f s" % (link, result["single_s"])),
            row("model transfer, 7 computers pulling at once", result["swarm_mb_s"], "MB/s in all", "-", None,
                "%.1f s, %.2fx one transfer" % (result["swarm_s"], ratio)),
            row("7 pulling at once / one transfer", ratio, "ratio", "<= 3", ratio <= 3, link)]
    if busy is not None and quiet:
        rows.append(row("first token of a chat at the source during a transfer / without", busy / quiet, "ratio",
                        "<= 1.1", busy / quiet <= 1.1, "median %.3f s against %.3f s (%d chats; the fake host waits 0.2 s before "
                        "a first word), --transfer-rate 1MiB" % (busy, quiet, result["busy_chats"])))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = str(BENCH.parent / "_vendor")
    for item in collect(options.quick, lambda *fields: dict(zip(("figure", "value", "unit", "goal", "met", "note"),
                                                                 fields))):
        print("%(figure)s: %(value)s %(unit)s (goal %(goal)s) %(note)s" % item)
    return 0


if __name__ == "__main__":
    sys.exit(main())
