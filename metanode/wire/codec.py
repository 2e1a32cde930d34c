"""The one msgpack codec of metanode (design §5, contract §7). Pure: no I/O, no clocks.

Every object that crosses a process boundary (raft messages, and later the hello
frame, forwarded requests, state machine commands, snapshots) is an ``attrs`` class
turned into msgpack by the single ``cattrs`` converter of this module, `converter`.

Encoding:

* an attrs class is a msgpack map from field name to value; fields whose default is
  ``None`` are left out while they are ``None``;
* a class registered with ``as_list=True`` is a compact array of its fields in
  declaration order: `LogId` is ``[term, index]`` (11 bytes shorter than a map per
  log id; decoding it is only ~0.3 us faster, within noise on a 2-core box);
* a member of a *tagged union* carries its tag (the class's ``TAG``) under ``"t"``,
  first in the map: ``{"t": "vote", "term": 3, "src": 1, ...}``;
* ``bytes`` stay msgpack ``bin``, ``str`` msgpack ``str``, an ``IntEnum`` its int,
  tuples and lists arrays.

Decoding is strict: an int field takes only an int (not ``"1"``, not ``True``, not
``1.0``), every int fits in a signed 64-bit integer, fields of classes registered
with ``unsigned=True`` (every raft type) are never negative, extra or missing fields
are refused, arrays are arrays (a ``bin`` is not a tuple of ints) and maps are maps.
Anything wrong becomes a `DecodeError` whose message names the path of each problem
(``$.entries[2].term: expected an int, got str '1'``), never a bare ``KeyError``,
``TypeError`` or ``ExceptionGroup``.

Registering more types: attrs classes work without registration. Call
`register_class` (unsigned ints, list encoding, an extra check) and
`register_tagged_union` (a union of classes that each have ``TAG: ClassVar[str]``)
before the first encode or decode of those types; hooks are generated once, so a late
registration is refused with ``RuntimeError`` instead of silently ignored.
"""

from __future__ import annotations

import collections.abc
import enum
import functools
import operator
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, Union, cast

import attrs
import cattrs
import msgpack
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
    StructureHandlerNotFoundError,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from metanode.raft.messages import MESSAGE_TYPES, AppendRequest, AppendResponse, Message
from metanode.raft.types import (
    Entry,
    EntryKind,
    HardState,
    LogId,
    Membership,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)
from metanode.wire.errors import DecodeError, EncodeError

__all__ = [
    "PROTOCOL_VERSION",
    "TAG_KEY",
    "converter",
    "decode",
    "decode_message",
    "decode_tagged",
    "encode",
    "encode_message",
    "pack",
    "register_class",
    "register_tagged_union",
    "structure",
    "unpack",
    "unstructure",
]

T = TypeVar("T")

#: Version of the raft-port protocol, carried by the hello frame (contract §7).
PROTOCOL_VERSION = 1

#: The map key holding the tag of a tagged-union member.
TAG_KEY = "t"

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

_MAX_REPORTED_ERRORS = 5


# --------------------------------------------------------------------------- helpers


