"""A seeded random plan of upgrades, downgrades and restarts of each side, as CockroachDB's
mixed-version framework makes them.

The plan starts both sides on a random release each, then changes one side's release at
a time until all four combinations (gateway old/new x assistant old/new) have run, with
restarts (SIGTERM) and crashes (SIGKILL) of either side drawn in between.
`PAIR_SKEW_SEED=N make test-skew` replays a plan.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Side = Literal["gateway", "assistant"]
Release = Literal["old", "new"]
Action = Literal["upgrade", "downgrade", "restart", "kill"]
SIDES: tuple[Side, Side] = ("gateway", "assistant")


@dataclass(frozen=True, slots=True)
class Step:
    side: Side
    action: Action
    # Both sides' releases once the step is done.
    gateway: Release
    assistant: Release

    def __str__(self) -> str:
        return (
            f"{self.action:9} {self.side:9} -> gateway {self.gateway}, assistant {self.assistant}"
        )


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    gateway: Release
    assistant: Release
    steps: tuple[Step, ...]

    def lines(self) -> list[str]:
        start = f"start     both      -> gateway {self.gateway}, assistant {self.assistant}"
        return [f"plan (seed {self.seed}):", f"  0. {start}"] + [
            f"  {number}. {step}" for number, step in enumerate(self.steps, 1)
        ]

    def combinations(self) -> set[tuple[Release, Release]]:
        return {(self.gateway, self.assistant)} | {(s.gateway, s.assistant) for s in self.steps}


def make_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    releases: dict[Side, Release] = {side: rng.choice(("old", "new")) for side in SIDES}
    start = dict(releases)
    # Changing one side at a time, three changes visit all four combinations when each
    # side changes in turn: first, other, first.
    first: Side = rng.choice(SIDES)
    second: Side = "assistant" if first == "gateway" else "gateway"
    steps: list[Step] = []
    for side in (first, second, first):
        for _ in range(rng.randint(0, 2)):
            other: Side = rng.choice(SIDES)
            action: Action = rng.choice(("restart", "kill"))
            steps.append(Step(other, action, releases["gateway"], releases["assistant"]))
        releases[side] = "new" if releases[side] == "old" else "old"
        change: Action = "upgrade" if releases[side] == "new" else "downgrade"
        steps.append(Step(side, change, releases["gateway"], releases["assistant"]))
    return Plan(seed, start["gateway"], start["assistant"], tuple(steps))
