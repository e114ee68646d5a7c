"""Fitting tiny task models: the used-ids softmax is the exact full-vocabulary one, unused rows
stay zero, and a fitted folder is reused only when its settings match."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenbridge.research.task import accuracy, split_problems, student_example
from tokenbridge.research.taskmodels import FitSpec, StopRule, fit_task_model
from tokenbridge.tinymodels import TinyModelSpec

from tests.support.paths import CACHE_DIR

SPEC = TinyModelSpec(tokenizer="mistral-v1", architecture="llama", hidden=64, heads=2, layers=1)


def _used_ids(tokenizer, problems):
    used = set()
    for problem in problems:
        prompt, completion = student_example(tokenizer, problem)
        used.update(prompt + completion)
    return sorted(used)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    train, _ = split_problems(1, 10, seed=0)
    fit = FitSpec(steps=150, batch_size=8, learning_rate=3e-3, examples=40)
    folder = tmp_path_factory.mktemp("fit") / "model"
    return fit_task_model(SPEC, fit, train, folder, CACHE_DIR, progress=False), fit, train


@pytest.mark.slow  # fits a model
def test_unused_rows_stay_zero_and_used_rows_learn(fitted):
    folder, fit, train = fitted
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    used = _used_ids(tokenizer, train[: fit.examples])
    weight = model.get_output_embeddings().weight.detach()
    nonzero = set(torch.nonzero(weight.abs().sum(-1)).flatten().tolist())
    assert nonzero == set(used)


@pytest.mark.slow  # fits a model
def test_the_fitted_model_predicts_its_examples_over_the_whole_vocabulary(fitted):
    folder, _, train = fitted
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prompt, completion = student_example(tokenizer, train[0])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    nll = -logprobs.gather(-1, torch.tensor(completion)[:, None]).mean()
    # Untrained, a 32k vocabulary costs about log(32000) ≈ 10.4 nats a token.
    assert float(nll) < 0.5 * math.log(len(tokenizer))


@pytest.mark.slow  # fits a model
def test_a_fitted_folder_is_reused_only_with_the_same_settings(fitted, tmp_path):
    folder, fit, train = fitted
    marker = folder / "tokenbridge-fit.json"
    before = marker.stat().st_mtime_ns
    assert fit_task_model(SPEC, fit, train, folder, CACHE_DIR, progress=False) == folder
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["fit"]["steps"] == fit.steps


def _unused_mass(folder, problems, used):
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    masses = []
    for problem in problems:
        prompt, completion = student_example(tokenizer, problem)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        probs = torch.softmax(logits, dim=-1)
        masses.append(float(1 - probs[:, used].sum(-1).mean()))
    return sum(masses) / len(masses)


@pytest.mark.slow  # fits a model
def test_pushing_unused_rows_down_takes_their_mass_and_leaves_the_task(fitted, tmp_path):
    folder, fit, train = fitted
    pushed_fit = FitSpec(**{**fit.__dict__, "unused_steps": 30})
    pushed = fit_task_model(SPEC, pushed_fit, train, tmp_path / "pushed", CACHE_DIR, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    used = _used_ids(tokenizer, train[: fit.examples])
    before, after = _unused_mass(folder, train[:5], used), _unused_mass(pushed, train[:5], used)
    assert after < before / 2
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    moved = AutoModelForCausalLM.from_pretrained(str(pushed)).state_dict()
    for name, value in plain.items():
        if "embed" in name or "lm_head" in name:
            assert torch.equal(value[used], moved[name][used]), name
        else:
            assert torch.equal(value, moved[name]), name


def _stop_at(target, every, problems, scores):
    def score(model, tokenizer):
        scores.append(accuracy(model, tokenizer, problems, max_new_tokens=12))
        return scores[-1]

    return StopRule(score, target, every, key={"test": "greedy accuracy", "target": target})


@pytest.mark.slow  # fits a model
def test_a_stop_rule_ends_the_fit_at_the_first_check_that_reaches_its_target(tmp_path):
    train, _ = split_problems(1, 10, seed=0)
    fit = FitSpec(steps=300, batch_size=8, learning_rate=3e-3, examples=40, unused_steps=5)
    scores: list[float] = []
    stop = _stop_at(0.05, 25, train[:20], scores)
    folder = fit_task_model(SPEC, fit, train, tmp_path / "m", CACHE_DIR, False, stop=stop)
    config = json.loads((folder / "config.json").read_text())
    taken, kept = config["tokenbridge_fit_steps_taken"], config["tokenbridge_fit_stop_score"]
    # Checked every 25 steps; stopped at the first score at or above the target, before the end.
    assert taken == 25 * len(scores) < fit.steps
    assert kept == scores[-1] >= 0.05 > max(scores[:-1], default=0.0)
    # The saved model is the one that was scored: its greedy accuracy reads the same.
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert accuracy(model, tokenizer, train[:20], max_new_tokens=12) == kept
    # The rule is part of what the cache matches: another target fits again.
    assert json.loads((folder / "tokenbridge-fit.json").read_text())["stop"]["target"] == 0.05


@pytest.mark.slow  # fits a model
def test_a_stop_rule_short_of_its_target_keeps_the_longest_fit_and_says_so(tmp_path):
    train, _ = split_problems(1, 10, seed=0)
    fit = FitSpec(steps=30, batch_size=8, learning_rate=3e-3, examples=40)
    scores: list[float] = []
    folder = fit_task_model(
        SPEC,
        fit,
        train,
        tmp_path / "m",
        CACHE_DIR,
        False,
        stop=_stop_at(1.01, 20, train[:8], scores),
    )
    config = json.loads((folder / "config.json").read_text())
    assert len(scores) == 2  # at step 20 and at the last step, 30
    assert config["tokenbridge_fit_steps_taken"] == 30
    assert config["tokenbridge_fit_stop_score"] == scores[-1] < 1.01


def test_fit_spec_rejects_bad_values():
    with pytest.raises(ValueError):
        FitSpec(steps=0)
    with pytest.raises(ValueError):
        FitSpec(learning_rate=0)
    with pytest.raises(ValueError):
        FitSpec(unused_steps=-1)
