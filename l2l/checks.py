"""The bottom of the house: the project's errors and the typed checks of params.yaml.

Every module may import this one; it imports nothing of the project. A check fails with one
line in one form, ``params.yaml: <key path>: [<problem>; ]expected <form>[, got <value>]``, so a
typo never turns into a silently different experiment. A *schema* is a closed key set with the
defaults beside the checks (:class:`Key`, :func:`resolve`): an unknown key anywhere is an error
naming its full path, and what comes back has every default filled in (written once, there).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

SOURCE = "params.yaml"
_NOT_GIVEN = object()


class ConfigError(ValueError):
    """A one-line message naming the offending key and the expected form."""


class DataError(Exception):
    """A data source or prepared array is unusable: one line naming the file and the problem."""


class IntegrityError(RuntimeError):
    """A result file failed verification (invalid, truncated, or not what its record says).
    (A RuntimeError, as load_checkpoint's mismatch always was.)"""


class LockedError(Exception):
    """A run folder is being trained by another process."""


class RunsFailed(RuntimeError):
    """Runs of the plan failed; the message names the first and why (one line)."""


class ClusterError(RuntimeError):
    """Remote workers cannot train here (a node that does not see the checkout or cannot reach MLflow):
    one line naming the node and what to fix, before any run is submitted."""


def config_error(path: str, expected: str | None = None, got: Any = _NOT_GIVEN, problem: str | None = None,
                 source: str = SOURCE) -> ConfigError:
    """The one message form: ``<source>: <path>: [<problem>; ]expected <form>[, got <value>]``."""
    text = f"{source}: {path}: " + "; ".join(p for p in (problem, expected and f"expected {expected}") if p)
    return ConfigError(text + ("" if got is _NOT_GIVEN else f", got {got!r}"))


# --- typed checks: each returns the value (normalised) or raises naming the key path ------

Check = Callable[[Any, str], Any]


def mapping(v: Any, path: str) -> dict:
    if not isinstance(v, dict):
        raise config_error(path, "a mapping", v)
    return v


def boolean(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise config_error(path, "true or false", v)
    return v


def integer(v: Any, path: str, low: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
        form = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        raise config_error(path, form, v)
    return v


def pos_int(v: Any, path: str) -> int:
    return integer(v, path, 1)


def nonneg_int(v: Any, path: str) -> int:
    return integer(v, path, 0)


def number(v: Any, path: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A real number within low..high (open ends where asked)."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v == v  # NaN is no number here
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        if low == 0 and high is None:
            form = "a positive number" if low_open else "a non-negative number"
        elif low is None and high is None:
            form = "a number"
        else:
            form = ("a number in " + ("(" if low_open else "[") + f"{'-inf' if low is None else low}, "
                    + f"{'inf' if high is None else high}" + (")" if high_open or high is None else "]"))
        raise config_error(path, form, v)
    return float(v)


def pos_float(v: Any, path: str) -> float:
    return number(v, path, 0, low_open=True)


def nonneg_float(v: Any, path: str) -> float:
    return number(v, path, 0)


def choice(v: Any, path: str, choices) -> Any:
    if v not in choices:
        raise config_error(path, "one of " + ", ".join(map(str, choices)), v)
    return v


def name_list(v: Any, path: str, choices=None, allow_empty: bool = False) -> list[str]:
    if not isinstance(v, list) or (not v and not allow_empty) or not all(isinstance(s, str) for s in v):
        raise config_error(path, "a list of names" if allow_empty else "a non-empty list of names", v)
    for s in v:
        if choices is not None and s not in choices:
            raise config_error(path, "names from " + ", ".join(choices), s)
    if len(set(v)) != len(v):
        raise config_error(path, "distinct names", v)
    return v


def optional_str(v: Any, path: str, form: str = "a name or null") -> str | None:
    if v is not None and not isinstance(v, str):
        raise config_error(path, form, v)
    return v


def path_str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise config_error(path, "a path", v)
    return v


def seeds(v: Any, path: str) -> list[int]:
    """Distinct non-negative integer seeds (torch and numpy take no negative seed)."""
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v):
        raise config_error(path, "a non-empty list of non-negative integers", v)
    if len(set(v)) != len(v):
        raise config_error(path, "distinct seeds", v)
    return v


def increasing_ints(v: Any, path: str, low: int = 1, allow_empty: bool = True) -> list[int]:
    ok = isinstance(v, list) and (v or allow_empty) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= low for i in v)
    if not ok or v != sorted(set(v)):
        raise config_error(path, f"an increasing list of integers >= {low}", v)
    return v


def one_of_keys(d: Mapping, path: str, known) -> None:
    """Every key of d is in known, else the error names the first stranger's full path."""
    for k in d:
        if k not in known:
            raise config_error(f"{path}.{k}", "one of " + ", ".join(sorted(known)), problem="unknown key")


# --- schemas: closed key sets with their defaults and checks in one table ------------------

REQUIRED = object()  # a Key without a default must be given


@dataclass(frozen=True)
class Key:
    """One key of a schema: its check (a Check, or a nested schema dict) and its default."""

    check: Check | dict
    default: Any = REQUIRED
    doc: str = ""


Schema = dict  # key -> Key


def resolve(schema: Schema, given: Any, path: str) -> dict:
    """`given` checked against `schema` (closed: unknown keys are errors), defaults filled in,
    nested schemas resolved alike. A nested schema whose key is absent resolves from {}."""
    given = {} if given is None else mapping(given, path)
    one_of_keys(given, path, schema)
    out = {}
    for k, key in schema.items():
        p = f"{path}.{k}"
        if isinstance(key.check, dict):
            out[k] = resolve(key.check, given.get(k), p)
        elif k in given:
            out[k] = key.check(given[k], p)
        elif key.default is REQUIRED:
            raise config_error(p, problem="missing")
        else:
            out[k] = copy.deepcopy(key.default)
    return out


def defaults(schema: Schema) -> dict:
    """The schema's defaults (nested schemas included); required keys are left out."""
    return {k: defaults(key.check) if isinstance(key.check, dict) else copy.deepcopy(key.default)
            for k, key in schema.items() if isinstance(key.check, dict) or key.default is not REQUIRED}


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; everything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
