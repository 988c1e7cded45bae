"""Fair sharing of the room's LLMs, in-process: fair queues per requester, the owner
first, --share-slots, placement where a chat starts soonest, re-placement, 503s moved, the pause
switch, the requester carried through the relay, and the queues in /metrics and /api/health."""

import http.client
import json
import os
import threading
import time
import types

import pytest
import requests
from hypothesis import given, settings, strategies as st

import neuromesh
from conftest import (ScriptedBackend, ScriptedPeerBackend, StubNode, TLSRelay, as_relay_peer, fully_linked,
                      scripted_router, wait_for, wsgi_call)
from support.fake_ollama import FakeOllama
from support.held_backend import HeldBackend

prometheus_parser = pytest.importorskip("prometheus_client.parser")

HEAVY = neuromesh.Requester("e" * 32, "node")
LIGHTS = [neuromesh.Requester("%x" % index * 32, "node") for index in range(1, 6)]


class PacedBackend(ScriptedBackend):
    """A scripted LLM that takes ``seconds`` per answer, like a real one (its speed, not a test wait)."""

    def __init__(self, node_name, parallel=2, seconds=0.02):
        ScriptedBackend.__init__(self, node_name, parallel=parallel, reply="paced answer")
        self.seconds = seconds

    def _stream(self, model, messages, options, cancel):
        threading.Event().wait(self.seconds)
        yield from ScriptedBackend._stream(self, model, messages, options, cancel)


class Chats:
    """Chats asked on threads, each labelled by its question; ``events[label]`` once done."""

    def __init__(self, router):
        self.router = router
        self.events, self.heard, self.errors = {}, {}, {}
        self.threads = []

    def ask(self, label, requester=None):
        self.heard[label] = []
        thread = threading.Thread(target=self._run, args=(label, requester), name="test-chat-" + label)
        thread.start()
        self.threads.append(thread)

    def _run(self, label, requester):
        try:
            self.events[label] = list(self.router.chat("m1", [{"role": "user", "content": label}],
                                                       on_queue=self.heard[label].append, requester=requester))
        except neuromesh.LLMError as exc:
            self.errors[label] = exc

    def join(self):
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads), "a chat never ended"

    def host_of(self, label):
        return self.events[label][-1]["node_name"]


def test_every_light_requester_starts_before_the_heavy_ones_fifth_chat():
    host = HeldBackend("host", parallel=2)
    chats = Chats(scripted_router(local=[host]))
    for index in range(20):
        chats.ask("H-%d" % index, HEAVY)
        wait_for(lambda: host.waiting_and_running() == index + 1, timeout=5, message="heavy chat %d queued" % index)
    for number, light in enumerate(LIGHTS):
        for second in range(2):
            chats.ask("L%d-%d" % (number, second), light)
            wait_for(lambda: host.waiting_and_running() == 21 + 2 * number + second, timeout=5,
                     message="light chat queued")
    host.open()
    chats.join()
    order = host.started_order()
    assert len(order) == 30 and not chats.errors
    heavy_fifth = order.index("H-4")
    for number in range(len(LIGHTS)):
        assert order.index("L%d-0" % number) < heavy_fifth, order
        # the place each light chat heard first was true: only earlier light chats were ahead of it
        assert chats.heard["L%d-0" % number][0]["position"] == number + 1


def test_the_owners_chat_starts_next_ahead_of_ten_remote_ones_queued_before_it():
    host = HeldBackend("host", parallel=1)
    router = scripted_router(local=[host])
    chats = Chats(router)
    for index in range(11):
        chats.ask("R-%d" % index, neuromesh.Requester("%02d" % index * 16, "node"))
        wait_for(lambda: host.waiting_and_running() == index + 1, timeout=5, message="remote chat queued")
    chats.ask("owner")  # asked on this computer: no requester means its owner
    wait_for(lambda: chats.heard["owner"], timeout=5, message="the owner's chat queued")
    assert chats.heard["owner"][0]["position"] == 1
    host.open()
    chats.join()
    assert host.started_order()[:2] == ["R-0", "owner"]


def test_with_share_slots_1_remote_chats_never_hold_both_slots():
    host = HeldBackend("host", parallel=2)
    router = scripted_router(local=[host], share_slots=1)
    chats = Chats(router)
    for index in range(4):
        chats.ask("R-%d" % index, LIGHTS[index])
    wait_for(lambda: host.slots.queued == 3, timeout=5, message="remote chats queued")
    assert host.slots.in_flight == 1  # the second slot stays free for the owner
    chats.ask("owner")
    wait_for(lambda: host.slots.in_flight == 2, timeout=5, message="the owner's chat took the free slot")
    for _ in range(5):
        host.finish_one()
    chats.join()
    assert host.most_running("R") == 1 and host.most_running("o") == 1
    assert sorted(chats.host_of(label) for label in chats.events) == ["host"] * 5


