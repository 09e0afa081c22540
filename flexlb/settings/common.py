"""What every part of the configuration shares: ``ConfigError``, the declaration of an environment variable
(``EnvVar``), and the coercion and range checks of one value, with the wording of their errors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

Scalar = int | float | bool | str


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range; the message names the field and its source."""


@dataclass(frozen=True, slots=True)
class EnvVar:
    """An environment variable outside FLEXLB_CONFIG: parsed (when ``default`` is an int) and documented."""

    name: str
    default: int | str | None
    doc: str
    low: int = 1  # integers only: the smallest accepted value


def _squash(name: str) -> str:
    """``ShortestTTFT``, ``shortest_ttft`` and ``SHORTEST-TTFT`` all become ``SHORTESTTTFT``."""
    return re.sub(r"[\s_-]", "", name).upper()


_TYPE_WORDS: Final[Mapping[type, str]] = {
    int: "an integer",
    float: "a number",
    bool: "a boolean (true/false/1/0/yes/no)",
    str: "a string",
}
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def _show(value: object) -> str:
    """A value as it would appear in JSON, shortened: ``"abc"``, ``true``, ``null``."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _type_error(where: str, typ: type, value: object) -> ConfigError:
    return ConfigError(f"{where}: expected {_TYPE_WORDS[typ]}, got {_show(value)}")


def _from_text(text: str, typ: type, where: str) -> Scalar:
    """Coerce a string (an environment variable, or a JSON string) to ``typ``."""
    s = text.strip()
    if typ is str:
        return s
    if typ is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
    elif typ is int:
        if re.fullmatch(r"[+-]?[0-9]+", s):
            return int(s)
    elif typ is float:
        try:
            number = float(s)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise _type_error(where, typ, text)


def _from_json(value: object, typ: type, where: str) -> Scalar:
    """Coerce a decoded JSON value to ``typ``; a bool is never a number."""
    if isinstance(value, str):
        if typ is str:
            return value
        # The original (Jackson) accepted scalars written as strings, e.g. "maxQueueSize": "1000".
        return _from_text(value, typ, where)
    if isinstance(value, bool):
        if typ is bool:
            return value
    elif isinstance(value, int):
        if typ is int:
            return value
        if typ is float and math.isfinite(float(value)):
            return float(value)
    elif isinstance(value, float) and math.isfinite(value):
        if typ is float:
            return value
        if typ is int and value.is_integer():  # 1e6 or 1000.0: JSON has one number type
            return int(value)
    raise _type_error(where, typ, value)


def _check_range(value: float, where: str, low: float | None, high: float | None, positive: bool) -> None:
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {_num(value)}")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"{where}: must be between {_num(low)} and {_num(high)}, got {_num(value)}")
    if low is not None and value < low:
        rule = "must not be negative" if low == 0 else f"must be at least {_num(low)}"
        raise ConfigError(f"{where}: {rule}, got {_num(value)}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: must be at most {_num(high)}, got {_num(value)}")


def _blank(value: str | None) -> bool:
    # An empty variable (``FOO=`` in a container spec) means "unset", not "the empty string".
    return value is None or not value.strip()


def _load_json(environ: Mapping[str, str], name: str) -> object:
    try:
        return json.loads(environ[name])
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{name}: invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} (char {exc.pos})"
        ) from None
