"""`pairctl metrics`: both daemons' `metrics` answers in Prometheus' text exposition format.

The format is prometheus-client's (a custom collector over the answers),
not written by hand; the daemons themselves never import it and listen on no
TCP port. `--textfile PATH` writes atomically (a temporary file, then a
rename) for node_exporter's textfile collector; `deploy/systemd/` has a timer
that does so every 15 s. A daemon that cannot be reached is `pair_up 0`.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pair.ctl.render import reads_answer
from pair.runtime.files import Dir, replace_atomically


class PairCollector(Collector):
    """The metric families of SPEC.md section 10, from each daemon's `metrics` answer
    (None: the daemon could not be reached), and what its `health` answer adds for the
    alerts (deploy/prometheus/): its release, its pid, degraded, the assistant link."""

    def __init__(
        self,
        answers: dict[str, dict[str, Any] | None],
        healths: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.answers = answers
        self.healths = healths or {}

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pair_up", "1 if the daemon answered metrics", labels=["daemon"])
        for daemon, answer in self.answers.items():
            up.add_metric([daemon], 0 if answer is None else 1)
        yield up
        answered = {d: answer for d, answer in self.answers.items() if answer is not None}
        yield from _call_families(answered)
        yield from _backup_families(answered)
        yield from _health_families(self.healths)
        gateway = self.answers.get("gateway")
        if gateway is not None:
            yield from _gateway_families(gateway)
        assistant = self.answers.get("assistant")
        if assistant is not None:
            queries = CounterMetricFamily(
                "pair_db_queries",
                "db_proxy queries by where they were answered: loop or readers",
                labels=["path"],
            )
            # An assistant before 0.2.0 does not say.
            for path, count in assistant.get("queries", {}).items():
                queries.add_metric([path], count)
            yield queries


DMO = ["daemon", "method", "outcome"]


def _gateway_families(answer: dict[str, Any]) -> Iterator[Metric]:
    redemptions = CounterMetricFamily(
        "pair_invite_redemptions", "Invite redemptions by outcome", labels=["outcome"]
    )
    for outcome, count in answer["inviteRedemptions"].items():
        redemptions.add_metric([outcome], count)
    yield redemptions
    outbox = answer["outbox"]
    yield GaugeMetricFamily("pair_outbox_pending", "Events waiting", value=outbox["pending"])
    yield GaugeMetricFamily("pair_outbox_dead", "Events set aside", value=outbox["dead"])
    oldest = outbox["oldestAgeSeconds"]
    yield GaugeMetricFamily(
        "pair_outbox_oldest_age_seconds",
        "Age of the oldest waiting event (0 when none waits)",
        value=0 if oldest is None else oldest,
    )
    yield CounterMetricFamily(
        "pair_outbox_delivered", "Events delivered to the assistant", value=outbox["deliveredTotal"]
    )


def _call_families(answers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    calls = CounterMetricFamily("pair_calls", "Calls answered, by method and outcome", labels=DMO)
    durations = HistogramMetricFamily(
        "pair_call_duration_seconds", "Time to answer a call", labels=["daemon", "method"]
    )
    connections = GaugeMetricFamily(
        "pair_connections_open", "Open client connections", labels=["daemon"]
    )
    refused = CounterMetricFamily(
        "pair_connections_refused", "Connections refused", labels=["daemon", "reason"]
    )
    db_errors = CounterMetricFamily(
        "pair_db_errors", "Database failures by errorCode", labels=["daemon", "code"]
    )
    for daemon, answer in answers.items():
        for call in answer["calls"]:
            calls.add_metric([daemon, call["method"], call["outcome"]], call["count"])
        for histogram in answer["callDurations"]:
            bounds = [str(bound) for bound in histogram["bounds"]] + ["+Inf"]
            cumulative = list(accumulate(histogram["counts"]))
            durations.add_metric(
                [daemon, histogram["method"]],
                list(zip(bounds, cumulative, strict=True)),
                histogram["sumSeconds"],
            )
        connections.add_metric([daemon], answer["connections"]["open"])
        for reason, count in answer["connections"]["refused"].items():
            refused.add_metric([daemon, reason], count)
        for code, count in answer["dbErrors"].items():
            db_errors.add_metric([daemon, code], count)
    yield from (calls, durations, connections, refused, db_errors)


def _health_families(healths: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "pair_info", "The daemon's release (always 1)", labels=["daemon", "version"]
    )
    pid = GaugeMetricFamily(
        "pair_pid", "The daemon's process id: a change is a restart", labels=["daemon"]
    )
    degraded = GaugeMetricFamily(
        "pair_degraded",
        "1 while the daemon says degraded (its database refuses writes: disk full, I/O)",
        labels=["daemon"],
    )
    for daemon, health in healths.items():
        info.add_metric([daemon, str(health["version"])], 1)
        pid.add_metric([daemon], health["pid"])
        degraded.add_metric([daemon], 1 if health["status"] == "degraded" else 0)
    yield from (info, pid, degraded)
    gateway = healths.get("gateway")
    if gateway is not None:
        yield GaugeMetricFamily(
            "pair_assistant_link_up",
            "1 while the gateway's link to the assistant is connected",
            value=1 if gateway["assistant"]["state"] == "connected" else 0,
        )


def _backup_families(answers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    backups = CounterMetricFamily(
        "pair_backups", "Snapshots taken by the backup method", labels=["daemon"]
    )
    failures = CounterMetricFamily(
        "pair_backup_failures", "Backup snapshots that failed", labels=["daemon"]
    )
    taken_at = GaugeMetricFamily(
        "pair_backup_last_success_timestamp_seconds",
        "When the last snapshot was taken (Unix time)",
        labels=["daemon"],
    )
    size = GaugeMetricFamily(
        "pair_backup_last_size_bytes", "Size of the last snapshot's files", labels=["daemon"]
    )
    for daemon, answer in answers.items():
        backup = answer.get("backup") or {}
        backups.add_metric([daemon], backup.get("count", 0))
        failures.add_metric([daemon], backup.get("failures", 0))
        if backup.get("lastAt") is not None:
            taken_at.add_metric([daemon], backup["lastAt"] / 1000)
            size.add_metric([daemon], backup["lastBytes"])
    yield from (backups, failures, taken_at, size)


def exposition(
    answers: dict[str, dict[str, Any] | None], healths: dict[str, dict[str, Any]] | None = None
) -> bytes:
    """The text exposition of `answers` (and `healths`)."""
    return generate_latest(_registry(answers, healths))


@reads_answer
def exposition_text(
    answers: dict[str, dict[str, Any] | None], healths: dict[str, dict[str, Any]] | None = None
) -> str:
    """The exposition as text; an answer of a shape pairctl cannot read is an
    `IncompatiblePeer` with words, never a traceback."""
    return exposition(answers, healths).decode()


def write_textfile(path: Path, data: bytes) -> None:
    """Write the exposition to `path` atomically (node_exporter never reads half a file,
    and after a power cut it finds the old or the new one whole). 0644: node_exporter
    runs as a user of its own; nothing in it is secret."""
    with Dir.open(path.parent) as directory:
        replace_atomically(directory, path.name, data, mode=0o644)


def _registry(
    answers: dict[str, dict[str, Any] | None], healths: dict[str, dict[str, Any]] | None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PairCollector(answers, healths))
    return registry
