"""Meshes without sockets, driven by NeuroMesh's own logic: for tests and bench/bench_fanout.py.

- ``SyncNetwork``: a few real SyncWorkers over real keyed Stores, linked as a test says; frames
  go through JSON as on the wire and are delivered in order, one hop at a time. Forwarding is
  the Mesh's own rule (LinkPolicy.forward_to), with each node knowing its peers' links as peer
  exchange tells them.
- ``SimulatedMesh``: a thousand nodes that choose their links with LinkPolicy (dial choices,
  evictions past --max-links) and flood an entry with LinkPolicy.forward_to; time is
  simulated from a per-hop cost and a per-frame send cost.
"""

import collections
import heapq
import json
import random
import types

import neuromesh as nm


class SimulatedLinks:
    """What a SyncWorker needs of its Mesh, over a SyncNetwork: handle, send, broadcast, forward, linked_peers."""

    def __init__(self, network, node_id):
        self.network, self.node_id = network, node_id
        self.handlers = {}  # marker -> the worker's handler, as it registers with a Mesh
        self.listeners = []  # what hears of peers, as it registered with a Mesh

    def handle(self, marker, handler):
        self.handlers[marker] = handler

    def watch(self, listener):
        self.listeners.append(listener)

    def linked_peers(self):
        return [types.SimpleNamespace(node_id=peer_id) for peer_id in sorted(self.network.links[self.node_id])]

    def send(self, peer_id, marker, payload):
        if peer_id in self.network.links[self.node_id]:
            self.network.transmit(self.node_id, peer_id, marker, payload)

    def broadcast(self, marker, payload, exclude=None):
        for peer_id in sorted(self.network.links[self.node_id]):
            if peer_id != exclude:
                self.network.transmit(self.node_id, peer_id, marker, payload)

    def forward(self, marker, payload, sender, spread, holders=()):
        links = self.network.links
        for peer_id in nm.LinkPolicy.forward_to(sorted(links[self.node_id]), sender, links.get(sender), spread,
                                                holders):
            self.network.transmit(self.node_id, peer_id, marker, payload)

    def unlink(self, peer_id, reason, seconds=60.0):
        raise AssertionError("a simulated peer sent a batch that failed verification: %s" % reason)


