"""Results that arrive later through a callback on the loop, and how to await one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Deferred(Protocol[T_co]):
    """A result that arrives later, through a callback run on the loop (`runtime.sqlite.Job`).

    A handler returning one hands its work to a thread without a task: the
    connection answers from the callback.
    """

    def then(
        self, on_done: Callable[[Any, bool, T_co | BaseException], None], context: Any
    ) -> None: ...

    def withdraw(self, error: BaseException) -> bool:
        """Answer the caller with `error` now if the work can still be dropped; True if so."""
        ...


class Done(Generic[T]):
    """A handler's outcome it had at once (a query answered on the loop): `Calls` answers
    it without a callback, as an inline call."""

    __slots__ = ("ok", "value")

    def __init__(self, ok: bool, value: T | BaseException) -> None:
        self.ok = ok
        self.value = value

    def then(self, on_done: Callable[[Any, bool, T | BaseException], None], context: Any) -> None:
        on_done(context, self.ok, self.value)

    def withdraw(self, error: BaseException) -> bool:
        return False


async def outcome_of(deferred: Deferred[T]) -> T:
    """Await what a `Job` (any `Deferred`) delivers: its result, or its exception raised."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    deferred.then(_settle_future, future)
    return await future


def _settle_future(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Settle an awaited future (unless its caller gave up)."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
