"""What a setting may be, said once: the allowed values of each field and the one type checker.

Both front ends use it: argparse takes its `choices=` from CHOICES, and a YAML job's mapping (or the
mapping the CLI's flags become) is checked by `check_mapping`, so a bad value gets the same error,
naming the key, whichever way it came in."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from storage.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration value is invalid; the message names the key."""


class InvalidValue(ConfigError):
    """One field's value is out of range. It keeps the field's name apart from the message, so each front end
    names it its own way: a job file by its key (`model.layers=0`), the CLI by its flag (`--layers 0`).

    `why` follows the name: ": at least one layer" or " must be positive"; `{other}` in it names another
    field of the same section, with `others[other]` as its value. The arguments are the exception's args,
    so it crosses a process boundary (pickle) intact."""

    def __init__(self, key: str, value: Any, why: str, others: Mapping[str, Any] | None = None,
                 where: str = "", names: Mapping[str, str] | None = None):
        super().__init__(key, value, why, dict(others or {}), where, dict(names or {}))

    def __str__(self) -> str:
        key, value, why, others, where, names = self.args
        return _named(key, value, where, names) + why.format(**{k: _named(k, v, "", names) for k, v in others.items()})

    def named(self, where: str = "", names: Mapping[str, str] | None = None) -> "InvalidValue":
        """The same error, its fields named under `where` (a job file's section) or by `names` (field -> flag)."""
        key, value, why, others, _, _ = self.args
        return InvalidValue(key, value, why, others, where, names)


def _named(key: str, value: Any, where: str, names: Mapping[str, str]) -> str:
    """`--flag value` where a flag names the field (`--flag` alone for a switch that is on), else `key=value`
    (the key as `names` gives it: a flat job's own key, or under `where`, the job file's section)."""
    shown = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    name = names.get(key)
    if name and name.startswith("-"):
        return name if value is True else f"{name} {shown}"
    return f"{name or where + key}={shown}"


ATTENTION_CHOICES = ("auto", "mask", "packed")  # how the encoder batches: see pipeline/model/packed_attention.py

CHOICES: dict[str, tuple[str, ...]] = {
    "format": ("auto", "tsv", "jsonl", "parquet", "hf"),
    "on_empty": ("skip", "error"),
    "on_invalid_utf8": ("skip", "error"),
    "on_malformed": ("error", "skip"),
    "on_duplicate": ("error", "keep-first"),
    "on_too_long": ("truncate", "skip"),
    "quantize": ("int8", "none"),
    "codec": ("linear", "pq"),
    "residual": ("none", "embeddings"),
    "device": ("auto", "cpu", "cuda"),
    "attention": ATTENTION_CHOICES,
    "pooling": ("auto", "cls", "mean"),
    "dtype": ("float16", "float32"),
}


def check_choice(key: str, value: Any, where: str = "") -> None:
    if value not in CHOICES[key]:
        raise ConfigError(f"{where}{key}={value!r} is not one of {', '.join(CHOICES[key])}")


def check_device(device: Any) -> str:
    """The one device check: configs, the reader and the searcher all call it (pick_device then maps it)."""
    check_choice("device", device)
    return device


Schema = Mapping[str, "type | tuple[type, ...]"]


def _types(want: type | tuple[type, ...]) -> tuple[type, ...]:
    return want if isinstance(want, tuple) else (want,)


def _fits(value: Any, want: type | tuple[type, ...]) -> bool:
    """bool is an int to Python but never to a job file; an int is a fine float."""
    types = _types(want)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def check_mapping(body: Mapping[str, Any], schema: Schema, where: str = "", required: tuple[str, ...] = ()) -> dict:
    """The one type checker: unknown keys, wrong types, values outside CHOICES and missing required keys,
    each named (None = unset)."""
    for key, value in body.items():
        if key not in schema:
            raise ConfigError(f"{where}{key}: unknown key (known: {', '.join(schema)})")
        want = schema[key]
        if want is not None and value is not None and not _fits(value, want):
            raise ConfigError(f"{where}{key}: expected {'/'.join(t.__name__ for t in _types(want))}, got {value!r}")
        if key in CHOICES and value is not None:
            check_choice(key, value, where)
    missing = [k for k in required if body.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{', '.join(where + m for m in missing)}: required")
    return dict(body)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}


def _expected_type(f: dataclasses.Field) -> type | None:
    """The type a value must have: the annotation's first alternative (`int | None` -> int, `dict[str, x]` -> dict)."""
    return _SCALARS.get(str(f.type).split("|")[0].split("[")[0].strip())


def dataclass_schema(cls) -> dict[str, type | None]:
    """A frozen config class's fields as a schema (a field of another type is passed through unchecked)."""
    return {f.name: _expected_type(f) for f in dataclasses.fields(cls)}


def build(cls, body: Mapping[str, Any], where: str = "", extra: Schema | None = None,
          names: Mapping[str, str] | None = None):
    """`cls(**body)` after the type check; the class's own checks' errors get `where` in front, or name the
    field by `names` (field -> the flag it came from) when the CLI filled `body`."""
    check_mapping(body, {**dataclass_schema(cls), **(extra or {})}, where)
    try:
        return cls(**body)
    except TypeError as exc:
        raise ConfigError(f"{where.rstrip('.')}: {exc}") from exc
    except InvalidValue as exc:
        raise exc.named(where, names) from exc
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from exc
