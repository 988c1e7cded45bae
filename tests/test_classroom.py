"""Issue 12 without a browser: history of failed and edited questions, cut-off answers, naming,
search, paging, export/import round trips, the CLI's help and errors."""

import json
import os
import subprocess
import sys

import pytest

import neuromesh
from conftest import ROOT, SCRIPT


def msg(role, content, id_=None, **extra):
    return dict({"role": role, "content": content, "id": id_ or content}, **extra)


def test_a_failed_question_is_not_history_unless_it_is_the_last():
    messages = [msg("user", "failed"), msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")]
    history = neuromesh.ChatService.history_of(messages)
    assert [m["content"] for m in history] == ["q1", "a1", "q2"]


def test_an_edited_question_replaces_the_old_one_and_its_answers_in_history():
    messages = [msg("user", "q1"), msg("assistant", "a1"), msg("user", "old"), msg("assistant", "a-old"),
                msg("user", "new", replaces="old")]
    history = neuromesh.ChatService.history_of(messages)
    assert [m["content"] for m in history] == ["q1", "a1", "new"]


def test_marks_are_kept_only_when_set(tmp_path):
    store = neuromesh.Store(str(tmp_path / "db.sqlite"), "a" * 32, "Box")
    try:
        conversation = store.create_conversation("t")
        plain = store.add_message(conversation["id"], "user", "q", "user")
        assert "cut_off" not in plain["data"] and "replaces" not in plain["data"]
        cut = store.add_message(conversation["id"], "assistant", "half", "LLM", cut_off=True)
        assert cut["data"]["cut_off"] is True
    finally:
        store.close()
