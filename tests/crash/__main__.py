"""`make crash N=... [SEED=...]`: N power cuts, each plan printed with what was
acknowledged before it and what was found; exit 1 when anything was."""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

from tests.crash.tier import draw, run


def main(argv: list[str]) -> int:
    cuts = int(argv[0]) if argv else 100
    first = int(argv[1]) if len(argv) > 1 else random.SystemRandom().randrange(10**6)
    started, found = time.monotonic(), 0
    print(f"{cuts} power cuts from seed {first}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pair-crash-", dir="/tmp") as work:
        for seed in range(first, first + cuts):
            plan = draw(seed)
            result = run(plan, Path(work) / "cut")
            found += bool(result.findings)
            state = (
                "FOUND: " + "; ".join(result.findings[:3]) if result.findings else "nothing lost"
            )
            print(f"{plan} | acknowledged: {result.acks} | {state}", flush=True)
    took = time.monotonic() - started
    print(f"{cuts} cuts (seeds {first}..{first + cuts - 1}) in {took:.0f}s: {found} found a loss")
    return 1 if found else 0


sys.exit(main(sys.argv[1:]))