def _describe(value: object) -> str:
    """A short description of a bad value for an error message."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    name = _UNION_NAMES.get(tp)
    if name is not None:
        return name
    return getattr(tp, "__name__", None) or repr(tp)


class _UInt(int):
    """Type marker (never instantiated): an int in [0, 2**63). See `register_class`."""


# ------------------------------------------------------------------- strict scalars


def _structure_int(value: Any, _: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an int, got {_describe(value)}")
    if value < INT64_MIN or value > INT64_MAX:
        raise ValueError(f"integer {value} does not fit in 64 bits (signed)")
    return value


def _structure_uint(value: Any, _: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected a non-negative int, got {_describe(value)}")
    if value < 0:
        raise ValueError(f"expected a non-negative int, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"integer {value} does not fit in 64 bits (signed)")
    return value


def _exact(tp: type, what: str) -> Callable[[Any, Any], Any]:
    """A structure hook accepting exactly `tp` (no bool for int, no "1" for 1)."""

    def structure(value: Any, _: Any) -> Any:
        if type(value) is not tp:
            raise TypeError(f"expected {what}, got {_describe(value)}")
        return value

    return structure


_ENUM_TABLES: dict[type, tuple[type, dict[Any, enum.Enum]]] = {}


def _enum_table(tp: type[enum.Enum]) -> tuple[type, dict[Any, enum.Enum]]:
    table = _ENUM_TABLES.get(tp)
    if table is None:
        members = {m.value: m for m in tp}
        # The type of the values says what the wire carries (an int or a str).
        value_types = {type(v) for v in members}
        value_type = value_types.pop() if len(value_types) == 1 else object
        table = _ENUM_TABLES[tp] = (value_type, members)
    return table


def _structure_enum(value: Any, tp: type[enum.Enum]) -> enum.Enum:
    value_type, members = _ENUM_TABLES.get(tp) or _enum_table(tp)
    if value_type is not object and type(value) is not value_type:
        what = {int: "an int", str: "a str"}.get(value_type, value_type.__name__)
        raise TypeError(f"expected {tp.__name__} ({what}), got {_describe(value)}")
    try:
        return members[value]
    except (KeyError, TypeError):
        raise ValueError(f"{value!r} is not a valid {tp.__name__}") from None


# --------------------------------------------------------------------- collections


def _collect(
    items: Iterator[tuple[Any, Any]], hook: Callable[[Any, Any], Any] | None, tp: Any
) -> tuple[list[Any], list[Exception]]:
    """Structure (index, value, type) items one by one, noting where each error is."""
    res: list[Any] = []
    errors: list[Exception] = []
    for ix, (value, elem_type) in items:
        try:
            h = hook if hook is not None else converter.get_structure_hook(elem_type)
            res.append(h(value, elem_type))
        except Exception as exc:  # noqa: BLE001 - re-raised below, grouped
            note = IterableValidationNote(f"Structuring {tp} @ index {ix}", ix, elem_type)
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]
            errors.append(exc)
    return res, errors


def _is_homogeneous(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in (tuple, list, frozenset, set):
        return True
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis
    return origin in (
        list,
        frozenset,
        set,
        collections.abc.Sequence,
        collections.abc.MutableSequence,
        collections.abc.Set,
        collections.abc.MutableSet,
    )


def _homogeneous_factory(tp: Any) -> Callable[[Any, Any], Any]:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    elem_type = args[0] if args else Any
    make: Callable[[list[Any]], Any] = {
        tuple: tuple,
        collections.abc.Sequence: tuple,
        list: list,
        collections.abc.MutableSequence: list,
        frozenset: frozenset,
        collections.abc.Set: frozenset,
        set: set,
        collections.abc.MutableSet: set,
    }[origin]
    hook = converter.get_structure_hook(elem_type)

    def structure_seq(value: Any, _: Any) -> Any:
        if type(value) is not list:
            raise TypeError(f"expected an array, got {_describe(value)}")
        try:
            return make([hook(v, elem_type) for v in value])
        except Exception:  # noqa: BLE001 - redo slowly to say which element is wrong
            pass
        res, errors = _collect(((i, (v, elem_type)) for i, v in enumerate(value)), hook, tp)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return make(res)  # pragma: no cover - the fast path failed but this did not

    return structure_seq


def _is_hetero_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis)


def _hetero_tuple_factory(tp: Any) -> Callable[[Any, Any], Any]:
    elem_types = typing.get_args(tp)
    if elem_types == ((),):  # tuple[()]
        elem_types = ()

    def structure_tuple(value: Any, _: Any) -> Any:
        if type(value) is not list:
            raise TypeError(f"expected an array, got {_describe(value)}")
        if len(value) != len(elem_types):
            raise ValueError(f"expected an array of {len(elem_types)}, got {len(value)} items")
        res, errors = _collect(enumerate(zip(value, elem_types, strict=True)), None, tp)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return tuple(res)

    return structure_tuple


def _is_mapping(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _mapping_factory(tp: Any) -> Callable[[Any, Any], Any]:
    args = typing.get_args(tp)
    key_type, value_type = args if args else (Any, Any)
    key_hook = converter.get_structure_hook(key_type)
    value_hook = converter.get_structure_hook(value_type)

    def structure_mapping(value: Any, _: Any) -> Any:
        if type(value) is not dict:
            raise TypeError(f"expected a map, got {_describe(value)}")
        res = {}
        errors: list[Exception] = []
        for k, v in value.items():
            try:
                res[key_hook(k, key_type)] = value_hook(v, value_type)
            except Exception as exc:  # noqa: BLE001 - re-raised below, grouped
                note = IterableValidationNote(f"Structuring {tp} @ key {k!r}", k, value_type)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return res

    return structure_mapping


# ------------------------------------------------------------------- attrs classes


@attrs.frozen
class _ClassOptions:
    unsigned: bool = False
    as_list: bool = False
    check: Callable[[Any], None] | None = None


_CLASS_OPTIONS: dict[type, _ClassOptions] = {}
_GENERATED: set[type] = set()
_UNION_NAMES: dict[Any, str] = {}


def _unsigned_type(tp: Any) -> Any:
    """`tp` with every `int` inside it replaced by the `_UInt` marker."""
    if tp is int:
        return _UInt
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is None or not args:
        return tp
    new_args = tuple(a if a is Ellipsis else _unsigned_type(a) for a in args)
    if new_args == args:
        return tp
    if origin in (Union, types.UnionType):
        return functools.reduce(operator.or_, new_args)
    if origin is tuple:
        return tuple[new_args]  # type: ignore[valid-type]
    return tp  # other generics keep plain (signed) ints


def _field_hooks(cls: type, options: _ClassOptions) -> dict[str, tuple[Any, Any]]:
    """For each field: (type as structured, its structure hook)."""
    result = {}
    for a in attrs.fields(cls):
        tp = _unsigned_type(a.type) if options.unsigned else a.type
        result[a.name] = (tp, converter.get_structure_hook(tp))
    return result


def _generate(name: str, lines: list[str], globs: dict[str, Any]) -> Any:
    source = "\n".join(lines)
    filename = f"<metanode.wire generated {name}>"
    exec(compile(source, filename, "exec"), globs)  # noqa: S102 - our own source
    return globs[name]


def _call_as(tp: Any, hook: Callable[[Any, Any], Any], value: Any, _: Any) -> Any:
    return hook(value, tp)


def _structure_attrs_factory(cls: type) -> Callable[[Any, Any], Any]:
    """A strict structure hook for an attrs class, in two halves.

    The fast half is generated code doing the least possible on good input; on any
    failure the slow half runs cattrs' detailed validation, which raises an error
    noting the path of every problem (so bad input costs two passes, good input one).
    """
    attrs.resolve_types(cls)
    _GENERATED.add(cls)
    options = _CLASS_OPTIONS.get(cls, _ClassOptions())
    check = options.check
    name = cls.__name__
    fields = [a for a in attrs.fields(cls) if a.init]
    hooks = _field_hooks(cls, options)
    globs: dict[str, Any] = {"__cl": cls, "__check": check}
    args: list[str] = []
    kwargs: list[str] = []

    if options.as_list:
        if any(a.kw_only for a in fields):
            raise TypeError(f"{name}: as_list needs positional fields")
        n = len(fields)

        def slow_list(value: Any) -> Any:
            if type(value) is not list:
                raise TypeError(f"expected {name} as an array, got {_describe(value)}")
            if len(value) != n:
                raise ValueError(f"expected {name} as an array of {n}, got {len(value)} items")
            types_ = [hooks[a.name][0] for a in fields]
            res, errors = _collect(enumerate(zip(value, types_, strict=True)), None, cls)
            if errors:
                raise IterableValidationError(f"While structuring {name}", errors, cls)
            obj = cls(*res)
            if check is not None:
                check(obj)
            return obj

        globs["__slow"] = slow_list
        for i, a in enumerate(fields):
            globs[f"__t{i}"], globs[f"__h{i}"] = hooks[a.name]
            args.append(f"__h{i}(o[{i}], __t{i})")
        guard = f"o.__class__ is not list or len(o) != {n}"
    else:
        # cattrs calls an override with the field's declared type: bind ours instead.
        overrides = {
            a.name: override(struct_hook=functools.partial(_call_as, *hooks[a.name]))
            for a in fields
            if hooks[a.name][0] is not a.type
        }
        # cattrs types **kwargs as its bool options, but they take AttributeOverrides.
        detailed: Callable[[Any, type], Any] = make_dict_structure_fn(
            cls,
            converter,
            _cattrs_forbid_extra_keys=True,
            _cattrs_detailed_validation=True,
            **overrides,  # type: ignore[arg-type]
        )

        def slow_map(value: Any) -> Any:
            if type(value) is not dict:
                raise TypeError(f"expected {name} as a map, got {_describe(value)}")
            obj = detailed(value, cls)
            if check is not None:
                check(obj)
            return obj

        globs["__slow"] = slow_map
        globs["__allowed"] = frozenset(a.name for a in fields)
        for i, a in enumerate(fields):
            globs[f"__t{i}"], globs[f"__h{i}"] = hooks[a.name]
            expr = f"__h{i}(o[{a.name!r}], __t{i})"
            if isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
                if a.default.takes_self:
                    raise TypeError(f"{name}.{a.name}: Factory(takes_self=True) is not supported")
                globs[f"__d{i}"] = a.default.factory
                expr = f"({expr} if {a.name!r} in o else __d{i}())"
            elif a.default is not attrs.NOTHING:
                globs[f"__d{i}"] = a.default
                expr = f"({expr} if {a.name!r} in o else __d{i})"
            if a.kw_only:
                kwargs.append(f"{a.alias}={expr}")
            else:
                args.append(expr)
        guard = "o.__class__ is not dict or not __allowed.issuperset(o)"

    fn = f"structure_{name}"
    lines = [
        f"def {fn}(o, _=None):",
        f"    if {guard}:",
        "        return __slow(o)",
        "    try:",
        f"        obj = __cl({', '.join(args + kwargs)})",
        "    except Exception:",
        "        return __slow(o)",
    ]
    if check is not None:
        lines.append("    __check(obj)")
    lines.append("    return obj")
    return _generate(fn, lines, globs)  # type: ignore[no-any-return]


def _unstructure_attrs_factory(cls: type) -> Callable[[Any], Any]:
    attrs.resolve_types(cls)
    _GENERATED.add(cls)
    options = _CLASS_OPTIONS.get(cls, _ClassOptions())
    fields = attrs.fields(cls)
    if options.as_list:
        hooks = [converter.get_unstructure_hook(a.type) for a in fields]
        names = [a.name for a in fields]
        if all(a.type in (int, bool, str, bytes, float) for a in fields):
            getter = operator.attrgetter(*names)
            if len(names) == 1:
                return lambda obj: [getter(obj)]
            return lambda obj: list(getter(obj))
        pairs = list(zip(names, hooks, strict=True))
        return lambda obj: [h(getattr(obj, n)) for n, h in pairs]
    overrides = {a.name: override(omit_if_default=True) for a in fields if a.default is None}
    # cattrs types **kwargs as its bool options, but they take AttributeOverrides.
    return make_dict_unstructure_fn(cls, converter, **overrides)  # type: ignore[arg-type]


def register_class(
    cls: type,
    *,
    unsigned: bool = False,
    as_list: bool = False,
    check: Callable[[Any], None] | None = None,
) -> None:
    """Set how an attrs class is encoded; call before its first use.

    ``unsigned``: every ``int`` in the class's fields (also inside tuples and
    optionals) must be in ``[0, 2**63)``. ``as_list``: encode as an array of the
    fields in order instead of a map (for small hot types). ``check``: called with
    each decoded object; raise ``ValueError`` to refuse it.
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class")
    if cls in _GENERATED:
        raise RuntimeError(f"{cls.__name__} was already used by the codec: register it earlier")
    _CLASS_OPTIONS[cls] = _ClassOptions(unsigned=unsigned, as_list=as_list, check=check)


