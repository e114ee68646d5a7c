"""Hostile ``path`` and ``hub`` registrations (``POST /v1/tokenizers``): the specification.

1. A ``path`` must resolve (symlinks and ``..`` followed) inside the service's ``data_dir``; any
   other is a 422 whose message says "outside".
2. A ``hub`` name must look like a hub repository id (``name`` or ``org/name`` of
   ``[A-Za-z0-9._-]``, no ``..``, no leading ``/`` or ``~``, no backslash); any other is a 422 and
   never reaches the loader.
3. Tokenizers load with ``trust_remote_code=False``: code shipped with a tokenizer never runs.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbridge.hub import materialise

from tests.support.fuzz import (
    AUTH,
    JSON,
    OfflineOnlyLoader,
    assert_clean_refusal,
    fuzz_config,
    fuzz_settings,
    send,
    started_app,
)
from tests.support.paths import CACHE_DIR
from tests.support.service import AppHarness

pytestmark = pytest.mark.fuzz

#: What the specification calls a hub repository id.
HUB_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data dir holding a tokenizer, symlinks out of it, and a tokenizer shipping code."""
    root = tmp_path_factory.mktemp("fuzz-paths")
    # Not named "outside": the refusal must say so itself, not by echoing the path.
    outside = tmp_path_factory.mktemp("elsewhere")
    gpt2 = materialise("gpt2", CACHE_DIR)
    llama3 = materialise("llama3", CACHE_DIR)
    shutil.copytree(gpt2, root / "tokenizers" / "gpt2")
    shutil.copytree(llama3, outside / "llama3")
    (root / "escape").symlink_to(outside / "llama3", target_is_directory=True)
    (root / "tokenizers" / "up").symlink_to(outside, target_is_directory=True)
    (root / "tokenizers" / "self").symlink_to(root / "tokenizers" / "gpt2")
    remote = root / "tokenizers" / "remote-code"
    shutil.copytree(gpt2, remote)
    config = json.loads((remote / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    marker = outside / "code-ran"
    (remote / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return root


@pytest.fixture(scope="module")
def outside(data_dir) -> Path:
    return (data_dir / "escape").resolve().parent


@pytest.fixture(scope="module")
def loader() -> OfflineOnlyLoader:
    return OfflineOnlyLoader()


@pytest.fixture(scope="module")
def app(teacher_dir, data_dir, loader, loop) -> Iterator[AppHarness]:
    with started_app(fuzz_config(teacher_dir, data_dir), loop, loader) as harness:
        yield harness


def register(app: AppHarness, **fields: Any) -> httpx.Response:
    body = json.dumps({"name": "student", **fields}).encode()
    return send(app, "POST", "/v1/tokenizers", content=body, headers=JSON)


def registered_ids(app: AppHarness) -> set[str]:
    listed = send(app, "GET", "/v1/tokenizers", headers={**AUTH, "accept": "application/json"})
    return {t["id"] for t in listed.json()["tokenizers"]}


# -- paths ---------------------------------------------------------------------------------------


def test_a_folder_inside_the_data_dir_registers_by_relative_or_absolute_path(app, data_dir):
    relative = register(app, path="tokenizers/gpt2")
    assert relative.status_code in (200, 201), relative.text
    absolute = register(app, path=str(data_dir / "tokenizers" / "gpt2"))
    assert absolute.status_code == 200 and absolute.json()["id"] == relative.json()["id"]
    inner_link = register(app, path="tokenizers/self")  # a symlink that stays inside
    assert inner_link.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "escape",  # a symlink inside the data dir to a tokenizer outside it
        "escape/",
        "tokenizers/up/llama3",  # through a symlinked folder
        "../elsewhere0/llama3",
        "tokenizers/../../elsewhere0/llama3",
        "tokenizers/gpt2/../../../elsewhere0/llama3",
        "/etc",
        "/",
        "~",
        "~/",
        "~root",
    ],
)
def test_paths_that_resolve_outside_the_data_dir_are_refused(app, outside, path):
    path = path.replace("elsewhere0", outside.name)
    before = registered_ids(app)
    response = register(app, path=path)
    assert_clean_refusal(response, (422,), "outside")
    assert registered_ids(app) == before


def test_absolute_paths_outside_the_data_dir_are_refused(app, outside):
    for path in (outside / "llama3", CACHE_DIR / "tokenizers" / "llama3", Path("/tmp")):
        assert_clean_refusal(register(app, path=str(path)), (422,), "outside")


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2Fetc",
        "%2e%2e/%2e%2e/etc",
        "%2e%2e%2f",
        "tokenizers%2Fgpt2",
        "tokenizers/gpt2\x00",
        "tokenizers/gpt2\x00/../../..",
        "\x00",
        "",
        "tokenizers\\..\\..\\etc",
        "tokenizers/gpt2/tokenizer.json",  # a file, not a folder
        "file:///etc",
        "tokenizers/" + "a" * 5000,
    ],
)
def test_encoded_nul_and_odd_paths_are_refused(app, path):
    before = registered_ids(app)
    assert_clean_refusal(register(app, path=path), (422,))
    assert registered_ids(app) == before


