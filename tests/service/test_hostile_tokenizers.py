"""Hostile uploads to ``POST /v1/tokenizers``: garbage, JSON that is not a tokenizer, tokenizers
with broken parts or odd specials, a huge vocabulary, and tokenizers that make the Rust library
panic (``pyo3_runtime.PanicException`` derives from ``BaseException``, not ``Exception``).

Each is registered (2xx) or refused with a clean 4xx; one that registers can then be scored with
random ids (its decoder runs on prompt ids) without a 5xx, and the service keeps serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tokenbridge.shared.codec import JSON as JSON_TYPE
from tokenbridge.shared.codec import pack
from tokenbridge.shared.errors import CodecError

from tests.support.fuzz import (
    AUTH,
    JSON,
    JSON_VALUES,
    MSGPACK,
    ODD_TEXT,
    assert_clean_refusal,
    body_of,
    fuzz_config,
    fuzz_settings,
    replaced,
    send,
    started_app,
)
from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import AppHarness

pytestmark = pytest.mark.fuzz

BODY_LIMIT = 4 << 20


def byte_level_tokenizer(size: int = 0, seed: int = 0) -> Tokenizer:
    """A byte-level BPE over the 256 byte symbols, a few merges, ``size`` more random tokens and
    an ``<eos>`` special: small, generative and mappable onto the GPT-2 teacher."""
    import random

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    rng = random.Random(seed)
    while len(vocab) < 262 + size:
        vocab.setdefault("".join(rng.choices(alphabet, k=rng.randint(2, 6))), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<eos>"])
    return tokenizer


BASE = json.loads(byte_level_tokenizer().to_str())
EOS = {"eos_token": "<eos>"}


@pytest.fixture(scope="module")
def app(teacher_dir, tmp_path_factory, loop) -> Iterator[AppHarness]:
    config = fuzz_config(
        teacher_dir, tmp_path_factory.mktemp("fuzz-uploads"), max_body_bytes=BODY_LIMIT
    )
    with started_app(config, loop) as harness:
        yield harness


def upload(app: AppHarness, tokenizer_json: Any, special_tokens: Any = EOS, **extra: Any):
    """Register an upload, in msgpack (JSON when a value does not fit msgpack)."""
    body = {"name": "upload", "tokenizer_json": tokenizer_json, **extra}
    if special_tokens is not None:
        body["special_tokens"] = special_tokens
    try:
        return send(app, "POST", "/v1/tokenizers", content=pack(body), headers=MSGPACK)
    except CodecError:  # an integer past 64 bits
        return send(app, "POST", "/v1/tokenizers", content=pack(body, JSON_TYPE), headers=JSON)


def use_and_delete(app: AppHarness, response: httpx.Response) -> None:
    """A registration that succeeded: score with its ids (prompt ids go through its decoder),
    then delete it. Either answer is a 2xx or a clean 4xx."""
    assert response.status_code in (200, 201), response.content[:300]
    described = body_of(response)
    size = described["vocab_size"]
    ids = sorted({0, 1, size // 2, size - 1})
    body = {
        "student_tokenizer": described["id"],
        "top_k": 4,
        "sequences": [
            {"prompt": {"ids": ids}, "completion_ids": ids},
            {"prompt": {"text": "hi"}, "completion_ids": []},
        ],
    }
    scored = send(app, "POST", "/v1/score", content=pack(body), headers=MSGPACK)
    if scored.status_code != 200:
        assert_clean_refusal(scored)
    deleted = send(app, "DELETE", f"/v1/tokenizers/{described['id']}", headers=AUTH)
    assert deleted.status_code == 200


def registered_or_refused(app: AppHarness, response: httpx.Response) -> None:
    if response.status_code in (200, 201):
        use_and_delete(app, response)
    else:
        assert_clean_refusal(response, (413, 422))


# -- not tokenizers at all ------------------------------------------------------------------


@fuzz_settings(80)
@given(ODD_TEXT)
def test_garbage_is_refused(app, text):
    assert_clean_refusal(upload(app, text), (422,), "tokenizer")


@fuzz_settings(80)
@given(JSON_VALUES)
def test_json_that_is_not_a_tokenizer_is_refused(app, value):
    assert_clean_refusal(upload(app, json.dumps(value)), (422,))


@pytest.mark.parametrize(
    "value", [None, 5, ["{}"], {"model": {}}], ids=["null", "int", "list", "map"]
)
def test_tokenizer_json_must_be_a_string(app, value):
    response = upload(app, value)
    assert_clean_refusal(response, (422,), "tokenizer_json")


# -- tokenizers with a part broken ---------------------------------------------------------------

#: Every part of a tokenizer.json a hostile upload may replace.
PARTS = [
    ("model",),
    ("model", "type"),
    ("model", "vocab"),
    ("model", "merges"),
    ("model", "byte_fallback"),
    ("model", "dropout"),
    ("model", "unk_token"),
    ("added_tokens",),
    ("normalizer",),
    ("pre_tokenizer",),
    ("post_processor",),
    ("decoder",),
    ("padding",),
    ("truncation",),
    ("version",),
]
#: Values that look like parts of some tokenizer, for the parts above.
PART_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(
        [
            {"type": "BPE", "vocab": {}, "merges": []},
            {"type": "Unigram", "unk_id": None, "vocab": []},
            {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]], "byte_fallback": True},
            {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0}},
            {"type": "WordLevel", "vocab": {}, "unk_token": "x"},
            {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated", "invert": False},
            {"type": "Split", "pattern": {"String": ""}, "behavior": "Removed", "invert": True},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
            {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
            {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 1000},
            {"type": "Strip", "content": " ", "start": 2**40, "stop": 2**40},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Sequence", "decoders": [{"type": "ByteLevel"}] * 50},
            {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]},
            {"type": "NFD"},
            {"type": "BertPreTokenizer"},
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}],
                "pair": [],
                "special_tokens": {},
            },
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
            [{"id": 2**32 - 1, "content": "<x>", "special": True, "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False}],
            [{"id": 0, "content": "", "special": True, "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False}],
            {"strategy": {"Fixed": 2**40}, "direction": "Right", "pad_to_multiple_of": None,
             "pad_id": 0, "pad_type_id": 0, "pad_token": "<eos>"},
            {"direction": "Right", "max_length": 0, "strategy": "LongestFirst", "stride": 0},
            {"Ġ": -1, "a": 2**40},
            [["Ġ", "t", "x"]],
        ]
    ),
)  # fmt: skip


def with_part(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """The base tokenizer with the part at ``path`` replaced by ``value``."""
    return dict(replaced(BASE, path, value))


@fuzz_settings(150)
@given(st.sampled_from(PARTS), PART_VALUES)
def test_a_tokenizer_with_any_part_replaced_registers_or_is_refused(app, path, value):
    registered_or_refused(app, upload(app, json.dumps(with_part(path, value))))


def test_the_base_tokenizer_registers_and_scores(app):
    use_and_delete(app, upload(app, json.dumps(BASE)))


PANICKING_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": "<bos>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [],
    "special_tokens": {},
}


def test_a_post_processor_that_panics_on_encode_is_harmless(app):
    """TemplateProcessing naming a special it does not define: the Rust library panics
    ("no entry found for key") when it encodes with special tokens."""
    broken = with_part(("post_processor",), PANICKING_POST_PROCESSOR)
    backend = Tokenizer.from_str(json.dumps(broken))
    with pytest.raises(BaseException, match="no entry found") as caught:
        backend.encode("hello")
    assert not isinstance(caught.value, Exception)  # a PanicException
    registered_or_refused(app, upload(app, json.dumps(broken)))


def test_a_normalizer_that_panics_on_load_is_refused(app):
    """A Precompiled normalizer with a charsmap it cannot parse panics in ``from_str``."""
    broken = with_part(("normalizer",), {"type": "Precompiled", "precompiled_charsmap": "AAAA"})
    assert_clean_refusal(upload(app, json.dumps(broken)), (422,), "cannot load the tokenizer")


def test_a_student_whose_only_ordinary_token_is_its_unk_can_be_scored(app):
    """A Unigram upload whose vocabulary is only ``<unk>`` (and the ``<eos>`` special)."""
    unigram = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]], "byte_fallback": True}
    registered = upload(app, json.dumps(with_part(("model",), unigram)))
    assert registered.status_code in (200, 201), registered.content[:300]
    body = {
        "student_tokenizer": body_of(registered)["id"],
        "top_k": 1,
        "sequences": [{"prompt": {"text": "hi"}, "completion_ids": [0]}],
    }
    response = send(app, "POST", "/v1/score", content=pack(body), headers=MSGPACK)
    assert response.status_code == 200 or 400 <= response.status_code < 500


def test_a_pure_byte_tokenizer_registers(app):
    tokenizer = with_part(("model", "merges"), [])
    tokenizer["model"]["vocab"] = {
        symbol: i for symbol, i in BASE["model"]["vocab"].items() if i < 256
    }
    tokenizer["added_tokens"][0]["id"] = 256
    response = upload(app, json.dumps(tokenizer))
    assert response.status_code in (200, 201), response.content[:300]


# -- special tokens ---------------------------------------------------------------------------


@fuzz_settings(80)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(["bos_token", "eos_token", "pad_token", "unk_token"]), ODD_TEXT),
        st.one_of(ODD_TEXT, st.sampled_from(["<eos>", "Ġ", "a" * 5000, "<eos><eos>"]), JSON_VALUES),
        max_size=4,
    )
)
def test_any_special_tokens_register_or_are_refused(app, special_tokens):
    registered_or_refused(app, upload(app, json.dumps(BASE), special_tokens=special_tokens))


@pytest.mark.parametrize(
    "special_tokens",
    [{"eos_token": ""}, {"eos_token": "\x00"}, {"eos_token": "Ġ"}, {"eos_token": "a" * 10_000}],
    ids=["empty", "nul", "ordinary-token", "long"],
)
def test_odd_end_of_sequence_tokens(app, special_tokens):
    registered_or_refused(app, upload(app, json.dumps(BASE), special_tokens=special_tokens))


@fuzz_settings(30)
@given(st.one_of(ODD_TEXT, st.just("{{ raise_exception('x') }}"), st.just("{% for %}")))
def test_any_chat_template_registers_or_is_refused(app, template):
    registered_or_refused(app, upload(app, json.dumps(BASE), chat_template=template))


# -- size ------------------------------------------------------------------------------------


def test_a_huge_vocabulary_registers_or_is_refused_and_one_past_the_body_limit_is_413(app):
    big = byte_level_tokenizer(size=100_000, seed=1).to_str()
    assert len(big) < BODY_LIMIT
    registered_or_refused(app, upload(app, big))
    bigger = byte_level_tokenizer(size=400_000, seed=2).to_str()
    assert len(bigger) > BODY_LIMIT
    assert_clean_refusal(upload(app, bigger), (413,), "max_body_bytes")


@pytest.mark.process
def test_a_tokenizer_that_pads_to_a_terabyte_does_not_abort_the_process(tmp_path):
    """A padding of 2**40 makes the Rust library abort the whole process (out of memory, not a
    panic) the moment it encodes with padding on. Registering and using such an upload must not
    get there; run in a child process so that a regression fails this test, not the run."""
    padded = with_part(
        ("padding",),
        {"strategy": {"Fixed": 2**40}, "direction": "Right", "pad_to_multiple_of": None,
         "pad_id": 0, "pad_type_id": 0, "pad_token": "<eos>"},
    )  # fmt: skip
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path[:0] = [{str(REPO / "tests")!r}, {str(REPO)!r}]
        from pathlib import Path
        from tokenbridge.hub import load_tokenizer
        from tokenbridge.service.registry import StudentRegistry
        from tokenbridge.service.scoring import render_prompt
        from tokenbridge.shared.protocol import Prompt, RegisterTokenizerRequest

        teacher = load_tokenizer("gpt2", Path({str(CACHE_DIR)!r}))
        registry = StudentRegistry(Path({str(tmp_path)!r}), "probe text 🦊")
        registry.add_teacher("default", teacher)
        request = RegisterTokenizerRequest(
            name="padded", tokenizer_json=sys.stdin.read(), special_tokens={{"eos_token": "<eos>"}}
        )
        entry, _ = registry.register(request)
        render_prompt(Prompt(ids=[1, 2, 3]), teacher, entry)
        print("survived", entry.vocab.size)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(padded),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "survived" in done.stdout


def test_the_service_still_serves_after_the_uploads(app):
    response = send(
        app, "POST", "/v1/tokenizers", content=b'{"name": "g", "hub": "gpt2"}', headers=JSON
    )
    assert response.status_code in (200, 201)
    student = response.json()["id"]
    body = {
        "student_tokenizer": student,
        "top_k": 2,
        "sequences": [{"prompt": {"text": "a"}, "completion_ids": [10, 11]}],
    }
    scored = send(app, "POST", "/v1/score", content=pack(body), headers=MSGPACK)
    assert scored.status_code == 200
    assert len(body_of(scored)["sequences"][0]["logprobs"]) == 2