# ------------------------------------------------------------------- tagged unions


def register_tagged_union(union: Any, *, name: str) -> Mapping[str, type]:
    """Make `union` (``Union[A, B, ...]``) a tagged union; returns tag -> class.

    Each member is an attrs class with a ``TAG: ClassVar[str]`` unique in the
    union; it is encoded as its map with ``"t": TAG`` first. ``name`` is used in
    error messages ("cannot decode message: ..."). A class may belong to several
    unions (e.g. a transport frame union that includes every raft message).
    """
    classes = typing.get_args(union)
    if not classes:
        raise TypeError(f"{union!r} is not a Union of classes")
    tags: dict[str, type] = {}
    for cls in classes:
        tag = getattr(cls, "TAG", None)
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"{cls!r} has no TAG: ClassVar[str]")
        if tag in tags:
            raise ValueError(f"tag {tag!r} is used by {tags[tag].__name__} and {cls.__name__}")
        if not attrs.has(cls) or _CLASS_OPTIONS.get(cls, _ClassOptions()).as_list:
            raise TypeError(f"{cls!r} must be an attrs class encoded as a map")
        if TAG_KEY in attrs.fields_dict(cls):
            raise ValueError(f"{cls.__name__} has a field named {TAG_KEY!r}, the tag key")
        tags[tag] = cls
    unstructure_hooks = {cls: converter.get_unstructure_hook(cls) for cls in classes}
    structure_hooks = {tag: (cls, converter.get_structure_hook(cls)) for tag, cls in tags.items()}
    known = ", ".join(sorted(tags))

    def unstructure_union(obj: Any) -> dict[str, Any]:
        hook = unstructure_hooks.get(obj.__class__)
        if hook is None:
            raise EncodeError(f"{type(obj).__name__} is not a {name}")
        body = {TAG_KEY: obj.TAG}
        body.update(hook(obj))
        return body

    def structure_union(value: Any, _: Any) -> Any:
        if type(value) is not dict:
            raise TypeError(f"expected a {name} as a map, got {_describe(value)}")
        body = value.copy()
        try:
            tag = body.pop(TAG_KEY)
        except KeyError:
            raise ValueError(f"no tag: a {name} needs a {TAG_KEY!r} key") from None
        if type(tag) is not str:
            raise TypeError(f"the tag {TAG_KEY!r} must be a str, got {_describe(tag)}")
        found = structure_hooks.get(tag)
        if found is None:
            raise ValueError(f"unknown {name} tag {tag!r} (known: {known})")
        cls, hook = found
        return hook(body, cls)

    converter.register_unstructure_hook_func(lambda t: t == union, unstructure_union)
    converter.register_structure_hook_func(lambda t: t == union, structure_union)
    _UNION_NAMES[union] = name
    return types.MappingProxyType(tags)


