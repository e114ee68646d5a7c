"""Teacher engines behind one protocol (``base.TeacherEngine``), chosen by the config's backend."""

from __future__ import annotations

from tokenbridge.service.engines.base import TeacherEngine
from tokenbridge.service.teacher_config import TeacherConfig

__all__ = ["build_engine"]


def build_engine(config: TeacherConfig) -> TeacherEngine:
    """The engine ``config.backend`` names for the teacher ``config``, not yet started."""
    model = config.model
    if config.backend == "vllm":
        from tokenbridge.service.engines.vllm import VLLMEngine

        return VLLMEngine(
            model,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_top_k=config.max_top_k,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            devices=config.devices or None,
        )
    from tokenbridge.service.engines.transformers import TransformersEngine

    return TransformersEngine(
        model,
        # A GPU list of one names the transformers engine's device.
        device=f"cuda:{config.devices[0]}" if config.devices else config.device,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_top_k=config.max_top_k,
        batch_wait_s=config.batch_wait_s,
        batch_max_tokens=config.batch_max_tokens,
    )
