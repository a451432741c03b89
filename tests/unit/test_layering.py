"""The wire layer stands alone: a client or a server loads no database code (SPEC.md section 1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def loaded_after(imports: str) -> list[str]:
    probe = (
        f"import sys, {imports}; "
        "print(sorted(m for m in sys.modules if m == 'apsw' or m.startswith('pair.runtime')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return list(ast.literal_eval(result.stdout))


def test_the_wire_client_and_server_load_no_database_code() -> None:
    assert loaded_after("pair.protocol.client, pair.protocol.server") == []


def test_the_ops_cli_loads_the_default_paths_and_no_database_code() -> None:
    assert loaded_after("pair.ctl.cli") == [
        "pair.runtime",
        "pair.runtime.errors",
        "pair.runtime.failpoints",
        "pair.runtime.files",
        "pair.runtime.paths",
        "pair.runtime.powercut",
        "pair.runtime.restore",
    ]


def test_protocol_imports_nothing_of_the_runtime_or_the_daemons() -> None:
    forbidden = {"apsw", "pair.runtime", "pair.assistant", "pair.gateway", "pair.ctl"}
    found = []
    for path in sorted((ROOT / "pair" / "protocol").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{path.name}: {n}"
                for n in names
                if any(n == f or n.startswith(f"{f}.") for f in forbidden)
            ]
    assert found == []


def test_the_daemons_never_load_the_prometheus_library() -> None:
    """The exposition format is pairctl's; the daemons answer `metrics` as JSON only."""
    probe = (
        "import sys, pair.assistant.app, pair.gateway.app; "
        "print([m for m in sys.modules if m.split('.')[0] == 'prometheus_client'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
