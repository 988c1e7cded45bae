"""A peer that comes back while another node keeps writing catches up at once:
the SyncWorker logic in-process (real Stores and SyncWorkers on a simulated network), then real
node processes on loopback (a restart, a pause), then hosts in network namespaces (a cut link;
five nodes under partitions and a SIGKILL)."""

import json
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import requests
from hypothesis import given, settings, strategies as st

import neuromesh as nm
from conftest import NodeProcess, RecordingMesh, fully_linked, keyed_store, wait_for
from support.namespaces import Namespaces, needs_namespaces


def sent(network, marker, sender, receiver):
    return network.frames[(marker, sender, receiver)]


# -- in-process: the SyncWorker logic --------------------------------------------------------------


def test_a_peer_that_relinks_while_the_writer_keeps_writing_gets_what_it_missed(sync_network):
    sync_network.link_all(["a", "b"])
    store = sync_network.nodes["a"].store
    conversation = store.create_conversation("lesson")["id"]
    sync_network.run()
    sync_network.unlink("a", "b")
    sync_network.frames.clear()
    written = []
    for index in range(30):  # all within a second: one long "fresh" streak of pushes nobody got
        written.append("while away %d" % index)
        store.add_message(conversation, "user", written[-1], "teacher")
    sync_network.link("a", "b")
    for index in range(5):  # a keeps writing: each delivery round brings a new push
        written.append("after %d" % index)
        store.add_message(conversation, "user", written[-1], "teacher")
        sync_network.run()
    assert sync_network.messages("b", conversation) == written
    assert sent(sync_network, nm.FILE, "a", "b") <= 5 + 2  # the live pushes, and at most two answers


def test_a_push_past_a_missed_one_makes_the_receiver_ask_and_the_gap_comes_at_once(sync_network):
    sync_network.link_all(["a", "b"])
    store = sync_network.nodes["a"].store
    conversation = store.create_conversation("lesson")["id"]
    sync_network.run()
    sync_network.frames.clear()
    sync_network.drop_to("b")
    store.add_message(conversation, "user", "lost on the way", "teacher")  # fresh: pushed a moment ago
    sync_network.drop_to(None)
    store.add_message(conversation, "user", "arrives past the gap", "teacher")
    sync_network.run()
    assert sync_network.messages("b", conversation) == ["lost on the way", "arrives past the gap"]
    assert sent(sync_network, nm.SYNC, "b", "a") == 1  # one question, with the gap named
    assert sent(sync_network, nm.FILE, "a", "b") == 2  # the push, then the answer
    assert sync_network.nodes["b"].counters["gaps_asked"] == 1


def test_a_writing_mesh_with_no_loss_sends_no_sync_at_all(sync_network):
    sync_network.link_all(["a", "b", "c"])
    conversation = sync_network.nodes["a"].store.create_conversation("lesson")["id"]
    for index in range(20):
        sync_network.nodes["a"].store.add_message(conversation, "user", "line %d" % index, "teacher")
        sync_network.run()
    assert sync_network.copies(nm.SYNC) == 0
    assert sync_network.copies() == 21 * 2  # each entry once to each of the N-1 others


def test_a_gap_nobody_fills_is_asked_once_per_state_not_once_per_push(tmp_path):
    writer_store, writer_key = keyed_store(tmp_path / "writer.db", "writer")
    conversation = writer_store.create_conversation("lesson")["id"]
    for index in range(6):
        writer_store.add_message(conversation, "user", "line %d" % index, "teacher")
    store, _key = keyed_store(tmp_path / "reader.db", "reader")
    mesh = RecordingMesh()
    worker = nm.SyncWorker(store, mesh, nm.EventBus(), interval=30.0)
    peer = types.SimpleNamespace(node_id=writer_key.node_id)
    worker.peer_up(peer)
    worker.run_ready()
    mesh.sent.clear()
    for seq in range(3, 7):  # pushes that all start past the gap (the reader holds nothing)
        worker.handle_file(peer, writer_store.batches.missing({writer_key.node_id: seq}))
    worker.run_ready()
    asks = [payload for _peer, marker, payload in mesh.sent if marker == nm.SYNC]
    assert asks == [{"vector": {}, "gaps": [writer_key.node_id]}]
    assert store.version_vector() == {}


