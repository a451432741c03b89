"""The alert rules as shipped: promtool checks them, runs their firing and quiet cases,
and each one has what an on-call engineer needs (severity, words, a runbook that exists)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.alerts import RULES, alert_expressions, promtool

TESTS = RULES.with_name("pair.rules.test.yml")
README = Path(__file__).resolve().parents[2] / "README.md"


def test_promtool_finds_the_rules_valid_and_every_case_as_expected() -> None:
    checked = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool(), "test", "rules", TESTS.name], cwd=TESTS.parent, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = re.findall(
        r"- alertname: (\w+)\n\s+eval_time: \S+\n(\s+exp_alerts:)?", TESTS.read_text()
    )
    for alert in alert_expressions():
        kinds = {bool(firing) for name, firing in cases if name == alert}
        assert kinds == {True, False}, f"{alert}: firing and quiet cases"


def test_every_alert_has_a_severity_words_and_a_runbook_section_in_the_readme() -> None:
    text = RULES.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", README.read_text(), re.M)
    }
    blocks = re.split(r"\n      - alert: ", text)[1:]
    assert [block.split("\n", 1)[0] for block in blocks] == list(alert_expressions())
    for block in blocks:
        name = block.split("\n", 1)[0]
        assert re.search(r"severity: (critical|warning)\n", block), name
        assert "summary:" in block, name
        assert "description:" in block, name
        runbook = re.search(r'runbook_url: "file:///usr/share/doc/pair/README.md#([a-z-]+)"', block)
        assert runbook, name
        assert runbook[1] in anchors, f"{name}: no README section #{runbook[1]}"
