"""The alert rules and the dashboard against real textfiles: every metric they read
exists, every panel's query has data and no alert's condition holds on a healthy pair,
and a stopped assistant makes its two hold (test_events.py does the poisoned event and
the full disk)."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pair.testing import Pair
from tests.support.alerts import (
    alert_expressions,
    conditions_holding,
    holding,
    metric_names,
    metrics_of,
)
from tests.support.ctl import pairctl
from tests.support.waiting import until


def test_every_metric_a_rule_reads_is_written_and_no_alert_holds_on_a_healthy_pair(
    pair: Pair, tmp_path: Path
) -> None:
    # A backup makes its series exist, as where backups are used.
    assert pairctl(pair, "backup", str(tmp_path / "bundles")).returncode == 0
    textfile = metrics_of(pair)
    written = {
        name
        for family in text_string_to_metric_families(textfile)
        for name in (family.name, *(sample.name for sample in family.samples))
    }
    for alert, expression in alert_expressions().items():
        ours = {name for name in metric_names(expression) if name.startswith("pair_")}
        missing = ours - written - {"pair_alert_threshold"}
        assert not missing, f"{alert} reads {sorted(missing)}, which pairctl never writes"
    assert conditions_holding(textfile, list(alert_expressions())) == []
    queries = dashboard_queries()
    for title, expression in queries.items():
        missing = {n for n in metric_names(expression) if n.startswith("pair_")} - written
        assert not missing, f"panel {title} reads {sorted(missing)}, which pairctl never writes"
    assert holding(textfile, queries) == list(queries)


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pair.json"


def dashboard_queries() -> dict[str, str]:
    """Each panel's queries, with Grafana's variables as a query of all hosts would have
    them."""
    board = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} {target['refId']}": target["expr"]
        .replace("$__rate_interval", "1m")
        .replace('"$instance"', '".*"')
        for panel in board["panels"]
        for target in panel["targets"]
    }


def test_a_stopped_assistant_with_events_waiting_makes_down_and_link_down_hold(
    pair: Pair,
) -> None:
    assert pair.assistant.stop() == 0
    pair.gateway.call("contacts_create", {"displayName": "waits"})
    until(
        lambda: pair.gateway.call("health")["assistant"]["state"] != "connected",
        "the gateway sees its link down",
    )
    held = conditions_holding(
        metrics_of(pair), ["PairDaemonDown", "PairAssistantLinkDown", "PairOutboxEventsDead"]
    )
    assert held == ["PairDaemonDown", "PairAssistantLinkDown"]
    pair.assistant.restart()
