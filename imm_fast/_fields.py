"""Declarative checks of config fields: `spec(default, ge=..., choices=...)` beside a dataclass field, and the
type/range/choice check that every config section (imm_fast.config and each backbone's section in
imm_fast.models) runs once when it is built.

Messages name the dotted key, an excerpt of the bad value (never the whole value: a hostile config can hold a
billion elements) and what is allowed. Imports nothing heavy, so backbone modules and config.py both sit above it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .errors import ConfigError, ConfigTypeError

MAX_SHOWN = 120        # characters of a bad value shown in a message
MAX_CONFIG_NODES = 100_000  # values (list entries, mapping entries) a config may hold, aliases counted each time


def excerpt(value, limit: int = MAX_SHOWN) -> str:
    """repr(value) cut to `limit` characters, computed without walking the whole value."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, 40
    text = r.repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_size(value, what: str, cap: int = MAX_CONFIG_NODES) -> None:
    """Refuse a value with more than `cap` nested entries, counting shared references (YAML aliases) each time
    they are reached, so a billion-laughs document is refused after `cap` steps instead of expanded."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            continue
        seen += len(v)
        if seen > cap:
            raise ConfigError(f"{what}: more than {cap:,} values (nested YAML aliases?); refused")


@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its annotated type. Ranges and the cap apply to every number (each entry of a tuple);
    choices to a single value (a callable returning the tuple is looked up when checked); `check(value)` returns
    a problem ("must ...") or None."""

    choices: Any = None
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    min_len: Optional[int] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    cap: Optional[float] = None  # a bound on sizes and counts (what a machine or a float can hold), not a meaning

    def range_text(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""

    def in_range(self, v) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def spec(default, *, choices=None, ge=None, gt=None, le=None, lt=None, min_len=None, check=None, cap=None):
    """A dataclass field with its checks: `depth: int = spec(28, ge=1, cap=1024)  # number of DiT blocks`."""
    rule = Rule(choices=choices, ge=ge, gt=gt, le=le, lt=lt, min_len=min_len, check=check, cap=cap)
    return field(default=default, metadata={"rule": rule})


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _key(cls, name: str, prefix: Optional[str] = None) -> str:
    prefix = getattr(cls, "_section", "") if prefix is None else prefix
    return f"{prefix}.{name}" if prefix else name


_NOUNS = {bool: ("true or false", "booleans"), int: ("an int", "ints"), float: ("a number", "numbers"),
          str: ("a string", "strings")}


def _describe(hint, plural=False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin is Union:
        return " or ".join(_describe(a, plural) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], True)}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_describe(args[0], True)}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    name = getattr(hint, "__name__", str(hint))
    if dataclasses.is_dataclass(hint):
        return f"{name}s" if plural else f"a {name} (a mapping of its keys)"
    return name


def _match(v, hint):
    """(True, v normalized) if v has the type `hint` (lists -> tuples, ints -> floats), else (False, None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, v
    if hint is type(None):
        return v is None, v
    if origin is Union:
        for a in args:
            ok, out = _match(v, a)
            if ok:
                return True, out
        return False, None
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return False, None
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(v)
        elif len(v) != len(args):
            return False, None
        out = []
        for x, a in zip(v, args):
            ok, y = _match(x, a)
            if not ok:
                return False, None
            out.append(y)
        return True, tuple(out)
    if hint is bool:
        return isinstance(v, bool), v
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if hint is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok, (float(v) if ok else None)
    return isinstance(v, hint), v


def check_value(key: str, value, hint, rule: Optional[Rule] = None):
    """`value` normalized to `hint`, or a ConfigError naming `key`, the value and what is allowed."""
    ok, value_n = _match(value, hint)
    if not ok:
        raise ConfigTypeError(f"{key}={excerpt(value)} must be {_describe(hint)}, got {type(value).__name__}")
    value = value_n
    if value is None:
        return value
    rule = rule or Rule()
    if rule.choices is not None and not isinstance(value, tuple):
        allowed = tuple(rule.choices() if callable(rule.choices) else rule.choices)
        if value not in allowed:
            others = [a for a in typing.get_args(hint) if not isinstance(value, typing.get_origin(a) or a)
                      and not (a is type(None) and None in allowed)]
            extra = f" (or {' or '.join(map(_describe, others))})" if others else ""
            raise ConfigError(f"{key}={excerpt(value)} is not one of {allowed}{extra}")
    if isinstance(value, tuple) and rule.min_len is not None and len(value) < rule.min_len:
        raise ConfigError(f"{key}={excerpt(value)} must hold at least {rule.min_len} value(s)")
    leaves = value if isinstance(value, tuple) else (value,)
    for v in leaves:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        what = rule.range_text()
        entry = f"every entry of {key} must be" if isinstance(value, tuple) else "must be"
        shown = excerpt(value)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={shown}: {entry} a finite number" + (f" {what}" if what else ""))
        if not rule.in_range(v):
            raise ConfigError(f"{key}={shown} is out of range: {entry} {what}")
        if rule.cap is not None and v > rule.cap:
            raise ConfigError(f"{key}={shown} exceeds the cap {rule.cap!r}: {entry} <= {rule.cap!r}")
    if rule.check is not None:
        problem = rule.check(value)
        if problem:
            raise ConfigError(f"{key}={excerpt(value)} {problem}")
    return value


def check_fields(cls, values: dict, prefix: Optional[str] = None) -> dict:
    """`values` (a subset of cls's fields) checked by cls's rules and normalized; keys named with `prefix`
    (default: the class's section, e.g. "model"). Models built from stored kwargs use this too."""
    hints, fields = _hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    return {name: check_value(_key(cls, name, prefix), v, hints[name], fields[name].metadata.get("rule"))
            if name in fields else v for name, v in values.items()}


def _validate(obj) -> None:
    """Check (and normalize in place) every field of a frozen config dataclass."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        new = check_value(_key(cls, f.name), value, hints[f.name], f.metadata.get("rule"))
        if new is not value:
            object.__setattr__(obj, f.name, new)


