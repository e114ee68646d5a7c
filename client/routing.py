"""Which teacher scores which prompt, when one service hosts several teachers by name.

Pure functions and one small frozen class, no I/O: the trainer (``client/train.py``) asks a
``TeacherRouter`` for every prompt it takes from its stream, the configuration
(``client/config.py``) and the teacher client (``client/teacher.py``) check names with
``check_teacher_name``.

A prompt row that names a teacher (the dataset's ``teacher_field``) goes to that teacher; every
other prompt follows the schedule:

- ``round_robin``: the whole batch of step ``s`` (counted from 0, so the first step uses the first
  teacher) goes to ``teachers[s % n]``;
- ``mixture``: each prompt draws a teacher with probabilities ``teacher_weights`` (uniform when
  none are given). The draw is a pure function of the run's seed and the prompt's position in the
  prompt stream, never of a random state other code also consumes, so a resumed run, another
  ``pipeline_depth`` or another number of ranks routes every prompt exactly as before.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from tokenbridge.shared.protocol import TEACHER_NAME

__all__ = [
    "SCHEDULES",
    "TEACHER_NAME",
    "TeacherRouter",
    "check_schedule",
    "check_teacher_name",
]

#: ``round_robin``: one teacher per step, in turn; ``mixture``: a seeded weighted draw per prompt.
SCHEDULES = ("round_robin", "mixture")


def check_teacher_name(name: object, what: str = "teacher name") -> str:
    """``name`` when it is a plausible teacher name, else ``ValueError`` saying what one is."""
    if not isinstance(name, str) or TEACHER_NAME.fullmatch(name) is None:
        raise ValueError(
            f"{what} {name!r} is not a teacher name: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class TeacherRouter:
    """The teacher of each prompt: its own request when it names one, else the schedule.

    ``teachers`` empty means the service's default teacher only: ``route`` then answers ``None``
    for prompts that name no teacher.
    """

    teachers: tuple[str, ...] = ()
    schedule: str = "round_robin"
    weights: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        problems = check_schedule(self.teachers, self.schedule, self.weights)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def mixture_weights(self) -> tuple[float, ...]:
        """The mixture's weights, one per teacher (uniform when none were given)."""
        return self.weights or (1.0,) * len(self.teachers)

    def scheduled(self, step: int, position: int) -> str | None:
        """The teacher the schedule gives the prompt at stream ``position``, taken for step
        ``step`` (from 0); ``None`` when no teachers are named (the service's default)."""
        if not self.teachers:
            return None
        if self.schedule == "round_robin":
            return self.teachers[step % len(self.teachers)]
        weights = self.mixture_weights
        cumulative = list(itertools.accumulate(weights))
        # A string seed is hashed with SHA-512 by ``random``: the same draw in every process,
        # whatever PYTHONHASHSEED, and independent of the trainer's own random states.
        draw = random.Random(f"tokenbridge-teacher-mixture:{self.seed}:{position}").random()
        index = bisect.bisect_right(cumulative, draw * cumulative[-1])
        # Rounding may carry ``draw * total`` onto the total: stay on a teacher that has weight.
        last_weighted = max(i for i, weight in enumerate(weights) if weight > 0)
        return self.teachers[min(index, last_weighted)]

    def route(self, step: int, position: int, requested: str | None = None) -> str | None:
        """``requested`` (the prompt row's own teacher) when given, else ``scheduled``."""
        return requested if requested is not None else self.scheduled(step, position)


def check_schedule(teachers: Sequence[str], schedule: str, weights: Sequence[float]) -> list[str]:
    """What is wrong with a teacher schedule, one reason per problem (empty: nothing)."""
    problems: list[str] = []
    for name in teachers:
        try:
            check_teacher_name(name)
        except ValueError as error:
            problems.append(f"teachers: {error}")
    if len(set(teachers)) != len(teachers):
        problems.append(f"teachers must be distinct; got {list(teachers)}")
    if schedule not in SCHEDULES:
        problems.append(f"teacher_schedule must be one of {SCHEDULES}; got {schedule!r}")
    if weights:
        if schedule != "mixture":
            problems.append(
                "teacher_weights only apply to teacher_schedule 'mixture' (round_robin takes "
                "the teachers in turn)"
            )
        if len(weights) != len(teachers):
            problems.append(
                f"teacher_weights needs one weight per teacher: {len(weights)} weights for "
                f"{len(teachers)} teachers {list(teachers)}"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights):
            problems.append(f"teacher_weights must be finite and >= 0; got {list(weights)}")
        elif not sum(weights) > 0:
            problems.append("teacher_weights must not all be 0")
    return problems
