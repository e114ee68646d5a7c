"""The teacher client naming its teacher on a real service that hosts two (a GPT-2 and a Llama-3
family teacher, in-process on ``httpx.ASGITransport``): each client scores and generates with its
own teacher, checks ``top_k`` against that teacher's maximum, shares one student registration,
and fails at start, naming the teachers there are, when its teacher is not one of them."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from tokenbridge.client.errors import TeacherConfigError, UnknownTeacherError
from tokenbridge.client.teacher import TeacherClient, TeacherClientConfig
from tokenbridge.service.config import ServiceConfig
from tokenbridge.shared.codec import MSGPACK, pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import config_for, running_app, tiny_teacher

pytestmark = pytest.mark.integration

STUDENT = "mistral-v1"
URL = "http://teachers"


@pytest.fixture(scope="module")
def two_teachers(teacher_dir, tmp_path_factory, loop):
    """``gpt`` (max_top_k 16) and ``llama`` (max_top_k 8), no default teacher."""
    config = ServiceConfig(
        teacher=(f"gpt={teacher_dir}", f"llama={tiny_teacher('llama3', 'llama')}"),
        teacher_options=("llama.max_top_k=8",),
        data_dir=tmp_path_factory.mktemp("data"),
        max_top_k=16,
    )
    with running_app(config, loop=loop) as harness:
        yield harness


@pytest.fixture(scope="module")
def one_teacher(teacher_dir, tmp_path_factory, loop):
    """The single-teacher service of ``--teacher PATH``: its teacher is named ``default``."""
    with running_app(config_for(teacher_dir, tmp_path_factory.mktemp("one")), loop=loop) as app:
        yield app


def _client(app: Any, teacher: str | None, **options: Any) -> TeacherClient:
    config = TeacherClientConfig(urls=(URL,), teacher=teacher, **{"top_k": 4, **options})
    return TeacherClient(config, STUDENT, transports=httpx.ASGITransport(app=app.app))


SEQUENCES = [
    {"prompt": {"text": "HAMLET.\n"}, "completion_ids": [1763, 367, 28725]},
    {"prompt": {"text": "OPHELIA.\n"}, "completion_ids": [5801, 28705]},
]


def test_each_client_scores_with_the_teacher_it_names(two_teachers):
    async def go():
        out = {}
        for name in ("gpt", "llama"):
            async with _client(two_teachers, name) as client:
                out[name] = (client.teacher_info, client.student_id, await client.score(SEQUENCES))
        # The same request sent by hand, naming the teacher: what the client must have got.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=two_teachers.app), base_url=URL
        ) as raw:
            body = {"student_tokenizer": out["llama"][1], "top_k": 4, "sequences": SEQUENCES,
                    "teacher": "llama"}  # fmt: skip
            response = await raw.post(
                "/v1/score", content=pack(body), headers={"content-type": MSGPACK}
            )
            assert response.status_code == 200, response.content[:300]
            direct = unpack(response.content)
        return out, direct

    out, direct = two_teachers.loop.run(go())
    (gpt_info, gpt_id, gpt), (llama_info, llama_id, llama) = out["gpt"], out["llama"]
    assert gpt_id == llama_id  # one registration, shared by the teachers
    assert (gpt_info["teacher"]["name"], llama_info["teacher"]["name"]) == ("gpt", "llama")
    assert (gpt_info["max_top_k"], llama_info["max_top_k"]) == (16, 8)  # each its own
    assert gpt_info["teacher"]["vocab_hash"] != llama_info["teacher"]["vocab_hash"]
    assert (gpt.teacher["name"], llama.teacher["name"]) == ("gpt", "llama")  # the stamps
    want = [ScoredSequence.from_wire(s, 4) for s in direct["sequences"]]
    for mine, theirs in zip(llama.sequences, want, strict=True):
        np.testing.assert_array_equal(mine.logprobs_S, theirs.logprobs_S)
        np.testing.assert_array_equal(mine.topk_ids_SK, theirs.topk_ids_SK)
    # Two teachers of two families: the same completions get other log-probs.
    assert not np.allclose(gpt.sequences[0].logprobs_S, llama.sequences[0].logprobs_S)


def test_generate_goes_to_the_named_teacher(two_teachers):
    async def go():
        async with _client(two_teachers, "llama") as client:
            return await client.generate(["HAMLET.\n", "OPHELIA.\n"], max_tokens=4, seed=3)

    result = two_teachers.loop.run(go())
    assert result.teacher["name"] == "llama"
    assert len(result.completions) == 2 and all(c.ids for c in result.completions)


def test_top_k_is_checked_against_the_named_teachers_maximum(two_teachers):
    async def go(name):
        async with _client(two_teachers, name, top_k=12) as client:
            return client.teacher_info["max_top_k"]

    assert two_teachers.loop.run(go("gpt")) == 16
    with pytest.raises(TeacherConfigError, match=r"above the teacher 'llama''s max_top_k 8"):
        two_teachers.loop.run(go("llama"))


def test_an_unknown_teacher_fails_at_start_and_names_the_teachers(two_teachers):
    async def go(name):
        async with _client(two_teachers, name):
            pass

    with pytest.raises(UnknownTeacherError, match=r"no teacher 'poetry'.*\['gpt', 'llama'\]") as e:
        two_teachers.loop.run(go("poetry"))
    assert e.value.available == ("gpt", "llama") and e.value.url == URL
    # Several teachers and no default: the client must name one; the error says which exist.
    with pytest.raises(UnknownTeacherError, match=r"several teachers \['gpt', 'llama'\] and none"):
        two_teachers.loop.run(go(None))


def test_a_single_teacher_service_names_its_teacher_default(one_teacher):
    async def go(name):
        async with _client(one_teacher, name) as client:
            result = await client.score(SEQUENCES[:1])
            return client.teacher_name, client.teacher_info["teacher"]["name"], result

    unnamed, info_name, result = one_teacher.loop.run(go(None))
    assert unnamed == info_name == result.teacher["name"] == "default"
    named = one_teacher.loop.run(go("default"))
    np.testing.assert_array_equal(named[2].sequences[0].logprobs_S, result.sequences[0].logprobs_S)
    with pytest.raises(UnknownTeacherError, match=r"no teacher 'gpt'.*\['default'\]"):
        one_teacher.loop.run(go("gpt"))
