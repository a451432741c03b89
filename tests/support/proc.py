"""What /proc says of a daemon process."""

from __future__ import annotations

from pathlib import Path


def vm_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB: VmRSS (now) or VmHWM (the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")