# ------------------------------------------------------------------- the converter


def _set_to_list(items: Iterable[Any]) -> list[Any]:
    """Sets become arrays, sorted when their items allow it: equal sets, equal bytes."""
    items = list(items)
    try:
        return sorted(items)
    except TypeError:
        return items


def _make_converter() -> cattrs.Converter:
    c = cattrs.Converter(
        forbid_extra_keys=True,
        detailed_validation=True,
        unstruct_collection_overrides={
            collections.abc.Set: _set_to_list,
            collections.abc.MutableSet: _set_to_list,
            frozenset: _set_to_list,
            set: _set_to_list,
        },
    )
    # Singledispatch hooks: exact-class registrations win over int for bool/IntEnum.
    c.register_structure_hook(int, _structure_int)
    c.register_structure_hook(_UInt, _structure_uint)
    c.register_structure_hook(bool, _exact(bool, "a bool"))
    c.register_structure_hook(float, _exact(float, "a float"))
    c.register_structure_hook(str, _exact(str, "a str"))
    c.register_structure_hook(bytes, _exact(bytes, "bytes (msgpack bin)"))
    c.register_structure_hook(enum.Enum, _structure_enum)
    c.register_structure_hook(enum.IntEnum, _structure_enum)
    c.register_structure_hook(enum.StrEnum, _structure_enum)
    # Function dispatch: the latest registration is tried first.
    c.register_structure_hook_factory(_is_hetero_tuple, _hetero_tuple_factory)
    c.register_structure_hook_factory(_is_homogeneous, _homogeneous_factory)
    c.register_structure_hook_factory(_is_mapping, _mapping_factory)
    c.register_structure_hook_factory(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum), lambda t: _structure_enum
    )
    c.register_structure_hook_factory(attrs.has, _structure_attrs_factory)
    c.register_unstructure_hook_factory(attrs.has, _unstructure_attrs_factory)
    return c


