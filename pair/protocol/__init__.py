"""The wire protocol shared by both daemons: framing, messages, values, errors, server, client."""

__version__ = "0.2.0"
