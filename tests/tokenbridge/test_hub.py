"""Offline tokenizers and the command-line config plumbing."""

from __future__ import annotations

import argparse

import pytest

from tokenbridge.cli import build_parser
from tokenbridge.hub import OfflineTokenizerError, load_tokenizer, materialise
from tokenbridge.mapping_demo import MappingDemoConfig
from tokenbridge.shared.configargs import config_from_args


def test_unknown_offline_name_lists_the_known_ones(tmp_path):
    with pytest.raises(OfflineTokenizerError, match="known: gpt2"):
        materialise("gpt-5", tmp_path)


def test_materialise_is_idempotent_and_loads_from_a_plain_folder(bank):
    folder = materialise("mistral-v3", bank.cache_dir)
    assert materialise("mistral-v3", bank.cache_dir) == folder
    # A folder path takes the same route as a hub name on a machine with a hub.
    tokenizer = load_tokenizer(str(folder))
    assert len(tokenizer) == len(bank.tokenizer("mistral-v3"))


def test_mapping_demo_flags_are_generated_from_the_config():
    parser = build_parser()
    args = parser.parse_args(["mapping-demo", "--pairs", "gpt2:llama3", "--top-k", "5"])
    config = config_from_args(MappingDemoConfig, args, parser)
    assert config.pairs == ("gpt2:llama3",) and config.top_k == 5


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--pairs", "gpt2-llama3"], "TEACHER:STUDENT"),
        (["--top-k", "0"], "at least 1"),
        (["--corpus-chars", "10"], "corpus_chars"),
    ],
)
def test_config_rejects_bad_values_with_a_reason(flags, reason, capsys):
    parser = build_parser()
    args = parser.parse_args(["mapping-demo", *flags])
    with pytest.raises(SystemExit):
        config_from_args(MappingDemoConfig, args, parser)
    assert reason in capsys.readouterr().err


def test_help_lists_every_config_field():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "mapping-demo"
    ]
    text = sub.format_help()
    for field in ("--pairs", "--text", "--prompt", "--top-k", "--teacher-top-k", "--cache-dir"):
        assert field in text
