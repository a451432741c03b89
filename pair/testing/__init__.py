"""Real daemons for socket-level tests: the pytest plugin (`pair.testing.plugin`, registered
through the `pytest11` entry point) and the process handles it hands out."""

from pair.testing.daemons import DaemonProcess, DaemonsFailed, Pair, crash_at

__all__ = ["DaemonProcess", "DaemonsFailed", "Pair", "crash_at"]
