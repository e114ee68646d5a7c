"""One service, two teachers of different tokenizer families (a tiny GPT-2 over the GPT-2 tokenizer
and a tiny Llama over the Llama 3 tokenizer), both on the transformers engine, in-process; a
student of a third family (Mistral's SentencePiece) registered once.

Each teacher answers with its own model's numbers (checked against a direct forward, position by
position where the two tokenizations split the text alike), requests find their teacher by name
(or the default one), each teacher has its own limits, admission and restart supervisor, the
registration and its pair tables are shared and survive a restart, metrics carry the teacher, and
one teacher's engine failing leaves the other serving.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenbridge.service.config import ServiceConfig
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import (
    GatedEngine,
    OutOfMemoryEngine,
    assert_matches_forward,
    running_app,
    tiny_teacher,
    transformers_engine,
)

pytestmark = pytest.mark.integration

JSON = {"accept": "application/json"}
PROMPT = "HAMLET.\n"
TEXT = "To be, or not to be: in 1601 the Globe sold 31536 seats 🎭 to the king."
STUDENT = "mistral-v1"
#: Each teacher's name, tokenizer family and architecture.
FAMILIES = {"gpt": ("gpt2", "gpt2"), "llama": ("llama3", "llama")}
#: The gpt teacher's own admission limit (teacher tokens in flight) and top_k limit.
GPT_LIMIT = 40  # a score of TEXT needs 28 gpt tokens: two never fit together
GPT_TOP_K = 8
SERVICE_TOP_K = 32
RESTART_BACKOFF_S = 2.0  # long enough to look at the service while one teacher restarts
WAIT_S = 60.0


@pytest.fixture(scope="module")
def teacher_dirs() -> dict[str, Path]:
    return {name: tiny_teacher(family, arch) for name, (family, arch) in FAMILIES.items()}


def two_teachers(dirs: dict[str, Path], data_dir: Path, *options: str, **fields) -> ServiceConfig:
    return ServiceConfig(
        teacher=tuple(f"{name}={path}" for name, path in dirs.items()),
        teacher_options=options,
        data_dir=data_dir,
        max_top_k=SERVICE_TOP_K,
        **fields,
    )


@pytest.fixture(scope="module")
def service(teacher_dirs, tmp_path_factory, loop):
    """The shared app: no default teacher; gpt gated (its gate open) with its own small limits;
    llama able to run out of memory, restarted once with a backoff."""
    data_dir = tmp_path_factory.mktemp("multi-data")
    config = two_teachers(
        teacher_dirs,
        data_dir,
        f"gpt.max_top_k={GPT_TOP_K}",
        f"gpt.max_tokens_in_flight={GPT_LIMIT}",
        f"gpt.max_request_tokens={GPT_LIMIT}",
        "gpt.admission_wait_s=0",
        "llama.engine_restarts=1",
        f"llama.engine_restart_backoff_s={RESTART_BACKOFF_S}",
    )
    gpt = GatedEngine(transformers_engine(teacher_dirs["gpt"]))
    gpt.gate.set()
    llama = OutOfMemoryEngine(teacher_dirs["llama"], max_top_k=64)
    with running_app(config, loop=loop, engines={"gpt": gpt, "llama": llama}) as harness:
        harness.engines = {"gpt": gpt, "llama": llama}
        harness.data_dir = data_dir
        yield harness


@pytest.fixture(scope="module")
def student(service) -> dict[str, Any]:
    """The Mistral student, registered once for both teachers."""

    async def go(client):
        return await client.post("/v1/tokenizers", json={"name": "m", "hub": STUDENT})

    response = service.run(go)
    assert response.status_code == 201, response.text
    return response.json()


# -- helpers --------------------------------------------------------------------------------------


def completion(bank, family: str, text: str = TEXT) -> list[int]:
    return encode_continuation(bank.tokenizer(family), bank.vocab(family), text)


def score_body(student_id: str, teacher: str | None, top_k: int = 4, text: str = TEXT, bank=None):
    body: dict[str, Any] = {
        "student_tokenizer": student_id,
        "top_k": top_k,
        "sequences": [
            {"prompt": {"text": PROMPT}, "completion_ids": completion(bank, STUDENT, text)}
        ],
    }
    if teacher is not None:
        body["teacher"] = teacher
    return body


def scored(response) -> tuple[dict[str, Any], ScoredSequence]:
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    return body, ScoredSequence.from_wire(body["sequences"][0], body["top_k"])


def decoded(response) -> Any:
    """A response's body, whichever encoding it came in."""
    if response.headers["content-type"].startswith("application/msgpack"):
        return unpack(response.content)
    return response.json()


