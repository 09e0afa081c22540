"""The configuration's reference tables, generated from the declarations (pasted into docs/configuration.md between
its BEGIN / END markers, checked by a test; ``python -m flexlb.settings`` prints them)."""

from __future__ import annotations

import json

from flexlb.settings.auth import AUTH_VARS
from flexlb.settings.common import _num
from flexlb.settings.environment import ENV_VARS
from flexlb.settings.flexlb_config import CONFIG_FIELDS, IGNORED_KEYS, ConfigField
from flexlb.settings.strategies import LEGACY_STRATEGIES


def _valid(f: ConfigField) -> str:
    if f.strategy:
        return "a strategy"
    if f.type is bool:
        return "true / false"
    if f.type is str:
        return "non-empty"
    if f.low is not None and f.high is not None:
        return f"{_num(f.low)} to {_num(f.high)}"
    if f.positive and f.high is not None:
        return f"> 0, <= {_num(f.high)}"
    if f.positive:
        return "> 0"
    if f.low is not None:
        return f">= {_num(f.low)}"
    return ""


def render_config_table() -> str:
    """Markdown tables of every variable, field, older strategy name and ignored key (docs/configuration.md)."""
    lines = ["### Environment variables", "", "| variable | default | meaning |", "|---|---|---|"]
    for v in (*ENV_VARS, *AUTH_VARS):
        default = "unset" if v.default is None else f"`{v.default}`"
        lines.append(f"| `{v.name}` | {default} | {v.doc} |")
    lines += [
        "",
        "### FLEXLB_CONFIG fields",
        "",
        "| FLEXLB_CONFIG field | environment variable | type | default | valid | from | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in CONFIG_FIELDS:
        lines.append(
            f"| `{f.key}` | `{f.env}` | {f.type.__name__} | `{json.dumps(f.default)}` | {_valid(f)} | {f.origin}"
            f" | {f.doc} |"
        )
    lines += ["", "### Older strategy names", "", "| older strategy name | flexlb strategy |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in LEGACY_STRATEGIES.items()]
    lines += ["", "### Ignored keys of the original", "", "| ignored FLEXLB_CONFIG key | why |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in IGNORED_KEYS.items()]
    return "\n".join(lines) + "\n"
