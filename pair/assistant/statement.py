"""One caller statement as db_proxy runs it: the single-statement and bind checks, its
cursor (closed whatever happens), and its rows read into an answer of bounded size."""

from __future__ import annotations

import contextlib
import itertools
import re
from math import isfinite
from typing import Any

import apsw

from pair.assistant.db import GuardedConn
from pair.assistant.policy import Mode
from pair.protocol.errors import InvalidParams, ResultTooLarge
from pair.protocol.values import SqlBind, to_wire
from pair.runtime.sqlite import timeout_error

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
# A cell's share of a row's JSON besides its text and its column's name: quotes,
# punctuation, a number. Texts count their UTF-8 bytes, blobs their base64 and
# wrapper; so the count is the answer's size to within a few bytes a cell.
CELL_BYTES = 24
BLOB_WRAPPER = len('{"$blob":""}')
CHECKED_SQL_MAX = 1024
CHECKED_SQL_MAX_CHARS = 16 * 1024
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?(\*/|$)", re.DOTALL)


class NotOneStatement(InvalidParams):
    """`sql` holds more than one statement where one is expected (not `mode=exec`)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            "sql must be exactly one statement (use mode=exec for a script)", path=path
        )


class Statement:
    """One caller statement: policy mode, single-statement and bind checks at prepare time."""

    __slots__ = ("bind", "columns", "conn", "sql", "step", "traced")

    def __init__(
        self, conn: GuardedConn, sql: str, bind: SqlBind | None, step: int | None = None
    ) -> None:
        self.conn = conn
        self.sql = sql
        self.bind = bind
        self.step = step
        self.columns: list[str] = []
        self.traced = False

    @property
    def path(self) -> str:
        """Where the statement is in the call's params, for an answer."""
        return "$" if self.step is None else f"$.steps[{self.step}]"

    def open(self, mode: Mode, *, single: bool = True) -> apsw.Cursor:
        """The statement started: its cursor, on its first row, for `read_rows` or `run_out`.

        Whatever fails here or in those closes the cursor at once. A cursor left open
        mid-statement keeps its statement in progress: on the writer no transaction
        can commit again ("SQL statements in progress"), on a reader its snapshot
        stays old; and an exception's traceback holds it in a reference cycle until
        the cycle collector runs, which on an idle daemon may be never. On success
        it has run to its end, and is done with when dropped.
        """
        cursor = self.conn.db.cursor()
        try:
            self._execute(cursor, mode, single)
        except BaseException:
            cursor.close(True)
            raise
        return cursor

    def run_out(self, cursor: apsw.Cursor) -> None:
        """Run the rest of a script (`open(single=False)`), closing the cursor on failure."""
        try:
            for _ in cursor:
                pass
        except BaseException:
            cursor.close(True)
            raise

    def _execute(self, cursor: apsw.Cursor, mode: Mode, single: bool) -> None:
        self.conn.guard.begin(mode)
        # A text already checked to be one statement skips the trace callback;
        # its columns, if it has any, come from the running statement. Named
        # binds are always traced, to check for unknown names. A script runs
        # as written (the authorizer still checks each statement).
        checked = None if type(self.bind) is dict else self.conn.checked_sql.get(self.sql)
        if single and checked is None:
            cursor.exec_trace = self._check_single
        elif not single:
            cursor.exec_trace = self._within_deadline
        try:
            cursor.execute(self.sql, self.bind)
        except KeyError as exc:
            raise InvalidParams(
                f"bind is missing named parameter {exc.args[0]!r}", path=f"{self.path}.bind"
            ) from exc
        if single and checked:
            try:
                self.columns = [column[0] for column in cursor.description]
            except apsw.ExecutionCompleteError:
                self.columns = self._probe_columns(cacheable=True)  # no row came

    def _within_deadline(self, _cursor: apsw.Cursor, _statement: str, _bindings: object) -> bool:
        # Before each statement of a script: see `Deadline.passed`.
        if self.conn.deadline.passed():
            raise timeout_error()
        return True

    def _probe_columns(self, *, cacheable: bool) -> list[str]:
        """The statement's columns, from preparing it again and stopping before it runs.

        Uncached, to see a schema change: apsw keeps the description it gave
        the trace callback of a statement that SQLite then re-prepared.
        """
        probe = self.conn.db.cursor()
        probe.exec_trace = self._capture_columns
        try:
            with contextlib.suppress(apsw.ExecTraceAbort):
                probe.execute(self.sql, self.bind, can_cache=cacheable)
        finally:
            probe.close(True)
        return self.columns

    def _capture_columns(self, cursor: apsw.Cursor, _statement: str, _bindings: object) -> bool:
        self.columns = [column[0] for column in cursor.description]
        return False

    def _check_single(self, cursor: apsw.Cursor, statement: str, _bindings: object) -> bool:
        if self.traced:
            # apsw traces what follows the statement too: a trailing comment is
            # nothing to run, and must not replace the statement's columns.
            if _COMMENTS.sub("", statement).strip(" \t\r\n;"):
                raise NotOneStatement(f"{self.path}.sql")
            return True
        self.traced = True
        if statement != self.sql:
            start = self.sql.find(statement)
            rest = self.sql[start + len(statement) :] if start >= 0 else ""
            if _COMMENTS.sub("", rest).strip(" \t\r\n;"):
                raise NotOneStatement(f"{self.path}.sql")
        self._check_bind(cursor)
        description = cursor.description
        self.columns = [column[0] for column in description] if description else []
        if len(self.sql) <= CHECKED_SQL_MAX_CHARS:
            checked = self.conn.checked_sql
            if len(checked) >= CHECKED_SQL_MAX:
                checked.clear()
            checked[self.sql] = bool(description)
        return True

    def _check_bind(self, cursor: apsw.Cursor) -> None:
        # apsw has already checked counts, positional-vs-named and missing
        # names when it bound; what it lets pass is a name nobody uses.
        bind = self.bind
        if not isinstance(bind, dict):
            return
        unknown = sorted(set(bind) - set(cursor.bindings_names))
        if unknown:
            raise InvalidParams(
                f"bind has a parameter the statement does not use: {unknown[0]!r}",
                path=f"{self.path}.bind.{unknown[0]}",
            )

    def read_rows(
        self, cursor: apsw.Cursor, max_rows: int, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> tuple[list[dict[str, Any]], bool]:
        """All rows as objects, keeping at most `max_rows` and `max_bytes` of their JSON;
        the statement always runs to the end. Rows that could not fit a frame, whatever
        `max_bytes` allows, are not kept one past the limit: `ResultTooLarge` at once."""
        try:
            return self._read_rows(cursor, max_rows, max_bytes)
        except BaseException:
            cursor.close(True)
            raise

    def _read_rows(
        self, cursor: apsw.Cursor, max_rows: int, max_bytes: int
    ) -> tuple[list[dict[str, Any]], bool]:
        columns = self.columns
        rows: list[dict[str, Any]] = []
        append = rows.append
        frame_bytes = self.conn.frame_bytes
        limit = min(max_bytes, frame_bytes)
        names = _names_bytes(columns)
        size = 0
        truncated = False
        for row in itertools.islice(cursor, max_rows):
            if len(row) != len(columns):
                columns = self._probe_columns(cacheable=False)
                names = _names_bytes(columns)
            # The row's JSON: its names, a fixed share per cell, every text's UTF-8
            # and every blob's base64. One pass over the cells also finds those with
            # no plain JSON form (a blob, a non-finite REAL): this loop is most of a
            # point query's Python.
            size += names + CELL_BYTES * len(row)
            plain = True
            for value in row:
                kind = type(value)
                if kind is str:
                    size += len(value) if value.isascii() else len(value.encode())
                elif kind is bytes:
                    size += (len(value) + 2) // 3 * 4 + BLOB_WRAPPER
                    plain = False
                elif kind is float and not isfinite(value):
                    plain = False
            if size > limit:
                if limit == frame_bytes:
                    raise ResultTooLarge(
                        f"the rows pass the frame limit of {frame_bytes} bytes before maxRows"
                        " or maxBytes stops them; ask for fewer rows or a smaller maxBytes"
                    )
                truncated = True
                break
            if plain:
                append(dict(zip(columns, row, strict=True)))
            else:
                append({name: to_wire(value) for name, value in zip(columns, row, strict=True)})
        for _ in cursor:
            truncated = True
        return rows, truncated


def _names_bytes(columns: list[str]) -> int:
    # Each name quoted, with its colon and comma; in one C-level pass.
    return len("".join(columns).encode()) + 4 * len(columns)
