"""The collector's thresholds a router or master process runs with (FLEXLB_CONFIG gcYoungThreshold)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from flexlb.gc_policy import OLDER_THRESHOLDS, PYTHON_DEFAULTS, apply_gc_policy
from flexlb.settings import load_settings


@pytest.fixture(autouse=True)
def _restore_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_default_setting_collects_young_objects_less_often() -> None:
    young = load_settings({}).flexlb.gc_young_threshold
    assert young > PYTHON_DEFAULTS[0]
    assert apply_gc_policy(young) == (young, *OLDER_THRESHOLDS)
    assert gc.get_threshold() == (young, *OLDER_THRESHOLDS)


def test_zero_keeps_pythons_defaults() -> None:
    gc.set_threshold(123, 4, 5)
    assert apply_gc_policy(0) == PYTHON_DEFAULTS
    assert gc.get_threshold() == PYTHON_DEFAULTS


def test_the_variable_sets_it() -> None:
    assert load_settings({"GC_YOUNG_THRESHOLD": "2500"}).flexlb.gc_young_threshold == 2500
