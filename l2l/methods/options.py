"""Validation of a method's options against its declared defaults."""
from __future__ import annotations

from l2l.config import ConfigError


def validate(options: dict, defaults: dict, path: str) -> dict:
    """Fill in defaults; reject unknown keys and values of another type than the default's."""
    out = dict(defaults)
    for k, v in options.items():
        if k not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"params.yaml: {path}.{k}: unknown option (known: {known})")
        d = defaults[k]
        if d is not None and not _same_kind(v, d):
            raise ConfigError(f"params.yaml: {path}.{k}: expected {type(d).__name__}, got {v!r}")
        out[k] = v
    return out


def _same_kind(v, d) -> bool:
    if isinstance(d, bool) or isinstance(v, bool):
        return isinstance(v, bool) and isinstance(d, bool)
    if isinstance(d, float):
        return isinstance(v, (int, float))
    return isinstance(v, type(d))
