"""Helpers of the fuzz tests: the app's limits and key, deterministic hypothesis settings, an
app started with an offline-only tokenizer loader, and the check that a refusal is a clean 4xx
(``{"error": {"code", "message"}}``, never a 500).

Every hypothesis test here uses ``FUZZ`` or ``fuzz_settings`` (derandomised, no example database)
so that CI sees the same examples on every run; ``TOKENBRIDGE_FUZZ_SCALE`` multiplies their
number for a longer hunt.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from tokenbridge.hub import OFFLINE_TOKENIZERS, load_tokenizer
from tokenbridge.service.config import ServiceConfig
from tokenbridge.shared.codec import ALLOWED_DTYPES, unpack

from tests.support.paths import CACHE_DIR
from tests.support.service import AppHarness, LoopThread, config_for, running_app

API_KEY = "fuzz-key-0123456789"
AUTH = {"authorization": f"Bearer {API_KEY}"}
MSGPACK = {**AUTH, "content-type": "application/msgpack"}
JSON = {**AUTH, "content-type": "application/json"}
MAX_TOP_K = 16
MAX_BODY_BYTES = 1 << 20
MAX_SEQUENCES = 8
MAX_GENERATE_TOKENS = 8
#: The tiny GPT-2 teacher's limit (its ``n_positions``).
MAX_MODEL_LEN = 1024


#: ``TOKENBRIDGE_FUZZ_SCALE=20 pytest -m fuzz`` runs twenty times the examples (a longer,
#: still deterministic hunt; CI runs scale 1).
SCALE = max(1, int(os.environ.get("TOKENBRIDGE_FUZZ_SCALE", "1")))


def fuzz_settings(max_examples: int) -> settings:
    """Bounded, deterministic hypothesis settings for a fuzz test."""
    return settings(
        max_examples=max_examples * SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


FUZZ = fuzz_settings(60)


# -- strategies ----------------------------------------------------------------------------------

#: Integers a body may carry: msgpack holds [-2**63, 2**64 - 1], JSON any length.
INTEGERS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
#: Text with the odd corners of Unicode: NUL, controls, combining marks, bidi overrides, emoji,
#: private use, non-characters (hypothesis leaves lone surrogates out: they are not UTF-8).
ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", "\x00", "\u202e", "e\u0301", "🦊", "\ufffd", "\uffff", "\U0010ffff", "\ufeff", " " * 7]
    ),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, FLOATS, ODD_TEXT, st.binary(max_size=24))
#: A typed-array map that may lie: any dtype string, any shape, any bytes.
LYING_ARRAYS = st.fixed_dictionaries(
    {
        "dtype": st.one_of(
            st.sampled_from(sorted(ALLOWED_DTYPES)),
            st.sampled_from(["|O", ">f4", "<c16", "<U4", "V8", "", "<i16", "object"]),
            SCALARS,
        ),
        "shape": st.one_of(
            st.lists(st.integers(-3, 6), max_size=5),
            st.lists(INTEGERS, max_size=3),
            SCALARS,
        ),
        "data": st.one_of(st.binary(max_size=64), SCALARS),
    }
)
MSGPACK_VALUES = st.recursive(
    st.one_of(SCALARS, LYING_ARRAYS),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(ODD_TEXT, children, max_size=4)
    ),
    max_leaves=20,
)


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A deep copy of the JSON-like ``value`` with the entry at ``path`` set to ``new``."""
    copy = json.loads(json.dumps(value))
    *parents, last = path
    target = copy
    for key in parents:
        target = target[key]
    target[last] = new
    return copy


def plain_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    """Values both encodings carry: no NaN or infinity, integers from ``integers``."""
    return st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            integers,
            st.floats(allow_nan=False, allow_infinity=False),
            ODD_TEXT,
        ),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(ODD_TEXT, children, max_size=4)
        ),
        max_leaves=20,
    )


#: JSON numbers have no size limit; msgpack's integers are 64-bit.
JSON_VALUES = plain_values(st.integers(-(10**30), 10**30))
MSGPACK_PLAIN_VALUES = plain_values(st.integers(-(2**63), 2**64 - 1))
NUMPY_ARRAYS = st.sampled_from(sorted(ALLOWED_DTYPES)).flatmap(
    lambda dtype: arrays(np.dtype(dtype), array_shapes(min_dims=0, max_dims=3, max_side=3))
)
#: What a decoded body may put in a field: anything msgpack or JSON gives, numpy arrays included.
FIELD_VALUES = st.one_of(MSGPACK_VALUES, JSON_VALUES, NUMPY_ARRAYS)


# -- the app ---------------------------------------------------------------------------------------


class OfflineOnlyLoader:
    """The service's hub loader for fuzzing: the offline tokenizers, and an immediate refusal for
    any other name (a real hub lookup would retry the unreachable network for most of a minute).
    Remembers every name it was asked for, so tests can tell which names reached it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, name: str) -> Any:
        self.asked.append(name)
        if name not in OFFLINE_TOKENIZERS:
            raise OSError(f"{name!r} is not one of the offline tokenizers")
        return load_tokenizer(name, CACHE_DIR)


@contextlib.contextmanager
def started_app(
    config: ServiceConfig, loop: LoopThread, loader: OfflineOnlyLoader | None = None
) -> Iterator[AppHarness]:
    """``config``'s app, started on ``loop`` with an offline-only hub loader, stopped after."""
    with running_app(config, loop=loop, tokenizer_loader=loader or OfflineOnlyLoader()) as harness:
        yield harness


def fuzz_config(teacher: Path, data_dir: Path, **overrides: Any) -> ServiceConfig:
    """The fuzzed service's configuration: ``API_KEY`` required, small limits."""
    options: dict[str, Any] = {
        "api_keys": (API_KEY,),
        "max_top_k": MAX_TOP_K,
        "max_body_bytes": MAX_BODY_BYTES,
        "max_sequences": MAX_SEQUENCES,
        "max_request_tokens": 4096,
        "max_generate_tokens": MAX_GENERATE_TOKENS,
    }
    return config_for(teacher, data_dir, **{**options, **overrides})


def register(app: AppHarness, *names: str) -> dict[str, str]:
    """Register offline tokenizers by hub name; their ids by name."""

    async def go(client: httpx.AsyncClient) -> dict[str, str]:
        ids = {}
        for name in names:
            response = await client.post(
                "/v1/tokenizers", json={"name": name, "hub": name}, headers=AUTH
            )
            assert response.status_code in (200, 201), response.text
            ids[name] = response.json()["id"]
        return ids

    return app.run(go)


def send(app: AppHarness, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to ``app`` (``kwargs`` as httpx takes them)."""

    async def go(client: httpx.AsyncClient) -> httpx.Response:
        return await client.request(method, path, **kwargs)

    return app.run(go)


def run(app: AppHarness, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """``scenario(client)`` on the app's loop."""
    return app.run(scenario)


def body_of(response: httpx.Response) -> Any:
    """The decoded body, in the encoding the response says."""
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        return response.json()
    assert content_type.startswith("application/msgpack"), content_type
    return unpack(response.content)


def assert_clean_refusal(
    response: httpx.Response, statuses: tuple[int, ...] | None = None, needle: str = ""
) -> str:
    """``response`` is a 4xx with ``{"error": {"code", "message"}}``; return the message."""
    status = response.status_code
    assert 400 <= status < 500, (status, response.content[:400])
    if statuses is not None:
        assert status in statuses, (status, statuses, response.content[:400])
    body = body_of(response)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"], error
    assert needle in error["message"], (needle, error["message"])
    return error["message"]
