"""Keys, per-key quotas, where tokenizers may be read from, and what the logs never hold: the
real app in-process on the transformers engine, and one real ``tokenbridge serve`` process."""

from __future__ import annotations

import asyncio
import hashlib
import os

import httpx
import pytest

from tokenbridge.process import free_port
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.quotas import KeyQuotas

from tests.support.service import (
    GatedEngine,
    config_for,
    running_app,
    serve_process,
    transformers_engine,
)

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-9876543210"
A = {"authorization": f"Bearer {KEY_A}", "accept": "application/json"}
B = {"authorization": f"Bearer {KEY_B}", "accept": "application/json"}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def score_body(student: str, ids: list[int]) -> dict:
    return {
        "student_tokenizer": student,
        "top_k": 2,
        "sequences": [{"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids}],
    }


async def register(client, headers, name="gpt2") -> str:
    response = await client.post(
        "/v1/tokenizers", json={"name": name, "hub": name}, headers=headers
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


# -- per-key quotas ---------------------------------------------------------------------------


def test_token_quota_refuses_one_key_and_not_the_other(teacher_dir, tmp_path):
    # 60 tokens a minute for A (one a second), none for B.
    config = config_for(
        teacher_dir,
        tmp_path,
        api_keys=(KEY_A, KEY_B),
        key_quotas=(f"{sha256(KEY_A)[:8]}=60",),
    )
    ids = list(range(300, 400))
    with running_app(config) as harness:

        async def go(client):
            student = await register(client, A)
            first = await client.post("/v1/score", json=score_body(student, ids), headers=A)
            refused = await client.post("/v1/score", json=score_body(student, ids), headers=A)
            other = await client.post("/v1/score", json=score_body(student, ids), headers=B)
            info_a = await client.get("/v1/info", headers=A)
            metrics = await client.get("/metrics", headers=B)
            return first, refused, other, info_a, metrics

        first, refused, other, info_a, metrics = harness.run(go)
    assert first.status_code == 200
    used = first.json()["usage"]["teacher_tokens"]
    assert used > 60
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert sha256(KEY_A)[:8] in refused.json()["error"]["message"]
    # One token a second: the balance is back above zero after (used - 60) seconds.
    assert int(refused.headers["retry-after"]) >= used - 60 - 1
    assert other.status_code == 200
    quota = info_a.json()["quota"]
    assert quota == {
        "key_id": sha256(KEY_A)[:8],
        "tokens_per_minute": 60,
        "tokens_left": 0,
        "max_requests_in_flight": 0,
    }
    text = metrics.text
    assert f'tokenbridge_quota_refusals_total{{key_id="{sha256(KEY_A)[:8]}"}} 1.0' in text
    labels = f'key_id="{sha256(KEY_B)[:8]}",teacher="default"'
    assert f"tokenbridge_key_teacher_tokens_total{{{labels}}} {used}.0" in text
    assert KEY_A not in text and KEY_B not in text


def test_requests_in_flight_per_key(teacher_dir, tmp_path):
    engine = GatedEngine(transformers_engine(teacher_dir))
    config = config_for(
        teacher_dir, tmp_path, api_keys=(KEY_A, KEY_B), key_max_requests_in_flight=1
    )
    ids = list(range(300, 310))
    with running_app(config, engine=engine) as harness:

        async def go(client):
            student = await register(client, A)
            held = asyncio.create_task(
                client.post("/v1/score", json=score_body(student, ids), headers=A)
            )
            while engine.entered < 1:
                await asyncio.sleep(0.01)
            second_a = await client.post("/v1/score", json=score_body(student, ids), headers=A)
            b_task = asyncio.create_task(
                client.post("/v1/score", json=score_body(student, ids), headers=B)
            )
            while engine.entered < 2:  # B got past its own quota and reached the engine
                await asyncio.sleep(0.01)
            engine.gate.set()
            first_a, first_b = await held, await b_task
            again_a = await client.post("/v1/score", json=score_body(student, ids), headers=A)
            return second_a, first_a, first_b, again_a

        second_a, first_a, first_b, again_a = harness.run(go)
    assert second_a.status_code == 429 and "key_max_requests_in_flight" in second_a.text
    assert second_a.headers["retry-after"] == "1"
    assert first_a.status_code == first_b.status_code == again_a.status_code == 200


def test_token_bucket_refills_at_the_keys_rate():
    now = [0.0]
    quotas = KeyQuotas({"k" * 64: 120}, max_requests_in_flight=0, clock=lambda: now[0])
    with quotas.hold("k" * 64):
        pass
    quotas.charge("k" * 64, 180)  # 60 over: two tokens a second refill it in 30 s
    assert quotas.balance("k" * 64) == pytest.approx(-60)
    with pytest.raises(Exception, match="quota of 120") as refused, quotas.hold("k" * 64):
        pass
    assert refused.value.retry_after_s == pytest.approx(30, abs=0.01)
    now[0] = 30.5
    with quotas.hold("k" * 64):
        pass
    now[0] = 10_000  # a quiet key banks at most one minute's worth
    assert quotas.balance("k" * 64) == 120
    assert quotas.balance("u" * 64) is None  # no quota: never refused
    with quotas.hold(None), quotas.hold("u" * 64):
        pass


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"key_quotas": ("abc=5",)}, "at least 8 hex"),
        ({"key_quotas": ("abcdefgh",)}, "KEY_ID=TOKENS_PER_MINUTE"),
        ({"key_quotas": (f"{sha256(KEY_A)[:8]}=lots",)}, "KEY_ID=TOKENS_PER_MINUTE"),
        ({"key_quotas": ("ffffffff=5",)}, "matches 0 configured keys"),
        ({"api_key_hashes": ("not-a-hash",)}, "sha256 hex"),
        ({"key_tokens_per_minute": -1}, "must be >= 0"),
    ],
)
def test_bad_quota_configs_say_why(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        ServiceConfig(api_keys=(KEY_A,), **overrides)


def test_quota_overrides_name_a_key_by_its_hash_in_any_case():
    config = ServiceConfig(
        api_key_hashes=(sha256(KEY_A).upper(),),
        key_tokens_per_minute=1000,
        key_quotas=(f"{sha256(KEY_A)[:10].upper()}=5",),
        api_keys=(KEY_B,),
    )
    assert config.key_quota_table() == {sha256(KEY_A): 5, sha256(KEY_B): 1000}


# -- where tokenizers may come from -----------------------------------------------------------


def test_path_registrations_stay_inside_the_allowed_folders(teacher_dir, tmp_path, bank):
    data = tmp_path / "data"
    extra = tmp_path / "mounted"
    outside = tmp_path / "outside"
    for folder in (data / "tokenizers", extra, outside):
        folder.mkdir(parents=True)
    bank.tokenizer("gpt2").save_pretrained(str(data / "tokenizers" / "gpt2"))
    bank.tokenizer("mistral-v1").save_pretrained(str(extra / "mistral"))
    bank.tokenizer("gpt2").save_pretrained(str(outside / "gpt2"))
    (data / "tokenizers" / "escape").symlink_to(outside / "gpt2")
    config = config_for(teacher_dir, data, tokenizer_dirs=(extra,))
    cases = {
        "relative": "tokenizers/gpt2",
        "absolute_inside": str(data / "tokenizers" / "gpt2"),
        "extra_root": str(extra / "mistral"),
        "dotdot": "tokenizers/../../outside/gpt2",
        "absolute_outside": str(outside / "gpt2"),
        "symlink_out": "tokenizers/escape",
        "home": "~/gpt2",
        "etc": "/etc",
    }
    with running_app(config) as harness:

        async def go(client):
            return {
                name: await client.post("/v1/tokenizers", json={"name": name, "path": path})
                for name, path in cases.items()
            }

        got = harness.run(go)
    assert got["relative"].status_code == got["extra_root"].status_code == 201
    assert got["absolute_inside"].status_code == 200  # the same tokenizer, already registered
    assert got["relative"].json()["id"] == got["absolute_inside"].json()["id"]
    for name in ("dotdot", "absolute_outside", "symlink_out", "home", "etc"):
        assert got[name].status_code == 422, name
        assert "outside the folders" in got[name].json()["error"]["message"], name


@pytest.mark.parametrize(
    "hub", ["../gpt2", "/etc/passwd", "~root/x", "a/b/c", "a\\b", "https://example.com/x", ".", ""]
)
def test_hub_names_that_are_not_repository_ids_are_refused(app_open, hub):
    response = app_open.run(
        lambda client: client.post("/v1/tokenizers", json={"name": "x", "hub": hub})
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unprocessable"


def test_an_existing_folder_named_as_a_hub_name_is_refused(app_open, tmp_path, monkeypatch):
    (tmp_path / "looks-like-a-repo").mkdir()
    monkeypatch.chdir(tmp_path)
    response = app_open.run(
        lambda client: client.post("/v1/tokenizers", json={"name": "x", "hub": "looks-like-a-repo"})
    )
    assert response.status_code == 422 and "not a hub repository id" in response.text


@pytest.fixture(scope="module")
def app_open(teacher_dir, tmp_path_factory, loop):
    with running_app(config_for(teacher_dir, tmp_path_factory.mktemp("data")), loop=loop) as app:
        yield app


# -- no secret in any log ---------------------------------------------------------------------


@pytest.mark.process
def test_keys_never_reach_the_log_of_a_real_process(teacher_dir, tmp_path):
    """A real ``tokenbridge serve`` at debug level, keys from the environment and a flag: no key,
    valid or not, appears in its log; requests are logged with the key's short id."""
    port = free_port()
    wrong = "wrong-key-that-must-not-be-logged"
    args = [
        "--teacher", str(teacher_dir), "--data-dir", str(tmp_path / "data"),
        "--api-keys", KEY_B, "--log-level", "debug", "--key-tokens-per-minute", "100000",
    ]  # fmt: skip
    env = {"TOKENBRIDGE_API_KEYS": KEY_A}
    served = serve_process(args, tmp_path, port=port, env=env, headers=A)
    with served as (url, _, log_path), httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v1/info", headers=A).status_code == 200
        assert client.get("/v1/info", headers=B).status_code == 200
        bad = {"authorization": f"Bearer {wrong}"}
        assert client.get("/v1/info", headers=bad).status_code == 403
        response = client.post("/v1/tokenizers", json={"name": "gpt2", "hub": "gpt2"}, headers=bad)
        assert response.status_code == 403
        assert client.post("/v1/score", content=b"\xc1", headers=A).status_code == 400
    log = log_path.read_text()
    assert '"route": "/v1/info"' in log
    for secret in (KEY_A, KEY_B, wrong):
        assert secret not in log
    assert f'"key_id": "{sha256(KEY_A)[:8]}"' in log
    assert f'"key_id": "{sha256(KEY_B)[:8]}"' in log


@pytest.mark.process
def test_the_environment_key_is_not_echoed_by_a_bad_config(tmp_path):
    """A usage error prints the config's problem, never the keys it was given."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "serve", "--teacher", "x", "--port", "0"],
        env={**os.environ, "TOKENBRIDGE_API_KEYS": KEY_A},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "port must lie" in result.stderr
    assert KEY_A not in result.stderr + result.stdout


def test_a_tokenizer_that_ships_code_never_runs_it(teacher_dir, tmp_path, bank):
    """``auto_map`` in a registered folder points at a module of its own: with
    ``trust_remote_code`` off the module is never imported, whatever the answer."""
    import json

    data = tmp_path / "data"
    folder = data / "tokenizers" / "evil"
    bank.tokenizer("gpt2").save_pretrained(str(folder))
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config_path = folder / "tokenizer_config.json"
    settings = json.loads(config_path.read_text())
    settings["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    settings["tokenizer_class"] = "EvilTokenizer"
    config_path.write_text(json.dumps(settings))
    with running_app(config_for(teacher_dir, data)) as harness:
        response = harness.run(
            lambda client: client.post(
                "/v1/tokenizers", json={"name": "evil", "path": "tokenizers/evil"}
            )
        )
    assert response.status_code in (201, 422), response.text
    assert not marker.exists()
