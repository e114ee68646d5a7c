"""The trainer's prompts: the prompts file (rows with a prompt or messages, and optionally the
teacher a row asks for), the seeded prompt stream whose position a checkpoint keeps, and each
step's routed batch."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from tokenbridge.client.rollout import (
    Prompt,
)
from tokenbridge.client.routing import TeacherRouter, check_teacher_name

DEFAULT_PROMPTS: tuple[str, ...] = tuple(
    f"{speaker}.\n{line}"
    for speaker, line in (
        ("HAMLET", "To be, or not to be,"),
        ("OPHELIA", "Good my lord,"),
        ("HORATIO", "Hail to your lordship!"),
        ("POLONIUS", "Though this be madness,"),
        ("GERTRUDE", "Good Hamlet, cast thy nighted colour off,"),
        ("CLAUDIUS", "Though yet of Hamlet our dear brother's death"),
        ("LAERTES", "My necessaries are embark'd."),
        ("MARCELLUS", "Something is rotten in the state of Denmark."),
        ("GHOST", "Mark me."),
        ("BERNARDO", "Who's there?"),
        ("FRANCISCO", "Nay, answer me."),
        ("ROSENCRANTZ", "My honoured lord!"),
    )
)


def load_prompts(path: Path | None) -> list[Prompt]:
    """Prompts from a JSONL file (``{"prompt": text}`` or ``{"messages": [...]}`` per line), or a
    small built-in set of Shakespeare openings when no file is given. Other fields of a row (its
    teacher, say) are ignored: ``load_routed_prompts`` reads that too."""
    return load_routed_prompts(path, teacher_field="")[0]


def load_routed_prompts(
    path: Path | None, teacher_field: str = "teacher", teachers: Sequence[str] = ()
) -> tuple[list[Prompt], list[str | None]]:
    """``load_prompts``, and each row's own teacher: the name its ``teacher_field`` holds, or
    ``None`` (no field, ``null``, or ``teacher_field`` empty) for a row the schedule routes.

    With ``teachers`` given, a row naming another teacher is an error that names its line, as is
    a value that is not a teacher name.
    """
    if path is None:
        return list(DEFAULT_PROMPTS), [None] * len(DEFAULT_PROMPTS)
    prompts: list[Prompt] = []
    routes: list[str | None] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise ValueError(f"{path}:{number}: needs 'prompt' (text) or 'messages' (a list)")
        requested = item.get(teacher_field) if teacher_field else None
        if requested is not None:
            try:
                check_teacher_name(requested, f"'{teacher_field}'")
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
            if teachers and requested not in teachers:
                raise ValueError(
                    f"{path}:{number}: '{teacher_field}' routes the prompt to teacher "
                    f"{requested!r}, which is not among the teachers {list(teachers)}: add it "
                    "to --teachers or change the row"
                )
        routes.append(requested)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts, routes


class PromptStream:
    """An endless, seeded, reshuffled-per-epoch stream of prompts; its position is checkpointed."""

    def __init__(self, prompts: list[Prompt], seed: int, position: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._epoch_order: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:  # one shuffle per epoch, not per prompt
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._epoch_order = epoch, order
        return self._epoch_order

    def take(self, count: int) -> list[Prompt]:
        """The next ``count`` prompts."""
        return [self.prompts[index] for _, index in self.take_indexed(count)]

    def take_indexed(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` prompts as (stream position, index into ``prompts``) pairs: what
        routing by the prompt's position or by its row needs."""
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            out.append((self.position, self._order(epoch)[index]))
            self.position += 1
        return out


def take_routed_batch(
    stream: PromptStream,
    router: TeacherRouter,
    row_teachers: Sequence[str | None],
    batch_size: int,
    world: int = 1,
    rank: int = 0,
) -> list[tuple[int, str | None, bool]]:
    """This rank's prompts of the next step, each as (index into the stream's prompts, its
    teacher, whether its row chose that teacher rather than the schedule).

    Every rank takes the whole step's ``batch_size * world`` prompts from the stream and keeps
    its slice, so positions, and with them the routing, are those of a single-rank run. The
    round-robin step is the stream position over the step's size: a resumed run (whose stream
    restarts at the saved position) routes as if it had never stopped.
    """
    step_index = stream.position // (batch_size * world)
    taken = stream.take_indexed(batch_size * world)[rank::world]
    return [
        (
            index,
            router.route(step_index, position, row_teachers[index]),
            row_teachers[index] is not None,
        )
        for position, index in taken
    ]
