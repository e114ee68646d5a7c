"""The trainer's prompt stream: seeded, every prompt once per epoch, resumable by position; and
the prompts file format."""

from __future__ import annotations

import json

import pytest

from tokenbridge.client.train import PromptStream, load_prompts


def test_every_prompt_once_per_epoch_and_epochs_differ():
    prompts = [f"p{i}" for i in range(7)]
    stream = PromptStream(prompts, seed=3)
    first, second = stream.take(7), stream.take(7)
    assert sorted(first) == sorted(prompts) and sorted(second) == sorted(prompts)
    assert first != second  # reshuffled per epoch
    assert PromptStream(prompts, seed=3).take(14) == first + second  # seeded


def test_position_resumes_the_same_stream():
    prompts = [f"p{i}" for i in range(5)]
    whole = PromptStream(prompts, seed=1).take(12)
    head = PromptStream(prompts, seed=1)
    taken = head.take(4)
    resumed = PromptStream(prompts, seed=1, position=head.position)
    assert taken + resumed.take(8) == whole


def test_prompts_file_takes_text_and_messages_and_names_bad_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"prompt": "Once"}) + "\n\n" + json.dumps({"messages": messages}))
    assert load_prompts(path) == ["Once", messages]
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: needs 'prompt'"):
        load_prompts(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r":1: not JSON"):
        load_prompts(path)
    assert len(load_prompts(None)) >= 8  # the built-in openings
