"""Discovery in-process, without sockets: announcement datagrams built and read back, hostile
datagrams dropped (never raised), a keyed room's datagrams unreadable with another key or the
open room's, and announcements from public addresses dropped unless allowed."""

from hypothesis import given, settings, strategies as st

import neuromesh as nm

HELLO = {"node_id": "node-a", "name": "A", "tcp_port": 7878, "http_port": 8080}


def discovery(room_key=nm.OPEN_ROOM_KEY, allow_public=False):
    return nm.Discovery(0, ["127.255.255.255"], "node-self", 30.0, room_key=room_key, allow_public=allow_public)


def datagram(room_key, kind="ONLINE", hello=HELLO):
    return nm.tag_datagram(room_key, nm.Discovery.make_announcement(kind, hello))


def test_an_announcement_goes_out_and_comes_back_as_sent():
    message = discovery().open_announcement("127.0.0.2", datagram(nm.OPEN_ROOM_KEY))
    assert message["message_type"] == "ONLINE"
    assert message["node_id"] == "node-a" and message["tcp_port"] == 7878


def test_a_keyed_room_reads_only_its_own_datagrams():
    room = nm.derive_room_key("room-code-one")
    other = nm.derive_room_key("room-code-two")
    keyed = discovery(room)
    assert keyed.open_announcement("127.0.0.2", datagram(room))["node_id"] == "node-a"
    assert keyed.open_announcement("127.0.0.2", datagram(other)) is None
    assert keyed.open_announcement("127.0.0.2", datagram(nm.OPEN_ROOM_KEY)) is None
    assert discovery().open_announcement("127.0.0.2", datagram(room)) is None
    assert keyed.counters["unauthenticated_datagrams"] == 2


def test_a_public_address_is_dropped_unless_allowed():
    assert discovery().open_announcement("8.8.8.8", datagram(nm.OPEN_ROOM_KEY)) is None
    allowed = discovery(allow_public=True)
    assert allowed.open_announcement("8.8.8.8", datagram(nm.OPEN_ROOM_KEY))["node_id"] == "node-a"


def test_announcements_with_bad_fields_are_not_announcements():
    for bad in ({"node_id": 5, "tcp_port": 1}, {"node_id": "x" * 65, "tcp_port": 1},
                {"node_id": "n", "tcp_port": 0}, {"node_id": "n", "tcp_port": True},
                {"node_id": "n", "tcp_port": 70000}):
        assert nm.Discovery.parse_announcement(nm.Discovery.make_announcement("ONLINE", bad)) is None
    assert nm.Discovery.parse_announcement(b"[" * 10000 + b"]" * 10000) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_any_datagram_is_an_announcement_or_dropped(data):
    room = discovery()
    message = room.open_announcement("127.0.0.2", data)
    assert message is None or message["message_type"] in ("ONLINE", "OFFLINE")
    tagged = room.open_announcement("127.0.0.2", nm.tag_datagram(nm.OPEN_ROOM_KEY, data))
    assert tagged is None or isinstance(tagged["node_id"], str)