def error(response) -> tuple[str, str]:
    found = decoded(response)["error"]
    return found["code"], found["message"]


def check_against_forward(
    body, seq, bank, teacher: str, model_dir: Path, text: str = TEXT, family: str | None = None
) -> int:
    """The answer of ``teacher`` (its name in the response, its prompt and completion tokens)
    against a direct forward of its own model (see ``assert_matches_forward``); ``family``: the
    teacher's tokenizer (default: ``FAMILIES``'). Returns the number of 1:1 positions."""
    family = family or FAMILIES[teacher][0]
    assert body["teacher"]["name"] == teacher
    alignment = body["sequences"][0]["alignment"]
    assert alignment["teacher_prompt_tokens"] == len(bank.tokenizer(family).encode(PROMPT))
    assert alignment["teacher_completion_tokens"] == len(completion(bank, family, text))
    return assert_matches_forward(seq, bank, STUDENT, family, model_dir, PROMPT, text)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels`` in Prometheus text, or ``None``."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        inside = line[len(name) + 1 : line.index("}")]
        found = dict(part.split("=", 1) for part in inside.split(",") if part)
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(line.split()[-1])
    return None


async def until(predicate, what: str) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < WAIT_S, what
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# -- description ----------------------------------------------------------------------------------


def test_info_and_readiness_list_both_teachers_with_their_own_limits(service, student):
    async def go(client):
        return (
            await client.get("/v1/info", headers=JSON),
            await client.get("/readyz"),
            await client.get("/readyz", params={"teacher": "llama"}),
            await client.get("/readyz", params={"teacher": "nobody"}),
            await client.get("/healthz"),
        )

    info_response, ready, ready_llama, ready_nobody, health = service.run(go)
    info = info_response.json()
    assert info["default_teacher"] is None
    # Without a default teacher the top level describes none; the service-wide limits remain.
    assert info["teacher"] is None and info["max_top_k"] is None
    assert info["limits"]["max_sequences"] == 256 and "max_tokens_in_flight" not in info["limits"]
    assert info["state"] == "ready" and info["students"] == 1
    teachers = {t["name"]: t for t in info["teachers"]}
    assert list(teachers) == ["gpt", "llama"]
    gpt, llama = teachers["gpt"], teachers["llama"]
    assert gpt["vocab_size"] == 50257 and llama["vocab_size"] == 128256
    assert gpt["tokenizer_size"] == 50257 and llama["tokenizer_size"] == 128256
    assert len(gpt["vocab_hash"]) == len(llama["vocab_hash"]) == 32
    assert gpt["vocab_hash"] != llama["vocab_hash"]
    assert gpt["model"].endswith("tiny-gpt2-gpt2-h64-l2-s0")
    assert llama["model"].endswith("tiny-llama-llama3-h64-l2-s0")
    for teacher in (gpt, llama):
        assert teacher["backend"] == "transformers" and teacher["device"] == "cpu"
        assert teacher["state"] == "ready" and teacher["ready"] is True
        assert teacher["engine_restarts"] == 0 and teacher["versions"]["torch"]
    # Per-teacher limits: gpt's own, llama the service-wide ones.
    assert gpt["max_top_k"] == GPT_TOP_K and llama["max_top_k"] == SERVICE_TOP_K
    assert gpt["limits"]["max_tokens_in_flight"] == GPT_LIMIT
    assert gpt["limits"]["max_request_tokens"] == GPT_LIMIT
    assert gpt["limits"]["admission_wait_s"] == 0
    assert llama["limits"]["max_tokens_in_flight"] == ServiceConfig().max_tokens_in_flight
    assert llama["limits"]["admission_wait_s"] == ServiceConfig().admission_wait_s

    assert ready.status_code == 200 and ready.json() == {
        "ready": True,
        "state": "ready",
        "teachers": {
            "gpt": {"ready": True, "state": "ready"},
            "llama": {"ready": True, "state": "ready"},
        },
        "unready": [],
    }
    assert ready_llama.status_code == 200 and ready_llama.json()["state"] == "ready"
    assert ready_nobody.status_code == 404
    code, message = error(ready_nobody)
    assert code == "unknown_teacher" and "'gpt'" in message and "'llama'" in message
    assert health.status_code == 200 and health.json()["state"] == "ready"


