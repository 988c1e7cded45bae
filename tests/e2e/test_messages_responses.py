"""Anthropic's Messages API (``/v1/messages``) and OpenAI's Responses API
(``/v1/responses``) through a node WITHOUT an LLM, relayed to a host whose Ollama is the fake
(tests/support/fake_ollama.py), spoken to by the official ``anthropic`` and ``openai`` Python SDKs."""

import json

import pytest
import requests

from conftest import API_MODEL, PIXEL, SEER, THINKER
from support.fake_ollama import image_note, thinking_for
from support.sdk_clients import anthropic_client, openai_client

QUESTION = "What is the weather in Paris?"
WEATHER = {"name": "get_weather", "description": "The weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# -- Anthropic's Messages API ----------------------------------------------------------------

def test_anthropic_chat_with_a_system_prompt_and_turns(served):
    _anthropic, client = anthropic_client(served)
    assert served.plain.health()["has_llm"] is False
    reply = client.messages.create(model=API_MODEL, max_tokens=200, system="Be brief.",
                                   extra_body={"temperature": 0.5},  # older SDKs and Claude Code send it
                                   stop_sequences=["END"], messages=[
                                       {"role": "user", "content": "Hello"},
                                       {"role": "assistant", "content": "Hi, what do you want to know?"},
                                       {"role": "user", "content": QUESTION}])
    assert reply.role == "assistant" and reply.type == "message" and reply.stop_reason == "end_turn"
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == served.answer(QUESTION)
    assert reply.usage.output_tokens > 3 and reply.usage.input_tokens > 0
    sent = served.fake.requests_to("/api/chat")[-1]
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][0]["content"] == "Be brief."
    options = sent["options"]
    assert options["num_predict"] == 200 and options["temperature"] == 0.5 and options["stop"] == ["END"]


def test_anthropic_streamed_chat_has_the_event_sequence(served):
    _anthropic, client = anthropic_client(served)
    with client.messages.stream(model=API_MODEL, max_tokens=100,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds and "message_delta" in kinds
    assert kinds.count("text") > 3  # the SDK's own event for each text delta, as they arrive
    assert final.content[0].text == served.answer(QUESTION) and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 3


def test_anthropic_max_tokens_cuts_the_answer_and_a_schema_shapes_it(served):
    _anthropic, client = anthropic_client(served)
    reply = client.messages.create(model=API_MODEL, max_tokens=3, messages=[{"role": "user", "content": QUESTION}])
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 3
    assert reply.content[0].text == "Echo from " + API_MODEL + ":"
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    shaped = client.messages.create(model=API_MODEL, max_tokens=300, messages=[{"role": "user", "content": QUESTION}],
                                    output_config={"format": {"type": "json_schema", "schema": schema}})
    assert list(json.loads(shaped.content[0].text)) == ["city"]
    assert served.fake.requests_to("/api/chat")[-1]["format"] == schema


def test_anthropic_tool_round_trip(served):
    _anthropic, client = anthropic_client(served)
    question = {"role": "user", "content": QUESTION}
    reply = client.messages.create(model=API_MODEL, max_tokens=100, tools=[WEATHER], messages=[question])
    assert reply.stop_reason == "tool_use"
    call = next(block for block in reply.content if block.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "value of city"} and call.id
    sent = served.fake.requests_to("/api/chat")[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]

    final = client.messages.create(model=API_MODEL, max_tokens=100, tools=[WEATHER], messages=[
        question, {"role": "assistant", "content": [block.model_dump() for block in reply.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]}])
    assert final.stop_reason == "end_turn" and final.content[0].text == served.answer(QUESTION)
    sent = served.fake.requests_to("/api/chat")[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "value of city"}}
    assert sent[2] == {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}

    with client.messages.stream(model=API_MODEL, max_tokens=100, tools=[WEATHER], messages=[question]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [
        ("tool_use", "get_weather", {"city": "value of city"})]


def test_anthropic_image_reaches_the_host_as_base64(served):
    _anthropic, client = anthropic_client(served)
    reply = client.messages.create(model=SEER, max_tokens=100, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "text", "text": "What is in this picture?"}]}])
    assert reply.content[0].text == served.answer("What is in this picture?", SEER) + image_note([PIXEL])
    assert served.fake.requests_to("/api/chat")[-1]["messages"][0]["images"] == [PIXEL]


