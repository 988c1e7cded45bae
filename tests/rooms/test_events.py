"""The events room in-process: the EventBus and the page's event stream (SSE) it feeds.

What it covers: every subscriber hears each event once, in order, with its type, data and time;
one that stopped reading loses events but never holds up the others or the publisher; an
unsubscribed one hears nothing more; and when the node stops (the bus is closed) the page's
event stream ends after its hello.
"""

import json
import threading

import neuromesh as nm
from conftest import drain, wait_for, wsgi_call


def test_each_subscriber_hears_every_event_in_order():
    bus = nm.EventBus()
    page, other = bus.subscribe(), bus.subscribe()
    bus.publish("peer_up", {"name": "ana's laptop"})
    bus.publish("message", {"conversation_id": "c1"})
    for inbox in (page, other):
        heard = drain(inbox)
        assert [(e["type"], e["data"]) for e in heard] == [("peer_up", {"name": "ana's laptop"}),
                                                          ("message", {"conversation_id": "c1"})]
        assert all(e["time"].endswith("Z") for e in heard)
    assert bus.subscriber_count == 2


def test_a_stuck_subscriber_loses_events_and_holds_up_no_one():
    bus = nm.EventBus()
    stuck, reading = bus.subscribe(), bus.subscribe()
    for index in range(bus.max_pending + 50):
        bus.publish("message", {"n": index})
        if index % 100 == 0:
            drain(reading)
    assert stuck.qsize() == bus.max_pending  # the newest were dropped, the first kept
    assert stuck.get_nowait()["data"] == {"n": 0}
    assert drain(reading)[-1]["data"] == {"n": bus.max_pending + 49}


def test_an_unsubscribed_page_hears_nothing_more():
    bus = nm.EventBus()
    page = bus.subscribe()
    bus.unsubscribe(page)
    bus.publish("message", {"conversation_id": "c1"})
    assert drain(page) == [] and bus.subscriber_count == 0


def test_the_page_stream_says_hello_then_ends_when_the_bus_closes(stub_node, monkeypatch):
    monkeypatch.setattr(nm.PageApi, "sse_keepalive", 0.05)
    bus = stub_node.events
    reply = {}

    def read_stream():  # as a browser: reads until the server ends the stream
        reply["value"] = wsgi_call(stub_node.app(), "GET", "/api/events")

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    wait_for(lambda: bus.subscriber_count == 1, message="the page subscribed")
    bus.publish("message", {"conversation_id": "c1"})
    bus.close()
    reader.join(10)
    assert not reader.is_alive(), "the stream ended once the bus closed"
    blocks = [json.loads(line[len("data: "):]) for line in reply["value"].text.splitlines()
              if line.startswith("data: ")]
    assert blocks[0]["type"] == "hello" and blocks[0]["data"]["name"] == "stub"
    assert blocks[1]["type"] == "message" and bus.subscriber_count == 0
