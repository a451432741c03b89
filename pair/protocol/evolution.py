"""Breaking changes between two releases' `rpc.discover` documents (a JSON-RPC `buf breaking`).

The rules a release keeps toward the one before it, so that either side can be
upgraded alone (README, "Upgrading one side at a time"):

- No method goes away, and none becomes admin only.
- Params: everything the old release accepted is still accepted. No member goes
  away (the daemons refuse unknown members, so an old caller sending it would be
  refused), none becomes required, no type narrows, no enum value goes, no bound
  tightens. New members are optional.
- Results: everything an old caller reads is still there. No required member
  goes away or becomes optional, no type widens (a caller could not read it).
  New members and new enum values may appear: callers tolerate both.

`python -m pair.protocol.evolution OLD.json NEW.json` prints the breaking changes
and exits 1 when there are any.
"""

from __future__ import annotations

import json
import sys
from typing import Any

Schema = dict[str, Any]

_LOWER = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each way `new` breaks a caller or a reader of `old`, one line each."""
    problems: list[str] = []
    olds = {method["name"]: method for method in old["methods"]}
    news = {method["name"]: method for method in new["methods"]}
    for name, was in olds.items():
        now = news.get(name)
        if now is None:
            problems.append(f"{name}: the method was removed")
            continue
        if now.get("x-admin") and not was.get("x-admin"):
            problems.append(f"{name}: the method became admin only")
        compare = _Compare(old, new, problems)
        compare.accepts(_params_schema(was), _params_schema(now), f"{name} params $")
        compare.produces(was["result"]["schema"], now["result"]["schema"], f"{name} result $")
    return problems


def _params_schema(method: dict[str, Any]) -> Schema:
    return {
        "type": "object",
        "properties": {param["name"]: param["schema"] for param in method["params"]},
        "required": [param["name"] for param in method["params"] if param["required"]],
    }


class _Compare:
    def __init__(self, old: dict[str, Any], new: dict[str, Any], problems: list[str]) -> None:
        self.old_components = old.get("components", {}).get("schemas", {})
        self.new_components = new.get("components", {}).get("schemas", {})
        self.problems = problems

    def accepts(self, old: Schema, new: Schema, path: str) -> None:
        """`new` accepts every value `old` accepted (params)."""
        old, new = self._resolve(old, self.old_components), self._resolve(new, self.new_components)
        olds, news = _alternatives(old), _alternatives(new)
        if len(olds) > 1 or len(news) > 1:
            for index, alternative in enumerate(olds):
                if not any(self._quietly(self.accepts, alternative, n) for n in news):
                    self.problems.append(f"{path}: alternative {index} is no longer accepted")
            return
        self._types(old, new, path, widen_ok=True)
        allowed: list[Any] | None = new.get("enum")
        if "enum" in old and allowed is not None:
            gone = [value for value in old["enum"] if value not in allowed]
            if gone:
                self.problems.append(f"{path}: no longer accepts {_listed(gone)}")
        for key in _LOWER:
            if key in new and new[key] > old.get(key, float("-inf")):
                self.problems.append(f"{path}: {key} tightened to {new[key]}")
        for key in _UPPER:
            if key in new and new[key] < old.get(key, float("inf")):
                self.problems.append(f"{path}: {key} tightened to {new[key]}")
        if "items" in old and "items" in new:
            self.accepts(old["items"], new["items"], f"{path}[]")
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        for member, schema in old_props.items():
            if member not in new_props:
                self.problems.append(f"{path}.{member}: the member was removed")
            else:
                self.accepts(schema, new_props[member], f"{path}.{member}")
        newly = set(new.get("required", ())) - set(old.get("required", ()))
        for member in sorted(newly):
            self.problems.append(f"{path}.{member}: the member became required")

    def produces(self, old: Schema, new: Schema, path: str) -> None:
        """Every value `new` produces reads as `old` said it would (results)."""
        old, new = self._resolve(old, self.old_components), self._resolve(new, self.new_components)
        olds, news = _alternatives(old), _alternatives(new)
        if len(olds) > 1 or len(news) > 1:
            for index, alternative in enumerate(news):
                if not any(self._quietly(self.produces, o, alternative) for o in olds):
                    self.problems.append(f"{path}: alternative {index} is new to its readers")
            return
        self._types(new, old, path, widen_ok=False)
        if "items" in old and "items" in new:
            self.produces(old["items"], new["items"], f"{path}[]")
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        new_required = set(new.get("required", ()))
        for member in old.get("required", ()):
            if member not in new_props:
                self.problems.append(f"{path}.{member}: the member was removed")
            elif member not in new_required:
                self.problems.append(f"{path}.{member}: the member became optional")
        for member, schema in old_props.items():
            if member in new_props:
                self.produces(schema, new_props[member], f"{path}.{member}")

    def _types(self, narrow: Schema, wide: Schema, path: str, *, widen_ok: bool) -> None:
        """The types of `narrow` are all types of `wide` (an integer is a number)."""
        narrow_types, wide_types = _types_of(narrow), _types_of(wide)
        if narrow_types is None or wide_types is None:
            return
        missing = {t for t in narrow_types if not (t in wide_types or _widens(t, wide_types))}
        if missing:
            change = "narrowed" if widen_ok else "widened"
            self.problems.append(f"{path}: the type {change} ({_listed(sorted(missing))})")

    def _quietly(self, check: Any, old: Schema, new: Schema) -> bool:
        found: list[str] = []
        saved, self.problems = self.problems, found
        try:
            check(old, new, "")
        finally:
            self.problems = saved
        return not found

    @staticmethod
    def _resolve(schema: Schema, components: dict[str, Any]) -> Schema:
        seen = 0
        while "$ref" in schema and seen < 32:
            schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
            seen += 1
        return schema


def _alternatives(schema: Schema) -> list[Schema]:
    return list(schema.get("anyOf") or schema.get("oneOf") or [schema])


def _types_of(schema: Schema) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    return {kind} if isinstance(kind, str) else set(kind)


def _widens(kind: str, into: set[str]) -> bool:
    return kind == "integer" and "number" in into


def _listed(values: list[Any]) -> str:
    return ", ".join(json.dumps(value) for value in values)


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: python -m pair.protocol.evolution OLD.json NEW.json", file=sys.stderr)
        return 2
    with open(sys.argv[1]) as old, open(sys.argv[2]) as new:
        problems = breaking_changes(json.load(old), json.load(new))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
