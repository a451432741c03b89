"""pair: the gateway / assistant daemon pair (README.md).

pair.protocol   the wire both daemons stand on
pair.runtime    what both daemons run on that is not the wire
pair.assistant  assistantd: owns assistant.db, serves assistant.sock
pair.gateway    gatewayd: owns gateway.db, serves gateway.sock
pair.ctl        pairctl, the ops CLI
pair.testing    the pytest plugin (fixtures pair, pair_factory, ...)
"""

# The release: one place (pyproject.toml reads it from here).
__version__ = "0.2.0"
# The pair's two daemons, in the order they start.
DAEMONS = ("assistant", "gateway")
