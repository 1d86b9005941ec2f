"""Typed configuration: nested dataclasses filled from YAML files and dotted overrides.

Every stage defines a ``@dataclass`` whose fields carry a default and a help
string (``field(default=..., metadata={"help": "what it is (unit)"})``); a
top-level dataclass nests them. ``load_config(cls, path, overrides)`` builds an
instance in three layers, later ones winning: the dataclass defaults, the YAML
file(s), then ``key.sub=value`` overrides from the command line.

Values are checked against the field's annotation and converted only where the
conversion is lossless and unsurprising:

* ``int`` accepts an integer (a bool is refused); ``float`` accepts an int or a
  float, and a string that Python parses as a float (YAML 1.1 reads ``1e-5``
  without a dot as a string);
* ``bool`` accepts only ``true``/``false`` (YAML's ``yes``/``no`` too);
* ``str`` accepts a string; an *override* whose text YAML would read as another
  type (``name=2024``) keeps its raw text;
* ``X | None`` accepts ``null``; ``Literal[...]`` one of its values;
  ``list[X]``/``tuple[X, ...]`` a YAML list (items checked); ``dict[str, X]`` a
  mapping; a nested dataclass a mapping (checked recursively); ``Any`` anything.

Numbers are then checked against the field's ``range`` metadata
(``rollout.config.check_ranges``: finite, and ``> 0``, ``[0, 1]``, ...), with
the full dotted key in the message.

An unknown key is an error that gives its full dotted path and the nearest
valid key. Errors are :class:`ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from rollout.config import check_ranges, plain, range_text, to_dict  # noqa: F401 - to_dict: part of this API

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names the key."""


