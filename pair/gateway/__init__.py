"""gatewayd: owns gateway.db (contacts, channels, invites) and serves gateway.sock."""