# -- routing and numbers ---------------------------------------------------------------------------


def test_each_teacher_answers_with_its_own_model(service, student, bank, teacher_dirs):
    async def go(client):
        return {
            name: await client.post("/v1/score", json=score_body(student["id"], name, 8, bank=bank))
            for name in ("gpt", "llama")
        }

    answers = service.run(go)
    seqs = {}
    for name, response in answers.items():
        body, seq = scored(response)
        seqs[name] = seq
        assert body["teacher"]["backend"] == "transformers"
        assert len(seq.logprobs_S) == len(completion(bank, STUDENT))
        assert check_against_forward(body, seq, bank, name, teacher_dirs[name]) >= 5
        # Top-K rows name valid Mistral ids (or padding).
        ids = seq.topk_ids_SK
        assert seq.topk_ids_SK.shape[1] == 8 and ((ids == -1) | ((ids >= 0) & (ids < 32000))).all()
    # Two models, two answers: neither teacher was served by the other's model.
    assert not np.allclose(seqs["gpt"].logprobs_S, seqs["llama"].logprobs_S, atol=1e-2)
    with pytest.raises(AssertionError):
        check_against_forward(
            answers["gpt"].json(), seqs["gpt"], bank, "gpt", teacher_dirs["llama"]
        )


def test_generate_is_routed_by_name_too(service, bank):
    async def go(client):
        body = {"prompts": [{"text": PROMPT}], "max_tokens": 4, "seed": 1, "temperature": 0}
        return {
            name: await client.post("/v1/generate", json={**body, "teacher": name}, headers=JSON)
            for name in ("gpt", "llama")
        }

    answers = service.run(go)
    for name, response in answers.items():
        assert response.status_code == 200, response.text
        assert response.json()["teacher"]["name"] == name
        family = FAMILIES[name][0]
        prompt_ids = bank.tokenizer(family).encode(PROMPT)
        assert response.json()["usage"]["teacher_prompt_tokens"] == len(prompt_ids)
        ids = response.json()["completions"][0]["ids"]
        assert 1 <= len(ids) <= 4 and all(0 <= i < len(bank.tokenizer(family)) for i in ids)


def test_unnamed_and_unknown_teachers(service, student, bank):
    async def go(client):
        return {
            "score_unnamed": await client.post(
                "/v1/score", json=score_body(student["id"], None, bank=bank)
            ),
            "generate_unnamed": await client.post(
                "/v1/generate", json={"prompts": [{"text": PROMPT}], "max_tokens": 2}
            ),
            "score_unknown": await client.post(
                "/v1/score", json=score_body(student["id"], "qwen", bank=bank)
            ),
            "generate_unknown": await client.post(
                "/v1/generate",
                json={"prompts": [{"text": PROMPT}], "max_tokens": 2, "teacher": "qwen"},
            ),
            "score_empty_name": await client.post(
                "/v1/score", json=score_body(student["id"], "", bank=bank)
            ),
        }

    got = service.run(go)
    for key in ("score_unnamed", "generate_unnamed"):
        assert got[key].status_code == 422, key
        message = error(got[key])[1]
        assert "several teachers and none is the default" in message
        assert "['gpt', 'llama']" in message
    for key in ("score_unknown", "generate_unknown"):
        assert got[key].status_code == 404, key
        code, message = error(got[key])
        assert code == "unknown_teacher"
        assert "'qwen'" in message and "['gpt', 'llama']" in message
    assert got["score_empty_name"].status_code == 422


def test_top_k_limits_are_each_teachers_own(service, student, bank):
    async def go(client):
        return {
            (name, top_k): await client.post(
                "/v1/score", json=score_body(student["id"], name, top_k, bank=bank)
            )
            for name in ("gpt", "llama")
            for top_k in (GPT_TOP_K, GPT_TOP_K + 1, SERVICE_TOP_K + 1)
        }

    got = service.run(go)
    assert got[("gpt", GPT_TOP_K)].status_code == 200
    refused = got[("gpt", GPT_TOP_K + 1)]
    assert refused.status_code == 422
    assert f"above the maximum {GPT_TOP_K} of teacher 'gpt'" in error(refused)[1]
    # Above gpt's limit is fine for llama, up to the service-wide one.
    _, seq = scored(got[("llama", GPT_TOP_K + 1)])
    assert seq.topk_ids_SK.shape[1] == GPT_TOP_K + 1
    for name in ("gpt", "llama"):
        assert got[(name, SERVICE_TOP_K + 1)].status_code == 422


