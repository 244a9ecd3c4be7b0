"""Validation of a method's options against its declared defaults."""
from __future__ import annotations

from l2l.checks import config_error


def validate(options: dict, defaults: dict, path: str) -> dict:
    """Fill in defaults; reject unknown keys and values of another type than the default's."""
    out = dict(defaults)
    for k, v in options.items():
        if k not in defaults:
            raise config_error(f"{path}.{k}", "one of " + (", ".join(sorted(defaults)) or "no options"),
                               problem="unknown option")
        d = defaults[k]
        if d is not None and not _same_kind(v, d):
            raise config_error(f"{path}.{k}", _kind_name(d), v)
        out[k] = v
    return out


def _kind_name(d) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(d), type(d).__name__)


def _same_kind(v, d) -> bool:
    if isinstance(d, bool) or isinstance(v, bool):
        return isinstance(v, bool) and isinstance(d, bool)
    if isinstance(d, float):
        return isinstance(v, (int, float))
    return isinstance(v, type(d))
