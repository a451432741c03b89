"""The dispatch table: method name -> typed handler, params decoding, and `rpc.discover`.

A handler takes one params Struct and returns its result; its type hints are
the method's contract, used both to decode params (stage two of decoding)
and to generate the OpenRPC document.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec
from msgspec import Raw, Struct

from pair.protocol.deferred import Deferred
from pair.protocol.errors import InvalidParams, ParseError
from pair.protocol.hello import PROTOCOL, Hello, HelloParams, ProtocolRange, answer_hello
from pair.protocol.metrics import (
    UNKNOWN_METHOD,
    M,
    MethodCounts,
    ProtocolMetrics,
    ServerCounts,
    snapshot,
)
from pair.protocol.trace import CAPABILITY as TRACE_CAPABILITY
from pair.protocol.trace import TRACEPARENT_FORMAT, traced_params

Handler = Callable[[Any], Awaitable[Any]] | Callable[[Any], Any]

_PATH_SUFFIX = re.compile(r" - at `(?P<path>\$[^`]*)`$")
_FIELD_IN_MESSAGE = re.compile(
    r"^Object (?:contains unknown|missing required) field `(?P<f>[^`]*)`"
)
_EMPTY_OBJECT = b"{}"


class NoParams(Struct, forbid_unknown_fields=True):
    """Params of a method that takes none."""


# Every method's params also take `_meta` (protocol.trace), NoParams too.
_NO_PARAMS = traced_params(NoParams)()


class Kind(Enum):
    """How a method's handler runs (`protocol.calls` runs each kind)."""

    INLINE = "inline"  # a plain function that never blocks, called on the loop
    DEFERRED = "deferred"  # a plain function returning Deferred[T], called on the loop
    TASK = "task"  # a coroutine function, run in a task
    THREAD = "thread"  # a blocking plain function, run in a worker thread


@dataclass(slots=True)
class Method:
    """One registered method: its handler, how it runs, and its params and result types."""

    name: str
    handler: Handler
    params_type: type[Struct]
    result_type: Any
    kind: Kind
    summary: str
    decoder: msgspec.json.Decoder[Any]
    counts: MethodCounts = field(default_factory=MethodCounts)
    # Only for a peer of the daemon's own uid or root (`Connection.admin`).
    admin: bool = False

    def decode_params(self, raw: Raw) -> Any:
        """Stage two: the raw params into this method's Struct (which also takes `_meta`,
        as `.meta`), or `InvalidParams`."""
        if not raw and self.params_type is NoParams:
            return _NO_PARAMS
        body = bytes(raw) or _EMPTY_OBJECT
        try:
            if body[:1] == b"[":
                return self._decode_positional(body)
            return self.decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise invalid_params(exc) from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ParseError(f"invalid JSON in params: {exc}") from exc
        except RecursionError as exc:
            raise ParseError("invalid JSON: params nested too deeply to decode") from exc

    def _decode_positional(self, body: bytes) -> Any:
        values = msgspec.json.decode(body, type=list[Any])
        fields = msgspec.structs.fields(self.params_type)
        if len(values) > len(fields):
            raise InvalidParams(
                f"{self.name} takes at most {len(fields)} positional params, got {len(values)}",
                path=f"$[{len(fields)}]",
            )
        named = {field.encode_name: value for field, value in zip(fields, values, strict=False)}
        return msgspec.convert(named, self.decoder.type)


def _kind_of(name: str, *, is_async: bool, deferred: bool, inline: bool, thread: bool) -> Kind:
    if is_async:
        if thread:
            raise TypeError(f"{name}: a coroutine handler runs in a task, not a thread")
        return Kind.TASK
    if deferred:
        return Kind.DEFERRED
    if inline == thread:
        raise TypeError(f"{name}: a plain handler says inline=True (never blocks) or thread=True")
    return Kind.INLINE if inline else Kind.THREAD


def invalid_params(exc: msgspec.ValidationError) -> InvalidParams:
    """Translate msgspec's message into `InvalidParams` with `data.path` set to the field."""
    message = str(exc)
    match = _PATH_SUFFIX.search(message)
    path = match["path"] if match else "$"
    field = _FIELD_IN_MESSAGE.match(message)
    if field:
        path = f"{path}.{field['f']}"
    elif path.endswith("._meta.traceparent") and message.startswith("Expected `str` matching"):
        message = f"Expected {TRACEPARENT_FORMAT} - at `{path}`"
    return InvalidParams(message, path=path)


