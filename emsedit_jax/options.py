"""Configuration fields declared once: a dataclass field made with `option(...)` carries
its default, its help text and its check, so the library (`check_fields` in
`__post_init__`) and the command line (`add_options`, which derives one flag per field)
share one set of defaults and one validation.

Adding a command-line flag is adding a field to one of the option dataclasses
(EditorConfig, TrainConfig, EvalConfig, or the CLI's own groups in cli.py):

    capture_chunk: int | None = option(None, "capture in microbatches of ROWS rows", check="positive",
                                       metavar="ROWS")

Checks: every number must be finite; "positive" (> 0) and "nonneg" (>= 0) add a sign.
Types come from the annotation: bool (--x / --no-x), int, float, str, Literal[...]
(choices), tuple[str, ...] (comma-separated), each optionally `| None`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal

from .errors import ConfigError

_CHECKS = {None: (lambda v: True, ""), "positive": (lambda v: v > 0, " > 0"),
           "nonneg": (lambda v: v >= 0, " >= 0")}


def option(default: Any = dataclasses.MISSING, help: str = "", *, check: str | None = None,
           flag: str | None = None, cli: bool = True, required: bool = False, default_text: str | None = None,
           **argparse_kw) -> Any:
    """A dataclass field with its help text (`help`), its check ("positive", "nonneg" or
    None), and how the CLI shows it: `flag` (default --field-name), `cli=False` keeps it
    off the command line, `required` makes the CLI require it, `default_text` replaces
    the default shown in --help, other keywords go to argparse's add_argument."""
    if check not in _CHECKS:
        raise ValueError(f"unknown check {check!r}")
    metadata = {"help": help, "check": check, "flag": flag, "cli": cli, "required": required,
                "default_text": default_text, "argparse": argparse_kw}
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------- types and checks
def _unwrap(hint) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def expected(hint, check: str | None) -> str:
    """What a value of this type and check must be, in words."""
    base, optional = _unwrap(hint)
    sign = _CHECKS[check][1]
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(base)))
    elif base is bool:
        text = "true or false"
    elif base is int:
        text = "a whole number" + sign
    elif base is float:
        text = "a finite number" + sign
    elif typing.get_origin(base) is tuple:
        text = "a list of names"
    else:
        text = "a string"
    return text + (" (or none)" if optional else "")


def coerce(value: Any, hint, check: str | None) -> Any:
    """`value` as the field's type (an int for a float field becomes a float, a list for a
    tuple field a tuple), or ValueError if it is not one."""
    base, optional = _unwrap(hint)
    if value is None:
        if optional:
            return None
        raise ValueError
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise ValueError
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        if base is int and (not isinstance(value, int)):
            if not (math.isfinite(value) and float(value).is_integer()):
                raise ValueError
            value = int(value)
        value = base(value)
        if not math.isfinite(value) or not _CHECKS[check][0](value):
            raise ValueError
        return value
    if typing.get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError
        return tuple(value)
    if base is str and not isinstance(value, str):
        raise ValueError
    return value


@functools.cache
def hints(cls) -> dict[str, Any]:
    """The resolved annotations of dataclass `cls` (cached: configs are built often)."""
    return typing.get_type_hints(cls)


def check_fields(obj) -> None:
    """Checks (and normalises: int -> float, list -> tuple) every field of a frozen
    dataclass declared with `option`; ConfigError names the field and what it expects."""
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        check = f.metadata.get("check")
        try:
            new = coerce(value, types_[f.name], check)
        except ValueError:
            raise ConfigError(f"{type(obj).__name__}.{f.name}: expected {expected(types_[f.name], check)}, "
                              f"got {value!r}") from None
        if new is not value:
            object.__setattr__(obj, f.name, new)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# ---------------------------------------------------------------- command line
def _parser_for(hint, check: str | None, flag: str):
    """argparse `type=` function: the string as the field's type, checked."""
    base, optional = _unwrap(hint)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            if base is int:
                value = int(text)
            elif base is float:
                value = float(text)
            elif typing.get_origin(base) is tuple:
                value = tuple(s.strip() for s in text.split(",") if s.strip())
            else:
                value = text
            return coerce(value, hint, check)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected(hint, check)}, got {text!r}") from None
    parse.__name__ = flag
    return parse


@dataclasses.dataclass(frozen=True)
class CliField:
    """One flag derived from a dataclass field: where it came from and how to check a
    value given in a config file."""
    cls: type
    name: str
    flag: str
    hint: Any
    check: str | None
    required: bool


def add_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None, title: str | None = None) -> list[CliField]:
    """Adds one flag per CLI field of dataclass `cls` (except `skip`) to `parser`, in an
    argument group titled `title`; the dataclass default (or `defaults[name]`) is the
    flag's default and is shown in --help. Returns the fields added."""
    group = parser.add_argument_group(title or cls.__name__)
    types_ = hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.name in skip or not md.get("cli", True):
            continue
        flag = md.get("flag") or "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, field_default(f))
        shown = md.get("default_text") or _show(default)
        kw = dict(dest=f.name, default=default, help=f"{md.get('help', '')} (default: {shown})".strip())
        base, _ = _unwrap(types_[f.name])
        extra = dict(md.get("argparse") or {})
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "action" not in extra:
            kw["type"] = _parser_for(types_[f.name], md.get("check"), flag)
            if typing.get_origin(base) is Literal:
                kw["choices"] = typing.get_args(base)
                kw["type"] = str
            elif "metavar" not in extra:
                kw["metavar"] = f.name.upper()
        kw.update(extra)
        group.add_argument(flag, **kw)
        added.append(CliField(cls, f.name, flag, types_[f.name], md.get("check"), md.get("required", False)))
    return added


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value is None else str(value)