#: THE converter of the project. Use `structure`/`unstructure` or `encode`/`decode`.
converter: cattrs.Converter = _make_converter()


def unstructure(obj: Any, cls: Any = None) -> Any:
    """`obj` as msgpack-ready builtins; pass ``cls`` for a union to get its tag."""
    return converter.unstructure(obj, cls)


def _error_lines(exc: BaseException, path: str) -> Iterator[str]:
    if isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _error_lines(sub, f"{path}[{note.index!r}]")
        for sub in without:
            yield from _error_lines(sub, path)
    elif isinstance(exc, ClassValidationError):
        with_names, without = exc.group_exceptions()
        for sub, name_note in with_names:
            yield from _error_lines(sub, f"{path}.{name_note.name}")
        for sub in without:
            yield from _error_lines(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        extra = ", ".join(sorted(map(repr, exc.extra_fields)))
        yield f"{path}: unexpected field(s) {extra}"
    elif isinstance(exc, KeyError):
        yield f"{path}: required field missing"
    else:
        yield f"{path}: {exc}" if str(exc) else f"{path}: {type(exc).__name__}"


def _decode_error(exc: Exception, cls: Any) -> DecodeError:
    lines = list(_error_lines(exc, "$"))
    shown = "; ".join(lines[:_MAX_REPORTED_ERRORS])
    if len(lines) > _MAX_REPORTED_ERRORS:
        shown += f"; and {len(lines) - _MAX_REPORTED_ERRORS} more"
    return DecodeError(f"cannot decode {_type_name(cls)}: {shown}")


def structure(data: Any, cls: type[T] | Any) -> T:
    """Build a `cls` from msgpack builtins, strictly; raises `DecodeError`."""
    hook = converter.get_structure_hook(cls)  # a type the codec cannot handle: our bug
    try:
        return hook(data, cls)  # type: ignore[no-any-return]
    except StructureHandlerNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is bad input
        raise _decode_error(exc, cls) from exc


def pack(data: Any) -> bytes:
    """msgpack bytes of builtins; raises `EncodeError` (e.g. an int over 64 bits)."""
    try:
        return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]
    except (OverflowError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode: {exc}") from exc


def unpack(body: bytes) -> Any:
    """msgpack builtins of `body`; raises `DecodeError` for anything malformed.

    ``bin`` -> bytes, ``str`` -> str (valid UTF-8 only), arrays -> lists, map keys
    only str or bytes (int keys are refused: they would allow hash flooding).
    """
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise DecodeError(f"malformed msgpack: {detail}") from exc


def encode(obj: Any, cls: Any = None) -> bytes:
    """msgpack bytes of `obj` (as `cls` when given, e.g. a tagged union)."""
    try:
        data = converter.unstructure(obj, cls)
    except EncodeError:
        raise
    except (AttributeError, OverflowError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode {type(obj).__name__}: {exc}") from exc
    return pack(data)


def decode(body: bytes, cls: type[T] | Any) -> T:
    """The `cls` encoded in `body`; raises `DecodeError` for any bad input."""
    return cast(T, structure(unpack(body), cls))


# ------------------------------------------------------------ raft types and messages


def _check_entry(entry: Entry) -> None:
    if (entry.kind == EntryKind.MEMBERSHIP) != (entry.membership is not None):
        if entry.membership is None:
            raise ValueError(
                f"entry {entry.term}-{entry.index} of kind MEMBERSHIP has no membership"
            )
        raise ValueError(
            f"entry {entry.term}-{entry.index} of kind {entry.kind.name} carries a membership"
        )


register_class(LogId, unsigned=True, as_list=True)
register_class(Entry, unsigned=True, check=_check_entry)
for _cls in (Membership, HardState, SnapshotMeta, Snapshot, PersistedState, *MESSAGE_TYPES):
    register_class(_cls, unsigned=True)
del _cls

#: tag -> message class, for every raft message.
MESSAGE_TAGS: Mapping[str, type] = register_tagged_union(Message, name="message")

_unstructure_message = converter.get_unstructure_hook(Message)


def _fast_append_out(msg: AppendRequest) -> dict[str, Any] | None:
    """The converter's output for an AppendEntries of plain entries, built by hand
    (the leader's hot path); None when an entry carries a membership."""
    entries = []
    for e in msg.entries:
        if e.membership is not None:
            return None
        entries.append({"term": e.term, "index": e.index, "kind": int(e.kind), "data": e.data})
    return {
        "t": "append", "term": msg.term, "src": msg.src, "dst": msg.dst,
        "prev_log_id": [msg.prev_log_id.term, msg.prev_log_id.index], "entries": entries,
        "commit": msg.commit, "acked": msg.acked,
    }


def encode_message(msg: Message) -> bytes:
    """msgpack bytes of a raft message: ``{"t": TAG, field: value, ...}``."""
    if type(msg) is AppendRequest:
        fast = _fast_append_out(msg)
        if fast is not None:
            return pack(fast)
    elif type(msg) is AppendResponse:  # the converter's output, by hand (~half the instructions)
        return pack({
            "t": "append_resp", "term": msg.term, "src": msg.src, "dst": msg.dst, "success": msg.success,
            "index": msg.index, "hint_term": msg.hint_term, "hint_index": msg.hint_index,
        })
    try:
        data = _unstructure_message(msg)
    except EncodeError:
        raise
    except (AttributeError, OverflowError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    return pack(data)


_U64 = INT64_MAX + 1  # (the strict path's bound for an unsigned field: it fits in a signed 64-bit int)
_APPEND_KEYS = frozenset(("t", "term", "src", "dst", "prev_log_id", "entries", "commit"))
_APPEND_KEYS_ACKED = _APPEND_KEYS | {"acked"}
_PLAIN_KINDS = {int(EntryKind.NOOP): EntryKind.NOOP, int(EntryKind.NORMAL): EntryKind.NORMAL}


def _u64(v: Any) -> bool:
    return type(v) is int and 0 <= v < _U64


def _fast_append(data: dict[str, Any]) -> AppendRequest | None:
    """The replication hot path (design §5): a well-formed AppendEntries of plain
    entries, built without the converter; None for anything else, which then takes the
    strict path (and its error messages). It accepts nothing the strict path refuses."""
    keys = data.keys()
    if keys != _APPEND_KEYS and keys != _APPEND_KEYS_ACKED:
        return None
    term, src, dst, commit, acked = data["term"], data["src"], data["dst"], data["commit"], data.get("acked", 0)
    prev, raw = data["prev_log_id"], data["entries"]
    if not (_u64(term) and _u64(src) and _u64(dst) and _u64(commit) and _u64(acked)):
        return None
    if type(prev) is not list or len(prev) != 2 or not (_u64(prev[0]) and _u64(prev[1])) or type(raw) is not list:
        return None
    entries: list[Entry] = []
    add = entries.append
    for e in raw:
        if type(e) is not dict or len(e) != 4:  # four keys, all four of these below: no other
            return None
        try:
            et, ei, ek, ed = e["term"], e["index"], e["kind"], e["data"]
        except KeyError:
            return None
        kind = _PLAIN_KINDS.get(ek) if type(ek) is int else None
        if kind is None or not (_u64(et) and _u64(ei)) or type(ed) is not bytes:
            return None
        add(Entry(et, ei, kind, ed))
    return AppendRequest(term, src, dst, LogId(prev[0], prev[1]), tuple(entries), commit, acked)


def _fast_append_resp(data: dict[str, Any]) -> AppendResponse | None:
    """An AppendEntries answer, built without the converter (one per follower per
    AppendEntries); None for anything it would not accept as it is."""
    if len(data) != 8:  # "t" and the seven fields, none missing, none extra
        return None
    try:
        term, src, dst, success = data["term"], data["src"], data["dst"], data["success"]
        index, hint_term, hint_index = data["index"], data["hint_term"], data["hint_index"]
    except KeyError:
        return None
    if type(success) is not bool:
        return None
    if not (_u64(term) and _u64(src) and _u64(dst) and _u64(index) and _u64(hint_term) and _u64(hint_index)):
        return None
    return AppendResponse(term, src, dst, success, index, hint_term, hint_index)


def decode_tagged(body: bytes, union: Any) -> Any:
    """The member of the tagged union `union` (raft messages, or a union holding them,
    such as the raft port's frames) in `body`, with the AppendEntries fast path;
    raises `DecodeError` for any bad input."""
    data = unpack(body)
    if type(data) is dict:
        tag = data.get("t")
        fast = _fast_append(data) if tag == "append" else _fast_append_resp(data) if tag == "append_resp" else None
        if fast is not None:
            return fast
    return structure(data, union)


def decode_message(body: bytes) -> Message:
    """The raft message in `body`; raises `DecodeError` for any bad input."""
    return decode_tagged(body, Message)  # type: ignore[no-any-return]