# -- registration --------------------------------------------------------------------------------


def test_one_registration_pairs_with_both_teachers(service, student):
    async def go(client):
        return (
            await client.post("/v1/tokenizers", json={"name": "again", "hub": STUDENT}),
            await client.get(f"/v1/tokenizers/{student['id']}", headers=JSON),
            await client.get("/v1/tokenizers", headers=JSON),
            await client.get("/v1/info", headers=JSON),
        )

    again, detail, listing, info = service.run(go)
    assert again.status_code == 200 and again.json()["id"] == student["id"]
    assert again.json()["created"] is False
    assert [t["id"] for t in listing.json()["tokenizers"]] == [student["id"]]
    for described in (student, detail.json()):
        assert list(described["teachers"]) == ["gpt", "llama"]
        for pairing in described["teachers"].values():
            assert 0.2 < pairing["vocab_overlap"] < 1
            assert 0 < pairing["probe_one_to_one_share"] <= 1
            assert pairing["special_token_map"]  # eos at least maps
        # Different teachers, different fits.
        gpt, llama = described["teachers"]["gpt"], described["teachers"]["llama"]
        assert gpt["vocab_overlap"] != llama["vocab_overlap"]
        assert gpt["special_token_map"] != llama["special_token_map"]
    # One table per (teacher, student) pair, keyed by both vocabularies' hashes.
    hashes = {t["name"]: t["vocab_hash"] for t in info.json()["teachers"]}
    pairs = sorted(p.name for p in (service.data_dir / "tables" / "pairs").glob("*.npz"))
    assert pairs == sorted(f"{hashes[n]}-{student['vocab_hash']}.npz" for n in ("gpt", "llama"))


def test_registrations_and_pair_tables_survive_a_restart(teacher_dirs, tmp_path, bank, loop):
    """Engines built from the config this time; the second start names a default teacher."""
    options = (f"llama.max_top_k={GPT_TOP_K}",)

    async def register(client):
        registered = await client.post("/v1/tokenizers", json={"name": "m", "hub": STUDENT})
        assert registered.status_code == 201, registered.text
        student_id = registered.json()["id"]
        scores = {
            name: await client.post("/v1/score", json=score_body(student_id, name, bank=bank))
            for name in ("gpt", "llama")
        }
        return registered.json(), scores

    with running_app(two_teachers(teacher_dirs, tmp_path, *options), loop=loop) as first:
        assert first.service.teachers["llama"].engine.info.max_top_k == GPT_TOP_K
        registered, before = first.run(register)
    tables = {p: p.stat().st_mtime_ns for p in (tmp_path / "tables" / "pairs").glob("*.npz")}
    assert len(tables) == 2

    async def after_restart(client):
        return (
            await client.get(f"/v1/tokenizers/{registered['id']}", headers=JSON),
            await client.get("/v1/info", headers=JSON),
            {
                name: await client.post(
                    "/v1/score", json=score_body(registered["id"], name, bank=bank)
                )
                for name in ("gpt", "llama", None)
            },
        )

    config = two_teachers(teacher_dirs, tmp_path, *options, default_teacher="llama")
    with running_app(config, loop=loop) as second:
        detail, info, after = second.run(after_restart)
    described = detail.json()
    assert described["id"] == registered["id"] and list(described["teachers"]) == ["gpt", "llama"]
    assert described["teachers"] == registered["teachers"]
    # The default teacher's figures stand at the top of the registration too.
    assert described["vocab_overlap"] == registered["teachers"]["llama"]["vocab_overlap"]
    for name in ("gpt", "llama"):
        _, a = scored(before[name])
        body, b = scored(after[name])
        assert body["teacher"]["name"] == name
        np.testing.assert_array_equal(a.logprobs_S, b.logprobs_S)
    # Omitted: the default teacher; /v1/info's top level is that teacher's.
    body, unnamed = scored(after[None])
    assert body["teacher"]["name"] == "llama"
    np.testing.assert_array_equal(unnamed.logprobs_S, scored(after["llama"])[1].logprobs_S)
    described_info = info.json()
    assert described_info["default_teacher"] == "llama"
    assert described_info["teacher"]["name"] == "llama"
    assert described_info["teacher"]["vocab_size"] == 128256
    assert described_info["max_top_k"] == GPT_TOP_K
    # The tables were read back, not rebuilt.
    assert {p: p.stat().st_mtime_ns for p in tables} == tables
    assert len(list((tmp_path / "tables" / "pairs").glob("*.npz"))) == 2


