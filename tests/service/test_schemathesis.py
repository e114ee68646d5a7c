"""Schemathesis against the service's own OpenAPI description (``/openapi.json``), in-process.

Schemathesis calls the ASGI app directly (it starts the app's lifespan in its own event-loop
thread), generates valid and invalid requests for every operation from the request-body
schemas, in both encodings, and checks each answer: never a 5xx, every status and content type
documented, every body matching its documented schema (msgpack answers are read into their JSON
form first), invalid data refused with a 4xx and the API key enforced. After the run a valid
score request still answers 200 with the teacher's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from tokenbridge.service.app import create_app
from tokenbridge.shared.codec import MSGPACK, to_json_ready, unpack
from tokenbridge.shared.protocol import DEFAULT_TEACHER

from tests.support.fuzz import (
    API_KEY,
    AUTH,
    MAX_GENERATE_TOKENS,
    SCALE,
    OfflineOnlyLoader,
    fuzz_config,
)
from tests.support.service import direct_logprobs

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python import asgi  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


#: The key as schemathesis sees it: its ``ignored_auth`` check removes the header by the name
#: the security scheme gives it (``Authorization``) to probe the operation without it.
BEARER = {"Authorization": f"Bearer {API_KEY}"}


def _msgpack_ready(value: Any) -> Any:
    """``value`` with the integers msgpack cannot hold (schema integers are unbounded) as floats."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value) if abs(value) < 10**308 else math.copysign(math.inf, value)
    if isinstance(value, dict):
        return {key: _msgpack_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_msgpack_ready(item) for item in value]
    return value


@schemathesis.serializer(MSGPACK)
def _pack_msgpack(ctx: Any, value: Any) -> bytes:
    return msgpack.packb(_msgpack_ready(value), use_bin_type=True)


@schemathesis.deserializer(MSGPACK)
def _read_msgpack(ctx: Any, response: Any) -> Any:
    """A msgpack answer in its JSON form (typed arrays as lists, non-finite floats as null)."""
    return to_json_ready(unpack(response.content))


@pytest.fixture(scope="module")
def service(teacher_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The app, its schema (loading it starts the app), and a registered student."""
    config = fuzz_config(teacher_dir, tmp_path_factory.mktemp("schemathesis"))
    app = create_app(config, tokenizer_loader=OfflineOnlyLoader())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
    )
    try:
        with asgi.get_client(app) as client:
            response = client.post(
                "/v1/tokenizers", json={"name": "g", "hub": "gpt2"}, headers=AUTH
            )
            assert response.status_code in (200, 201), response.text
            yield {"app": app, "schema": schema, "student": response.json()["id"]}
    finally:
        asgi.shutdown_lifespans()


OPERATIONS = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/info"),
    ("POST", "/v1/tokenizers"),
    ("GET", "/v1/tokenizers"),
    ("GET", "/v1/tokenizers/{student_id}"),
    ("DELETE", "/v1/tokenizers/{student_id}"),
    ("POST", "/v1/score"),
    ("POST", "/v1/generate"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("GET", "/vllm/{teacher}/{student_id}/health"),
    ("GET", "/vllm/{teacher}/{student_id}/v1/models"),
    ("POST", "/vllm/{teacher}/{student_id}/v1/completions"),
]
GPT2_VOCAB = 50257
#: Examples per operation and generation mode; bodies get more.
EXAMPLES = {"GET": 10, "DELETE": 10, "POST": 40}


def _steer(case: Any, student: str, mode: GenerationMode) -> None:
    """Steer valid generated bodies past the first refusals and into the handlers (and their answers
    through the response-schema check): half the score bodies name the registered student (GPT-2's
    own tokenizer) with ids folded into its vocabulary; generate bodies without ``max_tokens``
    get this service's maximum (the protocol's default, 128, is above it)."""
    body = case.body
    if mode != GenerationMode.POSITIVE:
        return
    if case.operation.path.startswith("/vllm/") and isinstance(case.path_parameters, dict):
        # Valid bodies go to the real pair (so its answers get checked); invalid ones meet 404.
        case.path_parameters.update(teacher=DEFAULT_TEACHER, student_id=student)
    if not isinstance(body, dict):
        return
    if case.operation.path.endswith("/v1/completions"):
        body.pop("model", None)
        if case.operation.path == "/v1/completions":
            body["model"] = f"{DEFAULT_TEACHER}"  # GPT-2's own tokenizer: the teacher's name
        prompts = body.get("prompt")
        if isinstance(prompts, list):
            body["prompt"] = [
                [i % GPT2_VOCAB for i in ids]
                if isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)
                else ids
                for ids in prompts
            ]
        body.pop("prompt_logprob_token_ids", None)
        return
    if case.operation.path == "/v1/generate":
        body.setdefault("max_tokens", MAX_GENERATE_TOKENS)
        return
    if (
        case.operation.path != "/v1/score"
        or not isinstance(body.get("student_tokenizer"), str)
        or len(body["student_tokenizer"]) % 2
    ):
        return
    body["student_tokenizer"] = student
    for sequence in body.get("sequences") or []:
        if not isinstance(sequence, dict):
            continue
        prompt = sequence.get("prompt")
        for holder, key in ((sequence, "completion_ids"), (prompt, "ids")):
            ids = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids):
                holder[key] = [i % GPT2_VOCAB for i in ids]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_conforms_to_its_description(service, method, path, mode):
    """Schemathesis' cases for one operation in one mode (the pytest plugin's lazy loading does
    not run under pytest 9, so the strategy is driven here with plain hypothesis)."""
    operation = service["schema"][path][method]
    hypothesis_settings = settings(
        max_examples=EXAMPLES[method] * SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure reports as found
        suppress_health_check=list(HealthCheck),
    )

    @hypothesis_settings
    @given(operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        _steer(case, service["student"], mode)
        case.call_and_validate(headers=BEARER, checks=CHECKS)

    check()


def test_the_description_documents_bodies_errors_and_the_key(service):
    with asgi.get_client(service["app"]) as client:
        described = client.get("/openapi.json").json()
    score = described["paths"]["/v1/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"application/json", "application/msgpack"}
    assert {"400", "401", "403", "404", "413", "415", "422", "429"} <= set(score["responses"])
    assert described["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    error = described["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    student = described["paths"]["/v1/tokenizers/{student_id}"]["get"]["parameters"][0]
    assert student["name"] == "student_id" and student["in"] == "path"


def test_after_the_run_the_service_scores_correctly(service, bank, teacher_dir):
    tokenizer = bank.tokenizer("gpt2")
    prompt_ids = tokenizer.encode("HAMLET.\n")
    ids = tokenizer.encode(" To be, or not to be", add_special_tokens=False)
    body = {
        "student_tokenizer": service["student"],
        "top_k": 4,
        "sequences": [{"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids}],
    }
    with asgi.get_client(service["app"]) as client:
        response = client.post(
            "/v1/score", json=body, headers={"authorization": f"Bearer {API_KEY}"}
        )
    assert response.status_code == 200, response.text
    logprobs = np.array(response.json()["sequences"][0]["logprobs"], dtype=np.float64)
    forward = direct_logprobs(teacher_dir, prompt_ids + ids)
    start = len(prompt_ids)
    expected = forward[np.arange(start - 1, start - 1 + len(ids)), ids]
    np.testing.assert_allclose(logprobs, expected, rtol=0, atol=2e-5)