def test_weights_give_a_requester_more_turns():
    teacher, student = neuromesh.Requester("a" * 32, "owner"), neuromesh.Requester("b" * 32, "node")
    host = HeldBackend("host", parallel=1)
    router = scripted_router(local=[host], requester_weight={"aaaaaaaa": 3})
    chats = Chats(router)
    chats.ask("X", neuromesh.Requester("c" * 32, "node"))
    wait_for(lambda: host.slots.in_flight == 1, timeout=5, message="the slot held")
    for label, requester in [("T-%d" % i, teacher) for i in range(8)] + [("S-%d" % i, student) for i in range(8)]:
        count = host.waiting_and_running()
        chats.ask(label, requester)
        wait_for(lambda: host.waiting_and_running() == count + 1, timeout=5, message="queued")
    host.open()
    chats.join()
    next_eight = host.started_order()[1:9]
    assert sum(label.startswith("T") for label in next_eight) == 6, next_eight


def test_a_queued_chat_moves_to_the_host_that_frees_up_first():
    log = []
    first, second = HeldBackend("first", log=log), HeldBackend("second", log=log)
    chats = Chats(scripted_router(local=[first, second]))
    chats.ask("c1", LIGHTS[0])
    wait_for(lambda: first.slots.in_flight == 1, timeout=5, message="c1 on the first host")
    chats.ask("c2", LIGHTS[1])
    wait_for(lambda: second.slots.in_flight == 1, timeout=5, message="c2 placed on the idle second host")
    chats.ask("c3", LIGHTS[2])
    wait_for(lambda: chats.heard["c3"], timeout=5, message="c3 queued")
    waited_at = chats.heard["c3"][0]["node_name"]
    freed = second if waited_at == "first" else first
    freed.finish_one()  # the other host is still busy: c3 should not wait for it
    wait_for(lambda: ("start", "c3", freed.node_name) in log, timeout=5, message="c3 moved to the freed host")
    first.open()
    second.open()
    chats.join()
    assert chats.host_of("c3") == freed.node_name and not chats.errors


def test_chats_waiting_at_two_hosts_keep_looking_at_the_other_and_all_finish():
    log = []
    first, second = HeldBackend("first", log=log), HeldBackend("second", log=log)
    router = scripted_router(local=[first, second])
    looks = []
    candidates = router.candidates

    def counted(*args, **kwargs):
        looks.append(1)
        return candidates(*args, **kwargs)

    router.candidates = counted
    chats = Chats(router)
    for index, backend in enumerate((first, second)):
        chats.ask("busy-%d" % index, LIGHTS[index])
        wait_for(lambda: backend.slots.in_flight == 1, timeout=5, message="both hosts busy")
    chats.ask("w1", LIGHTS[2])
    wait_for(lambda: chats.heard["w1"], timeout=5, message="w1 waits")
    chats.ask("w2", LIGHTS[3])
    wait_for(lambda: chats.heard["w2"], timeout=5, message="w2 waits")
    assert {first.slots.queued, second.slots.queued} == {1}  # one waits at each host
    seen = len(looks)
    wait_for(lambda: len(looks) >= seen + 20, timeout=10, message="the waiting chats look at the other host")
    first.open()
    second.open()
    chats.join()
    assert len(chats.events) == 4 and not chats.errors


def test_a_host_answering_503_gets_its_chat_moved():
    with FakeOllama(models=("m1",)) as busy, FakeOllama(models=("m1",)) as free:
        router = scripted_router()
        router.local = [neuromesh.OllamaBackend(busy.url, router.node_id, "busy"),
                        neuromesh.OllamaBackend(free.url, router.node_id, "free")]
        for backend in router.local:
            backend.refresh()
        assert [b.node_name for b in router.candidates("m1")] == ["busy", "free"]
        busy.set_fail("503", count=1)
        events = list(router.chat("m1", [{"role": "user", "content": "hi"}]))
        assert events[-1]["type"] == "done" and events[-1]["node_name"] == "free"
        assert len(busy.requests_to("/api/chat")) == 1
        # the full host is placed last for a while: the next chat goes straight to the other
        assert [b.node_name for b in router.candidates("m1")] == ["free", "busy"]
        list(router.chat("m1", [{"role": "user", "content": "again"}]))
        assert len(busy.requests_to("/api/chat")) == 1 and len(free.requests_to("/api/chat")) == 2


