"""The official Python SDKs pointed at the plain node (no LLM) of a ServedMesh (conftest): each
returns ``(module, client)``, and skips the test, saying so, where the SDK is not installed."""

import pytest


def ollama_client(served):
    ollama = pytest.importorskip("ollama")
    return ollama, ollama.Client(host=served.plain.url, timeout=30)


def openai_client(served):
    openai = pytest.importorskip("openai")
    return openai, openai.OpenAI(base_url=served.plain.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)


def anthropic_client(served):
    anthropic = pytest.importorskip("anthropic")
    return anthropic, anthropic.Anthropic(base_url=served.plain.url, api_key="not-needed", max_retries=0, timeout=30)
