"""Request bodies: the student tokenizer's registration in any form it is given, and a scored
sequence's ids as arrays the codec packs tightly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from tokenbridge.shared.protocol import (
    RegisterTokenizerRequest,
)

_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


# -- student registration ----------------------------------------------------------------------


def registration_body(student: Any, name: str | None = None) -> dict[str, Any]:
    """The ``POST /v1/tokenizers`` body for a student tokenizer given in any supported form.

    - a ``str``: a hub name the *service* loads (``{"name", "hub"}``);
    - a ``pathlib.Path``/``os.PathLike``: a folder on the *service's* file system (``path``);
    - a transformers fast tokenizer: uploaded whole (its ``tokenizer.json``, bos/eos/pad/unk
      token strings and chat template), so the service needs no access to it;
    - a mapping: a ready registration body, sent as it is (``name`` overrides its name).

    ``ValueError`` when the body would be invalid, ``TypeError`` for another kind of object.
    """
    body: dict[str, Any]
    if isinstance(student, Mapping):
        body = dict(student)
        if name is not None:
            body["name"] = name
    elif isinstance(student, str):
        body = {"name": name or student, "hub": student}
    elif isinstance(student, os.PathLike):
        path = Path(student)
        body = {"name": name or path.name or str(path), "path": str(path)}
    elif hasattr(student, "backend_tokenizer"):
        specials = {
            role: value
            for role in _SPECIAL_ROLES
            if isinstance(value := getattr(student, role, None), str)
        }
        body = {
            "name": name or _tokenizer_name(student),
            "tokenizer_json": student.backend_tokenizer.to_str(),
            "special_tokens": specials or None,
        }
        template = getattr(student, "chat_template", None)
        if isinstance(template, str):
            body["chat_template"] = template
    else:
        raise TypeError(
            "student_tokenizer must be a hub name (str), a path on the service (pathlib.Path), "
            f"a transformers fast tokenizer or a registration mapping; got {type(student).__name__}"
        )
    try:
        # The shared protocol model: a body the service would refuse is refused here, earlier.
        RegisterTokenizerRequest.model_validate(body)
    except ValidationError as error:
        raise ValueError(f"invalid student tokenizer registration: {error}") from None
    return {key: value for key, value in body.items() if value is not None}


def _tokenizer_name(tokenizer: Any) -> str:
    raw = str(getattr(tokenizer, "name_or_path", "") or "student")
    # A local folder's last part reads better in the service's listing than the whole path.
    return (Path(raw).name or raw)[:128]


# -- score bodies -------------------------------------------------------------------------------


def _ids_array(value: Any, where: str) -> np.ndarray:
    """Token ids as a 1-D int64 array: the codec then sends them in the narrowest integer type."""
    if isinstance(value, list | tuple) and not value:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(value)  # lists, numpy arrays and CPU tensors alike
    if array.size == 0 and array.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{where} must be a 1-D sequence of integer token ids; got {array.dtype}")
    return array.astype(np.int64, copy=False)


def _score_sequence(sequence: Mapping[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(sequence, Mapping) or "prompt" not in sequence:
        raise ValueError(f"sequences[{index}] must be a mapping with 'prompt' and 'completion_ids'")
    if "completion_ids" not in sequence:
        raise ValueError(f"sequences[{index}] has no 'completion_ids'")
    prompt = sequence["prompt"]
    if isinstance(prompt, str):
        prompt = {"text": prompt}
    elif isinstance(prompt, Mapping):
        prompt = dict(prompt)
        if prompt.get("ids") is not None:
            prompt["ids"] = _ids_array(prompt["ids"], f"sequences[{index}].prompt.ids")
    else:
        raise ValueError(f"sequences[{index}].prompt must be a mapping (text, messages or ids)")
    completion = _ids_array(sequence["completion_ids"], f"sequences[{index}].completion_ids")
    out: dict[str, Any] = {"prompt": prompt, "completion_ids": completion}
    if sequence.get("candidate_ids") is not None:
        # Student ids whose teacher mass is wanted per position (docs/mapping.md §4b), -1 pads.
        candidates = np.asarray(sequence["candidate_ids"])
        if candidates.size == 0:
            candidates = candidates.reshape(len(completion), 0)
        if (
            candidates.ndim != 2
            or candidates.dtype.kind not in "iu"
            or len(candidates) != len(completion)
        ):
            raise ValueError(
                f"sequences[{index}].candidate_ids must be an integer array with one row per "
                f"completion token ({len(completion)}); got {candidates.dtype} {candidates.shape}"
            )
        out["candidate_ids"] = candidates.astype(np.int64, copy=False)
    return out
