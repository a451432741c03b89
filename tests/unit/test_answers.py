"""A peer's error object, rebuilt whatever it holds: never an exception of another kind."""

from __future__ import annotations

from typing import Any

import pytest

from pair.protocol.answers import handler_error
from pair.protocol.messages import ErrorObject

NOT_A_STATUS = ["abc", "404", 1.5, 404.0, 1e300, True, False, None, 10**30, -1, 99, 600, [], {}]
NOT_A_CODE = [7, None, True, ["X"], {"X": 1}, "", "x", "NOT FOUND", "X\x1b[2J", "X\n", "X" * 65]


def rebuilt(data: dict[str, Any]) -> Any:
    return handler_error(ErrorObject(-32000, "refused", data))


@pytest.mark.parametrize("status", NOT_A_STATUS, ids=repr)
def test_a_status_code_that_is_no_status_is_a_500(status: object) -> None:
    error = rebuilt({"statusCode": status, "errorCode": "X"})
    assert (error.status_code, error.code, error.message) == (500, "X", "refused")


@pytest.mark.parametrize("code", NOT_A_CODE, ids=repr)
def test_an_error_code_that_is_no_code_is_unknown(code: object) -> None:
    error = rebuilt({"statusCode": 404, "errorCode": code})
    assert (error.status_code, error.code) == (404, "UNKNOWN")


def test_an_error_the_protocol_describes_is_kept_as_said() -> None:
    error = rebuilt({"statusCode": 429, "errorCode": "RATE_LIMITED", "retryable": True, "n": 1})
    assert (error.status_code, error.code, error.retryable) == (429, "RATE_LIMITED", True)
    assert error.data["n"] == 1


def test_data_that_says_nothing_is_a_500_named_unknown_not_retryable() -> None:
    error = rebuilt({})
    assert (error.status_code, error.code, error.retryable) == (500, "UNKNOWN", False)
    assert not rebuilt({"retryable": "yes"}).retryable
