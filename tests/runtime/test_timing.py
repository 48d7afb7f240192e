"""The stopwatch behind plan.json's timing: laps and nested stages charge each second once."""
from __future__ import annotations

import time

import pytest

from tamp_fx.runtime.timing import Stopwatch, stage, with_part


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_stages_charge_each_second_to_the_innermost_and_parts_sum_to_the_wall_time():
    clock = Stopwatch()
    with clock.running():
        with stage("layer forwards"):
            _busy(0.03)
            with stage("statistics"):
                _busy(0.02)
                with stage("token selection"):
                    _busy(0.01)
        clock.lap("prune")
    record = clock.record()
    parts = record["parts_s"]
    assert parts["layer forwards"] == pytest.approx(0.03, abs=0.008)
    assert parts["statistics"] == pytest.approx(0.02, abs=0.008)
    assert parts["token selection"] == pytest.approx(0.01, abs=0.008)
    assert parts["prune"] < 0.005                     # the lap's time less the stages inside it
    assert sum(parts.values()) == pytest.approx(record["wall_s"], abs=0.003)
    assert list(parts) == ["layer forwards", "statistics", "token selection", "prune", "other"]


def test_stages_outside_a_running_stopwatch_only_run_the_block():
    ran = []
    with stage("statistics"):
        ran.append(1)
    assert ran == [1]


def test_a_stage_that_raises_is_still_charged():
    clock = Stopwatch()
    with clock.running(), pytest.raises(ValueError), stage("pruning"):
        _busy(0.01)
        raise ValueError
    assert clock.record()["parts_s"]["pruning"] >= 0.009


def test_with_part_adds_to_the_wall_time_and_keeps_the_order():
    record = {"wall_s": 2.0, "parts_s": {"load": 1.0, "other": 1.0}}
    assert with_part(record, "writing", 0.5) == {"wall_s": 2.5, "parts_s": {"load": 1.0, "writing": 0.5, "other": 1.0}}
