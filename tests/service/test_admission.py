"""Admission control: the bound, the first-in first-out line, its limits in time and length, and
what a caller that leaves the line gives back."""

from __future__ import annotations

import asyncio

import pytest

from tokenbridge.service.admission import Admission
from tokenbridge.service.errors import OverloadedError


def run(coro):
    return asyncio.run(coro)


async def hold(admission: Admission, tokens: int, release: asyncio.Event, log: list[str], name):
    async with admission.admit(tokens):
        log.append(name)
        await release.wait()


def test_refuses_at_once_without_a_line():
    async def go():
        admission = Admission(100)
        release = asyncio.Event()
        first = asyncio.create_task(hold(admission, 80, release, [], "a"))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as refused:
            async with admission.admit(30):
                pass
        release.set()
        await first
        return refused.value, admission.in_flight

    refused, left = run(go())
    assert "admission_wait_s is 0" in refused.message and refused.retry_after_s >= 0
    assert left == 0


def test_an_idle_service_admits_a_request_above_the_limit():
    async def go():
        admission = Admission(10)
        async with admission.admit(50):
            return admission.in_flight

    assert run(go()) == 50


def test_the_line_is_first_in_first_out_and_arrivals_never_overtake():
    async def go():
        admission = Admission(100, max_wait_s=5, max_waiting=10)
        log: list[str] = []
        releases = {name: asyncio.Event() for name in "abcd"}
        a = asyncio.create_task(hold(admission, 90, releases["a"], log, "a"))
        await asyncio.sleep(0)
        b = asyncio.create_task(hold(admission, 60, releases["b"], log, "b"))  # waits: 90 + 60
        await asyncio.sleep(0)
        # c alone would fit beside a (90 + 10), but b is ahead of it in line.
        c = asyncio.create_task(hold(admission, 10, releases["c"], log, "c"))
        await asyncio.sleep(0.01)
        waiting_then = admission.waiting
        releases["a"].set()
        await asyncio.sleep(0.01)
        for name in "bc":
            releases[name].set()
        await asyncio.gather(a, b, c)
        return log, waiting_then, admission.in_flight, admission.waiting

    log, waiting_then, in_flight, waiting = run(go())
    assert waiting_then == 2
    assert log == ["a", "b", "c"]
    assert in_flight == 0 and waiting == 0


def test_a_full_line_and_a_wait_that_runs_out_are_refused():
    async def go():
        admission = Admission(100, max_wait_s=0.05, max_waiting=1)
        release = asyncio.Event()
        a = asyncio.create_task(hold(admission, 100, release, [], "a"))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold(admission, 50, asyncio.Event(), [], "w"))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as full:
            async with admission.admit(50):
                pass
        with pytest.raises(OverloadedError) as timed_out:
            await waiter
        waiting_after = admission.waiting
        release.set()
        await a
        return full.value.message, timed_out.value.message, waiting_after, admission.in_flight

    full, timed_out, waiting_after, in_flight = run(go())
    assert "1 requests already wait for room (admission_queue)" in full
    assert "no room came within admission_wait_s (0.05 s)" in timed_out
    assert waiting_after == 0 and in_flight == 0


def test_a_caller_that_leaves_the_line_lets_the_next_one_in():
    async def go():
        admission = Admission(100, max_wait_s=5, max_waiting=10)
        log: list[str] = []
        release_a, release_c = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(hold(admission, 60, release_a, log, "a"))
        await asyncio.sleep(0)
        big = asyncio.create_task(hold(admission, 90, asyncio.Event(), log, "big"))
        await asyncio.sleep(0)
        c = asyncio.create_task(hold(admission, 30, release_c, log, "c"))
        await asyncio.sleep(0.01)
        blocked = list(log)
        big.cancel()  # the head of the line leaves: c fits beside a and goes in at once
        await asyncio.gather(big, return_exceptions=True)
        await asyncio.sleep(0.01)
        admitted = list(log)
        release_a.set()
        release_c.set()
        await asyncio.gather(a, c)
        return blocked, admitted, admission.in_flight, admission.waiting

    blocked, admitted, in_flight, waiting = run(go())
    assert blocked == ["a"] and admitted == ["a", "c"]
    assert in_flight == 0 and waiting == 0


def test_retry_after_follows_the_measured_throughput():
    now = [0.0]

    async def go():
        admission = Admission(1000, clock=lambda: now[0])
        for _ in range(10):  # 10 requests of 300 tokens finish within 30 s: 100 tokens/s
            async with admission.admit(300):
                now[0] += 3.0
        release = asyncio.Event()
        holder = asyncio.create_task(hold(admission, 900, release, [], "h"))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as refused:
            async with admission.admit(600):
                pass
        rate = admission.throughput()
        release.set()
        await holder
        return rate, refused.value.retry_after_s

    rate, retry = run(go())
    assert rate == pytest.approx(100, rel=0.01)
    assert retry == pytest.approx((900 + 600 - 1000) / 100, rel=0.01)