@fuzz_settings(80)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["..", ".", "", "~", "escape", "tokenizers", "up", "llama3", "gpt2"]),
            st.text(max_size=8),
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_any_path_registers_inside_or_is_refused(app, data_dir, parts, absolute):
    path = "/".join(parts)
    if absolute:
        path = str(data_dir) + "/" + path
    response = register(app, path=path)
    if response.status_code in (200, 201):
        source = Path(response.json()["source"]["path"])
        assert source.resolve().is_relative_to(data_dir.resolve()), source
    else:
        assert_clean_refusal(response, (422,))


def test_code_shipped_with_a_tokenizer_never_runs(app, outside):
    response = register(app, path="tokenizers/remote-code")
    assert response.status_code < 500
    assert not (outside / "code-ran").exists()


def test_path_tokenizers_load_with_trust_remote_code_false(app, monkeypatch):
    from transformers import AutoTokenizer

    calls: list[dict[str, Any]] = []
    original = AutoTokenizer.from_pretrained.__func__  # type: ignore[attr-defined]

    def recording(cls: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(recording))
    response = register(app, path="tokenizers/gpt2")
    assert response.status_code in (200, 201), response.text
    assert calls, "the path registration loaded nothing"
    assert all(call.get("trust_remote_code") is False for call in calls), calls


# -- hub names -----------------------------------------------------------------------------------

HOSTILE_HUB_NAMES = [
    "..",
    "../..",
    "../../etc/passwd",
    "a/..",
    "org/../name",
    "org/..name",
    "a..b",
    "/etc/passwd",
    "/gpt2",
    "~/models",
    "~",
    "~user/x",
    "org\\name",
    "..\\..\\windows",
    "C:\\models",
    "a/b/c",
    "org/",
    "/",
    "",
    " gpt2",
    "gpt2 ",
    "gpt2\n",
    "a b",
    "gpt2\x00",
    "%2e%2e",
    "..%2F..%2Fetc",
    "https://evil.example/model",
    "file:///etc/passwd",
    "gpt２",
    "org:name",
]


@pytest.mark.parametrize("name", HOSTILE_HUB_NAMES)
def test_hub_names_that_are_not_repo_ids_are_refused_before_loading(app, loader, name):
    response = register(app, hub=name)
    assert_clean_refusal(response, (422,))
    assert name not in loader.asked


@pytest.mark.parametrize("name", ["gpt2", "mistral-v1", "org/name", "Org_1/model.v2-x"])
def test_hub_repo_ids_reach_the_loader(app, loader, name):
    response = register(app, hub=name)
    assert name in loader.asked
    if response.status_code not in (200, 201):
        assert_clean_refusal(response, (422,), "cannot load")


@fuzz_settings(150)
@given(
    st.one_of(
        st.text(max_size=30),
        st.lists(
            st.sampled_from(["..", "/", "\\", "~", ".", "a", "org", "%2e", "\x00", ":"]),
            max_size=6,
        ).map("".join),
    )
)
def test_any_hub_name_outside_the_repo_id_form_never_reaches_the_loader(app, loader, name):
    response = register(app, hub=name)
    is_repo_id = HUB_ID.fullmatch(name) is not None and ".." not in name
    if not is_repo_id:
        assert_clean_refusal(response, (422,))
        assert name not in loader.asked
    elif response.status_code not in (200, 201):
        assert_clean_refusal(response, (422,))
