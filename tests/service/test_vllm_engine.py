"""``VLLMEngine`` on a real vLLM engine over a tiny random GPT-2 (CPU is enough).

One engine serves the whole module (starting one takes ~30 s). It lives on an event loop that runs
in a background thread for the module's lifetime: vLLM's output task is bound to the loop that
first uses the engine, so every test must submit its coroutines to that same loop.

Run: ``python -m pytest -m vllm`` in an environment with ``vllm`` (or ``vllm-cpu``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

# vLLM's CPU backend reserves this many GiB for its KV cache; its default is far more than tests
# need. Set before vLLM is imported or an engine built.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# ``tests/`` is on sys.path, so where vLLM is not installed ``import vllm`` finds this folder as a
# namespace package and succeeds; a real submodule tells the two apart.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed")
import vllm

from tokenbridge.service.engines.base import (
    GenerateParams,
    PositionScores,
    ScoreJob,
    TeacherEngine,
)
from tokenbridge.service.engines.vllm import (
    VLLMEngine,
    _scores_from_prompt_logprobs,
)
from tokenbridge.service.errors import EngineUnavailableError
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("TOKENBRIDGE_CACHE", REPO / ".cache"))
MAX_TOP_K = 20
#: Agreement between vLLM's CPU kernels and a transformers forward pass, both float32.
TOL = 1e-4
TEXT = (
    "The quick brown fox jumps over the lazy dog while 1234 apples fall from the tree; "
    "meanwhile, a naïve café owner counts coins and hums an old song about the sea."
)
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` submits and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(TinyModelSpec("gpt2"), tmp_path_factory.mktemp("tiny-gpt2"), CACHE_DIR)


@pytest.fixture(scope="module")
def runner() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(model_dir: Path, runner: LoopThread) -> Iterator[VLLMEngine]:
    teacher = VLLMEngine(str(model_dir), dtype="float32", max_model_len=512, max_top_k=MAX_TOP_K)
    began = time.perf_counter()
    runner.run(teacher.start(), timeout=300)
    print(f"vLLM engine started in {time.perf_counter() - began:.1f} s")
    yield teacher
    runner.run(teacher.stop(), timeout=120)
    runner.run(teacher.stop(), timeout=120)  # idempotent
    assert not teacher.healthy()


@pytest.fixture(scope="module")
def ids(engine: VLLMEngine) -> np.ndarray:
    ids = np.asarray(engine.tokenizer.encode(TEXT), dtype=np.int64)
    assert 35 <= len(ids) <= 60
    return ids


@pytest.fixture(scope="module")
def reference(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """``(L, V)``: log_softmax of a transformers forward pass; row ``i`` predicts ``ids[i + 1]``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def assert_topk_matches(ids_TK: np.ndarray, lps_TK: np.ndarray, ref_TV: np.ndarray) -> None:
    """Top-K ids and log-probs agree with ``ref_TV``; ids may swap only between near-ties."""
    T, K = ids_TK.shape
    order = np.argsort(-ref_TV, axis=1, kind="stable")[:, :K]
    ref_lps = np.take_along_axis(ref_TV, order, axis=1)
    np.testing.assert_allclose(lps_TK, ref_lps, atol=TOL, rtol=0)
    # Each returned id carries the log-prob the reference gives that id, and that log-prob is
    # the reference's k-th best: an id differs from the reference's only within a tie.
    mine = np.take_along_axis(ref_TV, ids_TK, axis=1)
    np.testing.assert_allclose(mine, ref_lps, atol=TOL, rtol=0)
    for t in range(T):
        assert len(set(ids_TK[t].tolist())) == K, f"row {t} repeats an id"
    assert np.mean(ids_TK == order) > 0.9


