"""The alert rules of deploy/prometheus/ evaluated by promtool on a real textfile.

`conditions_holding(textfile)` says which alerts' conditions (their `expr`, without
`for:`) hold on the samples of a `pairctl metrics --textfile` output, each sample held
constant for ten minutes, as promtool's `promql_expr_test` computes them: the check
that ties the rules to the failures the suite really produces.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pair.testing import Pair
from tests.support.ctl import pairctl

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "pair.rules.yml"
# The labels the scrape adds (node_exporter's textfile collector).
SCRAPE = 'instance="host:9100",job="node"'


def promtool() -> str:
    """promtool's path; a skip where it is missing, a failure in CI."""
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing (Debian: apt-get install prometheus)"
        if os.environ.get("PAIR_REQUIRE_PROMTOOL"):
            pytest.fail(f"PAIR_REQUIRE_PROMTOOL is set, but: {reason}")
        pytest.skip(reason)
    return path


def alert_expressions(rules: Path = RULES) -> dict[str, str]:
    """Each alert's expr, read from the rules file's own layout (`- alert: NAME`, then
    `expr:` on one line or folded below `expr: >-`): no YAML library in the lock."""
    expressions: dict[str, str] = {}
    name = None
    lines = rules.read_text().splitlines()
    for number, line in enumerate(lines):
        alert = re.match(r"\s*- alert: (\w+)$", line)
        if alert:
            name = alert[1]
        expr = re.match(r"(\s*)expr: (.*)$", line)
        if expr and name is not None:
            indent, text = len(expr[1]), expr[2]
            if text == ">-":
                folded = []
                for follow in lines[number + 1 :]:
                    if len(follow) - len(follow.lstrip()) <= indent:
                        break
                    folded.append(follow.strip())
                text = " ".join(folded)
            expressions[name] = text
    return expressions


def metric_names(expression: str) -> set[str]:
    """The metric names an expression reads (ours and node_exporter's)."""
    return set(re.findall(r"\b((?:pair|node)_[a-z_]+)\b", expression))


def conditions_holding(textfile: str, alerts: list[str]) -> list[str]:
    """Those of `alerts` whose condition holds on `textfile`'s samples."""
    expressions = alert_expressions()
    return holding(textfile, {alert: expressions[alert] for alert in alerts})


def holding(textfile: str, expressions: dict[str, str]) -> list[str]:
    """The names of `expressions` that return at least one sample on `textfile`'s
    samples (each held for ten minutes, evaluated at five) as promtool computes them;
    an expression promtool cannot parse or evaluate fails the test."""
    series = []
    for family in text_string_to_metric_families(textfile):
        for sample in family.samples:
            labels = ",".join(
                f'{key}="{_escaped(value)}"' for key, value in sorted(sample.labels.items())
            )
            selector = f"{sample.name}{{{labels + ',' if labels else ''}{SCRAPE}}}"
            series.append(f"      - series: '{selector}'\n        values: '{sample.value}x40'")
    found = []
    with tempfile.TemporaryDirectory(prefix="pair-alerts-") as scratch:
        for name, expression in expressions.items():
            test = Path(scratch) / "test.yml"
            test.write_text(
                f"rule_files: ['{RULES}']\nevaluation_interval: 15s\ntests:\n"
                "  - interval: 15s\n    input_series:\n" + "\n".join(series) + "\n"
                "    promql_expr_test:\n"
                f"      - expr: '{_quoted(f'clamp_max(count({expression}), 1)')}'\n"
                "        eval_time: 5m\n"
                "        exp_samples: [{labels: '{}', value: 1}]\n"
            )
            result = subprocess.run(
                [promtool(), "test", "rules", str(test)], capture_output=True, text=True
            )
            if result.returncode == 0:
                found.append(name)
            elif not re.search(r"got: *nil", result.stdout + result.stderr):
                raise AssertionError(f"promtool on {name}: {result.stdout}{result.stderr}")
    return found


def _quoted(expression: str) -> str:
    """For a single-quoted YAML string."""
    return expression.replace("'", "''")


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_of(pair: Pair) -> str:
    """What `pairctl metrics` writes for the textfile collector, from `pair` now."""
    result = pairctl(pair, "metrics")
    assert result.returncode == 0, result.stderr
    return result.stdout
