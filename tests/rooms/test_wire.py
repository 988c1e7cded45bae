"""The wire room in-process: frames, announcements and settings, as a peer and a user meet them.

What it covers: a frame decodes to its marker and payload however the stream is split, and an
oversize length, an unknown marker or bad JSON is refused before it costs memory; announcements
keep the original program's fields and garbage datagrams are no announcement; directed
broadcast addresses; settings come from flags, then the environment, then the file, then the
documented defaults, and a bad one is named; the node's identity is random, kept and private.
A live node on loopback closes a link that sends malformed frames, counts garbage datagrams
and bounds a flood of peer-exchange entries."""

import json
import os
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

import neuromesh as nm
from conftest import LOOPBACK_BROADCAST, wait_for

# -- frames ---------------------------------------------------------------------


def feed_all(decoder, data):
    """Every frame in ``data``: before the key proof a decoder gives one frame per feed()."""
    frames = decoder.feed(data)
    received = list(frames)
    while frames:
        frames = decoder.feed(b"")
        received += frames
    return received


def test_frame_round_trip_keeps_marker_and_payload():
    payload = {"node_id": "abc", "text": "héllo ✓", "n": [1, 2.5, None, True]}
    frames = nm.FrameDecoder(1024).feed(nm.encode_frame(nm.HELLO, payload))
    assert frames == [(nm.HELLO, payload)]


def test_frame_layout_is_marker_then_u64_little_endian_length():
    frame = nm.encode_frame(nm.PING, {"t": 1})
    body = json.dumps({"t": 1}, separators=(",", ":")).encode()
    assert frame[:5] == b"PING:"
    assert struct.unpack("<Q", frame[5:13])[0] == len(body)
    assert frame[13:] == body


def test_every_marker_is_five_ascii_bytes():
    assert all(len(marker) == 5 and marker.isascii() for marker in nm.MARKERS)


def test_stream_fed_one_byte_at_a_time_yields_each_frame_once():
    payloads = [{"i": i, "pad": "x" * i} for i in range(5)]
    stream = b"".join(nm.encode_frame(nm.SYNC, p) for p in payloads)
    decoder = nm.FrameDecoder(1024)
    received = []
    for index in range(len(stream)):
        received += decoder.feed(stream[index:index + 1])
    assert [payload for _marker, payload in received] == payloads
    assert decoder.buffered == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=4),
                min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=50))
def test_any_split_of_a_stream_decodes_the_same(payloads, cuts):
    stream = b"".join(nm.encode_frame(nm.FILE, p) for p in payloads)
    decoder, received, position = nm.FrameDecoder(1 << 20), [], 0
    for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        if position >= len(stream):
            break
        received += feed_all(decoder, stream[position:position + cut])
        position += cut
    received += feed_all(decoder, stream[position:])
    assert [p for _m, p in received] == payloads


def test_oversize_length_is_refused_before_the_payload_arrives():
    decoder = nm.FrameDecoder(max_size=1000)
    header = struct.pack("<5sQ", b"FILE:", 10 ** 12)
    with pytest.raises(nm.ProtocolError, match="over the limit"):
        decoder.feed(header)


def test_unknown_marker_is_refused():
    with pytest.raises(nm.ProtocolError, match="unknown frame marker"):
        nm.FrameDecoder(1000).feed(struct.pack("<5sQ", b"EVIL:", 2) + b"{}")


def test_bad_json_and_non_objects_are_refused():
    with pytest.raises(nm.ProtocolError, match="bad JSON"):
        nm.FrameDecoder(1000).feed(struct.pack("<5sQ", b"PING:", 5) + b"{nope")
    with pytest.raises(nm.ProtocolError, match="JSON object"):
        nm.FrameDecoder(1000).feed(struct.pack("<5sQ", b"PING:", 2) + b"[]")
    with pytest.raises(nm.ProtocolError, match="bad JSON"):
        nm.FrameDecoder(1000).feed(struct.pack("<5sQ", b"PING:", 2) + b"\xff\xfe")


