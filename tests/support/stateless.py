"""The life cycle of a test daemon that keeps nothing: nothing to open, run or close."""

from __future__ import annotations

from anyio.abc import TaskGroup


class Stateless:
    async def open(self) -> None:
        pass

    async def run_background(self, task_group: TaskGroup) -> None:
        pass

    async def close(self, timeout: float) -> None:
        pass
