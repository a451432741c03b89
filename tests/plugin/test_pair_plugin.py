"""The pytest plugin as a user meets it: a test file of theirs, run by pytest in a process of
its own (pytester), against the installed plugin and real daemons."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import os
import signal

import pytest

from pair.protocol.errors import IpcHandlerError, IpcTransportError


def test_each_daemon_answers_through_its_handle(pair):
    assert pair.assistant.call("health")["pid"] == pair.assistant.pid
    assert pair.gateway.call("health")["pid"] == pair.gateway.pid
    assert pair.assistant.socket_path.endswith("assistant.sock")
    assert (pair.assistant.state_dir / "assistant.db").is_file()
    with pytest.raises(IpcHandlerError) as caught:
        pair.gateway.call("contacts_get", {"id": "missing"})
    assert caught.value.code == "NOT_FOUND"


def test_a_restart_keeps_the_socket_path_and_the_data(pair):
    contact = pair.gateway.call("contacts_create", {"displayName": "Ada"})["contact"]
    socket_path, pid = pair.gateway.socket_path, pair.gateway.pid
    pair.gateway.restart()
    assert (pair.gateway.socket_path, pair.gateway.pid != pid) == (socket_path, True)
    found = pair.gateway.call("contacts_get", {"id": contact["id"]})
    assert found["contact"]["displayName"] == "Ada"


def test_a_killed_daemon_raises_a_transport_error_until_started(pair):
    pair.assistant.kill()
    with pytest.raises(IpcTransportError):
        pair.assistant.call("health", timeout=2)
    pair.assistant.start()
    assert pair.assistant.call("health")["status"] == "ok"


def test_stop_answers_the_exit_code_and_logs_what_it_said(pair):
    assert pair.gateway.stop() == 0
    assert "ready" in pair.gateway.logs()


def test_the_factory_starts_a_pair_with_flags_of_its_own(pair_factory):
    strict = pair_factory(gateway_args=("--guess-limit-sender", "1"))
    code = {"sourceChannel": "sms", "code": "000000", "externalUserId": "u"}
    for expected in ("INVITE_INVALID", "RATE_LIMITED"):
        with pytest.raises(IpcHandlerError) as caught:
            strict.gateway.call("invites_redeem", code)
        assert caught.value.code == expected


@pytest.mark.anyio
async def test_the_async_clients_are_connected(assistant_client, gateway_client):
    assert (await assistant_client.call("health"))["status"] == "ok"
    assert (await gateway_client.call("health"))["assistant"]["state"] in ("connected", "unknown")
"""


def test_a_users_test_file_gets_every_fixture_and_handle_method(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=240)
    result.assert_outcomes(passed=6)


def test_a_daemon_that_dies_during_a_test_fails_it_with_its_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_crash="""
        import os
        import signal


        def test_passes_but_its_assistant_dies(pair):
            os.kill(pair.assistant.pid, signal.SIGKILL)
            pair.assistant.proc.wait()
        """
    )
    result = pytester.runpytest_subprocess(timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*assistantd exited with -9 during the test*", "*pair: assistantd log*"]
    )


def test_a_handler_error_fails_the_test_at_its_own_line_not_in_the_loop(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_missing="""
        def test_looks_up_a_missing_contact(pair):
            pair.gateway.call("contacts_get", {"id": "nobody"})
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=120)
    result.assert_outcomes(failed=1)
    report = "\n".join(result.outlines)
    assert 'pair.gateway.call("contacts_get", {"id": "nobody"})' in report
    assert "IpcHandlerError: NOT_FOUND" in report
    for internal in ("asyncio", "concurrent/futures", "protocol/client.py"):
        assert internal not in report, report


def test_pair_keep_keeps_a_failed_tests_directories_and_says_where(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_fails="""
        def test_fails(pair):
            pair.gateway.call("contacts_create", {"displayName": "kept"})
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--pair-keep", timeout=120)
    result.assert_outcomes(failed=1)
    kept = [line for line in result.outlines if line.startswith("test_fails.py::test_fails: ")]
    assert len(kept) == 1, result.outlines
    root = Path(kept[0].split(": ", 1)[1])
    try:
        assert (root / "state" / "gateway.db").is_file()
    finally:
        shutil.rmtree(root)


def test_the_readme_example_passes_as_written(pytester: pytest.Pytester) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Testing your code against the pair", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    pytester.makepyfile(test_readme=example)
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=120)
    result.assert_outcomes(passed=4)