def test_encoding_an_unknown_marker_is_a_programming_error():
    with pytest.raises(nm.ProtocolError):
        nm.encode_frame(b"NOPE:", {})


# -- announcements ----------------------------------------------------------------


def test_announcement_keeps_the_original_fields():
    hello = {"node_id": "n1", "name": "A", "tcp_port": 7878, "http_port": 8080, "has_llm": True,
             "version": nm.__version__, "protocol_version": nm.PROTOCOL_VERSION}
    message = nm.Discovery.parse_announcement(nm.Discovery.make_announcement("ONLINE", hello))
    assert message["message_type"] == "ONLINE" and message["has_llm"] is True
    assert message["timestamp"].endswith("Z")
    assert message["node_id"] == "n1" and message["tcp_port"] == 7878


@pytest.mark.parametrize("datagram", [
    b"", b"\xff\xfe garbage", b"[]", b"null", b'{"message_type": "ONLINE"}',
    b'{"message_type": "HELLO", "node_id": "x", "tcp_port": 1}',
    b'{"message_type": "ONLINE", "node_id": "x", "tcp_port": "7878"}',
    b'{"message_type": "ONLINE", "node_id": "x", "tcp_port": 70000}',
    b'{"message_type": "ONLINE", "node_id": "", "tcp_port": 7878}',
])
def test_garbage_datagrams_are_not_announcements(datagram):
    assert nm.Discovery.parse_announcement(datagram) is None


def test_directed_broadcast_of_an_interface():
    assert nm.directed_broadcast("10.77.0.3", 24) == "10.77.0.255"
    assert nm.directed_broadcast("192.168.1.20", 22) == "192.168.3.255"
    assert nm.directed_broadcast("127.0.0.1", 8) == "127.255.255.255"


def test_default_broadcast_addresses_skip_loopback():
    addresses = nm.default_broadcast_addresses()
    assert all(not address.startswith("127.") for address in addresses)


# -- configuration ------------------------------------------------------------------


def _config(argv, environ=None, tmp_path=None):
    return nm.load_config(nm.build_arg_parser().parse_args(argv), environ or {})


def test_defaults_are_the_documented_ones():
    config = _config([])
    assert (config.http_port, config.tcp_port, config.udp_port) == (8080, 7878, 5000)
    assert config.host == "0.0.0.0" and config.announce_interval == 30 and config.peer_timeout == 60
    assert config.sync_interval == 30 and config.max_message_size == 50 * 1024 * 1024
    assert config.data_dir.endswith(".neuromesh")


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    config_file = tmp_path / "nm.json"
    config_file.write_text(json.dumps({"http_port": 9001, "tcp_port": 9002, "udp_port": 9003, "name": "file"}))
    environ = {"NEUROMESH_TCP_PORT": "9102", "NEUROMESH_UDP_PORT": "9103", "NEUROMESH_NAME": "env"}
    config = _config(["--config", str(config_file), "--udp-port", "9203"], environ)
    assert config.http_port == 9001  # only the file says it
    assert config.tcp_port == 9102   # env beats file
    assert config.udp_port == 9203   # flag beats env
    assert config.name == "env"


def test_repeatable_flags_fractional_intervals_and_sizes():
    config = _config(["--broadcast", "127.255.255.255", "--broadcast", "10.0.0.255",
                      "--peer", "10.0.0.2:7000", "--peer", "host", "--announce-interval", "0.25",
                      "--max-message-size", "2MiB", "--no-discovery"])
    assert config.broadcast == ["127.255.255.255", "10.0.0.255"]
    assert config.static_peers == [("10.0.0.2", 7000), ("host", 7878)]
    assert config.announce_interval == 0.25 and config.max_message_size == 2 * 1024 * 1024
    assert config.no_discovery is True


