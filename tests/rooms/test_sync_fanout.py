"""Fan-out linear in N and bounded links: the forwarding rule and link choice in-process
(real Stores and SyncWorkers on a simulated network; 1,000 simulated nodes), and 100 real node
processes on loopback with bounded links and one LLM host."""

import random
import types

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh as nm
from conftest import wait_for
from support.mesh_simulation import SimulatedMesh


def received(network, marker=nm.FILE):
    """How many ``marker`` frames each node received."""
    counts = {label: 0 for label in network.nodes}
    for (kind, _sender, receiver), count in network.frames.items():
        if kind == marker:
            counts[receiver] += count
    return counts


# -- the forwarding rule on real SyncWorkers -------------------------------------------------------


def test_full_mesh_of_six_each_node_receives_each_entry_once(sync_network):
    labels = ["a", "b", "c", "d", "e", "f"]
    sync_network.link_all(labels)
    conversation = sync_network.write("a", "photosynthesis")  # two pushes: the conversation, the message
    sync_network.run()
    for label in labels:
        assert sync_network.messages(label, conversation) == ["photosynthesis"]
    assert received(sync_network) == {"a": 0, "b": 2, "c": 2, "d": 2, "e": 2, "f": 2}
    assert sync_network.copies() == 2 * (len(labels) - 1)  # no receiver forwards: all are linked to the origin
    assert sync_network.copies(nm.SYNC) == 0


def test_chain_a_b_c_d_converges_by_forwarding_one_hop_a_round(sync_network):
    for label in "abcd":
        sync_network.add(label)
    for a, b in ("ab", "bc", "cd"):
        sync_network.link(a, b)
    sync_network.settle()
    conversation = sync_network.write("a", "chain")
    sync_network.run()
    assert sync_network.messages("d", conversation) == ["chain"]
    assert sync_network.hops == 3  # one round per hop: no sync interval was waited for
    assert sync_network.copies(nm.SYNC) == 0
    assert {(s, r) for (kind, s, r) in sync_network.frames if kind == nm.FILE} == {("a", "b"), ("b", "c"), ("c", "d")}


def test_partial_mesh_of_two_rooms_converges_each_node_receiving_each_entry_once(sync_network):
    rooms = (["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"])  # two full meshes, one bridge a3-b0
    for room in rooms:
        sync_network.link_all(room)
    sync_network.link("a3", "b0")
    sync_network.settle()
    conversations = [sync_network.write("a0", "from a0"), sync_network.write("b1", "from b1")]
    sync_network.run()
    for label in rooms[0] + rooms[1]:
        for conversation, text in zip(conversations, ("from a0", "from b1")):
            assert sync_network.messages(label, conversation) == [text]
    assert sync_network.copies() == 4 * 7  # 4 pushes, each reaching the 7 others once: flooding sends 76
    assert sync_network.copies(nm.SYNC) == 0


def test_idle_mesh_sends_no_vectors_and_a_missed_push_heals_in_one_round(sync_network):
    sync_network.link_all(["a", "b", "c"])
    for worker in sync_network.nodes.values():
        worker.run_once(0.0)  # a periodic round, due now
    sync_network.run()
    assert sync_network.frames == {}  # nothing changed: no SYNC: at all

    sync_network.drop_to("c")  # c misses the push (a link that lost it)
    conversation = sync_network.write("a", "late")
    sync_network.run()
    assert sync_network.messages("b", conversation) == ["late"]
    assert sync_network.nodes["c"].store.get_conversation(conversation) is None
    sync_network.drop_to(None)
    for worker in sync_network.nodes.values():
        worker.fresh_for = 0.0  # the next round comes seconds later in life: the push is no longer fresh
        worker.run_once(0.0)
    sync_network.run()
    assert sync_network.messages("c", conversation) == ["late"]


def test_a_vector_that_crosses_a_push_gets_no_second_copy(sync_network):
    sync_network.link_all(["a", "b"])
    behind = sync_network.nodes["b"].store.version_vector()
    conversation = sync_network.write("a", "crossing")  # its pushes are on the way to b
    sync_network.nodes["a"].handle_sync(types.SimpleNamespace(node_id="b"), {"vector": behind})
    sync_network.run()
    assert sync_network.messages("b", conversation) == ["crossing"]
    assert sync_network.copies() == 2  # the two pushes; the SYNC: answer left them out


# -- LinkPolicy ---------------------------------------------------------------------------------


def test_link_policy_links_all_of_a_small_room_and_a_random_few_of_a_big_one():
    policy = nm.LinkPolicy(24)
    ready = [("t%d" % index, False) for index in range(30)] + [("host", True)]
    assert len(policy.dial_choices(ready[:20], known=20, outbound=3)) == 20  # a full mesh up to 24
    chosen = policy.dial_choices(ready, known=200, outbound=3, rng=random.Random(1))
    assert "host" in chosen and len(chosen) == 1 + policy.out_links - 3  # hosts always, others to the budget
    assert policy.dial_choices(ready, known=200, outbound=policy.out_links) == ["host"]


