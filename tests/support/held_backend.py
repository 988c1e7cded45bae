"""An LLM backend for tests of fair queues and failover: answers start, then wait until the test
lets them go on, so the test, not the clock, decides when a slot frees."""

import threading

from conftest import ScriptedBackend


class HeldBackend(ScriptedBackend):
    """A scripted LLM whose answers start, then wait until the test lets one (``finish_one``) or
    all (``open``) go on: the test decides when a slot frees. ``log``: ("start", label, host) in
    the order chats started; ``most_running(prefix)``: the most chats of a label prefix at once;
    ``waiting_and_running()`` and ``started_order()`` for the test's waits and verdicts."""

    def __init__(self, node_name, parallel=1, log=None):
        ScriptedBackend.__init__(self, node_name, parallel=parallel, reply="fair answer")
        self.log = log if log is not None else []
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._running = []
        self._most = {}

    def finish_one(self):
        self._permits.release()

    def open(self):
        for _ in range(1000):
            self._permits.release()

    def most_running(self, prefix):
        return self._most.get(prefix, 0)

    def waiting_and_running(self):
        """How many chats this backend holds: queued for a slot, or started."""
        return self.slots.in_flight + self.slots.queued

    def started_order(self):
        """The chats' labels in the order they started."""
        return [label for kind, label, _host in self.log if kind == "start"]

    def _stream(self, model, messages, options, cancel):
        label = messages[-1]["content"]
        with self._lock:
            self.log.append(("start", label, self.node_name))
            self._running.append(label)
            for prefix in {item[0] for item in self._running}:
                count = sum(1 for item in self._running if item[0] == prefix)
                self._most[prefix] = max(self._most.get(prefix, 0), count)
        try:
            assert self._permits.acquire(timeout=20), "the test never let this answer go on"
            yield from ScriptedBackend._stream(self, model, messages, options, cancel)
        finally:
            with self._lock:
                self._running.remove(label)