def assert_same_scores(a: PositionScores, b: PositionScores, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(a.actual_logprobs_T, b.actual_logprobs_T, atol=atol, rtol=0)
    np.testing.assert_allclose(a.topk_logprobs_TK, b.topk_logprobs_TK, atol=atol, rtol=0)
    same = a.topk_ids_TK == b.topk_ids_TK
    # Where ids differ, the two log-probs must be a near-tie.
    assert np.all(same | np.isclose(a.topk_logprobs_TK, b.topk_logprobs_TK, atol=atol, rtol=0))


def test_flat_and_dict_layouts_convert_alike() -> None:
    """Both layouts vLLM can return, built by vLLM's own append function, give the same rows;
    short rows are padded with id -1 and log-prob -inf."""
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    rng = np.random.default_rng(3)
    L, V, K = 9, 40, 5
    ids = rng.integers(0, V, L)
    ids[4] = 7  # a row whose actual token is its top-1 (listed twice in the flat layout)
    layouts = {flat: create_prompt_logprobs(flat) for flat in (True, False)}
    expected_ids = np.empty((L - 1, K), dtype=np.int64)
    expected_lps = np.empty((L - 1, K), dtype=np.float32)
    for p in range(1, L):
        lp_V = rng.normal(size=V).astype(np.float32)
        if p == 4:
            lp_V[7] = lp_V.max() + 1
        order = np.argsort(-lp_V, kind="stable")
        expected_ids[p - 1], expected_lps[p - 1] = order[:K], lp_V[order[:K]]
        rank = int(np.nonzero(order == ids[p])[0][0]) + 1
        for logprobs in layouts.values():
            append_logprobs_for_next_position(
                logprobs,
                [int(ids[p]), *order[:K].tolist()],
                [float(lp_V[ids[p]]), *lp_V[order[:K]].tolist()],
                [None] * (K + 1),
                rank,
                K,
            )
        expected_actual = lp_V[ids[p]]
        assert layouts[True][p][int(ids[p])].logprob == pytest.approx(expected_actual)
    flat = _scores_from_prompt_logprobs(layouts[True], ids, 2, K)
    dicts = _scores_from_prompt_logprobs(layouts[False], ids, 2, K)
    for got in (flat, dicts):
        np.testing.assert_array_equal(got.topk_ids_TK, expected_ids[1:])
        np.testing.assert_allclose(got.topk_logprobs_TK, expected_lps[1:], rtol=1e-6)
    np.testing.assert_array_equal(flat.actual_logprobs_T, dicts.actual_logprobs_T)

    short = [None, {3: vllm.logprobs.Logprob(-0.5, rank=1), 9: vllm.logprobs.Logprob(-2.0, 2)}]
    padded = _scores_from_prompt_logprobs(short, np.array([0, 9]), 1, 3)
    np.testing.assert_array_equal(padded.topk_ids_TK, [[3, 9, -1]])
    np.testing.assert_array_equal(padded.topk_logprobs_TK, [[-0.5, -2.0, -np.inf]])
    np.testing.assert_array_equal(padded.actual_logprobs_T, [-2.0])


def test_engine_reports_what_it_runs(engine: VLLMEngine) -> None:
    assert isinstance(engine, TeacherEngine)
    assert engine.healthy()
    info = engine.info
    assert (info.backend, info.device, info.dtype) == ("vllm", "cpu", "float32")
    assert info.max_top_k == MAX_TOP_K and info.max_model_len == 512
    assert info.vocab_size == len(engine.tokenizer)
    assert info.versions["vllm"] == vllm.__version__
    assert {"torch", "transformers"} <= info.versions.keys()


def test_scores_match_a_transformers_forward(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray, reference: np.ndarray
) -> None:
    start, K = 5, MAX_TOP_K
    got = runner.run(engine.score(ScoreJob(ids=ids, start=start, top_k=K)))
    T = len(ids) - start
    assert got.topk_ids_TK.shape == (T, K) and got.topk_ids_TK.dtype == np.int64
    assert got.topk_logprobs_TK.shape == (T, K) and got.topk_logprobs_TK.dtype == np.float32
    assert got.actual_logprobs_T.shape == (T,) and got.actual_logprobs_T.dtype == np.float32
    # Logits row start-1+t predicts token start+t.
    ref_TV = reference[start - 1 : len(ids) - 1]
    expected = ref_TV[np.arange(T), ids[start:]]
    np.testing.assert_allclose(got.actual_logprobs_T, expected, atol=TOL, rtol=0)
    assert_topk_matches(got.topk_ids_TK, got.topk_logprobs_TK, ref_TV)
    assert np.all(np.diff(got.topk_logprobs_TK, axis=1) <= 0), "top-K not most likely first"


def test_row_t_is_about_token_start_plus_t(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray, reference: np.ndarray
) -> None:
    """Pins the off-by-one: row ``t`` scores ``ids[start + t]`` from the logits at
    ``start + t - 1``, and neither neighbouring convention fits."""
    start = 7
    got = runner.run(engine.score(ScoreJob(ids=ids, start=start, top_k=1)))
    p = np.arange(start, len(ids))
    right = reference[p - 1, ids[p]]
    logits_one_late = reference[p[:-1], ids[p[:-1]]]  # "distribution at i is about token i"
    token_one_late = reference[p[:-1] - 1, ids[p[:-1] + 1]]  # row t about token start+t+1
    err = np.abs(got.actual_logprobs_T - right)
    assert err.max() < TOL
    assert np.abs(got.actual_logprobs_T[:-1] - logits_one_late).max() > 100 * TOL
    assert np.abs(got.actual_logprobs_T[:-1] - token_one_late).max() > 100 * TOL
    # The top-1 row agrees with the same logits row.
    assert np.array_equal(got.topk_ids_TK[:, 0], reference[p - 1].argmax(axis=1))
    # The first scorable token (start=1) is predicted by position 0.
    first = runner.run(engine.score(ScoreJob(ids=ids[:3], start=1, top_k=2)))
    np.testing.assert_allclose(
        first.actual_logprobs_T, reference[[0, 1], ids[[1, 2]]], atol=TOL, rtol=0
    )


def test_k_above_the_maximum_is_refused_clearly(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray
) -> None:
    with pytest.raises(ValueError, match=rf"top_k {MAX_TOP_K + 1} exceeds .* maximum {MAX_TOP_K}"):
        runner.run(engine.score(ScoreJob(ids=ids, start=1, top_k=MAX_TOP_K + 1)))
    with pytest.raises(ValueError, match="at most 512"):
        runner.run(engine.score(ScoreJob(ids=np.zeros(513, dtype=np.int64), start=1, top_k=1)))
    with pytest.raises(ValueError, match="token ids must lie in"):
        bad = np.array([1, engine.info.vocab_size], dtype=np.int64)
        runner.run(engine.score(ScoreJob(ids=bad, start=1, top_k=1)))
    assert engine.healthy()


def test_nothing_to_score_returns_empty_rows(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray
) -> None:
    got = runner.run(engine.score(ScoreJob(ids=ids, start=len(ids), top_k=3)))
    assert got.topk_ids_TK.shape == (0, 3) and got.actual_logprobs_T.shape == (0,)


def test_concurrent_scores_equal_sequential_ones(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray
) -> None:
    rng = np.random.default_rng(0)
    vocab = engine.info.vocab_size
    jobs = [
        ScoreJob(ids=ids, start=5, top_k=MAX_TOP_K),
        ScoreJob(ids=rng.integers(0, vocab, 120), start=40, top_k=8),
        ScoreJob(ids=rng.integers(0, vocab, 64), start=1, top_k=MAX_TOP_K),
        ScoreJob(ids=ids[:20], start=10, top_k=1),
    ]
    sequential = [runner.run(engine.score(job)) for job in jobs]

    async def together() -> list[PositionScores]:
        return list(await asyncio.gather(*(engine.score(job) for job in jobs)))

    for seq, conc, job in zip(sequential, runner.run(together()), jobs, strict=True):
        assert conc.topk_ids_TK.shape == (job.positions, job.top_k)
        assert_same_scores(seq, conc)


def test_generate_obeys_max_tokens_and_is_greedy_at_temperature_zero(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray
) -> None:
    prompt = ids[:10].tolist()
    greedy = GenerateParams(max_tokens=12, temperature=0.0)
    first = runner.run(engine.generate(prompt, greedy))
    second = runner.run(engine.generate(prompt, greedy))
    assert first == second
    assert 1 <= len(first.ids) <= 12
    assert all(0 <= i < engine.info.vocab_size for i in first.ids)
    assert first.finish_reason in ("stop", "length")
    if first.finish_reason == "length":
        assert len(first.ids) == 12
    eos = engine.tokenizer.eos_token_id
    spoken = first.ids[:-1] if first.ids[-1] == eos else first.ids
    assert first.text == engine.tokenizer.decode(spoken)

    sampled = GenerateParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=1234)
    a = runner.run(engine.generate(prompt, sampled))
    b = runner.run(engine.generate(prompt, sampled))
    assert a.ids == b.ids and len(a.ids) <= 5
    assert all(0 <= i < engine.info.vocab_size for i in a.ids)