def test_anthropic_thinking_comes_back_in_its_own_block(served):
    _anthropic, client = anthropic_client(served)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    reply = client.messages.create(model=THINKER, max_tokens=500, thinking=thinking,
                                   messages=[{"role": "user", "content": QUESTION}])
    answer = served.answer(QUESTION, THINKER)
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == thinking_for(answer) and reply.content[1].text == answer
    assert served.fake.requests_to("/api/chat")[-1]["think"] is True
    with client.messages.stream(model=THINKER, max_tokens=500, thinking=thinking,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds.count("thinking") > 3 and kinds.index("thinking") < kinds.index("text")
    assert final.content[0].thinking == thinking_for(answer) and final.content[1].text == answer


def test_anthropic_errors_come_in_anthropics_shape(served):
    anthropic, client = anthropic_client(served)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model:7b", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=API_MODEL, max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://example.com/a.png"}}]}])
    assert "base64" in bad.value.body["error"]["message"]
    raw = requests.post(served.plain.url + "/v1/messages", json={"model": API_MODEL, "messages": []}, timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in raw.json()["error"]["message"]


# -- OpenAI's Responses API ------------------------------------------------------------------

def test_responses_plain_and_streamed(served):
    _openai, client = openai_client(served)
    reply = client.responses.create(model=API_MODEL, instructions="Be brief.", input=QUESTION, max_output_tokens=200)
    assert reply.status == "completed" and reply.output_text == served.answer(QUESTION)
    assert reply.usage.output_tokens > 3
    sent = served.fake.requests_to("/api/chat")[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["options"]["num_predict"] == 200

    kinds, deltas = [], []
    with client.responses.stream(model=API_MODEL, input=[
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert len(deltas) > 3 and "".join(deltas) == served.answer(QUESTION) == final.output_text


def test_responses_with_a_tool_round_trip(served):
    _openai, client = openai_client(served)
    tool = {"type": "function", "name": "get_weather", "description": "The weather of a city",
            "parameters": WEATHER["input_schema"]}
    reply = client.responses.create(model=API_MODEL, input=QUESTION, tools=[tool])
    call = next(item for item in reply.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "value of city"}
    final = client.responses.create(model=API_MODEL, tools=[tool], input=[
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert final.output_text == served.answer(QUESTION)
    sent = served.fake.requests_to("/api/chat")[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "value of city"}
    assert sent[2] == {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}

    with client.responses.stream(model=API_MODEL, input=QUESTION, tools=[tool]) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert [item.name for item in streamed.output if item.type == "function_call"] == ["get_weather"]


def test_responses_with_a_json_schema_format(served):
    _openai, client = openai_client(served)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sky": {"type": "string"}},
              "required": ["city", "sky"]}
    reply = client.responses.create(model=API_MODEL, input=QUESTION, text={"format": {
        "type": "json_schema", "name": "weather", "schema": schema, "strict": True}})
    assert set(json.loads(reply.output_text)) == {"city", "sky"}
    assert served.fake.requests_to("/api/chat")[-1]["format"] == schema


def test_responses_thinking_and_images(served):
    _openai, client = openai_client(served)
    reply = client.responses.create(model=THINKER, input=QUESTION, reasoning={"effort": "high"})
    answer = served.answer(QUESTION, THINKER)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output[0].summary[0].text == thinking_for(answer) and reply.output_text == answer
    assert served.fake.requests_to("/api/chat")[-1]["think"] == "high"
    seen = client.responses.create(model=SEER, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64," + PIXEL}]}])
    assert seen.output_text == served.answer("What is this?", SEER) + image_note([PIXEL])


def test_responses_previous_response_id_is_a_clear_400(served):
    openai, client = openai_client(served)
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=API_MODEL, input="and then?", previous_response_id="resp_123")
    assert "previous_response_id" in str(error.value) and "stateless" in str(error.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model:7b", input="hi")