# --------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | Sequence[str | Path] | None = None,
                overrides: Sequence[str] = ()) -> T:
    """An instance of dataclass ``cls`` from defaults, YAML file(s) and overrides.

    ``path`` is one YAML file or a list of them, deep-merged in order (a
    mapping in a later file updates the earlier one key by key; any other value
    replaces it). ``overrides`` are ``"a.b=value"`` strings; ``value`` is read
    with ``yaml.safe_load`` (so ``[1, 2]`` is a list and ``null`` is None).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict = {}
    for p in paths:
        layer = _read_yaml(Path(p))
        _check_keys(cls, layer, (), cls, str(p))
        _merge(data, layer)
    return _with_overrides(cls, data, overrides)


def override(cls: type[T], base: Any, overrides: Sequence[str] = ()) -> T:
    """``base`` (a config instance) as a ``cls`` with dotted ``overrides`` applied, in memory; the same checks
    and messages as :func:`load_config`."""
    return _with_overrides(cls, to_dict(base), overrides)


def with_values(cfg: T, values: dict[str, Any]) -> T:
    """``cfg`` with each dotted field of ``values`` replaced by its (typed) value, by ``dataclasses.replace``
    at every level (so every section's checks run again)."""
    for dotted, value in values.items():
        cfg = _replace_at(cfg, dotted.split("."), value)
    return cfg


def _replace_at(node: Any, keys: list[str], value: Any) -> Any:
    if len(keys) > 1:
        value = _replace_at(getattr(node, keys[0]), keys[1:], value)
    return dataclasses.replace(node, **{keys[0]: value})


def _with_overrides(cls: type[T], data: dict, overrides: Sequence[str]) -> T:
    ctx = _Context(cls, {})
    for item in overrides:
        keys, value, text = _parse_override(cls, item)
        _set(data, keys, value, item)
        ctx.raw = {k: v for k, v in ctx.raw.items() if k[:len(keys)] != keys}  # replaced by this one
        ctx.raw[keys] = text
    return _build(cls, data, (), ctx)


@dataclasses.dataclass
class _Context:
    root: type  # the top-level config class, searched for key suggestions
    raw: dict[tuple[str, ...], str]  # override key path -> its text before YAML parsing


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _parse_override(cls: type, item: str) -> tuple[tuple[str, ...], Any, str]:
    """``"a.b=3"`` -> (("a", "b"), 3, "3"), after checking that ``a.b`` exists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    keys = tuple(dotted.split("."))
    if not dotted or "" in keys:
        raise ConfigError(f"override {item!r}: empty key")
    where = f"override {item!r}"
    tp = _type_at(cls, keys, where)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the text; a non-str field then reports the mismatch
    _check_keys(tp, value, keys, cls, where)
    return keys, value, text


def _type_at(cls: type, keys: tuple[str, ...], where: str) -> Any:
    """The annotation at dotted path ``keys`` of ``cls``; raise if no such key exists."""
    tp: Any = cls
    for i, key in enumerate(keys):
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if key not in hints:
                raise ConfigError(f"{where}: {_unknown(key, keys[:i], hints, cls)}")
            tp = hints[key]
        elif typing.get_origin(tp) is dict or tp is Any:
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        else:
            raise ConfigError(f"{where}: '{'.'.join(keys[:i])}' is a {_type_name(tp)}, it has no sub-key '{key}'")
    return tp


def _check_keys(tp: Any, data: Any, path: tuple[str, ...], root: type, where: str) -> None:
    """Raise on the first mapping key in ``data`` that type ``tp`` does not know."""
    tp = _strip_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(data, dict):
        hints = _hints(tp)
        for key, value in data.items():
            if key not in hints:
                raise ConfigError(f"{where}: {_unknown(str(key), path, hints, root)}")
            _check_keys(hints[key], value, path + (key,), root, where)
    elif origin in _SEQUENCES and args and isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            _check_keys(args[0] if len(args) == 1 or args[1] is Ellipsis else args[min(i, len(args) - 1)],
                        value, path + (str(i),), root, where)
    elif origin is dict and args and isinstance(data, dict):
        for key, value in data.items():
            _check_keys(args[1], value, path + (str(key),), root, where)


def _set(data: dict, keys: tuple[str, ...], value: Any, item: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{'.'.join(keys[:i + 1])}' is set to {child!r}, not a mapping")
        node = child
    node[keys[-1]] = value


# --------------------------------------------------------------------------- checking


_SEQUENCES = (list, tuple, collections.abc.Sequence)


def _build(cls: type[T], data: Any, path: tuple[str, ...], ctx: _Context) -> T:
    where = ".".join(path) or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {_show(data)}")
    hints = _hints(cls)
    for key in data:  # normally caught earlier, with the file or override named
        if key not in hints:
            raise ConfigError(_unknown(str(key), path, hints, ctx.root))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _coerce(_on_default(f, data[f.name]), hints[f.name], path + (f.name,), ctx)
        elif dataclasses.is_dataclass(_strip_optional(hints[f.name])) and _default(f) is _MISSING:
            kwargs[f.name] = _build(_strip_optional(hints[f.name]), {}, path + (f.name,), ctx)
        elif _default(f) is _MISSING:
            raise ConfigError(f"missing required key '{'.'.join(path + (f.name,))}'")
    try:
        check_ranges(cls, kwargs, prefix="".join(f"{p}." for p in path))  # the dotted key, before __post_init__
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {e}") from None


def _on_default(f: dataclasses.Field, value: Any) -> Any:
    """A section given in part (a mapping) updates the field's own default section, key by key: a field whose
    default is ``RolloutConfig(temperature=0.0)`` keeps that temperature when only ``max_tokens`` is set."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    try:
        plain_default = to_dict(type(default)())
    except (TypeError, ValueError):  # a section class without defaults of its own
        plain_default = {}
    merged = _differences(to_dict(default), plain_default)  # only what the field's default changes
    _merge(merged, value)
    return merged


def _differences(ours: dict, theirs: dict) -> dict:
    out = {}
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(theirs.get(key), dict):
            sub = _differences(value, theirs[key])
            if sub:
                out[key] = sub
        elif key not in theirs or theirs[key] != value:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, path: tuple[str, ...], ctx: _Context) -> Any:
    key = ".".join(path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:
            try:
                return _coerce(value, member, path, ctx)
            except ConfigError:
                if len(members) == 1 and (dataclasses.is_dataclass(member) or typing.get_origin(member)):
                    raise  # a structured value: the inner message says which part is wrong
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if value in args:
            return value
        if path in ctx.raw and ctx.raw[path] in args:
            return ctx.raw[path]
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, ctx)
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {_show(value)}")
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
            return tuple(_coerce(v, a, path + (str(i),), ctx) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, path + (str(i),), ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({_type_name(tp)}), got {_show(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, path, ctx): _coerce(v, val_tp, path + (str(k),), ctx)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if path in ctx.raw and value is not None:
            return ctx.raw[path]
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{key}: unsupported field type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


#: keys that were renamed when every knob got one name: old name -> new name at the same level
RENAMED: dict[str, str] = {"k": "rollout.n", "ray_address": "ray.address", "timeout_s": "checker_timeout_s",
                           "check_timeout_s": "checker_timeout_s"}


def _unknown(key: str, path: tuple[str, ...], hints: dict, root: type) -> str:
    """'unknown key a.b.x; did you mean a.b.y?' — a renamed key's new name, else the nearest name at that
    level, else anywhere."""
    full = ".".join(path + (key,))
    if key in RENAMED and RENAMED[key].split(".")[0] in hints:
        return f"unknown key '{full}': it is now '{'.'.join(path + (RENAMED[key],))}'"
    close = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.6)
    if close:
        return f"unknown key '{full}'; did you mean '{'.'.join(path + (close[0],))}'?"
    everywhere = [p for p, _ in _leaves(root, ())]
    by_last = {p.rsplit(".", 1)[-1]: p for p in everywhere}
    close = difflib.get_close_matches(key, list(by_last), n=1, cutoff=0.8)
    if close:
        return f"unknown key '{full}'; did you mean '{by_last[close[0]]}'?"
    level = ".".join(path) or "the top level"
    return f"unknown key '{full}'; valid keys at {level}: {', '.join(sorted(hints))}"


# --------------------------------------------------------------------------- output
# (``to_dict`` lives in ``rollout.config`` so that training code on any floor can write its resolved config)


@dataclasses.dataclass
class FieldDoc:
    """One documented config key: dotted name, type, default and help text."""

    key: str
    type: str
    default: str
    help: str


def field_docs(cls: type) -> list[FieldDoc]:
    """Every leaf key of dataclass ``cls`` (nested dataclasses expanded), in field order."""
    return [FieldDoc(key, _type_name(tp), _default_text(cls, key), _help_text(f)) for key, (f, tp) in _leaves(cls, ())]


def _help_text(f: dataclasses.Field) -> str:
    spec = f.metadata.get("range")
    if spec is None:
        return f.metadata.get("help", "")
    return f"{f.metadata.get('help', '')} (must be {range_text(spec) or 'finite'})"


def describe(cls: type) -> str:
    """A ``--help``-style listing of ``cls``'s keys: ``key  type  default  help``, one a line."""
    docs = field_docs(cls)
    if not docs:
        return f"{cls.__name__}: no keys"
    head = FieldDoc("key", "type", "default", "help")
    widths = [max(len(getattr(d, a)) for d in [head] + docs) for a in ("key", "type", "default")]
    lines = []
    for d in [head] + docs:
        cells = [d.key.ljust(widths[0]), d.type.ljust(widths[1]), d.default.ljust(widths[2]), d.help]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _leaves(cls: type, path: tuple[str, ...]) -> list[tuple[str, tuple[dataclasses.Field, Any]]]:
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = _strip_optional(tp)
        if dataclasses.is_dataclass(inner) and inner is tp:
            out += _leaves(inner, path + (f.name,))
        else:
            out.append((".".join(path + (f.name,)), (f, tp)))
    return out


def _default_text(cls: type, key: str) -> str:
    """The default of dotted ``key``: from the outermost section that has a default, so a section field whose
    default is ``RolloutConfig(temperature=0.0)`` shows temperature 0.0."""
    node: Any = _MISSING
    for name in key.split("."):
        if node is _MISSING:
            f = next(f for f in dataclasses.fields(cls) if f.name == name)
            node = _default(f)
            cls = _strip_optional(_hints(cls)[name])
        else:
            node = getattr(node, name)
    return "(required)" if node is _MISSING else repr(plain(node))


# --------------------------------------------------------------------------- helpers


def _hints(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"cannot resolve the annotations of {cls.__name__}: {e}") from None
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]" if args else name
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"
