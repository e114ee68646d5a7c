"""The OpenAPI description of API v1 (``GET /openapi.json``).

The routes read their bodies themselves (msgpack or JSON, see ``app``), so FastAPI cannot infer
request or response schemas from their signatures; this module generates them from the shared
definitions: every request body from its ``shared.protocol`` model (for ``application/json`` and
``application/msgpack`` alike: msgpack bodies have the same fields, and may send token ids as a
typed array), every answer from its ``shared.responses`` type, and every refusal as the one
error body (``ErrorBody``) with the statuses that route can answer. What it writes by hand is only
what cannot be generated: the statuses and summaries of each route, the path and query
parameters, the security scheme, and the request limits of this service's configuration.
Response schemas describe the JSON form; a msgpack answer has the same fields with typed arrays
(``{"dtype", "shape", "data"}``) where JSON has lists.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from tokenbridge.service.completions import PAIR_PATH, is_face_path
from tokenbridge.shared.protocol import (
    COMPLETION_NEUTRAL_FIELDS,
    CompletionRequest,
    GenerateRequest,
    RegisterTokenizerRequest,
    ScoreRequest,
)
from tokenbridge.shared.responses import (
    RESPONSE_TYPES,
    CompletionResponse,
    Deleted,
    ErrorBody,
    GenerateResponse,
    Health,
    Info,
    ModelList,
    Readiness,
    Registration,
    ScoreResponse,
    StudentDescription,
    StudentList,
    VllmErrorBody,
)

__all__ = ["install", "operation"]

_COMPONENTS = "#/components/schemas/"
_ENCODINGS = ("application/json", "application/msgpack")

_REQUEST_MODELS = (ScoreRequest, GenerateRequest, RegisterTokenizerRequest, CompletionRequest)
_PAIR = PAIR_PATH

_ERROR_TEXT = {
    400: "the body is not valid msgpack/JSON, is empty, or a typed array lies about its size",
    401: "no API key: send 'Authorization: Bearer KEY'",
    403: "the API key is not valid",
    404: "no such student tokenizer, or no such teacher (code unknown_teacher), or model",
    413: "the body or the tokens it needs exceed a limit (the message names it)",
    415: "a content type other than application/msgpack or application/json",
    422: "the body decodes but asks for something invalid (the message says what)",
    429: "refused: too many teacher tokens in flight, or the key's quota is spent (Retry-After)",
    500: "an internal error; the message names the request id to look up in the log",
    503: "not ready: loading, draining, or the engine failed (Retry-After)",
    504: "the request ran past request_timeout_s and was abandoned",
}
_GUARDED = (401, 403, 500, 503)
_STRING = {"type": "string"}
_BODY = (400, 413, 415, 422)

# (method, path) -> (summary, request model, success status and answer type, extra error statuses)
_ROUTES: dict[tuple[str, str], tuple[str, type | None, dict[int, type | None], tuple[int, ...]]] = {
    ("GET", "/readyz"): ("Readiness", None, {200: Readiness, 503: Readiness}, (404, 422)),
    ("GET", "/metrics"): ("Prometheus metrics", None, {200: None}, ()),
    ("GET", "/v1/info"): ("The teachers, their limits and encodings", None, {200: Info}, ()),
    ("POST", "/v1/tokenizers"): (
        "Register a student tokenizer",
        RegisterTokenizerRequest,
        {200: Registration, 201: Registration},
        (*_BODY, 429),
    ),
    ("GET", "/v1/tokenizers"): ("List student tokenizers", None, {200: StudentList}, ()),
    ("GET", "/v1/tokenizers/{student_id}"): (
        "Describe a student tokenizer",
        None,
        {200: StudentDescription},
        (404,),
    ),
    ("DELETE", "/v1/tokenizers/{student_id}"): (
        "Delete a student tokenizer",
        None,
        {200: Deleted},
        (404,),
    ),
    ("POST", "/v1/score"): (
        "Score student completions with the teacher",
        ScoreRequest,
        {200: ScoreResponse},
        (*_BODY, 404, 429, 504),
    ),
    ("POST", "/v1/generate"): (
        "Sample from the teacher",
        GenerateRequest,
        {200: GenerateResponse},
        (*_BODY, 404, 429, 504),
    ),
    ("GET", "/v1/models"): (
        "Every (teacher, student) pair, as vLLM models",
        None,
        {200: ModelList},
        (),
    ),
    ("POST", "/v1/completions"): (
        "vLLM's prompt_logprobs over the student's vocabulary",
        CompletionRequest,
        {200: CompletionResponse},
        (*_BODY, 404, 429, 504),
    ),
    ("GET", _PAIR + "/health"): ("The pair's vLLM health check", None, {200: None}, (404,)),
    ("GET", _PAIR + "/v1/models"): ("The pair as a vLLM model", None, {200: ModelList}, (404,)),
    ("POST", _PAIR + "/v1/completions"): (
        "vLLM's prompt_logprobs over the student's vocabulary, for the pair",
        CompletionRequest,
        {200: CompletionResponse},
        (*_BODY, 404, 429, 504),
    ),
}


def _content(schema_name: str) -> dict[str, Any]:
    schema = {"$ref": _COMPONENTS + schema_name}
    return {media: {"schema": schema} for media in _ENCODINGS}


def operation(method: str, path: str) -> dict[str, Any]:
    """The ``openapi_extra`` of one guarded route: body, parameters, answers and security."""
    summary, model, successes, errors = _ROUTES[(method, path)]
    refusal = (VllmErrorBody if is_face_path(path) else ErrorBody).__name__
    responses: dict[str, Any] = {}
    for status, answer in successes.items():
        if answer is None and path.endswith("/health"):
            content = {}
        elif answer is None:  # /metrics
            content = {"text/plain": {"schema": _STRING}}
        elif path == "/readyz":
            content = {"application/json": {"schema": {"$ref": _COMPONENTS + answer.__name__}}}
        else:
            content = _content(answer.__name__)
        description = "the service is not ready (Retry-After)" if status == 503 else "success"
        responses[str(status)] = {"description": description, "content": content}
    for status in sorted({*_GUARDED, *errors}):
        if str(status) not in responses:
            responses[str(status)] = {
                "description": _ERROR_TEXT[status],
                "content": _content(refusal),
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
            *(
                [
                    {
                        "name": "teacher",
                        "in": "path",
                        "required": True,
                        "description": "a teacher of the service (GET /v1/info lists them)",
                        "schema": _STRING,
                    }
                ]
                if "{teacher}" in path
                else []
            ),
            {
                "name": "student_id",
                "in": "path",
                "required": True,
                "description": "the id POST /v1/tokenizers answered",
                "schema": _STRING,
            },
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
    completion = schemas["CompletionRequest"]
    completion["required"] = ["prompt", "prompt_logprobs", "max_tokens"]
    fields = completion["properties"]
    fields["prompt_logprobs"] = {
        "type": "integer",
        "minimum": 0,
        "maximum": limits["max_top_k"],
        "description": fields["prompt_logprobs"]["description"],
    }
    fields["max_tokens"] = {
        "type": "integer",
        "enum": [0, 1],
        "description": "the face generates nothing (vLLM's default of 16 is refused)",
    }
    for name, neutral in COMPLETION_NEUTRAL_FIELDS.items():
        fields[name] = {
            "enum": list(neutral),
            "description": "vLLM's field, accepted only where it changes nothing here",
        }
    fields["prompt"]["items"]["minItems"] = 1
    fields["prompt"]["maxItems"] = limits["max_sequences"]
    _, answers = TypeAdapter.json_schemas(
        [(answer, "serialization", TypeAdapter(answer)) for answer in RESPONSE_TYPES],
        ref_template=_COMPONENTS + "{model}",
    )
    return {**schemas, **answers["$defs"]}


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
        health = {"application/json": {"schema": {"$ref": _COMPONENTS + Health.__name__}}}
        responses = schema["paths"]["/healthz"]["get"]["responses"]
        responses["200"]["content"] = health
        responses["503"] = {"description": "the service gave up on its engine", "content": health}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
