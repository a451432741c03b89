"""No raw file operation in pairctl or the backup and restore code: every open, create,
rename and unlink of a path there goes through pair.runtime.files (issue 28), whose
directory descriptors and O_NOFOLLOW are what keep root's hands off planted links."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUARDED = [
    *sorted((ROOT / "pair" / "ctl").glob("*.py")),
    ROOT / "pair" / "runtime" / "backup.py",
    ROOT / "pair" / "runtime" / "restore.py",
    ROOT / "pair" / "gateway" / "codes.py",
]
RAW_MODULE_CALLS = {
    "os": {"open", "rename", "replace", "unlink", "remove", "rmdir", "mkdir", "makedirs",
           "chmod", "chown", "symlink", "link", "truncate", "renames", "removedirs"},
    "shutil": {"copy", "copy2", "copyfile", "copytree", "move", "rmtree", "copyfileobj"},
}  # fmt: skip
# Path methods that open, write or change what is at a path (Dir has none of these).
RAW_PATH_METHODS = {"read_text", "write_text", "read_bytes", "write_bytes", "mkdir",
                    "touch", "chmod", "symlink_to", "hardlink_to", "iterdir", "glob"}  # fmt: skip
# Where a raw call is right, and why.
ALLOWED = {
    # The daemon making its own state directory's parents, before it opens it as a Dir.
    ("restore.py", "os.makedirs"),
    # pairctl pointing its stdout at /dev/null when the reader went away.
    ("cli.py", "os.open"),
}


def raw_calls(source: str, name: str) -> list[str]:
    """The raw file operations `source` calls, less those ALLOWED in a file `name`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            found.append("open")
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if owner in RAW_MODULE_CALLS and func.attr in RAW_MODULE_CALLS[owner]:
                found.append(f"{owner}.{func.attr}")
            elif owner != "Dir" and func.attr in RAW_PATH_METHODS:
                found.append(f".{func.attr}()")
    return [call for call in found if (name, call) not in ALLOWED]


def test_no_raw_file_operation_outside_pair_runtime_files() -> None:
    found = {
        str(path.relative_to(ROOT)): calls
        for path in GUARDED
        if (calls := raw_calls(path.read_text(), path.name))
    }
    assert found == {}


def test_the_check_names_each_kind_of_raw_call() -> None:
    source = (
        "import os, shutil\n"
        "os.rename('a', 'b')\nopen('x')\nPath('x').write_text('y')\n"
        "shutil.copyfile('a', 'b')\nDir.open('d')\nstate.rename('a', 'b')\nos.open('z', 0)\n"
    )
    assert raw_calls(source, "bundle.py") == [
        "os.rename", "open", ".write_text()", "shutil.copyfile", "os.open",
    ]  # fmt: skip
    assert raw_calls(source, "cli.py") == ["os.rename", "open", ".write_text()", "shutil.copyfile"]
