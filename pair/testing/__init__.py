"""Real daemons for socket-level tests: the pytest plugin (`pair.testing.plugin`, registered
through the `pytest11` entry point) and the process handles it hands out."""

from pair.testing.daemons import DaemonProcess, Pair

__all__ = ["DaemonProcess", "Pair"]