def test_two_equal_hosts_split_a_skewed_load_within_10_percent():
    one, two = PacedBackend("one"), PacedBackend("two")
    chats = Chats(scripted_router(local=[one, two]))
    for index in range(20):
        chats.ask("H-%d" % index, HEAVY)
    for number, light in enumerate(LIGHTS):
        chats.ask("L%d-0" % number, light)
        chats.ask("L%d-1" % number, light)
    chats.join()
    hosts = [chats.host_of(label) for label in chats.events]
    assert len(hosts) == 30 and not chats.errors
    assert abs(hosts.count("one") - hosts.count("two")) <= 3, hosts  # within 10 % of 30


def test_pausing_sends_waiting_remote_chats_away_and_keeps_the_owners():
    host = HeldBackend("host", parallel=1)
    router = scripted_router(local=[host])
    chats = Chats(router)
    chats.ask("R-0", LIGHTS[0])
    wait_for(lambda: host.slots.in_flight == 1, timeout=5, message="a remote chat runs")
    chats.ask("R-1", LIGHTS[1])
    wait_for(lambda: host.slots.queued == 1, timeout=5, message="a remote chat waits")
    router.pause_sharing(True)
    wait_for(lambda: "R-1" in chats.errors, timeout=5, message="the waiting remote chat refused")
    assert "paused sharing" in str(chats.errors["R-1"]) and chats.errors["R-1"].status == 503
    assert router.local_capability()["has_llm"] is False and router.local_capability()["models"] == []
    assert router.candidates("m1", requester=LIGHTS[2]) == [] and router.candidates("m1") == [host]
    chats.ask("owner")
    host.open()
    chats.join()
    assert chats.host_of("owner") == "host" and chats.host_of("R-0") == "host"


# -- the relay carries who asks ---------------------------------------------------------


@pytest.fixture
def relay_host(tmp_path):
    """A StubNode host whose LLM is a HeldBackend, a peer holding its relay token, and its app."""
    backend = HeldBackend("host", parallel=1)
    router = scripted_router(local=[backend])
    peer_id = "p" * 32
    router.tokens.issued[peer_id] = "peer-token"
    node = StubNode(tmp_path, router)
    yield node, backend, as_relay_peer(node.app(), peer_id), peer_id
    backend.open()
    node.store.close()


def relay_chat(app, tag, content="hi"):
    return wsgi_call(app, "POST", neuromesh.RELAY_PATH, {"model": "m1", "requester": tag,
                                                          "messages": [{"role": "user", "content": content}]},
                     headers={"Authorization": "Bearer peer-token"})


def test_the_relay_queues_a_chat_under_the_peer_and_the_tag_it_sent(relay_host):
    node, backend, app, peer_id = relay_host
    backend.open()
    assert relay_chat(app, "guest-1234abcd").lines()[-1]["done"] is True
    assert relay_chat(app, "../../etc\n{x}").lines()[-1]["done"] is True  # a hostile tag: the node's own
    assert dict(backend.slots.stats.started) == {peer_id + "/guest-1234abcd": 1, peer_id + "/node": 1}


def test_a_host_past_its_queue_limit_gets_the_chat_moved_to_another(tmp_path):
    """The host's relay (TLS on loopback) answers 503 once --max-queued chats wait: the
    requester's router places the chat on the other host at once."""
    held = HeldBackend("full-host", parallel=1)
    host_router = scripted_router(local=[held])
    host = StubNode(tmp_path, host_router, max_queued=1)
    relay = TLSRelay(app=host.app())
    host_router.tokens.issued[relay.client_id] = "peer-token"
    waiting = Chats(host_router)
    queued = http.client.HTTPConnection("neuromesh-relay", timeout=10)
    try:
        waiting.ask("already waiting", LIGHTS[0])  # holds the slot
        wait_for(lambda: held.slots.in_flight == 1, timeout=5, message="the host's slot held")
        peer = types.SimpleNamespace(node_id=relay.node_id, name="full-host", models=["m1"], connected=True,
                                     has_llm=True, load={}, rtt_ms=1, address="127.0.0.1", link=None)
        full = relay.peer_backend(peer, "peer-token")
        other = ScriptedPeerBackend("other-host", reply="from the other host")
        requester = scripted_router(peers=[full, other])
        requester.placement.rank = lambda backends, model, who: sorted(backends, key=lambda b: b is other)
        body = {"model": "m1", "messages": [{"role": "user", "content": "in the queue"}], "requester": "x"}
        queued.sock = relay.dial(10)
        queued.request("POST", neuromesh.RELAY_PATH, body=json.dumps(body),
                       headers={"Authorization": "Bearer peer-token", "Content-Type": "application/json"})
        wait_for(lambda: held.slots.queued == 1, timeout=5, message="a relayed chat waits at the host: it is full")
        heard = []
        events = list(requester.chat("m1", [{"role": "user", "content": "hi"}], on_queue=heard.append))
        assert events[-1]["node_name"] == "other-host" and heard == []  # moved at once, never queued there
        assert full.busy_until > time.monotonic()  # and placed last for a while
    finally:
        queued.close()
        held.open()
        waiting.join()
        relay.close()
        host.store.close()


