"""Catch-up of a new peer, unsigned against signed (issue 11), in-process, in one run.

    PYTHONPATH=_vendor python3 bench/bench_catchup.py [MESSAGES] [ORIGINS]

Builds MESSAGES messages (default 100,000, ~500 B each) in the logs of ORIGINS nodes (default 3),
gathered in one source store; then a new store catches up through the sync path twice: the
unsigned store primitives (entries_missing / apply_entries) and the signed one
(batches.missing / batches.apply: every chain hashed, one signature verified per origin per
batch). Prints both wall times, process CPU times and the ratios. Bounded: at most
MESSAGES / 500 * 3 batches per run. No network.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import neuromesh as nm  # noqa: E402

TEXT = "The mitochondria is the powerhouse of the cell; a student asks why, and the answer runs on. " * 4


def build(directory, messages, origins):
    """A source store holding ``messages`` messages of ``origins`` keyed nodes, each log signed."""
    source_key = nm.NodeKey.generate()
    source = nm.Store(os.path.join(directory, "source.db"), source_key.node_id, "source", source_key)
    per_origin = messages // origins
    for number in range(origins):
        key = nm.NodeKey.generate()
        writer = nm.Store(os.path.join(directory, "writer%d.db" % number), key.node_id, "w%d" % number, key)
        cid = writer.create_conversation("notes %d" % number)["id"]
        data = {"role": "user", "content": TEXT, "sender": "student",
                "host_info": {"hostname": "laptop", "ip_address": "10.0.0.%d" % number, "is_llm_host": False}}
        writer._db.write(lambda: [writer._log.append(key.node_id, "message", cid, dict(data))
                                  for _ in range(per_origin)])
        while True:
            payload = writer.batches.missing(source.version_vector())
            if not payload["entries"]:
                break
            source.batches.apply(payload)
        writer.close()
    return source


def catch_up(source, target, signed, limit):
    batches = 0
    while batches < limit:
        if signed:
            payload = source.batches.missing(target.version_vector())
            if not payload["entries"]:
                break
            target.batches.apply(payload)
        else:
            entries, _more = source.entries_missing(target.version_vector())
            if not entries:
                break
            target.apply_entries(entries)
        batches += 1
    return batches


def measure(messages=100000, origins=3):
    """{False: (wall, cpu), True: (wall, cpu)}: the unsigned and the signed catch-up, in seconds."""
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        source = build(directory, messages, origins)
        print("built %d messages of %d origins in %.1f s" % (source.message_count(), origins,
                                                             time.perf_counter() - started))
        results = {}
        for signed in (False, True):
            key = nm.NodeKey.generate()
            target = nm.Store(os.path.join(directory, "new-%s.db" % signed), key.node_id, "new", key)
            wall, cpu = time.perf_counter(), time.process_time()
            batches = catch_up(source, target, signed, messages // 500 * 3 + 10)
            results[signed] = (time.perf_counter() - wall, time.process_time() - cpu)
            assert target.version_vector() == {origin: seq for origin, seq in source.version_vector().items()
                                               if origin != source.node_id}, "caught up on everything"
            print("%-8s %6d messages in %4d batches: wall %7.2f s  cpu %7.2f s" % (
                "signed" if signed else "unsigned", target.message_count(), batches, *results[signed]))
            target.close()
        source.close()
    return results


def main():
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    origins = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results = measure(messages, origins)
    (uw, uc), (sw, sc) = results[False], results[True]
    print("ratio signed/unsigned: wall %.2f  cpu %.2f  (goal: within 1.5)" % (sw / uw, sc / uc))

if __name__ == "__main__":
    main()