@pytest.mark.parametrize("argv, environ, fragment", [
    (["--http-port", "http"], {}, "--http-port must be a port number"),
    (["--peer-timeout", "-1"], {}, "--peer-timeout must be a positive number of seconds"),
    ([], {"NEUROMESH_UDP_PORT": "99999"}, "NEUROMESH_UDP_PORT"),
    (["--max-message-size", "lots"], {}, "max_message_size"),
    (["--log-level", "loud"], {}, "log-level"),
])
def test_bad_settings_name_the_setting(argv, environ, fragment):
    with pytest.raises(nm.ConfigError, match=fragment):
        _config(argv, environ)


def test_unknown_key_in_config_file_is_an_error(tmp_path):
    config_file = tmp_path / "nm.json"
    config_file.write_text('{"http_prot": 1}')
    with pytest.raises(nm.ConfigError, match="unknown setting 'http_prot'"):
        _config(["--config", str(config_file)])


def test_identity_is_random_persisted_and_private(tmp_path):
    first = nm.load_identity(str(tmp_path))
    nm.Store(str(tmp_path / nm.DATABASE_FILE), first, "A").close()
    assert first == nm.load_identity(str(tmp_path))
    assert first != nm.load_identity(str(tmp_path / "other"))
    assert socket.gethostname() not in first


def test_a_lost_database_means_a_new_identity(tmp_path):
    # peers hold the old id's sequence numbers: reusing the id would hide new messages
    first = nm.load_identity(str(tmp_path))
    nm.Store(str(tmp_path / nm.DATABASE_FILE), first, "A").close()
    os.remove(str(tmp_path / nm.DATABASE_FILE))
    assert nm.load_identity(str(tmp_path)) != first


# -- a live node and hostile peers ------------------------------------------------------


@pytest.mark.parametrize("attack", ["oversize", "unknown_marker", "bad_json", "before_handshake"])
def test_malformed_frames_close_the_link_and_the_node_stays_up(cluster, raw_peer, attack):
    node = cluster.start("target", settings={"max_message_size": "1MiB"})
    peer = raw_peer(node.tcp_port)
    assert peer.prove()["node_id"] == node.node_id  # the key proof done, no HELO sent yet
    if attack == "oversize":
        peer.sock.sendall(struct.pack("<5sQ", b"FILE:", 2 ** 40))
    elif attack == "unknown_marker":
        peer.sock.sendall(struct.pack("<5sQ", b"HACK:", 2) + b"{}")
    elif attack == "bad_json":
        peer.sock.sendall(struct.pack("<5sQ", b"HELO:", 9) + b"{not json")
    else:
        peer.send(nm.SYNC, {"vector": {}})
    assert peer.closed_by_node()
    health = node.health()
    assert health["status"] == "ok" and node.alive
    assert health["counters"]["protocol_errors"] == 1
    assert "closing link" in node.log()


def test_garbage_datagrams_are_counted_and_ignored(cluster):
    node = cluster.start("listener")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    try:
        for datagram in (b"\x00\x01garbage", b"{}", b'{"message_type":"ONLINE","node_id":7}'):
            sender.sendto(datagram, (LOOPBACK_BROADCAST, cluster.udp_port))
    finally:
        sender.close()
    wait_for(lambda: node.health()["counters"].get("garbage_datagrams", 0) >= 3, message="3 garbage datagrams")
    assert node.alive and node.peers() == []


def test_a_flood_of_peer_exchange_entries_is_bounded(cluster, raw_peer):
    node = cluster.start("target", settings={"peer_timeout": "30"})
    peer = raw_peer(node.tcp_port)
    peer.prove()
    key = nm.NodeKey.generate()  # a HELO must be signed by the key its id derives from
    peer.send(nm.HELLO, nm.signed_hello(key, peer, {"node_id": key.node_id, "name": "flooder", "tcp_port": 1}))
    entries = [{"node_id": "%032x" % i, "address": "127.0.0.1", "tcp_port": 20000 + i} for i in range(3000)]
    peer.send(nm.PEERS, {"peers": entries})
    wait_for(lambda: node.health()["counters"]["dial_targets"] >= 200, message="targets from the exchange")
    counters = node.health()["counters"]
    assert counters["dial_targets"] <= nm.DialPlan.max_exchanged + 1  # entries read at most: 256
    assert node.alive