class Router:
    """The dispatch table of one server."""

    def __init__(self, name: str, version: str, protocol: ProtocolRange = PROTOCOL) -> None:
        self.name = name
        self.version = version
        # The wire protocol versions this server speaks (another range only in tests of
        # version skew).
        self.protocol = protocol
        self._methods: dict[str, Method] = {}
        # Calls naming no registered method, and the server's connections (protocol.metrics).
        self.unknown_counts = MethodCounts()
        self.server_counts = ServerCounts()
        # rpc.discover's answer, encoded once: building it took 4.3 ms of the loop
        # per call, and pipelined calls stalled every other connection.
        self._document: msgspec.Raw | None = None
        self.add("rpc.discover", self._discover, inline=True)
        self.add("pair.hello", self._hello, inline=True)

    def add(
        self,
        name: str,
        handler: Handler,
        *,
        inline: bool = False,
        thread: bool = False,
        admin: bool = False,
        observe: Callable[[Any, str | None], None] | None = None,
    ) -> None:
        """Register `handler` under `name`; its annotations give the params and result types.

        The kind follows from the handler: a coroutine function is a TASK, a
        plain function returning `Deferred[T]` is DEFERRED. Any other plain
        function must say how it runs: `inline=True` (it never blocks) or
        `thread=True` (it does), so none takes a thread hop by accident.
        `observe(result, error_code)` sees each answer (`protocol.metrics`).
        An `admin` method answers FORBIDDEN to any peer but the daemon's own uid and
        root, whatever `--allow-uid` and `--allow-group` let connect.
        """
        if name in self._methods:
            raise ValueError(f"method {name!r} is registered twice")
        self._document = None
        hints = typing.get_type_hints(handler)
        params = [hint for key, hint in hints.items() if key != "return"]
        params_type = params[0] if params else NoParams
        if not (isinstance(params_type, type) and issubclass(params_type, Struct)):
            raise TypeError(f"{name}: the params annotation must be a msgspec Struct")
        is_async = inspect.iscoroutinefunction(handler)
        if inline and is_async:
            raise TypeError(f"{name}: an inline handler is a plain function")
        result_type = hints.get("return", Any)
        deferred = typing.get_origin(result_type) is Deferred
        if not deferred and hasattr(typing.get_origin(result_type) or result_type, "then"):
            raise TypeError(f"{name}: annotate a handler that returns a job as Deferred[...]")
        if deferred:
            if is_async or inline or thread:
                raise TypeError(f"{name}: a Deferred handler is a plain function, not inline")
            (result_type,) = typing.get_args(result_type)
        self._methods[name] = Method(
            name=name,
            handler=handler,
            params_type=params_type,
            result_type=result_type,
            kind=_kind_of(name, is_async=is_async, deferred=deferred, inline=inline, thread=thread),
            summary=inspect.getdoc(handler) or "",
            decoder=msgspec.json.Decoder(traced_params(params_type)),
            admin=admin,
        )
        self._methods[name].counts.observe = observe

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    @property
    def methods(self) -> list[Method]:
        return list(self._methods.values())

    def protocol_metrics(self, kind: type[M] = ProtocolMetrics, **extra: Any) -> M:  # type: ignore[assignment]
        """What the server counted of calls and connections, as `kind`: a daemon's
        `metrics` answer type, with its own fields in `extra`."""
        counts = {method.name: method.counts for method in self._methods.values()}
        counts[UNKNOWN_METHOD] = self.unknown_counts
        return snapshot(counts, self.server_counts, kind, **extra)

    def _hello(self, params: HelloParams) -> Hello:
        """Who this daemon is, its release, the wire protocol versions it speaks and its
        capabilities (its methods). A client calls it on every
        (re)connect and uses a feature only when named here; a caller whose `protocol`
        range misses this daemon's is answered PROTOCOL_UNSUPPORTED (426), with this
        daemon's name, release and range in `data` (`daemon`, `version`, `protocol`)."""
        return answer_hello(
            params,
            daemon=self.name,
            version=self.version,
            ours=self.protocol,
            capabilities=[*self._methods, TRACE_CAPABILITY],
        )

    def _discover(self, params: NoParams) -> msgspec.Raw:
        """An OpenRPC document of every method, its params and result as JSON Schema."""
        if self._document is None:
            self._document = msgspec.Raw(msgspec.json.encode(openrpc_document(self)))
        return self._document


def openrpc_document(router: Router) -> dict[str, Any]:
    """Generate the OpenRPC document from the registered handlers' msgspec types."""
    methods = router.methods
    # Untagged unions of Structs have no single schema in msgspec: each member
    # gets its own and the result is their anyOf.
    result_members = [_union_members(m.result_type) for m in methods]
    all_types: list[Any] = [m.params_type for m in methods]
    for members in result_members:
        all_types.extend(members)
    schemas, components = msgspec.json.schema_components(
        all_types, ref_template="#/components/schemas/{name}"
    )
    result_schemas = iter(schemas[len(methods) :])
    described = []
    for index, method in enumerate(methods):
        members = [next(result_schemas) for _ in result_members[index]]
        result = members[0] if len(members) == 1 else {"anyOf": members}
        described.append(
            {
                "name": method.name,
                "summary": method.summary.split("\n\n")[0],
                "description": method.summary,
                "paramStructure": "either",
                "params": _params_of(schemas[index], components),
                "result": {"name": "result", "schema": result},
                **({"x-admin": True} if method.admin else {}),
            }
        )
    return {
        "openrpc": "1.3.2",
        "info": {"title": router.name, "version": router.version},
        "methods": described,
        "components": {"schemas": components},
    }


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _params_of(schema: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    name = schema["$ref"].rsplit("/", 1)[-1]
    struct = components[name]
    required = set(struct.get("required", ()))
    return [
        {"name": field, "required": field in required, "schema": field_schema}
        for field, field_schema in struct.get("properties", {}).items()
    ]
