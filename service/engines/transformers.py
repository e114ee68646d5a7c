"""The embedded teacher engine: a transformers causal LM on the CPU or one GPU.

Scoring requests are micro-batched (``MicroBatcher``): one forward pass per batch over
right-padded sequences, then log-softmax, ``torch.topk`` and the actual tokens' log-probs on the
completion rows only. All model work runs on one worker thread, so forward passes and generation
never overlap on the same weights and the event loop stays free.

Out of memory (CUDA's ``torch.OutOfMemoryError``, or the CPU allocator failing) marks the engine
unhealthy; ``stop`` then ``start`` brings it back with a fresh worker thread, batcher and model
(the service does this itself, see ``TeacherService``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from tokenbridge.service.batching import MicroBatcher
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

__all__ = ["TransformersEngine", "is_out_of_memory"]

#: transformers' ``from_pretrained`` is not thread-safe: two teachers loading at once (a service
#: starts its teachers together) leave meta tensors behind. One load at a time, process-wide.
_LOAD_LOCK = threading.Lock()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch running out of memory: CUDA's (or another accelerator's)
    ``torch.OutOfMemoryError``, or the CPU allocator's ``RuntimeError`` ("can't allocate
    memory")."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


class TransformersEngine:
    """A ``TeacherEngine`` on ``transformers.AutoModelForCausalLM``."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int = 2048,
        max_top_k: int = 64,
        batch_wait_s: float = 0.005,
        batch_max_tokens: int = 8192,
        revision: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.model_name = model
        self.device = device
        self.dtype = dtype
        self.revision = revision
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        config = AutoConfig.from_pretrained(model, revision=revision)
        positions: int = (
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or max_model_len
        )
        self.max_model_len = min(max_model_len, int(positions))
        self.info = EngineInfo(
            backend="transformers",
            model=model,
            revision=revision,
            dtype=dtype,
            device=device,
            vocab_size=int(config.vocab_size),
            max_top_k=max_top_k,
            max_model_len=self.max_model_len,
            versions=package_versions("torch", "transformers", "tokenbridge"),
            flop_model=flop_model(config),
            full_rows=True,
        )
        self.batch_wait_s = batch_wait_s
        self.batch_max_tokens = batch_max_tokens
        self._executor, self._batcher = self._workers()
        self._stopped = False
        self._model: Any = None
        self._dead = False

    def _workers(self) -> tuple[ThreadPoolExecutor, MicroBatcher[ScoreJob, PositionScores]]:
        """A fresh worker thread and the micro-batcher that feeds it."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        batcher: MicroBatcher[ScoreJob, PositionScores] = MicroBatcher(
            self.score_batch,
            lambda job: len(job.ids),
            executor=executor,
            max_wait_s=self.batch_wait_s,
            max_batch_tokens=self.batch_max_tokens,
        )
        return executor, batcher

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the weights (blocking); ``start`` does this on the worker thread."""
        import torch
        from transformers import AutoModelForCausalLM

        torch_dtype = getattr(torch, self.dtype) if self.dtype != "auto" else "auto"
        # On a GPU, the first CUDA call reads CUDA_VISIBLE_DEVICES: never while a vLLM teacher
        # has its own GPUs in it.
        devices = DEVICES_LOCK if self.device.startswith("cuda") else contextlib.nullcontext()
        with _LOAD_LOCK, devices:
            model: Any = AutoModelForCausalLM.from_pretrained(
                self.model_name,
                revision=self.revision,
                dtype=torch_dtype,
            )
            self._model = model.to(self.device).eval()

    async def start(self) -> None:
        """Load the model on the worker thread and start the micro-batcher.

        After ``stop`` (a restart) a new worker thread and batcher replace the closed ones.
        """
        if self._stopped:
            self._executor, self._batcher = self._workers()
            self._stopped = False
        self._dead = False
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)
        self._batcher.start()

    async def stop(self) -> None:
        """Fail waiting jobs, let the running batch finish, release the model (and, on a GPU,
        the memory it held). Safe to call more than once; ``start`` may follow."""
        self._stopped = True
        await self._batcher.close()
        # Waiting for the running batch blocks: keep the event loop free meanwhile.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._model = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def healthy(self) -> bool:
        """False once a batch hit an unrecoverable error (out of memory), and while stopped."""
        return self._model is not None and not self._dead

    @property
    def batcher(self) -> MicroBatcher[ScoreJob, PositionScores]:
        """The micro-batcher feeding the worker thread (a new one after each restart)."""
        return self._batcher

    # -- scoring -------------------------------------------------------------------------------

    async def score(self, job: ScoreJob) -> PositionScores:
        """The teacher's scores of ``job``, batched with concurrent callers."""
        if job.top_k > self.info.max_top_k:
            raise ValueError(
                f"top_k {job.top_k} exceeds this engine's maximum {self.info.max_top_k}"
            )
        return await self._batcher.submit(job)

    def score_batch(self, jobs: Sequence[ScoreJob]) -> list[PositionScores]:
        """Score ``jobs`` in one forward pass (blocking; the batcher calls it on the worker)."""
        import torch

        if self._model is None:
            raise RuntimeError("the teacher model is not loaded")
        device = self.device
        lengths = [len(job.ids) for job in jobs]
        width = max(lengths)
        ids_BL = torch.zeros((len(jobs), width), dtype=torch.long)
        mask_BL = torch.zeros((len(jobs), width), dtype=torch.long)
        # Rows of the logits that predict a completion token: positions start-1 .. len-2.
        batch_rows: list[np.ndarray] = []
        pos_rows: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        for b, job in enumerate(jobs):
            ids_BL[b, : lengths[b]] = torch.from_numpy(np.asarray(job.ids, dtype=np.int64))
            mask_BL[b, : lengths[b]] = 1
            batch_rows.append(np.full(job.positions, b))
            pos_rows.append(np.arange(job.start - 1, lengths[b] - 1))
            targets.append(np.asarray(job.ids[job.start :], dtype=np.int64))
        top_k = max(job.top_k for job in jobs)
        try:
            with torch.inference_mode():
                hidden = self._model(
                    input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device)
                ).logits
                rows_b = torch.from_numpy(np.concatenate(batch_rows)).to(device)
                rows_p = torch.from_numpy(np.concatenate(pos_rows)).to(device)
                logits_NV = hidden[rows_b, rows_p].float()
                del hidden
                logprobs_NV = torch.log_softmax(logits_NV, dim=-1)
                top_NK = torch.topk(logprobs_NV, k=min(top_k, logprobs_NV.shape[-1]), dim=-1)
                target_N = torch.from_numpy(np.concatenate(targets)).to(device)
                actual_N = logprobs_NV.gather(1, target_N[:, None])[:, 0]
                topk_ids = top_NK.indices.cpu().numpy().astype(np.int64)
                topk_lps = top_NK.values.cpu().numpy()
                actual = actual_N.cpu().numpy()
                full = logprobs_NV.cpu().numpy() if any(j.full_rows for j in jobs) else None
        except Exception as error:
            if is_out_of_memory(error):
                self._dead = True
            raise
        results: list[PositionScores] = []
        offset = 0
        for job in jobs:
            rows = slice(offset, offset + job.positions)
            offset += job.positions
            results.append(
                PositionScores(
                    topk_ids_TK=topk_ids[rows, : job.top_k],
                    topk_logprobs_TK=topk_lps[rows, : job.top_k],
                    actual_logprobs_T=actual[rows],
                    full_logprobs_TV=full[rows] if full is not None and job.full_rows else None,
                )
            )
        return results

    # -- generation ----------------------------------------------------------------------------

    def _generate(self, prompt_ids: list[int], params: GenerateParams) -> Generated:
        import torch

        if self._model is None:
            raise RuntimeError("the teacher model is not loaded")
        generator_seed = params.seed if params.seed is not None else torch.seed()
        torch.manual_seed(generator_seed)
        sample = params.temperature > 0
        try:
            output = self._sample(prompt_ids, params, sample)
        except Exception as error:
            if is_out_of_memory(error):
                self._dead = True
            raise
        ids = output[0, len(prompt_ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        finish: Literal["stop", "length"] = (
            "stop" if eos is not None and ids and ids[-1] == eos else "length"
        )
        return Generated(ids=ids, text=completion_text(self.tokenizer, ids), finish_reason=finish)

    def _sample(self, prompt_ids: list[int], params: GenerateParams, sample: bool) -> Any:
        import torch

        with torch.inference_mode():
            return self._model.generate(
                input_ids=torch.tensor([prompt_ids], device=self.device),
                attention_mask=torch.ones(
                    (1, len(prompt_ids)), dtype=torch.long, device=self.device
                ),
                max_new_tokens=params.max_tokens,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=0 if sample else None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )

    async def generate(self, prompt_ids: list[int], params: GenerateParams) -> Generated:
        """Sample one completion on the worker thread (between scoring batches)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate, prompt_ids, params)