# -- admission ------------------------------------------------------------------------------------


def test_admission_is_per_teacher(service, student, bank, teacher_dirs):
    gpt = service.engines["gpt"]
    gpt_body = score_body(student["id"], "gpt", bank=bank)
    llama_body = score_body(student["id"], "llama", bank=bank)

    async def go(client):
        metrics_text = (await client.get("/metrics")).text
        rejected_before = metric(metrics_text, "tokenbridge_rejected_total", teacher="gpt") or 0
        gpt.gate.clear()
        entered = gpt.entered
        try:
            holder = asyncio.create_task(client.post("/v1/score", json=gpt_body))
            while gpt.entered == entered:
                await asyncio.sleep(0.01)
            held_tokens = service.service.teachers["gpt"].admission.in_flight
            assert GPT_LIMIT / 2 < held_tokens <= GPT_LIMIT  # two such requests never fit
            started = time.monotonic()
            # Bounded waits: a request admitted by mistake would sit at the closed gate.
            refused = await asyncio.wait_for(client.post("/v1/score", json=gpt_body), 30)
            other = await asyncio.wait_for(client.post("/v1/score", json=llama_body), 30)
            elapsed = time.monotonic() - started
            holder_done = holder.done()
            metrics_text = (await client.get("/metrics")).text
            llama_in_flight = service.service.teachers["llama"].admission.in_flight
        finally:
            gpt.gate.set()
        return (
            held_tokens, refused, other, elapsed, holder_done, metrics_text, rejected_before,
            llama_in_flight, await holder,
        )  # fmt: skip

    (held, refused, other, elapsed, holder_done, metrics_text, rejected_before, llama_in_flight,
     holder) = service.run(go)  # fmt: skip
    assert GPT_LIMIT / 2 < held <= GPT_LIMIT
    # gpt is full: refused at once (admission_wait_s is 0), with Retry-After.
    assert refused.status_code == 429
    assert "max_tokens_in_flight" in error(refused)[1] and int(refused.headers["retry-after"]) >= 1
    # llama has room of its own: it answered while gpt still held its request, with its numbers.
    assert not holder_done and elapsed < 10
    body, seq = scored(other)
    check_against_forward(body, seq, bank, "llama", teacher_dirs["llama"])
    assert llama_in_flight == 0
    assert metric(metrics_text, "tokenbridge_tokens_in_flight", teacher="gpt") == held
    assert metric(metrics_text, "tokenbridge_tokens_in_flight", teacher="llama") == 0
    assert metric(metrics_text, "tokenbridge_rejected_total", teacher="gpt") == rejected_before + 1
    assert (metric(metrics_text, "tokenbridge_rejected_total", teacher="llama") or 0) == 0
    # Once the gate opens the held request is served.
    assert holder.status_code == 200
    assert service.service.teachers["gpt"].admission.in_flight == 0


def test_metrics_carry_the_teacher_label(service, student, bank):
    async def go(client):
        for name in ("gpt", "llama"):
            response = await client.post(
                "/v1/score", json=score_body(student["id"], name, bank=bank)
            )
            assert response.status_code == 200
        await client.post("/v1/score", json=score_body(student["id"], "qwen", bank=bank))
        return (await client.get("/metrics")).text

    text = service.run(go)
    for name in ("gpt", "llama"):
        requests = metric(
            text, "tokenbridge_requests_total", route="/v1/score", status="200", teacher=name
        )
        assert requests is not None and requests >= 1, name
        assert metric(text, "tokenbridge_scored_positions_total", teacher=name) >= len(
            completion(bank, STUDENT)
        )
        assert metric(text, "tokenbridge_teacher_tokens_total", kind="completion", teacher=name)
        assert metric(text, "tokenbridge_ready", teacher=name) == 1
        assert metric(text, "tokenbridge_admission_waiting", teacher=name) == 0
        assert f'tokenbridge_stage_seconds_count{{stage="engine",teacher="{name}"}}' in text
    # An unknown teacher's request is counted without a teacher.
    assert metric(text, "tokenbridge_requests_total", route="/v1/score", status="404", teacher="")


