"""The OpenAPI description of API v1 (``GET /openapi.json``).

The routes read their bodies themselves (msgpack or JSON, see ``app``), so FastAPI cannot infer
request or response schemas from their signatures; this module writes them down: every request
body with the JSON schema of its ``shared.protocol`` model (for ``application/json`` and
``application/msgpack`` alike: msgpack bodies have the same fields, and may send token ids as a
typed array), every answer with its schema, and every refusal with the one error body
``{"error": {"code", "message"}}`` and the statuses that route can answer. Response schemas
describe the JSON form; a msgpack answer has the same fields with typed arrays
(``{"dtype", "shape", "data"}``) where JSON has lists.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from tokenbridge.shared.protocol import GenerateRequest, RegisterTokenizerRequest, ScoreRequest

__all__ = ["ERROR_SCHEMA", "install", "operation"]

_COMPONENTS = "#/components/schemas/"
_ENCODINGS = ("application/json", "application/msgpack")

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "description": "stable, machine-readable"},
                "message": {"type": "string", "description": "what was wrong and what to do"},
            },
        }
    },
}

_NUMBER_OR_NULL = {"type": ["number", "null"]}  # JSON has no NaN or infinity: they are null


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _object(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **optional},
    }


_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOLEAN = {"type": "boolean"}
_MAP = {"type": "object"}

_TEACHER_STAMP = _object(
    {"name": _STRING, "model": _STRING, "backend": _STRING, "dtype": _STRING, "versions": _MAP}
)
_NULLABLE_STRING = {"type": ["string", "null"]}
_SUMMARY = {
    "id": _STRING,
    "name": _STRING,
    "source": _object({"kind": {"enum": ["hub", "path", "tokenizer_json"]}}),
    "vocab_size": _INTEGER,
    "vocab_hash": _STRING,
    "scheme": _STRING,
}
_PAIRING = _object(
    {"vocab_overlap": _NUMBER, "probe_one_to_one_share": _NUMBER, "special_token_map": _MAP}
)
_DESCRIPTION = {
    **_SUMMARY,
    "roles": _MAP,
    "has_chat_template": _BOOLEAN,
    "teachers": {
        "type": "object",
        "additionalProperties": _PAIRING,
        "description": "how the student maps onto each teacher, by teacher name",
    },
}
#: The default teacher's pairing figures, repeated at the top (absent without a default teacher).
_DEFAULT_PAIRING = _PAIRING["properties"]
_TEACHER_INFO = _object(
    {
        "name": _STRING,
        "state": _STRING,
        "ready": _BOOLEAN,
        "model": _STRING,
        "backend": _STRING,
        "device": _STRING,
        "devices": _array(_INTEGER),
        "versions": _MAP,
        "vocab_hash": _NULLABLE_STRING,
        "max_top_k": _INTEGER,
        "limits": _MAP,
    },
    candidate_scoring={
        **_BOOLEAN,
        "description": "whether the teacher scores named student candidates (candidate_ids)",
    },
)

#: Generation and scoring cost the same FLOPs per token but not the same time on a real server.
_ENGINE_SECONDS = {
    **_NUMBER,
    "description": "seconds the teacher's engine spent on this request (measured, wall clock)",
}

_RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": ERROR_SCHEMA,
    "Health": _object({"status": _STRING, "state": _STRING}),
    "Readiness": _object(
        {
            "ready": _BOOLEAN,
            "state": _STRING,
            "teachers": {
                "type": "object",
                "additionalProperties": _object({"ready": _BOOLEAN, "state": _STRING}),
            },
            "unready": _array(_STRING),
        }
    ),
    "Info": _object(
        {
            "api_version": _STRING,
            "state": _STRING,
            "teacher": {"type": ["object", "null"], "description": "the default teacher"},
            "max_top_k": {"type": ["integer", "null"]},
            "limits": _MAP,
            "default_teacher": _NULLABLE_STRING,
            "teachers": _array(_TEACHER_INFO),
            "logprobs": _MAP,
            "encodings": _array(_STRING),
            "students": _INTEGER,
        }
    ),
    "TokenizerSummary": _object({**_SUMMARY, "created": _NUMBER}),
    "TokenizerList": _object({"tokenizers": _array({"$ref": _COMPONENTS + "TokenizerSummary"})}),
    "Tokenizer": _object({**_DESCRIPTION, "created": _NUMBER}, **_DEFAULT_PAIRING),
    "Registration": _object(
        {**_DESCRIPTION, "created": {**_BOOLEAN, "description": "false: it was registered"}},
        **_DEFAULT_PAIRING,
    ),
    "Deleted": _object({"id": _STRING, "deleted": _BOOLEAN}),
    "ScoredSequence": _object(
        {
            "logprobs": _array(_NUMBER_OR_NULL),
            "topk_ids": _array(_array(_INTEGER)),
            "topk_logprobs": _array(_array(_NUMBER_OR_NULL)),
            "chunk_ids": _array(_INTEGER),
            "tail_mass": _array(_NUMBER_OR_NULL),
            "unresolved_mass": _array(_NUMBER_OR_NULL),
            "exact": _array(_BOOLEAN),
            "chunk_logprobs": _array(_NUMBER_OR_NULL),
            "alignment": _object(
                {
                    "chunks": _INTEGER,
                    "one_to_one_share": _NUMBER,
                    "longest_chunk_tokens": _INTEGER,
                    "untiled_bytes": _INTEGER,
                    "total_bytes": _INTEGER,
                    "teacher_prompt_tokens": _INTEGER,
                    "teacher_completion_tokens": _INTEGER,
                }
            ),
        },
        candidate_logprobs={
            **_array(_array(_NUMBER_OR_NULL)),
            "description": "with candidate_ids in the request: per completion token and named "
            "candidate, the log of the teacher's mass of that student token from its full row "
            "(docs/mapping.md §4b); null/-inf for none or padding",
        },
        candidate_unresolved_mass={
            **_array(_array(_NUMBER_OR_NULL)),
            "description": "mass of teacher tokens that may belong to the candidate but hang on "
            "the next teacher position: the true mass lies in [exp(logprob), exp(logprob) + "
            "this]; 0: exact",
        },
    ),
    "ScoreResponse": _object(
        {
            "top_k": _INTEGER,
            "sequences": _array({"$ref": _COMPONENTS + "ScoredSequence"}),
            "usage": _object(
                {
                    "positions": _INTEGER,
                    "teacher_prompt_tokens": _INTEGER,
                    "teacher_completion_tokens": _INTEGER,
                    "teacher_tokens": _INTEGER,
                    "teacher_flops": {"type": ["integer", "null"]},
                    "teacher_engine_s": _ENGINE_SECONDS,
                }
            ),
            "timings": _object({"prepare_s": _NUMBER, "engine_s": _NUMBER, "mapping_s": _NUMBER}),
            "teacher": _TEACHER_STAMP,
        }
    ),
    "GenerateResponse": _object(
        {
            "completions": _array(
                _object(
                    {
                        "text": _STRING,
                        "ids": _array(_INTEGER),
                        "finish_reason": {"enum": ["stop", "length"]},
                    }
                )
            ),
            "usage": _object(
                {
                    "teacher_prompt_tokens": _INTEGER,
                    "teacher_completion_tokens": _INTEGER,
                    "teacher_tokens": _INTEGER,
                    "teacher_flops": {"type": ["integer", "null"]},
                    "teacher_engine_s": _ENGINE_SECONDS,
                }
            ),
            "teacher": _TEACHER_STAMP,
        }
    ),
}

_REQUEST_MODELS = (ScoreRequest, GenerateRequest, RegisterTokenizerRequest)

_ERROR_TEXT = {
    400: "the body is not valid msgpack/JSON, is empty, or a typed array lies about its size",
    401: "no API key: send 'Authorization: Bearer KEY'",
    403: "the API key is not valid",
    404: "no such student tokenizer, or no such teacher (code unknown_teacher)",
    413: "the body or the tokens it needs exceed a limit (the message names it)",
    415: "a content type other than application/msgpack or application/json",
    422: "the body decodes but asks for something invalid (the message says what)",
    429: "refused: too many teacher tokens in flight, or the key's quota is spent (Retry-After)",
    500: "an internal error; the message names the request id to look up in the log",
    503: "not ready: loading, draining, or the engine failed (Retry-After)",
    504: "the request ran past request_timeout_s and was abandoned",
}
_GUARDED = (401, 403, 500, 503)
_BODY = (400, 413, 415, 422)

# (method, path) -> (summary, request model, success status and schema, extra error statuses)
_ROUTES: dict[tuple[str, str], tuple[str, type | None, dict[int, str], tuple[int, ...]]] = {
    ("GET", "/readyz"): ("Readiness", None, {200: "Readiness", 503: "Readiness"}, (404, 422)),
    ("GET", "/metrics"): ("Prometheus metrics", None, {200: ""}, ()),
    ("GET", "/v1/info"): ("The teachers, their limits and encodings", None, {200: "Info"}, ()),
    ("POST", "/v1/tokenizers"): (
        "Register a student tokenizer",
        RegisterTokenizerRequest,
        {200: "Registration", 201: "Registration"},
        (*_BODY, 429),
    ),
    ("GET", "/v1/tokenizers"): ("List student tokenizers", None, {200: "TokenizerList"}, ()),
    ("GET", "/v1/tokenizers/{student_id}"): (
        "Describe a student tokenizer",
        None,
        {200: "Tokenizer"},
        (404,),
    ),
    ("DELETE", "/v1/tokenizers/{student_id}"): (
        "Delete a student tokenizer",
        None,
        {200: "Deleted"},
        (404,),
    ),
    ("POST", "/v1/score"): (
        "Score student completions with the teacher",
        ScoreRequest,
        {200: "ScoreResponse"},
        (*_BODY, 404, 429, 504),
    ),
    ("POST", "/v1/generate"): (
        "Sample from the teacher",
        GenerateRequest,
        {200: "GenerateResponse"},
        (*_BODY, 404, 429, 504),
    ),
}


def _content(schema_name: str) -> dict[str, Any]:
    schema = {"$ref": _COMPONENTS + schema_name}
    return {media: {"schema": schema} for media in _ENCODINGS}


def operation(method: str, path: str) -> dict[str, Any]:
    """The ``openapi_extra`` of one guarded route: body, parameters, answers and security."""
    summary, model, successes, errors = _ROUTES[(method, path)]
    responses: dict[str, Any] = {}
    for status, schema_name in successes.items():
        if path == "/metrics":
            content = {"text/plain": {"schema": _STRING}}
        elif path == "/readyz":
            content = {"application/json": {"schema": {"$ref": _COMPONENTS + schema_name}}}
        else:
            content = _content(schema_name)
        description = "the service is not ready (Retry-After)" if status == 503 else "success"
        responses[str(status)] = {"description": description, "content": content}
    for status in sorted({*_GUARDED, *errors}):
        if str(status) not in responses:
            responses[str(status)] = {
                "description": _ERROR_TEXT[status],
                "content": _content("Error"),
            }
    extra: dict[str, Any] = {
        "summary": summary,
        "responses": responses,
        "security": [{"bearer": []}],
    }
    if model is not None:
        extra["requestBody"] = {
            "required": True,
            "description": "msgpack (the default) or JSON; in msgpack, token ids may be a typed "
            'array {"dtype": "<i4", "shape": [n], "data": <bytes>}',
            "content": _content(model.__name__),
        }
    if path == "/readyz":
        extra["parameters"] = [
            {
                "name": "teacher",
                "in": "query",
                "required": False,
                "description": "answer for this teacher alone (GET /v1/info lists them)",
                "schema": _STRING,
            }
        ]
    if "{student_id}" in path:
        extra["parameters"] = [
            {
                "name": "student_id",
                "in": "path",
                "required": True,
                "description": "the id POST /v1/tokenizers answered",
                "schema": _STRING,
            }
        ]
    return extra


def _exactly_one(schema: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``schema`` (a model's, its optional fields ``anyOf [X, null]``) with a ``oneOf`` that asks
    for exactly one of ``names`` to be given (not null), as the model's validator does."""
    properties = schema["properties"]

    def given(name: str) -> dict[str, Any]:
        variants = properties[name].get("anyOf", [properties[name]])
        return next(v for v in variants if v.get("type") != "null")

    schema["oneOf"] = [
        {
            "required": [name],
            "properties": {
                name: given(name),
                **{other: {"type": "null"} for other in names if other != name},
            },
        }
        for name in names
    ]
    return schema


