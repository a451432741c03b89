"""What both daemons run on that is not the wire: flags, logging and life cycle, paths,
the listener, systemd, failpoints, and SQLite (connections, threads, group commit)."""
