"""YAML job files for `ray job submit`: load, check keys against a schema, name the bad one."""
from __future__ import annotations

from typing import Any

import yaml

from pipeline.config import ConfigError


def load(path: str, schema: dict[str, type | tuple[type, ...]], required: tuple[str, ...]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            body = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read job config: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}") from exc
    if not isinstance(body, dict):
        raise ConfigError("the job config must be a mapping")
    for key, value in body.items():
        if key not in schema:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(schema)})")
        if value is not None and not isinstance(value, schema[key]):
            expected = schema[key].__name__ if isinstance(schema[key], type) else "/".join(t.__name__ for t in schema[key])
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    missing = [k for k in required if body.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required")
    return body


def flags(body: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Job keys -> CLI flags (booleans become bare flags)."""
    argv: list[str] = []
    for key, flag in names.items():
        value = body.get(key)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            import json
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv
