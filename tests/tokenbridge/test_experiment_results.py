"""The experiment's configuration and its results arithmetic (pure: no models, no service)."""

from __future__ import annotations

import math

import pytest

from tokenbridge.research.experiment import (
    ARMS,
    ExperimentConfig,
    before_after_table,
    plot_results,
    preset_config,
    results_table,
    summarise,
    warm_start_fit,
)
from tokenbridge.research.experiment.results import _compute_to_reach, _mean_curve


def _points(accuracies, flops_per_step=10.0):
    return [
        {"step": i, "teacher_tokens_total": i * 3, "teacher_flops_total": i * flops_per_step,
         "sampled_accuracy": a, "accuracy": min(1.0, a + 0.3), "bits_per_byte": 1.0 - a / 2,
         "eval_reverse_kl_per_byte": 0.5 - a / 4}
        for i, a in enumerate(accuracies)
    ]  # fmt: skip


def _runs():
    return {
        "none": {0: _points([0.1]), 1: _points([0.2])},
        "sft": {0: _points([0.1, 0.2, 0.3, 0.4]), 1: _points([0.2, 0.3, 0.4, 0.5])},
        "opd_topk_kl": {0: _points([0.1, 0.5, 0.6, 0.7]), 1: _points([0.2, 0.6, 0.7, 0.8])},
        "same_tokenizer_opd": {0: _points([0.1, 0.6, 0.8, 0.9]), 1: _points([0.2, 0.7, 0.9, 1.0])},
    }


def test_compute_to_reach_interpolates_between_evaluations():
    curve = [(0.0, 0.1, 0.0), (10.0, 0.3, 0.0), (20.0, 0.5, 0.0)]
    assert _compute_to_reach(curve, 0.2) == pytest.approx(5.0)
    assert _compute_to_reach(curve, 0.5) == pytest.approx(20.0)
    assert _compute_to_reach(curve, 0.05) == 0.0
    assert _compute_to_reach(curve, 0.6) is None


def test_mean_curve_averages_seeds_point_by_point():
    curve = _mean_curve(_runs()["sft"], "sampled_accuracy")
    assert [round(m, 6) for _, m, _ in curve] == [0.15, 0.25, 0.35, 0.45]
    assert all(s == pytest.approx(math.sqrt(0.005)) for _, _, s in curve)
    assert [f for f, _, _ in curve] == [0.0, 10.0, 20.0, 30.0]


def test_summary_states_both_claims_from_the_curves():
    cfg = ExperimentConfig(seeds=(0, 1), arms=("none", "sft", "opd_topk_kl", "same_tokenizer_opd"))
    summary = summarise(cfg, _runs(), {"accuracy": 0.97}, cfg.out_dir)
    # The claims read the accuracy at temperature 1; greedy is reported beside it.
    assert summary["arms"]["sft"]["sampled_accuracy"]["mean"] == pytest.approx(0.45)
    assert summary["arms"]["sft"]["accuracy"]["mean"] == pytest.approx(0.75)
    claim = summary["claims"]["opd_topk_kl"]
    # OPD's mean curve (0.15, 0.55, ...) reaches SFT's final 0.45 at 0.75 of its first interval.
    assert claim["flops_to_reach_sft_final"] == pytest.approx(7.5)
    assert claim["compute_share_of_sft"] == pytest.approx(7.5 / 30.0)
    # (0.75 - 0.15) / (0.95 - 0.15)
    assert claim["gap_share_closed"] == pytest.approx(0.75)
    # Gains over each arm's own start: (0.75 - 0.15) / (0.95 - 0.15)
    assert claim["gain_share_of_same_tokenizer"] == pytest.approx(0.75)
    table = results_table(summary)
    assert "0.25× SFT's teacher FLOPs" in table and "closes 75%" in table
    assert table.split("Paired")[0].count("\n| ") == 5  # header and four arms
    # Two seeds: each arm's paired differences against no distillation and SFT, with intervals.
    assert "Paired differences over seeds" in table and "95% CI" in table
    # And each trained arm's change from its own start: SFT gained 0.3 on both seeds.
    gain = summary["arms"]["sft"]["minus"]["start"]["sampled_accuracy"]
    assert gain["mean"] == pytest.approx(0.3) and gain["low"] == pytest.approx(0.3)
    assert "| SFT on teacher samples | start | sampled_accuracy | +0.300 |" in table
    assert "start" not in summary["arms"]["none"].get("minus", {})
    demo = before_after_table(summary)
    assert "before (warm start)" in demo and "0.450" in demo


def test_plot_is_written(tmp_path):
    cfg = ExperimentConfig(seeds=(0, 1), arms=("none", "sft", "opd_topk_kl", "same_tokenizer_opd"))
    summary = summarise(cfg, _runs(), {"accuracy": 0.97}, cfg.out_dir)
    path = plot_results(summary, _runs(), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"arms": ("opd", "sft")}, "unknown arms"),
        ({"seeds": ()}, "at least one arm and one seed"),
        ({"seeds": (1, 1)}, "must not repeat"),
        ({"eval_problems": 500}, "must not exceed held_out"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"student_hidden": 48}, "multiple of 32"),
        ({"warm_start_target": 0.0}, "warm_start_target must lie in"),
        ({"warm_start_target": 0.4, "task": "text"}, "needs the arithmetic task"),
        ({"warm_start_check_every": 0}, "warm_start_check_every must be at least 1"),
    ],
)
def test_config_rejects_bad_values_with_a_reason(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        ExperimentConfig(**overrides)


def test_presets_refine_the_defaults_and_flags_win():
    smoke = preset_config("smoke", steps=3)
    assert smoke.steps == 3 and smoke.seeds == (0,)
    assert set(preset_config("full").arms) == set(ARMS)
    # The full preset fits every warm start to one validation accuracy at temperature 1 (the
    # steps are the longest fit); the demo keeps its fixed length.
    full, demo = preset_config("full"), preset_config("demo")
    assert full.warm_start_target == 0.4 and demo.warm_start_target is None
    assert warm_start_fit(full, "cross", 0).steps == warm_start_fit(full, "same", 2).steps == 2400
    assert warm_start_fit(full, "same", 2).seed == 2
    assert warm_start_fit(demo, "cross", 0).steps == warm_start_fit(demo, "same", 0).steps == 600
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")


def test_no_compute_ratio_when_sft_did_not_improve():
    runs = {**_runs(), "sft": {0: _points([0.3, 0.2, 0.25]), 1: _points([0.3, 0.2, 0.25])}}
    cfg = ExperimentConfig(seeds=(0, 1), arms=("none", "sft", "opd_topk_kl", "same_tokenizer_opd"))
    summary = summarise(cfg, runs, {"accuracy": 0.97}, cfg.out_dir)
    claim = summary["claims"]["opd_topk_kl"]
    assert claim["sft_improved"] is False and claim["compute_share_of_sft"] is None
    assert "no compute ratio" in results_table(summary)


def test_no_gap_share_when_the_reference_ends_below_no_distillation():
    runs = {**_runs(), "same_tokenizer_opd": {0: _points([0.0, 0.05]), 1: _points([0.0, 0.05])}}
    cfg = ExperimentConfig(seeds=(0, 1), arms=("none", "sft", "opd_topk_kl", "same_tokenizer_opd"))
    summary = summarise(cfg, runs, {"accuracy": 0.97}, cfg.out_dir)
    claim = summary["claims"]["opd_topk_kl"]
    assert claim["gap_share_closed"] is None
    # (0.75 - 0.15) / (0.05 - 0.0)
    assert claim["gain_share_of_same_tokenizer"] == pytest.approx(12.0)
    assert "no gap to close" in results_table(summary)


def test_on_text_the_claims_read_bits_per_byte_where_lower_is_better():
    def points(bits):
        return [
            {"step": i, "teacher_tokens_total": i * 3, "teacher_flops_total": i * 10.0,
             "bits_per_byte": b, "next_token_accuracy": 0.5 - b / 10,
             "eval_reverse_kl_per_byte": b / 4}
            for i, b in enumerate(bits)
        ]  # fmt: skip

    runs = {
        "none": {0: points([2.0]), 1: points([2.2])},
        "sft": {0: points([2.0, 1.9, 1.8, 1.7]), 1: points([2.2, 2.1, 2.0, 1.9])},
        "opd_candidate_kl": {0: points([2.0, 1.7, 1.6, 1.5]), 1: points([2.2, 1.9, 1.8, 1.7])},
        "same_tokenizer_opd": {0: points([2.0, 1.6, 1.4, 1.3]), 1: points([2.2, 1.8, 1.6, 1.5])},
    }
    cfg = ExperimentConfig(task="text", seeds=(0, 1), arms=tuple(runs))
    teacher = {"bits_per_byte": 1.2, "next_token_accuracy": 0.4}
    summary = summarise(cfg, runs, teacher, cfg.out_dir)
    claim = summary["claims"]["opd_candidate_kl"]
    assert claim["measure"] == "bits_per_byte" and claim["sft_final"] == pytest.approx(1.8)
    # OPD's mean curve (2.1, 1.8, ...) reaches SFT's final 1.8 at the end of its first interval.
    assert claim["compute_share_of_sft"] == pytest.approx(10.0 / 30.0)
    # (2.1 - 1.6) / (2.1 - 1.4): lower bits are the better end of the gap.
    assert claim["gap_share_closed"] == pytest.approx(0.5 / 0.7)
    table = results_table(summary)
    assert "Teacher on held-out text: 1.200 bits/byte" in table
    assert "SFT's final bits/byte (1.800)" in table and "bits/byte (real text)" in table
    demo = before_after_table(summary)
    assert "bits/byte of real held-out text" in demo and "task accuracy" not in demo


def test_an_unknown_task_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'poetry'.*arithmetic"):
        ExperimentConfig(task="poetry")


def test_the_teacher_line_reports_its_temperature_1_accuracy_beside_greedy():
    cfg = ExperimentConfig(seeds=(0, 1), arms=("none", "sft", "opd_topk_kl", "same_tokenizer_opd"))
    teacher = {"accuracy": 1.0, "sampled_accuracy": 0.69, "accuracy_after_error": 0.81}
    table = results_table(summarise(cfg, _runs(), teacher, cfg.out_dir))
    assert "100.0% (69.0% sampled at temperature 1)" in table
    assert "after a wrong digit planted in its steps: 81.0%" in table
    # Older results, without the sampled accuracy, still read.
    old = results_table(summarise(cfg, _runs(), {"accuracy": 0.97}, cfg.out_dir))
    assert "97.0%" in old and "sampled" not in old.split("\n")[0]


def test_the_learning_rate_is_chosen_on_a_measure_that_is_not_at_its_ceiling():
    """Arithmetic rates are chosen by validation accuracy at temperature 1: greedy accuracy was
    0.99 for a competent warm start, which left every rate tied and the smallest one chosen."""
    from tokenbridge.research.experiment.run import validation_score

    arithmetic = ExperimentConfig(progress=False)
    saturated = {"val_accuracy": 1.0, "val_sampled_accuracy": 0.35}
    better = {"val_accuracy": 1.0, "val_sampled_accuracy": 0.42}
    assert validation_score(arithmetic, saturated) == 0.35
    assert validation_score(arithmetic, better) > validation_score(arithmetic, saturated)
    assert validation_score(arithmetic, {"val_accuracy": 1.0}) == -math.inf
    text = ExperimentConfig(progress=False, task="text")
    assert validation_score(text, {"val_bits_per_byte": 2.5}) == -2.5


def test_runs_made_under_another_selection_measure_are_not_reused():
    from tokenbridge.research.experiment.run import _run_settings

    chosen = ExperimentConfig(progress=False)
    assert _run_settings(chosen, "sft", 0, 1e-4)["selection"] == "sampled_accuracy"
    # A fixed rate (the demo, the smoke presets) and the warm-start points keep their caches.
    fixed = ExperimentConfig(progress=False, learning_rate=3e-4)
    assert "selection" not in _run_settings(fixed, "sft", 0, 3e-4)
    assert "selection" not in _run_settings(chosen, "warm-start", 0)


def test_the_table_lists_each_students_warm_starts():
    runs = _runs()
    for kind_arm, steps in (("none", 700), ("same_tokenizer_opd", 1100)):
        for seed, points in runs[kind_arm].items():
            points[0].update(warm_start_steps=steps + seed, warm_start_val_sampled_accuracy=0.41)
    cfg = ExperimentConfig(seeds=(0, 1), arms=("none", "sft", "opd_topk_kl", "same_tokenizer_opd"))
    table = results_table(summarise(cfg, runs, {"accuracy": 0.97}, cfg.out_dir))
    assert "| cross-tokenizer | 1 | 701 | 0.410 | 0.500 | 0.200 |" in table
    assert "| same tokenizer | 0 | 1100 | 0.410 | 0.400 | 0.100 |" in table


@pytest.mark.parametrize("preset", ["full", "smoke"])
def test_the_half_batch_arm_spends_the_same_budget_in_smaller_steps(preset):
    cfg = preset_config(preset)
    full = ARMS["opd_candidate_kl"].schedule(cfg)
    half = ARMS["opd_candidate_kl_half_batch"].schedule(cfg)
    assert half["batch_size"] * 2 == full["batch_size"] == cfg.batch_size
    # Same sequences over the run, evaluated after the same numbers of sequences.
    assert half["batch_size"] * half["steps"] == full["batch_size"] * full["steps"]
    assert half["batch_size"] * half["eval_every"] == full["batch_size"] * full["eval_every"]
    assert half["warmup_steps"] * half["batch_size"] == full["warmup_steps"] * full["batch_size"]


def test_the_smoke_run_and_the_demo_fit_one_teacher_between_them():
    # The teacher's cache is keyed by its settings and the problems it fits on (the train split
    # the validation split leaves): a clean `make test` fits it once for the smoke run and the
    # demo test, and a later `make demo` reuses it.
    from tokenbridge.research.experiment.config import preset_config
    from tokenbridge.research.experiment.models import _teacher_spec, task_split

    smoke, demo = preset_config("smoke"), preset_config("demo")
    assert _teacher_spec(smoke) == _teacher_spec(demo)
    teacher_fields = ("task", "digits", "held_out", "teacher_fit_steps", "teacher_corrupt")
    assert [getattr(smoke, f) for f in teacher_fields] == [getattr(demo, f) for f in teacher_fields]
    assert task_split(smoke)[0] == task_split(demo)[0]
