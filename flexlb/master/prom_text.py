"""Read a few metrics out of a Prometheus text exposition (an engine's ``GET /metrics``), fast.

``prometheus_client.parser.text_string_to_metric_families`` parses every line, histograms included: some 7 ms of CPU
for a vLLM page, on the master's event loop, several times a second per worker. The load of a worker needs half a
dozen series, so this reads only the lines of the wanted names (a string prefix test per line) and parses their
labels and value; the unit tests check it against prometheus_client on real-format pages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field

_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(slots=True)
class Samples:
    """The series found for the wanted names: name -> [(labels, value), ...], in page order."""

    series: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.series.get(name, ())]

    def has(self, name: str) -> bool:
        return name in self.series

    def total(self, *names: str) -> float | None:
        """The sum over the series of the first of ``names`` present (e.g. one per data-parallel engine); None when
        none is."""
        for name in names:
            if name in self.series:
                return sum(self.values(name))
        return None

    def mean(self, *names: str) -> float | None:
        for name in names:
            values = self.values(name)
            if values:
                return sum(values) / len(values)
        return None


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"bad label set {{{text}}}")
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return labels


def _value(text: str) -> float:
    """The sample value (a timestamp after it is ignored); Prometheus spells infinities and NaN its own way."""
    token = text.split(maxsplit=1)[0]
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[token] if token in special else float(token)


def read_samples(text: str, names: Collection[str]) -> Samples:
    """The series of ``names`` (full sample names, ``_total`` included for counters) in ``text``.

    Raises ValueError for a wanted line that is not a valid sample; other lines are not looked at."""
    wanted = frozenset(names)
    prefixes = tuple(sorted({n.split(":", 1)[0] for n in wanted}))  # e.g. "vllm", a cheap first filter
    found = Samples()
    for raw in text.splitlines():
        line = raw.lstrip()
        if not line.startswith(prefixes):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace].rstrip()
            if name not in wanted:
                continue
            end = line.rfind("}")
            if end < brace:
                raise ValueError(f"unterminated label set in {raw!r}")
            labels, rest = _labels(line[brace + 1 : end]), line[end + 1 :]
        else:
            name = line[:space] if space != -1 else line
            if name not in wanted:
                continue
            labels, rest = {}, line[len(name) :]
        try:
            value = _value(rest)
        except (IndexError, ValueError):
            raise ValueError(f"no sample value in {raw!r}") from None
        found.series.setdefault(name, []).append((labels, value))
    return found