def test_cancelling_a_score_aborts_it_and_the_engine_keeps_serving(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray
) -> None:
    expected = runner.run(engine.score(ScoreJob(ids=ids, start=5, top_k=4)))
    long_ids = np.random.default_rng(1).integers(0, engine.info.vocab_size, 500)

    async def cancel_mid_flight() -> int:
        vllm_engine = engine._engine  # to watch the request in flight and its abort
        task = asyncio.create_task(engine.score(ScoreJob(ids=long_ids, start=1, top_k=MAX_TOP_K)))
        for _ in range(10_000):
            if vllm_engine.get_num_unfinished_requests() > 0 or task.done():
                break
            await asyncio.sleep(0)
        was_in_flight = vllm_engine.get_num_unfinished_requests()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if vllm_engine.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.01)
        assert vllm_engine.get_num_unfinished_requests() == 0, "the request was not aborted"
        return was_in_flight

    assert runner.run(cancel_mid_flight()) == 1, "the score finished before it could be cancelled"
    assert engine.healthy()
    after = runner.run(engine.score(ScoreJob(ids=ids, start=5, top_k=4)))
    assert_same_scores(expected, after)


def test_zz_a_dead_engine_core_is_reported(
    engine: VLLMEngine, runner: LoopThread, ids: np.ndarray
) -> None:
    """Last on purpose: kills this module's engine core process (a child this test started)."""
    import psutil

    cores = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()):
                cores.append(proc)
    if not cores:
        pytest.skip("cannot identify vLLM's engine core process")
    for proc in cores:
        proc.kill()
    deadline = time.monotonic() + 30
    while engine.healthy() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not engine.healthy()
    with pytest.raises(EngineUnavailableError):
        runner.run(engine.score(ScoreJob(ids=ids, start=5, top_k=4)), timeout=60)