# -- one teacher's engine fails -------------------------------------------------------------------


def test_one_teacher_failing_leaves_the_other_serving_until_it_is_back(
    service, student, bank, teacher_dirs
):
    llama = service.engines["llama"]
    loads_before = llama.loads

    async def go(client):
        before = await client.post("/v1/score", json=score_body(student["id"], "llama", bank=bank))
        llama.oom_next = 1
        failed = await client.post("/v1/score", json=score_body(student["id"], "llama", bank=bank))
        during = {
            "ready": await client.get("/readyz"),
            "ready_llama": await client.get("/readyz", params={"teacher": "llama"}),
            "ready_gpt": await client.get("/readyz", params={"teacher": "gpt"}),
            "health": await client.get("/healthz"),
            "llama": await client.post(
                "/v1/score", json=score_body(student["id"], "llama", bank=bank)
            ),
            "llama_generate": await client.post(
                "/v1/generate",
                json={"prompts": [{"text": PROMPT}], "max_tokens": 2, "teacher": "llama"},
            ),
            "gpt": await client.post("/v1/score", json=score_body(student["id"], "gpt", bank=bank)),
            "info": await client.get("/v1/info", headers=JSON),
            "metrics": (await client.get("/metrics")).text,
        }
        back_in = await until(
            lambda: _status(client, "/readyz", {"teacher": "llama"}, 200), "llama never came back"
        )
        after = await client.post("/v1/score", json=score_body(student["id"], "llama", bank=bank))
        return (
            before, failed, during, back_in, after, await client.get("/v1/info", headers=JSON),
            await client.get("/readyz"), (await client.get("/metrics")).text,
        )  # fmt: skip

    before, failed, during, back_in, after, info, ready, metrics_text = service.run(go)
    assert before.status_code == 200
    # The request that ran out of memory: 503, retry shortly.
    assert failed.status_code == 503 and "retry-after" in failed.headers
    code, message = error(failed)
    assert code == "engine_unavailable" and "'llama'" in message
    # While llama restarts the service is ready (gpt serves) but degraded, naming llama unready.
    ready_during = during["ready"]
    assert ready_during.status_code == 200
    assert ready_during.json() == {
        "ready": True,
        "state": "degraded",
        "teachers": {
            "gpt": {"ready": True, "state": "ready"},
            "llama": {"ready": False, "state": "restarting"},
        },
        "unready": ["llama"],
    }
    assert (
        during["ready_llama"].status_code == 503 and "retry-after" in during["ready_llama"].headers
    )
    assert during["ready_llama"].json()["state"] == "restarting"
    assert during["ready_gpt"].status_code == 200
    assert during["health"].status_code == 200 and during["health"].json()["state"] == "degraded"
    for key in ("llama", "llama_generate"):
        assert during[key].status_code == 503 and "retry-after" in during[key].headers, key
        assert "teacher 'llama' is restarting" in error(during[key])[1]
    # gpt keeps answering, with its own model's numbers.
    body, seq = scored(during["gpt"])
    check_against_forward(body, seq, bank, "gpt", teacher_dirs["gpt"])
    described = {t["name"]: t for t in during["info"].json()["teachers"]}
    assert described["llama"]["state"] == "restarting" and described["llama"]["ready"] is False
    assert described["gpt"]["state"] == "ready"
    assert metric(during["metrics"], "tokenbridge_ready", teacher="llama") == 0
    assert metric(during["metrics"], "tokenbridge_ready", teacher="gpt") == 1
    # llama came back after its backoff, with the same weights: the same numbers.
    assert back_in < WAIT_S
    assert after.status_code == 200
    assert after.json()["sequences"] == before.json()["sequences"]
    assert llama.loads == loads_before + 1
    restarts = {t["name"]: t["engine_restarts"] for t in info.json()["teachers"]}
    assert restarts == {"gpt": 0, "llama": 1}
    assert ready.json()["state"] == "ready" and ready.json()["unready"] == []
    assert metric(metrics_text, "tokenbridge_engine_restarts_total", teacher="llama") == 1
    assert (metric(metrics_text, "tokenbridge_engine_restarts_total", teacher="gpt") or 0) == 0


