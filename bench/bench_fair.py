"""Fair queueing (issue 15) against the FIFO queue it replaced, in-process, in one run.

    PYTHONPATH=_vendor python3 bench/bench_fair.py [--old-rev 1e52342] [--rounds 5]

1. Who waits: one LLM slot, one heavy requester with 20 chats queued first, then 5 light
   requesters with 2 each. Prints, for the FIFO Slots of ``--old-rev`` and for the fair Slots,
   the median and worst number of chats that started before each light requester's first one
   (the answers it waited for), and the heavy requester's fifth chat's place.
2. What it costs: microseconds per acquire+release with no one waiting, and with 32 chats
   waiting (the fair queue orders its waiting list on each wake-up), median of ``--rounds``.
No network; bounded in count.
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import neuromesh as nm  # noqa: E402


def old_module(rev):
    """neuromesh.py of ``rev`` as a module of its own (for its Slots)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", "%s:neuromesh.py" % rev], check=True,
                            capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    path = folder / "neuromesh_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("neuromesh_old", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def turn_of(node_id):
    return nm.Turn(nm.Requester(node_id, "node"), 1.0, False, True, None)


def who_waits(slots, fair):
    """Start order of 20 heavy then 5 x 2 light chats on one slot; the places of the lights' firsts."""
    order, lock, threads = [], threading.Lock(), []
    slots.acquire(**({"turn": turn_of("x" * 32)} if fair else {}))  # the slot is busy while they queue

    def chat(label, node_id):
        slots.acquire(**({"turn": turn_of(node_id)} if fair else {}))
        with lock:
            order.append(label)
        slots.release(*([turn_of(node_id)] if fair else []))

    plan = [("H%d" % i, "h" * 32) for i in range(20)]
    plan += [("L%d-%d" % (j, k), "%x" % (j + 1) * 32) for j in range(5) for k in range(2)]
    for index, (label, node_id) in enumerate(plan):
        thread = threading.Thread(target=chat, args=(label, node_id), daemon=True)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while slots.queued < index + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    slots.release(*([turn_of("x" * 32)] if fair else []))
    for thread in threads:
        thread.join(10)
    firsts = [order.index("L%d-0" % j) for j in range(5)]
    return statistics.median(firsts), max(firsts), order.index("H4")


def cost(slots, fair, waiting, count=2000):
    """Microseconds per acquire+release of one holder while ``waiting`` chats wait (they never get in)."""
    extra = slots.limit  # hold every slot but one, so the waiters stay queued
    blockers = []
    if waiting:
        for _ in range(extra):
            slots.acquire(**({"turn": turn_of("b" * 32)} if fair else {}))
        stop = threading.Event()

        def waiter(index):
            turn = turn_of("%032x" % index)
            try:
                slots.acquire(cancel=stop, **({"turn": turn} if fair else {}))
                slots.release(*([turn] if fair else []))
            except Exception:
                pass
        blockers = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(waiting)]
        for thread in blockers:
            thread.start()
        while slots.queued < waiting:
            time.sleep(0.001)
        for _ in range(extra):
            slots.release(*([turn_of("b" * 32)] if fair else []))
        # the waiters start now; measure a lone holder afterwards instead
        for thread in blockers:
            thread.join(10)
    started = time.perf_counter()
    for _ in range(count):
        slots.acquire(**({"turn": turn_of("o" * 32)} if fair else {}))
        slots.release(*([turn_of("o" * 32)] if fair else []))
    return (time.perf_counter() - started) / count * 1e6


def drain(slots, fair, waiting):
    """Seconds for ``waiting`` queued chats to pass through one slot (each wakes every other)."""
    holder = turn_of("z" * 32)
    slots.acquire(**({"turn": holder} if fair else {}))
    threads = []

    def chat(index):
        turn = turn_of("%032x" % index)
        slots.acquire(**({"turn": turn} if fair else {}))
        slots.release(*([turn] if fair else []))
    for index in range(waiting):
        thread = threading.Thread(target=chat, args=(index,), daemon=True)
        thread.start()
        threads.append(thread)
    while slots.queued < waiting:
        time.sleep(0.001)
    started = time.perf_counter()
    slots.release(*([holder] if fair else []))
    for thread in threads:
        thread.join(30)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--old-rev", default="1e52342")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    old = old_module(args.old_rev)
    print("1. who waits: 1 slot, a heavy requester's 20 chats queued first, then 5 light requesters x 2")
    for label, make, fair in (("FIFO (%s)" % args.old_rev, old.Slots, False), ("fair", nm.Slots, True)):
        median, worst, heavy_fifth = who_waits(make(1), fair)
        print("   %-16s light requesters' first chat starts after %4.1f chats (median), %2d (worst); "
              "the heavy one's 5th is number %d" % (label, median, worst, heavy_fifth + 1))
    print("2. cost per acquire+release, median of %d rounds (noisy: 2 shared cores)" % args.rounds)
    for label, make, fair in (("FIFO (%s)" % args.old_rev, old.Slots, False), ("fair", nm.Slots, True)):
        lone = statistics.median(cost(make(1), fair, 0) for _ in range(args.rounds))
        drained = statistics.median(drain(make(1), fair, 32) for _ in range(args.rounds))
        print("   %-16s %6.1f us alone; 32 queued chats pass one slot in %6.1f ms" % (label, lone, drained * 1e3))


if __name__ == "__main__":
    main()
