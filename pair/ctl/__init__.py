"""pairctl: run, inspect and drive the daemon pair from a shell."""