def test_link_policy_evicts_peers_that_dialed_never_the_newcomer():
    policy = nm.LinkPolicy(4)
    counted = [("in1", True), ("in2", True), ("out1", False), ("out2", False), ("new", True), ("in3", True)]
    evicted = policy.evictions(counted, "new", random.Random(3))
    assert len(evicted) == 2 and set(evicted) <= {"in1", "in2", "in3"}
    assert policy.evictions(counted[:4], "new") == []


def test_forward_to_spares_the_senders_links_and_holders():
    linked = ["s", "x", "y", "z"]
    assert nm.LinkPolicy.forward_to(linked, "s", frozenset({"x", "me"}), spread=True) == ["y", "z"]
    assert nm.LinkPolicy.forward_to(linked, "s", frozenset({"x"}), spread=False) == ["x", "y", "z"]
    assert nm.LinkPolicy.forward_to(linked, "s", None, spread=True, holders={"z"}) == ["x", "y"]


def test_max_links_below_four_is_refused_with_a_clear_error(tmp_path):
    args = nm.build_arg_parser().parse_args(["--data-dir", str(tmp_path), "--max-links", "2"])
    with pytest.raises(nm.ConfigError, match="--max-links must be at least 4"):
        nm.load_config(args, environ={})


# -- 1,000 simulated nodes --------------------------------------------------------------------------


def test_a_thousand_simulated_nodes_with_bounded_links_reach_all_within_four_hops():
    mesh = SimulatedMesh(1000, degree=24, seed=14)
    assert mesh.most_links() <= 24
    assert mesh.diameter() <= 4
    flood = mesh.flood(origin=0)
    assert flood.reached == 1000 and flood.hops <= 4
    assert flood.frames < 1000 * 24  # each node sends each entry at most once to each of its links


# -- 100 real processes ------------------------------------------------------------------------------


@pytest.mark.scale
def test_a_hundred_processes_with_bounded_links_all_get_a_message_and_see_the_llm_host(hundred_nodes):
    nodes, host, degree = hundred_nodes
    writer = nodes[37]
    conversation = writer.post("/api/conversations", json={"title": "everyone"}).json()["id"]
    reply = writer.post("/api/conversations/%s/messages" % conversation, json={"content": "hello all", "answer": False})
    assert reply.status_code == 201, reply.text

    def everyone_has_it():
        return [node.label for node in nodes
                if conversation not in {c["id"] for c in node.json("/api/conversations", timeout=30)}]

    wait_for(lambda: not everyone_has_it(), timeout=30, interval=0.5, message="the conversation on every node")
    for node in nodes:
        peers = node.json("/api/peers", timeout=30)
        counted = [p for p in peers if p["connected"] and p["node_id"] != host.node_id]
        if node is not host:  # the LLM host keeps every node's link to it
            assert len(counted) <= degree, (node.label, len(counted))
            assert any(p["connected"] and p["node_id"] == host.node_id for p in peers), node.label
        assert len(peers) >= 50, (node.label, len(peers))  # discovery lists those it is not linked to too
    wait_for(lambda: all(node.json("/api/models", timeout=30)["llm_hosts"] == 1 for node in nodes if node is not host),
             timeout=30, interval=0.5, message="every node to see the LLM host")


# -- hostile input: a PEER: frame's list of links, a FILE: frame's "spread" -----------------------------

ENTRY_VALUE = st.none() | st.booleans() | st.integers(-3, 70000) | st.text(max_size=70) | st.lists(st.integers(), max_size=2)
PEER_ENTRY = st.dictionaries(st.sampled_from(["node_id", "name", "address", "tcp_port", "x"]), ENTRY_VALUE, max_size=5)


@pytest.fixture(scope="module")
def bare_mesh(tmp_path_factory):
    """A Mesh that is built but never started: its frame handling, called by hand."""
    config = nm.Config(data_dir=str(tmp_path_factory.mktemp("bare")), no_discovery=True, host="127.0.0.1")
    key = nm.NodeKey.generate()
    mesh = nm.Mesh(config, key.node_id, key=key)
    yield mesh
    mesh.io.close_sockets()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.fixed_dictionaries({"peers": st.lists(PEER_ENTRY, max_size=30)}) | st.dictionaries(
    st.sampled_from(["peers", "spread"]), ENTRY_VALUE))
def test_any_peer_list_is_checked_and_kept_bounded_as_the_senders_links(bare_mesh, payload):
    peer = nm.Peer("p" * 32)
    try:
        nm.check_frame(nm.PEERS, payload)
    except nm.ProtocolError:
        return  # the link would close with this message
    bare_mesh.peer_exchange.handle(peer, payload)
    assert bare_mesh.node_id in peer.links and len(peer.links) <= bare_mesh.peer_exchange.max_link_list + 1
    assert all(isinstance(node_id, str) for node_id in peer.links)


@settings(max_examples=100, deadline=None)
@given(spread=ENTRY_VALUE)
def test_a_file_frame_whose_spread_is_not_a_boolean_is_refused(spread):
    payload = {"entries": [], "spread": spread}
    if spread is None or isinstance(spread, bool):
        nm.check_frame(nm.FILE, payload)
    else:
        with pytest.raises(nm.ProtocolError, match="spread must be true or false"):
            nm.check_frame(nm.FILE, payload)
