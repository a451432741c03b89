"""The statement policy every db_proxy caller is held to, enforced by an SQLite authorizer.

A read-only check is not enough: `is_readonly` is true for BEGIN and ATTACH.
The authorizer sees every action a statement would take when it is
prepared, so a forbidden statement never runs at all.
"""

from __future__ import annotations

import enum

import apsw

# Pragmas a caller may use to look (never to set anything). The first set
# takes an argument naming what to inspect; the second only reads a value,
# since an argument there would set it.
INSPECTING_PRAGMAS = frozenset(
    {
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)
READ_ONLY_PRAGMAS = frozenset(
    {
        "collation_list",
        "compile_options",
        "data_version",
        "database_list",
        "freelist_count",
        "function_list",
        "page_count",
        "page_size",
        "pragma_list",
        "schema_version",
        "user_version",
    }
)

_READ_ACTIONS = frozenset(
    {apsw.SQLITE_SELECT, apsw.SQLITE_READ, apsw.SQLITE_FUNCTION, apsw.SQLITE_RECURSIVE}
)
# What SQLite passes the authorizer, per action code ("Authorizer Action Codes"
# in its documentation), and what a caller may do. A 5th argument names the
# trigger or view whose body is being coded; the policy holds inside bodies
# alike, since the mode is the statement's that fired them (callers cannot put
# a trigger on a table the daemon's own statements write).
#
#   code                  arg1            arg2           caller
#   CREATE_INDEX      1   index           table          not on an internal table
#   CREATE_TABLE      2   table           -              not an internal name
#   CREATE_TEMP_INDEX 3   index           table          as CREATE_INDEX; dropped after the call
#   CREATE_TEMP_TABLE 4   table           -              not an internal name (a shadow); dropped
#   CREATE_TEMP_TRIGGER 5 trigger         table          not on an internal table; dropped
#   CREATE_TEMP_VIEW  6   view            -              not an internal name; dropped
#   CREATE_TRIGGER    7   trigger         table          not on an internal table
#   CREATE_VIEW       8   view            -              not an internal name
#   DELETE            9   table           -              not an internal table
#   DROP_INDEX       10   index           table          not on an internal table
#   DROP_TABLE       11   table           -              not an internal table
#   DROP_TEMP_INDEX  12   index           table          as DROP_INDEX
#   DROP_TEMP_TABLE  13   table           -              as DROP_TABLE
#   DROP_TEMP_TRIGGER 14  trigger         table          not on an internal table
#   DROP_TEMP_VIEW   15   view            -              not an internal name
#   DROP_TRIGGER     16   trigger         table          not on an internal table
#   DROP_VIEW        17   view            -              not an internal name
#   INSERT           18   table           -              not an internal table
#   PRAGMA           19   pragma          its argument   only the listed ones, only to look
#   READ             20   table           column         yes, the internal tables too
#   SELECT           21   -               -              yes
#   TRANSACTION      22   BEGIN/COMMIT... -              no: a transaction never spans calls
#   UPDATE           23   table           column         not an internal table
#   ATTACH           24   file name       -              no
#   DETACH           25   schema          -              no
#   ALTER_TABLE      26   schema          table          not an internal table
#   REINDEX          27   index           -              yes (write modes)
#   ANALYZE          28   table           -              not an internal table
#   CREATE_VTABLE    29   table           module         not an internal name
#   DROP_VTABLE      30   table           module         not an internal name
#   FUNCTION         31   -               function       not load_extension, fts3_tokenizer
#   SAVEPOINT        32   BEGIN/RELEASE.. savepoint      no
#   RECURSIVE        33   -               -              yes
#
# Query mode allows only SELECT, READ, FUNCTION, RECURSIVE and the pragmas.
#
# The actions that change a table or something about it, by which argument of
# the authorizer names the table (SQLite's "Authorizer Action Codes"): the first
# for the table's own rows and DDL and for any table or view created (a TEMP
# one of an internal table's name would shadow it on this connection), the
# second for an index or trigger on it and for ALTER TABLE (whose first is the
# schema's name). SQLITE_READ (first: table) is not here: callers may read.
_TABLE_IN_ARG1 = frozenset(
    {
        apsw.SQLITE_INSERT,
        apsw.SQLITE_UPDATE,
        apsw.SQLITE_DELETE,
        apsw.SQLITE_CREATE_TABLE,
        apsw.SQLITE_CREATE_TEMP_TABLE,
        apsw.SQLITE_DROP_TABLE,
        apsw.SQLITE_DROP_TEMP_TABLE,
        apsw.SQLITE_CREATE_VIEW,
        apsw.SQLITE_CREATE_TEMP_VIEW,
        apsw.SQLITE_DROP_VIEW,
        apsw.SQLITE_DROP_TEMP_VIEW,
        apsw.SQLITE_CREATE_VTABLE,
        apsw.SQLITE_DROP_VTABLE,
        apsw.SQLITE_ANALYZE,
    }
)
_TABLE_IN_ARG2 = frozenset(
    {
        apsw.SQLITE_CREATE_INDEX,
        apsw.SQLITE_CREATE_TEMP_INDEX,
        apsw.SQLITE_DROP_INDEX,
        apsw.SQLITE_DROP_TEMP_INDEX,
        apsw.SQLITE_CREATE_TRIGGER,
        apsw.SQLITE_CREATE_TEMP_TRIGGER,
        apsw.SQLITE_DROP_TRIGGER,
        apsw.SQLITE_DROP_TEMP_TRIGGER,
        apsw.SQLITE_ALTER_TABLE,
    }
)
_CREATE_TEMP = frozenset(
    {
        apsw.SQLITE_CREATE_TEMP_TABLE,
        apsw.SQLITE_CREATE_TEMP_VIEW,
        apsw.SQLITE_CREATE_TEMP_TRIGGER,
        apsw.SQLITE_CREATE_TEMP_INDEX,
    }
)
# DDL after which the caller's tables' foreign keys are checked (`defined_table`).
_DEFINES_TABLE = frozenset(
    {apsw.SQLITE_CREATE_TABLE, apsw.SQLITE_CREATE_TEMP_TABLE, apsw.SQLITE_ALTER_TABLE}
)
# Functions that reach memory or files through their arguments: fts3_tokenizer
# with a bound blob is a pointer SQLite calls through (a caller crashed it so).
REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})


