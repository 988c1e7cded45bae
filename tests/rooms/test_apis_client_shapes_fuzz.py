"""The request parsers and stream translators of /v1/messages and /v1/responses take
hostile input: whatever JSON a client sends, or whatever chunks a host streams back, the
answer is a request, a clear HTTPFailure, or well-formed events; never another exception."""

import json

from hypothesis import HealthCheck, given, settings, strategies as st

import neuromesh

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=5), max_leaves=30)
KEYS = st.sampled_from(["model", "messages", "max_tokens", "system", "tools", "thinking", "stop_sequences",
                        "input", "instructions", "text", "reasoning", "previous_response_id", "output_config",
                        "role", "content", "type", "source", "data", "tool_use_id", "call_id", "image_url",
                        "arguments", "name", "input_schema", "format", "schema", "effort", "summary"])
BODIES = st.recursive(JSON, lambda inner: st.dictionaries(KEYS, inner, max_size=6) | st.lists(inner, max_size=4),
                      max_leaves=40).filter(lambda value: isinstance(value, dict)) | st.dictionaries(KEYS, JSON)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.filter_too_much])


@FUZZ
@given(BODIES)
def test_any_messages_body_is_a_request_or_a_clear_400(body):
    try:
        request = neuromesh.AnthropicShapes.request(body)
    except neuromesh.HTTPFailure as exc:
        assert exc.status == 400 and str(exc)
        return
    assert isinstance(request["model"], str) and isinstance(request["messages"], list)
    json.dumps(request)


@FUZZ
@given(BODIES)
def test_any_responses_body_is_a_request_or_a_clear_400(body):
    try:
        request = neuromesh.ResponsesShapes.request(body)
    except neuromesh.HTTPFailure as exc:
        assert exc.status == 400 and str(exc)
        return
    assert isinstance(request["model"], str) and request["messages"]
    json.dumps(request)


CHUNKS = st.lists(st.dictionaries(st.sampled_from(["message", "done", "error", "done_reason", "eval_count",
                                                   "prompt_eval_count"]), JSON, max_size=4), max_size=8)


@FUZZ
@given(CHUNKS)
def test_any_chunks_from_a_host_become_well_formed_events(chunks):
    for stream in (neuromesh.AnthropicStream("msg_1", "m"),
                   neuromesh.ResponsesStream(neuromesh.ResponsesShapes.skeleton("resp_1", "m", {}))):
        events = list(stream.events(iter(chunks)))
        for event in events:
            kind, data = event.split("\n", 1)
            assert kind.startswith("event: ") and data.startswith("data: ") and event.endswith("\n\n")
            assert json.loads(data[6:])["type"] == kind[7:]
    try:
        neuromesh.OllamaChats.whole(iter(chunks))
    except neuromesh.HTTPFailure as exc:
        assert exc.status in (502, 503)


@FUZZ
@given(JSON)
def test_message_images_are_a_list_of_base64_or_nothing(value):
    images = neuromesh._message_images(value)
    assert images is None or (1 <= len(images) <= neuromesh.MAX_MESSAGE_IMAGES and all(
        neuromesh._BASE64.fullmatch(image) for image in images))
