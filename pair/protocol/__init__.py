"""The wire protocol shared by both daemons: framing, messages, values, errors, server, client."""