async def _status(client, path: str, params: dict[str, str], status: int) -> bool:
    return (await client.get(path, params=params)).status_code == status


def test_a_teacher_failed_for_good_leaves_the_service_up_until_every_teacher_failed(
    teacher_dirs, tmp_path, bank, loop
):
    """No restarts: the failed teacher stays failed, the service serves the other (named
    ``default``: requests that name none go there), and gives up only once both failed."""
    dirs = {"default": teacher_dirs["gpt"], "llama": teacher_dirs["llama"]}
    engines = {name: OutOfMemoryEngine(path, max_top_k=64) for name, path in dirs.items()}
    config = two_teachers(dirs, tmp_path, engine_restarts=0)
    gave_up: list[str] = []
    with running_app(config, loop=loop, engines=engines) as harness:
        service = harness.service
        service.on_failed = lambda: gave_up.append(service.state)
        # Each teacher tells the service when it gives up; note llama's word on its way.
        llama_gave_up: list[str] = []
        tell_service = service.teachers["llama"].on_failed

        def llama_failed() -> None:
            llama_gave_up.append(service.teachers["llama"].state)
            tell_service()

        service.teachers["llama"].on_failed = llama_failed

        async def go(client):
            registered = await client.post("/v1/tokenizers", json={"name": "m", "hub": STUDENT})
            student_id = registered.json()["id"]
            unnamed = await client.post("/v1/score", json=score_body(student_id, None, bank=bank))
            engines["llama"].oom_next = 1
            failed = await client.post("/v1/score", json=score_body(student_id, "llama", bank=bank))
            await until(lambda: _true(bool(llama_gave_up)), "llama did not give up")
            one_failed = {
                "ready": await client.get("/readyz"),
                "ready_llama": await client.get("/readyz", params={"teacher": "llama"}),
                "health": await client.get("/healthz"),
                "llama": await client.post(
                    "/v1/score", json=score_body(student_id, "llama", bank=bank)
                ),
                "unnamed": await client.post(
                    "/v1/score", json=score_body(student_id, None, bank=bank)
                ),
                "gave_up": list(gave_up),
            }
            engines["default"].oom_next = 1
            await client.post("/v1/score", json=score_body(student_id, "default", bank=bank))
            await until(lambda: _true(bool(gave_up)), "the service did not give up")
            return (
                unnamed, failed, one_failed, await client.get("/readyz"),
                await client.get("/healthz"),
            )  # fmt: skip

        unnamed, failed, one_failed, ready, health = harness.run(go)
    body, seq = scored(unnamed)
    assert body["teacher"]["name"] == "default"
    check_against_forward(body, seq, bank, "default", dirs["default"], family="gpt2")
    assert failed.status_code == 503 and "gave up on it" in error(failed)[1]
    assert llama_gave_up == ["failed"]
    assert one_failed["gave_up"] == []  # one teacher failing is no reason to exit
    assert one_failed["ready"].status_code == 200
    assert one_failed["ready"].json()["state"] == "degraded"
    assert one_failed["ready"].json()["unready"] == ["llama"]
    assert one_failed["ready"].json()["teachers"]["llama"] == {"ready": False, "state": "failed"}
    assert one_failed["ready_llama"].status_code == 503
    assert one_failed["ready_llama"].json()["state"] == "failed"
    assert one_failed["health"].status_code == 200
    assert one_failed["llama"].status_code == 503
    assert "must be restarted" in error(one_failed["llama"])[1]
    _, again = scored(one_failed["unnamed"])
    np.testing.assert_array_equal(again.logprobs_S, seq.logprobs_S)
    # Both failed: told once, and liveness says so.
    assert gave_up == ["failed"]
    assert ready.status_code == 503 and ready.json()["unready"] == ["default", "llama"]
    assert health.status_code == 503 and health.json()["state"] == "failed"
    assert engines["llama"].loads == engines["default"].loads == 1  # restarts are off


async def _true(value: bool) -> bool:
    return value