def test_a_paused_host_refuses_relayed_chats_with_a_clear_503(relay_host):
    node, _backend, app, _peer_id = relay_host
    node.router.pause_sharing(True)
    reply = relay_chat(app, "node")
    assert reply.status == 503 and "paused sharing" in reply.json()["error"]
    assert reply.headers.get("Retry-After") == "30"


@given(st.one_of(st.text(max_size=80), st.integers(), st.none(), st.lists(st.text(max_size=3))))
@settings(max_examples=200, deadline=None)
def test_any_requester_tag_from_the_network_becomes_a_short_safe_one(tag):
    clean = neuromesh.Requester.clean_tag(tag)
    assert clean == tag or clean == "node"
    assert 1 <= len(clean) <= neuromesh.Requester.max_tag and "/" not in clean and "\n" not in clean


@given(st.dictionaries(st.sampled_from(["queue", "loaded", "tokens_per_second", "load"]),
                       st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=300),
                                 st.lists(st.one_of(st.text(max_size=300), st.integers()), max_size=300),
                                 st.dictionaries(st.text(max_size=200), st.one_of(st.integers(), st.text()),
                                                 max_size=100))))
@settings(max_examples=200, deadline=None)
def test_a_peers_queue_report_is_kept_bounded_whatever_it_says(info):
    peer = neuromesh.Peer(node_id="q" * 32)
    peer.update(info)
    assert len(peer.queue) <= 64 and all(len(key) <= 128 and 0 < count <= 10000 for key, count in peer.queue.items())
    assert len(peer.loaded) <= 200 and all(isinstance(model, str) and len(model) <= 200 for model in peer.loaded)
    assert peer.tokens_per_second is None or 0 <= peer.tokens_per_second <= 1e6


# -- /metrics and /api/health -------------------------------------------------------


def metric_samples(text):
    """``{(name, frozenset(labels)): value}`` of a /metrics reply, read by Prometheus' own parser."""
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def values_of(samples, name, **labels):
    return [value for (sample, found), value in samples.items()
            if sample == name and set(labels.items()) <= set(found)]


