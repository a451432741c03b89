"""`pairctl methods`, `describe` and `sql`: what a daemon offers, and its database by hand.

`methods` and `describe` read the daemon's own `rpc.discover` document, so they
list what the running version has, not what this pairctl was built with.
"""

from __future__ import annotations

import json
import math
import shutil
from typing import Any

from pair.ctl import render

# Below this a summary is cut no further; the table is then wider than the terminal.
SUMMARY_MIN = 24
# The terminal's width when stdout is not one (a pipe, a file).
DEFAULT_COLUMNS = 120
# What --bind's value is when it is not JSON: text, as typed. `I` and `N` are tried
# so that Infinity and NaN are refused as numbers, not bound as text by surprise.
_JSON_START = set('-0123456789[{"') | {"t", "f", "n", "I", "N"}
# The spellings of a parameter's name; db_proxy's bind is keyed by the bare name.
_PREFIXES = ":@$"


@render.reads_answer
def methods_table(documents: dict[str, dict[str, Any]]) -> str:
    rows = [
        [daemon, method["name"], _params_line(method), _result_name(method), method["summary"]]
        for daemon, document in documents.items()
        for method in sorted(document["methods"], key=lambda m: str(m["name"]))
    ]
    header = ["DAEMON", "METHOD", "PARAMS", "RESULT", "SUMMARY"]
    # The summary takes what the other columns leave of the terminal's width.
    used = sum(max(len(str(row[i])) for row in [header, *rows]) + 2 for i in range(4))
    width = max(SUMMARY_MIN, shutil.get_terminal_size((DEFAULT_COLUMNS, 24)).columns - used)
    return render.table(header, [[*row[:4], _short(row[4], width)] for row in rows])


@render.reads_answer
def describe(document: dict[str, Any], method: dict[str, Any]) -> str:
    """A method of `document`: its description, params (name, type, required) and
    result fields."""
    name = method["name"]
    components = document.get("components", {}).get("schemas", {})
    params = [
        [
            p["name"],
            _type_of(p["schema"]),
            "required" if p["required"] else "optional",
            _limits_of(p["schema"]) or "-",
        ]
        for p in method["params"]
    ]
    result = method["result"]["schema"]
    fields = [
        [field, _type_of(schema), "required" if required else "optional"]
        for field, schema, required in _fields_of(result, components)
    ]
    parts = [
        render.escaped(f"{name}: {method['description']}"),
        "",
        "params:",
        render.table(["NAME", "TYPE", "", "DEFAULT, LIMITS"], params),
        "",
        render.escaped(f"result: {_result_name(method)}"),
        render.table(["FIELD", "TYPE", ""], fields),
    ]
    return "\n".join(parts)


def _short(summary: object, width: int) -> str:
    text = " ".join(str(summary).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _limits_of(schema: dict[str, Any]) -> str:
    """What a param's schema allows beyond its type, as rpc.discover states it:
    `default 86400, 1..2592000`, `length 1..200`, `at most 500 items`."""
    said = [f"default {json.dumps(schema['default'])}"] if "default" in schema else []
    for member in [schema, *schema.get("anyOf", ())]:
        said += _bounds(member, "minimum", "maximum", "")
        said += _bounds(member, "minLength", "maxLength", "length ")
        said += _bounds(member, "minItems", "maxItems", "items ")
        if "pattern" in member:
            said.append(f"matching {member['pattern']}")
    return ", ".join(said)


def _bounds(schema: dict[str, Any], low: str, high: str, what: str) -> list[str]:
    lowest, highest = schema.get(low), schema.get(high)
    if lowest is None and highest is None:
        return []
    if highest is None:
        return [f"{what}>= {lowest}"]
    if lowest is None:
        return [f"{what}<= {highest}"]
    return [f"{what}{lowest}..{highest}"]


def _params_line(method: dict[str, Any]) -> str:
    names = [p["name"] if p["required"] else f"[{p['name']}]" for p in method["params"]]
    return " ".join(names) or "-"


def _result_name(method: dict[str, Any]) -> str:
    return _type_of(method["result"]["schema"])


def _type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return " | ".join(_type_of(member) for member in schema[union])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type_of(schema.get('items', {}))}"
    return str(kind)


def _fields_of(
    schema: dict[str, Any], components: dict[str, Any]
) -> list[tuple[str, dict[str, Any], bool]]:
    members = schema.get("anyOf", [schema])
    fields = []
    for member in members:
        ref = member.get("$ref")
        struct = components.get(str(ref).rsplit("/", 1)[-1], {}) if ref else member
        required = set(struct.get("required", ()))
        for field, field_schema in struct.get("properties", {}).items():
            fields.append((field, field_schema, field in required))
    return fields


def bind_of(pairs: list[str]) -> dict[str, Any] | None:
    """`--bind k=v` as db_proxy's named binds: v as JSON when it reads as JSON
    (42, 1.5, null, true, "007"), otherwise as the text typed. `ValueError` (a usage
    error) for a name given twice or a number that is not finite."""
    if not pairs:
        return None
    bind: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        # `a`, `:a`, `@a` and `$a` are one parameter: SQLite names them apart, but the
        # daemon binds every spelling from the bare name (apsw's dict binding), so two
        # of them could never carry two values; the second would silently win.
        name = key.lstrip(_PREFIXES)
        if not sep or not name:
            raise ValueError(f"--bind {pair!r}: expected NAME=VALUE")
        if name in bind:
            raise ValueError(
                f"--bind {pair!r}: parameter {name!r} is already bound"
                " (a, :a, @a and $a name one parameter)"
            )
        bind[name] = _value_of(name, value)
    return bind


def _value_of(name: str, text: str) -> Any:
    # Surrounding spaces make it text: ' 5' and '5 ' alike, as typed.
    if text[:1] not in _JSON_START or text != text.strip():
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not _finite(value):
        raise ValueError(
            f"--bind {name}={text}: not a finite number (it would be stored as NULL); write"
            f""" {name}='{{"$real": "Infinity"}}' for such a REAL (or "-Infinity", "NaN"),"""
            f" {name}='{json.dumps(text)}' for the text"
        )
    return value


def _finite(value: Any) -> bool:
    """Whether no number in `value` is infinite or NaN (Python's JSON reads 1e400 as
    inf, and Infinity and NaN, which JSON has not; SQLite would store them as NULL)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    return True


@render.reads_answer
def sql_result(result: dict[str, Any]) -> str:
    """Rows as a table (columns in the order of the first row) and what changed."""
    rows = result.get("rows") or []
    lines = []
    header = result.get("columns") or (list(rows[0]) if rows else [])
    if header:
        lines.append(render.table(header, [[_cell(row.get(c)) for c in header] for row in rows]))
    if result.get("truncated"):
        lines.append("(truncated: raise --max-rows)")
    count = len(rows)
    if header or "changes" not in result:
        lines.append(f"{count} row{'s' if count != 1 else ''}")
    if "changes" in result:
        lines.append(f"{result['changes']} changed")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@render.reads_answer
def method_named(document: dict[str, Any], name: str) -> str:
    """The method `name` of `document` as JSON text, or "" when it has none."""
    method = next((m for m in document["methods"] if m["name"] == name), None)
    return "" if method is None else json.dumps(method)