class SyncNetwork:
    """Real Stores and SyncWorkers joined by simulated links; ``run()`` delivers every frame.

    ``add(label)``, ``link(a, b)``, ``unlink(a, b)``, ``link_all(labels)``, ``write(label, text)`` (a new
    conversation and message on that node, pushed as a Node pushes), ``run()``, ``settle()``;
    ``frames`` counts (marker, sender, receiver) and ``hops`` the delivery rounds ``run`` took."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.nodes, self.links = {}, {}
        self.in_flight = collections.deque()
        self.frames = collections.Counter()
        self.hops = 0
        self.dropping = None  # frames to this node are lost (``drop_to``)

    def add(self, label):
        key = nm.NodeKey.generate()
        store = nm.Store(str(self.tmp_path / ("%s.db" % label)), key.node_id, label, key)
        worker = nm.SyncWorker(store, SimulatedLinks(self, label), nm.EventBus(), interval=3600)
        worker.requests.gap = worker.requests.repeat_gap = 0.0  # answers at once: time is not simulated here
        self.nodes[label] = worker
        self.links[label] = set()
        return worker

    def link(self, a, b):
        """Link ``a`` and ``b``; both send their vectors, as on a real link-up."""
        self.links[a].add(b)
        self.links[b].add(a)
        for one, other in ((a, b), (b, a)):
            self.nodes[one].peer_up(types.SimpleNamespace(node_id=other))

    def unlink(self, a, b):
        """Drop the link ``a``-``b`` as a cut cable does: both sides see the peer go down."""
        self.links[a].discard(b)
        self.links[b].discard(a)
        for one, other in ((a, b), (b, a)):
            self.nodes[one].peer_down(types.SimpleNamespace(node_id=other))

    def link_all(self, labels):
        """Add the nodes ``labels``, link each pair of them, and settle."""
        for label in labels:
            self.add(label)
        for index, a in enumerate(labels):
            for b in labels[index + 1:]:
                self.link(a, b)
        return self.settle()

    def settle(self):
        """Deliver the link-up vectors, then forget the frames they took."""
        self.run()
        self.frames.clear()
        self.hops = 0
        return self

    def write(self, label, text):
        store = self.nodes[label].store
        conversation = store.create_conversation("about %s" % text)
        store.add_message(conversation["id"], "user", text, "student")
        return conversation["id"]

    def drop_to(self, label):
        """Lose every frame sent to ``label`` from now on (None: lose nothing)."""
        self.dropping = label

    def transmit(self, sender, receiver, marker, payload):
        if receiver == self.dropping:
            return
        self.frames[(marker, sender, receiver)] += 1
        self.in_flight.append((sender, receiver, marker, json.loads(json.dumps(payload))))

    def run(self, max_rounds=50):
        """Deliver frames round by round (a round: every frame sent in the one before) until none is left."""
        for _ in range(max_rounds):
            self._run_jobs()
            if not self.in_flight:
                return
            self.hops += 1
            batch, self.in_flight = self.in_flight, collections.deque()
            for sender, receiver, marker, payload in batch:
                self.nodes[receiver].mesh.handlers[marker](types.SimpleNamespace(node_id=sender), payload)
        raise AssertionError("frames still flowing after %d rounds" % max_rounds)

    def _run_jobs(self):
        for worker in self.nodes.values():
            worker.run_ready()

    def copies(self, marker=nm.FILE):
        return sum(count for (kind, _s, _r), count in self.frames.items() if kind == marker)

    def messages(self, label, conversation_id):
        return [m["content"] for m in self.nodes[label].store.get_conversation(conversation_id)["messages"]]

    def close(self):
        for worker in self.nodes.values():
            worker.store.close()


FloodResult = collections.namedtuple("FloodResult", "reached seconds hops frames")


class SimulatedMesh:
    """``count`` nodes that each know every other (discovery) and link by LinkPolicy with ``degree``."""

    def __init__(self, count, degree, seed=1, max_rounds=100):
        self.count = count
        self.policy = nm.LinkPolicy(degree)
        self.rng = random.Random(seed)
        self.links = [set() for _ in range(count)]
        self.dialed = [set() for _ in range(count)]  # peers node i dialed (its outbound links)
        self.refused = [set() for _ in range(count)]  # peers that unlinked node i (a GOODBYE: forgotten)
        self.rounds = self._settle(max_rounds)

    def _settle(self, max_rounds):
        """Let every node dial, in random order, until no node wants another link."""
        for round_number in range(1, max_rounds + 1):
            dials = 0
            for node in self.rng.sample(range(self.count), self.count):
                ready = [(peer, False) for peer in range(self.count)
                         if peer != node and peer not in self.links[node] and peer not in self.refused[node]]
                for peer in self.policy.dial_choices(ready, self.count - 1, len(self.dialed[node]), self.rng):
                    self._link(node, peer)
                    dials += 1
            if not dials:
                return round_number
        raise AssertionError("links still changing after %d rounds" % max_rounds)

    def _link(self, dialer, acceptor):
        self.links[dialer].add(acceptor)
        self.links[acceptor].add(dialer)
        self.dialed[dialer].add(acceptor)
        counted = [(peer, acceptor in self.dialed[peer]) for peer in self.links[acceptor]]
        for peer in self.policy.evictions(counted, dialer, self.rng):
            self._unlink(acceptor, peer)
        counted = [(peer, dialer in self.dialed[peer]) for peer in self.links[dialer]]
        for peer in self.policy.evictions(counted, acceptor, self.rng):
            self._unlink(dialer, peer)

    def _unlink(self, node, peer):
        """``node`` says goodbye to ``peer``, which forgets it as a dial target."""
        self.links[node].discard(peer)
        self.links[peer].discard(node)
        self.dialed[node].discard(peer)
        self.dialed[peer].discard(node)
        self.refused[peer].add(node)

    def most_links(self):
        return max(len(links) for links in self.links)

    def eccentricity(self, origin):
        distance = {origin: 0}
        frontier = [origin]
        while frontier:
            following = []
            for node in frontier:
                for peer in self.links[node]:
                    if peer not in distance:
                        distance[peer] = distance[node] + 1
                        following.append(peer)
            frontier = following
        return max(distance.values()) if len(distance) == self.count else float("inf")

    def diameter(self, samples=None):
        """Hops across the mesh: the largest eccentricity (of ``samples`` random nodes, else all)."""
        nodes = range(self.count) if samples is None else self.rng.sample(range(self.count), samples)
        return max(self.eccentricity(node) for node in nodes)

    def flood(self, origin, hop_seconds=0.002, send_seconds=0.0001):
        """Spread one entry from ``origin`` as the Mesh does (LinkPolicy.forward_to); each node
        handles a frame in ``hop_seconds`` and sends its copies one after another."""
        first = {}  # node -> (time, hops) of its first copy
        frames = 0
        events = [(0.0, 0, origin, None)]
        while events:
            moment, hops, node, sender = heapq.heappop(events)
            if node in first:
                continue
            first[node] = (moment, hops)
            if sender is None:
                targets = sorted(self.links[node])
            else:
                targets = nm.LinkPolicy.forward_to(sorted(self.links[node]), sender, self.links[sender], True)
            for index, peer in enumerate(targets):
                frames += 1
                heapq.heappush(events, (moment + send_seconds * (index + 1) + hop_seconds, hops + 1, peer, node))
        return FloodResult(len(first), max(t for t, _h in first.values()), max(h for _t, h in first.values()),
                           frames)
