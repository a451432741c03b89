"""assistantd: owns assistant.db and serves it on assistant.sock."""