class Mode(enum.Enum):
    TRUSTED = "trusted"  # our own statements: migrations, BEGIN/COMMIT, idempotency keys
    READ = "read"  # db_proxy query
    WRITE = "write"  # db_proxy run/exec and transaction steps


class Denial(enum.Enum):
    FORBIDDEN = "forbidden"
    WRITE_IN_READ = "write_in_read"
    # Not refused: not for the loop's own reader (`quick_only`); the readers run it.
    NOT_QUICK = "not_quick"


# What the loop's own reader may run: functions of bounded work per row. Any other (printf,
# trim, like, replace, randomblob, json...) can take seconds in one SQLite step, where no
# progress handler runs, and the loop would stall with it; so can a pragma
# (integrity_check is one step).
# Not count: count(*) of a whole table is one step (OP_Count walks the b-tree). Nor the
# table-valued functions reported as reads (json_each parses its argument in one step).
QUICK_FUNCTIONS = frozenset(
    {"min", "max", "sum", "total", "avg", "coalesce", "ifnull", "nullif", "iif",
     "typeof", "abs", "round", "sign", "likely", "unlikely", "likelihood"}
)  # fmt: skip
_TABLE_FUNCTIONS = frozenset({"json_each", "json_tree", "generate_series", "dbstat"})


def _quick(action: int, arg1: str | None, arg2: str | None) -> bool:
    if action == apsw.SQLITE_FUNCTION:
        return (arg2 or "").lower() in QUICK_FUNCTIONS
    if action == apsw.SQLITE_READ:
        return (arg1 or "").lower() not in _TABLE_FUNCTIONS
    return action != apsw.SQLITE_PRAGMA


class Guard:
    """Per-connection authorizer state: the current mode and why the last statement was denied."""

    def __init__(self, internal_tables: frozenset[str]) -> None:
        self.mode = Mode.TRUSTED
        self.internal_tables = internal_tables
        self.denial: Denial | None = None
        self.reason = ""
        # A caller statement created a TEMP object: it is dropped before the
        # call ends, so nothing outlives the call on this shared connection.
        self.created_temp = False
        # A caller statement created or altered a table: its foreign keys are
        # checked before the call commits (`assistant.proxy`).
        self.defined_table = False
        # The loop's own reader: a statement that could stall it is refused at prepare
        # (`Denial.NOT_QUICK`), to be run by the readers instead (`assistant.loop_reader`).
        self.quick_only = False

    def authorize(
        self, action: int, arg1: str | None, arg2: str | None, _db: str | None, trigger: str | None
    ) -> int:
        if self.mode is Mode.TRUSTED:
            # The daemon has no triggers: one coded into our own statement is a
            # caller's (fired through a foreign key's cascade, say), and would run
            # with the daemon's rights.
            if trigger is None:
                return apsw.SQLITE_OK
            return self._deny(
                Denial.FORBIDDEN, f"the caller's trigger {trigger} may not run in the daemon's work"
            )
        reason = self._forbidden(action, arg1, arg2)
        if reason:
            return self._deny(Denial.FORBIDDEN, reason)
        if action in _CREATE_TEMP:
            self.created_temp = True
        if action in _DEFINES_TABLE:
            self.defined_table = True
        if self.mode is Mode.READ and action not in _READ_ACTIONS and action != apsw.SQLITE_PRAGMA:
            return self._deny(Denial.WRITE_IN_READ, "query mode takes read-only statements")
        if self.quick_only and not _quick(action, arg1, arg2):
            return self._deny(Denial.NOT_QUICK, "not for the loop's own reader")
        return apsw.SQLITE_OK

    def _forbidden(self, action: int, arg1: str | None, arg2: str | None) -> str:
        if action in (apsw.SQLITE_TRANSACTION, apsw.SQLITE_SAVEPOINT):
            return (
                "transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE) is not allowed"
            )
        if action in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH):
            return "ATTACH and DETACH are not allowed"
        if action == apsw.SQLITE_FUNCTION and (arg2 or "").lower() in REFUSED_FUNCTIONS:
            return f"the function {arg2} is not allowed"
        if action == apsw.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in INSPECTING_PRAGMAS or (name in READ_ONLY_PRAGMAS and arg2 is None):
                return ""
            allowed = ", ".join(sorted(INSPECTING_PRAGMAS | READ_ONLY_PRAGMAS))
            return f"PRAGMA {name} is not allowed; callers may read only: {allowed}"
        table = arg1 if action in _TABLE_IN_ARG1 else arg2 if action in _TABLE_IN_ARG2 else None
        if table is not None and table.lower() in self.internal_tables:
            return f"table {table} is internal to the assistant: it may be read, not changed"
        return ""

    def deny_not_quick(self) -> None:
        """A function refused on the loop's reader while its statement runs (`loop_reader`)."""
        self._deny(Denial.NOT_QUICK, "not for the loop's own reader")

    def _deny(self, denial: Denial, reason: str) -> int:
        if self.denial is None:
            self.denial, self.reason = denial, reason
        return apsw.SQLITE_DENY

    def begin(self, mode: Mode) -> None:
        self.mode = mode
        self.denial = None
        self.reason = ""