def test_a_gap_question_is_answered_at_once_even_for_entries_just_pushed(tmp_path):
    store, key = keyed_store(tmp_path / "writer.db", "writer")
    mesh = RecordingMesh()
    worker = nm.SyncWorker(store, mesh, nm.EventBus(), interval=30.0)  # a repeated vector waits 15 s
    worker.requests.gap = 0.0  # a new one is answered at once: time is not simulated here
    reader = types.SimpleNamespace(node_id="r" * 32)
    worker.peer_up(reader)
    conversation = store.create_conversation("lesson")["id"]
    store.add_message(conversation, "user", "one", "teacher")

    def answers():
        return [payload for peer_id, marker, payload in mesh.sent if peer_id == reader.node_id and marker == nm.FILE]

    worker.handle_sync(reader, {"vector": {}})  # crossed the two pushes: no second copy
    worker.run_ready()
    assert answers() == []
    worker.handle_sync(reader, {"vector": {}})  # the same again: a repeat, dropped
    worker.handle_sync(reader, {"vector": {}, "gaps": [key.node_id]})  # the pushes came past its gap
    worker.run_ready()
    assert worker.counters["sync_requests_repeated"] == 1
    assert [entry["seq"] for entry in answers()[0]["entries"]] == [1, 2] and len(answers()) == 1


@settings(max_examples=150, deadline=None)
@given(gaps=st.none() | st.booleans() | st.integers() | st.text(max_size=5)
       | st.lists(st.text(max_size=140) | st.integers(), max_size=5))
def test_a_sync_frame_with_any_gaps_field_is_checked(gaps):
    payload = {"vector": {}, "gaps": gaps}
    fits = gaps is None or (isinstance(gaps, list) and all(isinstance(g, str) and len(g) <= 128 for g in gaps))
    if fits:
        nm.check_frame(nm.SYNC, payload)
    else:
        with pytest.raises(nm.ProtocolError, match="gaps"):
            nm.check_frame(nm.SYNC, payload)


# -- real node processes on loopback -----------------------------------------------------------------


class Writer(threading.Thread):
    """Posts a message every 1/rate seconds into one conversation through ``post(path, body)``
    (an HTTP status back), as a teacher's node that never stops; at most ``limit`` messages."""

    def __init__(self, post, conversation_id, rate=5.0, limit=1000):
        threading.Thread.__init__(self, daemon=True)
        self.post, self.conversation_id, self.rate, self.limit = post, conversation_id, rate, limit
        self.acknowledged = []
        self.failures = []
        self.finish = threading.Event()

    def run(self):
        path = "/api/conversations/%s/messages" % self.conversation_id
        for index in range(self.limit):
            if self.finish.wait(1.0 / self.rate):
                return
            text = "%s-%d" % (self.conversation_id[:8], index)
            status = self.post(path, {"content": text, "answer": False})
            (self.acknowledged if status == 201 else self.failures).append(text)

    def stop(self):
        self.finish.set()
        self.join(15)
        return list(self.acknowledged)


def http_post(node):
    session = requests.Session()
    return lambda path, body: session.post(node.url + path, json=body, timeout=10).status_code


def held(node, conversation_id):
    """The messages ``node`` shows of a conversation, in order (a list: a duplicate would show)."""
    response = node.get("/api/conversations/%s?limit=1000" % conversation_id)
    return [] if response.status_code != 200 else [m["content"] for m in response.json()["messages"]]