def test_metrics_parse_as_prometheus_text_and_count_queues_by_requester(relay_host):
    node, backend, app, _peer_id = relay_host
    node.router.node_name = backend.node_name = 'Ana\'s "lab" \\ pc\nroom 2'  # escaped in labels
    chats = Chats(node.router)
    for index in range(3):
        chats.ask("R-%d" % index, LIGHTS[index])
        wait_for(lambda: backend.waiting_and_running() == index + 1, timeout=5, message="queued")
    reply = wsgi_call(app, "GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(reply.text)
    host = {"host": node.router.node_name}
    assert values_of(samples, "neuromesh_queue_waiting", **host) == [2]
    assert values_of(samples, "neuromesh_queue_running", **host) == [1]
    assert values_of(samples, "neuromesh_queue_slots", **host) == [1]
    assert sorted(values_of(samples, "neuromesh_requester_waiting", **host)) == [0, 1, 1]
    assert values_of(samples, "neuromesh_requester_waiting", requester=LIGHTS[1].key) == [1]
    backend.open()
    chats.join()
    samples = metric_samples(wsgi_call(app, "GET", "/metrics").text)
    assert values_of(samples, "neuromesh_queue_wait_seconds_count", **host) == [3]
    assert values_of(samples, "neuromesh_queue_wait_seconds_bucket", le="+Inf") == [3]
    assert sorted(values_of(samples, "neuromesh_requester_chats_started_total")) == [1, 1, 1]
    assert sum(values_of(samples, "neuromesh_requester_share")) == pytest.approx(1.0, abs=0.001)
    assert values_of(samples, "neuromesh_tokens_per_second", **host) == [42.0]
    assert values_of(samples, "neuromesh_sharing_paused") == [0]


def test_health_shows_each_hosts_queue_by_requester_in_counts_only(relay_host):
    node, backend, _app, peer_id = relay_host
    chats = Chats(node.router)
    chats.ask("secret question", LIGHTS[0])
    wait_for(lambda: backend.slots.in_flight == 1, timeout=5, message="running")
    chats.ask("another secret", neuromesh.Requester(peer_id, "guest-77aa0000"))
    wait_for(lambda: backend.slots.queued == 1, timeout=5, message="queued")
    report = neuromesh.QueueReport(node.router).health()
    assert "secret" not in repr(report)
    host = report["hosts"][0]
    assert (host["in_flight"], host["queued"], host["parallel"], host["local"]) == (1, 1, 1, True)
    by_key = {entry["requester"]: entry for entry in host["requesters"]}
    assert by_key[LIGHTS[0].key]["running"] == 1 and by_key[peer_id + "/guest-77aa0000"]["queued"] == 1
    assert by_key[peer_id + "/guest-77aa0000"]["name"].endswith("guest 77aa")
    assert report["sharing_with"] == 2 and report["sharing_paused"] is False
    backend.open()
    chats.join()


def test_requester_weights_are_checked_when_the_node_starts():
    assert neuromesh.parse_requester_weights(["3f2a9c01=3", "owner=2"]) == {"3f2a9c01": 3.0, "owner": 2.0}
    assert neuromesh.parse_requester_weights("a=1,b=0.5") == {"a": 1.0, "b": 0.5}
    for bad in ("=3", "teacher", "teacher=many", "teacher=1000"):
        with pytest.raises(ValueError):
            neuromesh.parse_requester_weights(bad)


# -- two real nodes: the requester through the relay, the waited time, the pause switch ----------


def test_a_students_chat_on_a_sharing_host_is_counted_and_the_pause_switch_sends_chats_away(cluster):
    model = "llama3.2:1b"
    with FakeOllama(models=(model,), token_delay=0.005) as fake:
        host = cluster.start("host", extra=["--ollama-url", fake.url, "--llm-parallel", "2", "--share-slots", "1"])
        student = cluster.start("student")
        wait_for(lambda: fully_linked([host, student]), message="mesh")

        def student_hosts():
            return {h["node_id"] for m in student.json("/api/models")["models"] for h in m["hosts"]}

        wait_for(lambda: student_hosts() == {host.node_id}, message="the student may use the host's LLM")
        conversation = student.post("/api/conversations", json={"title": "fair"}).json()["id"]
        reply = student.post("/api/conversations/%s/messages" % conversation, json={"content": "hi"}, timeout=30)
        assert reply.status_code == 201, reply.text
        answer = reply.json()["assistant"]
        assert answer["answered_by"] == host.node_id and answer["answered_by_name"] == host.health()["name"]
        assert isinstance(answer["waited_s"], float) and 0 <= answer["waited_s"] < 30

        samples = metric_samples(host.get("/metrics").text)
        assert values_of(samples, "neuromesh_requester_chats_started_total",
                         requester=student.node_id + "/owner") == [1]
        assert values_of(samples, "neuromesh_sharing_with") == [1]
        queues = host.health()["queues"]
        assert queues["share_slots"] == 1 and queues["hosts"][0]["parallel"] == 2

        paused = requests.patch(host.url + "/api/node", json={"sharing_paused": True}, timeout=5)
        assert paused.status_code == 200 and paused.json()["sharing_paused"] is True
        assert os.path.exists(os.path.join(host.data_dir, "sharing_paused"))  # kept like the node's name
        assert host.health()["llm"]["sharing_paused"] is True
        wait_for(lambda: student_hosts() == set(), message="the student stops placing chats on the paused host")
        refused = student.post("/api/conversations/%s/messages" % conversation, json={"content": "again"}, timeout=30)
        assert refused.status_code == 503
        own = host.post("/api/chat", json={"model": model, "messages": [{"role": "user", "content": "mine"}],
                                            "stream": False}, timeout=30)
        assert own.status_code == 200, own.text  # the owner still uses their own LLM

        resumed = requests.patch(host.url + "/api/node", json={"sharing_paused": False}, timeout=5)
        assert resumed.json()["sharing_paused"] is False
        wait_for(lambda: student_hosts() == {host.node_id}, message="sharing again")
        assert not os.path.exists(os.path.join(host.data_dir, "sharing_paused"))
