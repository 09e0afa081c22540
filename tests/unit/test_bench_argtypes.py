"""The bench subcommands' argument types: a bad value is refused with a message saying what was expected."""

from __future__ import annotations

import argparse

import pytest

from flexlb.bench.argtypes import json_object


def test_json_object_takes_an_object_and_names_what_else_it_got() -> None:
    assert json_object('{"ttftTieRatio": 0.3}') == {"ttftTieRatio": 0.3}
    with pytest.raises(argparse.ArgumentTypeError, match="expected a JSON object, got list"):
        json_object("[1]")
    with pytest.raises(argparse.ArgumentTypeError, match="not JSON"):
        json_object("{ttftTieRatio: 0.3}")