def writing_pair(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    wait_for(lambda: fully_linked([a, b]), message="a and b linked")
    conversation_id = a.post("/api/conversations", json={"title": "the lesson"}).json()["id"]
    wait_for(lambda: held(b, conversation_id) == [], message="the conversation on b")
    writer = Writer(http_post(a), conversation_id)
    writer.start()
    wait_for(lambda: len(writer.acknowledged) >= 10, message="a writing")  # a streak of pushes under way
    return a, b, conversation_id, writer


def catches_up_while_writing(a, b, conversation_id, writer):
    missed = list(writer.acknowledged)  # everything acknowledged while b was away, and before
    wait_for(lambda: fully_linked([a, b]), timeout=15, interval=0.02, message="b linked again")
    try:
        wait_for(lambda: set(missed) <= set(held(b, conversation_id)), timeout=3.0,
                 message="b holding, within 3 s of relinking, all a acknowledged while it was away")
        assert writer.is_alive() and not writer.finish.is_set(), "a was still writing"
    finally:
        everything = writer.stop()
    assert writer.failures == []
    wait_for(lambda: held(b, conversation_id) == everything, message="b holding each message once")


def test_a_restarted_peer_catches_up_while_a_keeps_writing(cluster):
    a, b, conversation_id, writer = writing_pair(cluster)
    b.stop()
    time.sleep(6.0)  # b is away for 6 s, as a laptop restarting
    b.start()
    catches_up_while_writing(a, b, conversation_id, writer)


def test_a_paused_peer_catches_up_while_a_keeps_writing(cluster):
    a, b, conversation_id, writer = writing_pair(cluster)
    b.process.send_signal(signal.SIGSTOP)  # a laptop whose lid closed: a drops the silent link
    try:
        wait_for(lambda: b.node_id not in a.connected_ids(), timeout=10, message="a dropped b")
        time.sleep(6.0 - 2.0)  # 6 s away in all (the peer timeout is 2 s)
    finally:
        b.process.send_signal(signal.SIGCONT)
    catches_up_while_writing(a, b, conversation_id, writer)


# -- hosts in network namespaces: a cut link; five nodes under partitions and a SIGKILL -----------------

AGENT = r"""
import json, sys, urllib.error, urllib.request
for line in sys.stdin:
    method, path, body = json.loads(line)
    request = urllib.request.Request("http://127.0.0.1:8080" + path, method=method, headers={
        "Content-Type": "application/json"}, data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            reply = [response.status, json.loads(response.read() or b"null")]
    except urllib.error.HTTPError as error:
        reply = [error.code, None]
    except Exception as error:
        reply = [0, repr(error)]
    print(json.dumps(reply), flush=True)
"""


class HostClient:
    """Asks the node of one namespace over HTTP through a small process living in it (one
    process for many requests: a new one per request would cost more than the request)."""

    def __init__(self, host):
        self.process = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c", AGENT],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()

    def call(self, method, path, body=None):
        with self.lock:
            self.process.stdin.write(json.dumps([method, path, body]) + "\n")
            self.process.stdin.flush()
            return json.loads(self.process.stdout.readline() or "[0, null]")

    def post(self, path, body):
        return self.call("POST", path, body)[0]

    def json(self, path):
        status, body = self.call("GET", path)
        return body if status == 200 else None

    def close(self):
        self.process.stdin.close()
        self.process.wait(10)


class CutNamespaces(Namespaces):
    """Namespaces (tests/support/namespaces.py) whose cables can be pulled and whose bridge can be split in two."""

    def cut(self, index):
        self.ip("-n", self.hub, "link", "set", "veth%d" % index, "down")

    def mend(self, index):
        self.ip("-n", self.hub, "link", "set", "veth%d" % index, "up")

    def split(self, indexes):
        """Move the hosts ``indexes`` onto a second bridge: two rooms that cannot hear each other."""
        self.ip("-n", self.hub, "link", "add", "br1", "type", "bridge")
        self.ip("-n", self.hub, "link", "set", "br1", "up")
        for index in indexes:
            self.ip("-n", self.hub, "link", "set", "veth%d" % index, "master", "br1")

    def heal(self, indexes):
        for index in indexes:
            self.ip("-n", self.hub, "link", "set", "veth%d" % index, "master", "br0")
        self.ip("-n", self.hub, "link", "del", "br1")


class NamespaceRoom:
    """``count`` nodes, one per namespace, with a client each; ``linked()``, ``holds(...)``."""

    def __init__(self, tmp_path, spaces):
        self.spaces = spaces
        self.nodes, self.clients = [], []
        for host in spaces.hosts:
            self.nodes.append(NodeProcess(tmp_path / host, ["--announce-interval", "0.5", "--peer-timeout", "2",
                                                           "--log-level", "debug", "--ollama-url", "none"], host,
                                          prefix=["ip", "netns", "exec", host]))
            self.clients.append(HostClient(host))

    def start(self):
        for node in self.nodes:
            node.start()
        wait_for(self.linked, timeout=30, interval=0.3, message="every namespace linked to every other")

    def linked(self, indexes=None):
        indexes = range(len(self.nodes)) if indexes is None else indexes
        for index in indexes:
            peers = self.clients[index].json("/api/peers") or []
            if sum(1 for peer in peers if peer["connected"] and peer["address"] in self._addresses(indexes)) \
                    != len(indexes) - 1:
                return False
        return True

    def _addresses(self, indexes):
        return {"%s.%d" % (self.spaces.subnet, index + 1) for index in indexes}

    def writer(self, index):
        """A Writer on node ``index``, in a conversation every node lists, with a client of its own."""
        client = HostClient(self.spaces.hosts[index])
        self.clients.append(client)
        status, record = client.call("POST", "/api/conversations", {"title": "lesson %d" % index})
        assert status == 201, record
        wait_for(lambda: all(self.held(other, record["id"]) == [] for other in range(len(self.nodes))),
                 timeout=10, interval=0.2, message="the conversation on every node")
        return Writer(client.post, record["id"])

    def held(self, index, conversation_id):
        page = self.clients[index].json("/api/conversations/%s?limit=1000" % conversation_id)
        return None if page is None else [message["content"] for message in page["messages"]]

    def lacking(self, expected):
        """(node index, how many) of the messages in ``expected`` ({conversation id: [text]}) each node lacks."""
        out = []
        for index in range(len(self.nodes)):
            count = sum(len(set(texts) - set(self.held(index, cid) or [])) for cid, texts in expected.items())
            if count:
                out.append((index + 1, count))
        return out

    def close(self):
        for node in self.nodes:
            node.kill()
        for client in self.clients:
            client.close()


def namespace_room(tmp_path, count):
    spaces = CutNamespaces(count)
    spaces.create()
    room = NamespaceRoom(tmp_path, spaces)
    try:
        room.start()
    except BaseException:
        room.close()
        spaces.delete()
        raise
    return spaces, room


@needs_namespaces
def test_a_peer_whose_cable_was_pulled_for_6_s_catches_up_while_a_keeps_writing(tmp_path):
    spaces, room = namespace_room(tmp_path, 2)
    writer = None
    try:
        writer = room.writer(0)
        writer.start()
        wait_for(lambda: len(writer.acknowledged) >= 10, message="a writing")
        spaces.cut(2)
        wait_for(lambda: not room.linked(), timeout=10, message="a and b see the link gone")
        time.sleep(6.0 - 2.0)  # 6 s without the cable in all (the peer timeout is 2 s)
        spaces.mend(2)
        missed = {writer.conversation_id: list(writer.acknowledged)}
        wait_for(room.linked, timeout=15, interval=0.05, message="a and b linked again")
        wait_for(lambda: not room.lacking(missed), timeout=3.0, interval=0.1,
                 message="b holding, within 3 s of relinking, all a acknowledged while it was cut off")
        assert writer.is_alive(), "a was still writing"
        everything = writer.stop()
        assert writer.failures == []
        wait_for(lambda: room.held(1, writer.conversation_id) == everything, message="each message once on b")
    finally:
        if writer is not None:
            writer.stop()
        room.close()
        spaces.delete()


@needs_namespaces
def test_five_hosts_after_partitions_and_a_sigkill_hold_every_acknowledged_message_soon_after_the_heal(tmp_path):
    spaces, room = namespace_room(tmp_path, 5)
    writers = []
    try:
        writers = [room.writer(index) for index in (0, 1, 3)]  # hosts 1, 2 and 4 write all along
        for writer in writers:
            writer.start()
        wait_for(lambda: all(len(writer.acknowledged) >= 5 for writer in writers), message="writing")
        spaces.cut(2)  # host 2 alone, still writing
        time.sleep(2.0)
        spaces.split([4, 5])  # hosts 1 and 3 | hosts 4 and 5
        time.sleep(1.0)
        room.nodes[2].kill()  # host 3: the power goes out
        time.sleep(2.0)
        spaces.mend(2)
        room.nodes[2].start()
        time.sleep(3.0)
        spaces.heal([4, 5])  # the final heal
        healed = time.monotonic()
        before_heal = {writer.conversation_id: list(writer.acknowledged) for writer in writers}
        try:
            wait_for(lambda: not room.lacking(before_heal), timeout=5.0, interval=0.2, message="the heal")
        except AssertionError:
            raise AssertionError("5 s after the final heal, (host, messages acknowledged before it that it lacks): %s"
                                 % room.lacking(before_heal)) from None
        print("every node held all %d messages acknowledged before the final heal %.1f s after it"
              % (sum(len(texts) for texts in before_heal.values()), time.monotonic() - healed))
        assert all(writer.is_alive() for writer in writers), "the writers were still writing"
        everything = {writer.conversation_id: writer.stop() for writer in writers}
        assert [writer.failures for writer in writers] == [[], [], []]
        wait_for(lambda: all(room.held(index, cid) == texts for index in range(5) for cid, texts in everything.items()),
                 timeout=20, interval=0.3, message="every node holding each message once, none lost")
    finally:
        for writer in writers:
            writer.stop()
        room.close()
        spaces.delete()