def _component_schemas(limits: dict[str, int]) -> dict[str, Any]:
    """The request models' JSON schemas, tightened to what the models' validators and the
    service's limits accept, and the response schemas."""
    _, top = models_json_schema(
        [(model, "validation") for model in _REQUEST_MODELS], ref_template=_COMPONENTS + "{model}"
    )
    schemas = top["$defs"]
    prompt = schemas["Prompt"]
    messages = prompt["properties"]["messages"]["anyOf"][0]
    messages["minItems"] = 1
    generation_prompt = copy.deepcopy(prompt)
    _exactly_one(prompt, ("text", "messages", "ids"))
    generation_prompt["properties"]["ids"] = {"type": "null"}
    generation_prompt["title"] = "GenerationPrompt"
    generation_prompt["description"] = "Exactly one of ``text`` or ``messages``."
    schemas["GenerationPrompt"] = _exactly_one(generation_prompt, ("text", "messages"))
    register = _exactly_one(schemas["RegisterTokenizerRequest"], ("path", "hub", "tokenizer_json"))
    specials = register["properties"]["special_tokens"]["anyOf"][0]
    specials["propertyNames"] = {"enum": ["bos_token", "eos_token", "pad_token", "unk_token"]}
    score = schemas["ScoreRequest"]["properties"]
    score["top_k"]["maximum"] = limits["max_top_k"]
    score["sequences"]["maxItems"] = limits["max_sequences"]
    generate = schemas["GenerateRequest"]["properties"]
    generate["prompts"]["items"] = {"$ref": _COMPONENTS + "GenerationPrompt"}
    generate["prompts"]["maxItems"] = limits["max_sequences"]
    generate["max_tokens"]["anyOf"][0]["maximum"] = limits["max_generate_tokens"]
    return {**schemas, **_RESPONSE_SCHEMAS}


def install(app: FastAPI, limits: dict[str, int]) -> None:
    """Add the shared schemas and the Bearer scheme to ``app``'s OpenAPI description;
    ``limits`` (``max_top_k``, ``max_sequences``, ``max_generate_tokens``) bound the bodies."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI's own, which it caches in ``app.openapi_schema``
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(_component_schemas(limits))
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key of the service (every route but /healthz needs one "
            "when keys are configured)",
        }
        health = {"application/json": {"schema": {"$ref": _COMPONENTS + "Health"}}}
        responses = schema["paths"]["/healthz"]["get"]["responses"]
        responses["200"]["content"] = health
        responses["503"] = {"description": "the service gave up on its engine", "content": health}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
