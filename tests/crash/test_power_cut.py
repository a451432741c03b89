"""The power-cut tier, short: cuts drawn from a seed (printed; PAIR_CRASH_SEED=N replays
it) across every moment of tests/crash/tier.py, each finding nothing; and proof that
the tier sees a loss when there is one (synchronous=OFF, our directory fsyncs dropped)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.crash.tier import MOMENTS, Plan, draw, run

CUTS = int(os.environ.get("PAIR_CRASH_CUTS", "14"))


def seeds() -> list[int]:
    first = int(os.environ.get("PAIR_CRASH_SEED") or random.SystemRandom().randrange(10**6))
    print(f"\npower-cut tier: PAIR_CRASH_SEED={first} PAIR_CRASH_CUTS={CUTS}")
    return [first + n for n in range(CUTS)]


@pytest.mark.parametrize("seed", seeds())
def test_a_power_cut_loses_nothing_acknowledged(seed: int, short_tmp: Path) -> None:
    plan = draw(seed)
    result = run(plan, short_tmp / "cut")
    print(
        f"{plan}: {result.acks} acknowledged; {'; '.join(result.notes) or 'no unsynced data kept'}"
    )
    assert result.findings == [], f"{plan}\n" + "\n".join(result.findings)


def test_with_synchronous_off_the_tier_names_what_was_lost(short_tmp: Path) -> None:
    plan = Plan(seed=1, moment="load", after=0.6)
    result = run(plan, short_tmp / "cut", environment={"PAIR_POWERCUT_SYNCHRONOUS": "OFF"})
    assert result.acks.contacts, "the load ran"
    print("\n".join(result.findings[:5]))
    assert any("acknowledged" in line or "malformed" in line for line in result.findings)


def test_with_our_directory_fsyncs_dropped_the_tier_finds_the_key_gone(short_tmp: Path) -> None:
    plan = Plan(seed=2, moment="load", after=0.6)
    result = run(plan, short_tmp / "cut", environment={"PAIR_POWERCUT_SKIP": "dir-sync"})
    print("\n".join(result.findings[:5]))
    assert any("gateway.key is missing" in line for line in result.findings)


def test_every_moment_is_drawn() -> None:
    assert {draw(seed).moment for seed in range(len(MOMENTS))} == set(MOMENTS)
