"""Progress: one ETA over every phase of a plan (a fake clock), rows that fit 80 columns, plain
lines (one per finished layer) where stderr is no terminal; plan.json records every layer's wall
time and peak memory."""
from __future__ import annotations

import io
import mmap
import re
import resource
from pathlib import Path

import pytest
import torch
from rich.console import Console

import tamp_fx
from tamp_fx.runtime.memory import PeakMemory, describe, resident_mib
from tamp_fx.runtime.progress import Bars, Eta, InfoColumn


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_the_time_left_in_every_phase_not_only_the_current_one():
    clock = FakeClock()
    eta = Eta(clock)
    seconds = {"capture": 10.0, "profile": 40.0, "prune": 100.0, "write": 5.0}
    for phase, cost in seconds.items():
        eta.expect(phase, cost / 5)                  # costs in units proportional to the time they take
    assert eta.remaining() is None                   # no pace to go by yet
    left = sum(seconds.values())
    for phase, cost in seconds.items():
        eta.begin(phase)
        for step in range(1, 5):
            clock.now += cost / 4
            left -= cost / 4
            eta.update(phase, step / 4)
            assert eta.remaining() == pytest.approx(left), (phase, step)
        if phase == "capture":                       # its own part is done; three phases (145 s) are not
            assert eta.remaining() == pytest.approx(145.0) and eta.fraction() == pytest.approx(2 / 31)
    assert eta.remaining() == 0 and eta.fraction() == 1


def test_eta_counts_down_between_steps_and_goes_by_the_pace_of_the_phase_under_way():
    clock = FakeClock()
    eta = Eta(clock)
    eta.expect("capture", 1)
    eta.expect("prune", 10)
    eta.begin("capture")
    clock.now = 2.0
    eta.update("capture", 1.0)                       # 2 s a unit so far: prune is expected to take 20 s
    eta.begin("prune")
    assert eta.remaining() == pytest.approx(20.0)
    clock.now = 12.0
    eta.update("prune", 0.25)                        # prune goes slower than expected: 40 s in all
    assert eta.remaining() == pytest.approx(30.0)
    clock.now = 15.0                                 # no step since: the estimate counts down
    assert eta.remaining() == pytest.approx(27.0)


def test_rich_rows_fit_80_columns_one_line_each():
    clock = FakeClock()
    bars = Bars(True, style="rich", to=Console(file=io.StringIO(), width=80, force_terminal=True), clock=clock)
    with bars:
        bars.expect("write plan", 1)
        bars.expect("prune", 300)
        with bars.task("prune", 300, item="layer") as advance:
            clock.now = 1234.5
            advance(note=describe({"peak_host_mib": 123456.0, "peak_device_mib": 654321.0}))
            with bars.task("layer 1: calibrate, with a description longer than its column", 100000) as inner:
                inner(99999)
                out = io.StringIO()
                Console(file=out, width=80).print(bars._progress.get_renderable())
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, out.getvalue()           # overall, prune, calibrate: none wrapped
    assert all(len(line) <= 80 for line in lines), out.getvalue()
    assert "ETA" in lines[0] and "elapsed" in lines[0]


def test_plain_lines_one_per_finished_layer_with_elapsed_eta_and_memory():
    clock, out = FakeClock(), io.StringIO()
    bars = Bars(True, style="plain", to=Console(file=out, width=80), clock=clock)
    with bars:
        bars.expect("capture decoder inputs", 1)
        bars.expect("prune", 6)
        with bars.task("capture decoder inputs", 4) as advance:
            for _ in range(4):
                clock.now += 0.5
                advance()
        with bars.task("prune", 3, item="layer") as advance:
            for i in range(3):
                with bars.task(f"layer {i}: calibrate", 4) as inner:   # nested: no lines of its own
                    inner(4)
                clock.now += 4.0
                advance(note=describe({"peak_host_mib": 812.0}))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("capture decoder inputs 4/4 in 2.0 s; 0:00:02 elapsed, ETA ")
    assert lines[1:] == [f"prune {k}/3: layer {k - 1}, 4.0 s, peak host 812 MiB; 0:00:{2 + 4 * k:02d} elapsed, "
                         f"ETA 0:00:{12 - 4 * k:02d}" for k in (1, 2, 3)]
    assert all(len(line) <= 80 for line in lines)


def test_layer_row_shows_the_layer_under_way_and_the_last_ones_time_and_note():
    clock = FakeClock()
    bars = Bars(enabled=False, clock=clock)
    with bars, bars.task("prune", 3, item="layer") as advance:
        info = InfoColumn(bars)
        assert info.render(bars._progress.tasks[0]).plain == "layer 0: 0 s"
        clock.now = 2.0
        advance(note="peak host 10 MiB")
        clock.now = 3.0
        assert info.render(bars._progress.tasks[0]).plain == "layer 1: 1 s; last 2.0 s, peak host 10 MiB"


@pytest.mark.parametrize("method, phases", [
    ("wanda", {"capture decoder inputs", "prune"}),
    ("tamp", {"capture decoder inputs", "profile", "prune"}),
    ("ecoflap", {"capture decoder inputs", "ecoflap: zeroth-order", "prune"}),
])
def test_a_plan_declares_the_phases_it_runs_and_finishes_them(tiny_models, method, phases):
    """The ETA covers the whole plan only if every phase it expects is one it runs, under that name."""
    model = tiny_models("llava")
    bars = Bars(False)
    tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method=method, nsamples=2), progress=bars)
    assert set(bars.eta.phases) == phases
    assert all(p.units > 0 and p.done == 1 for p in bars.eta.phases.values())
    assert bars.eta.fraction() == 1 and bars.eta.remaining() == 0
    assert re.fullmatch(r"\d+:\d\d:\d\d elapsed, ETA 0:00:00", bars.times())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc/self/statm")
def test_peak_memory_is_the_peak_the_kernel_reports():
    """The host peak covers what was resident before it was made (64 MiB since let go) and is the
    kernel's own mark, which nothing resets."""
    with mmap.mmap(-1, 64 * 2**20) as pages:        # fresh pages (a heap allocation may reuse resident ones)
        pages.write(b"\1" * len(pages))            # touched: 64 MiB more resident
        resident = resident_mib()
    peak = PeakMemory().read()["peak_host_mib"]
    kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB on Linux
    assert peak >= resident - 0.1                  # read() rounds to 0.1 MiB
    assert abs(peak - kernel) <= 1
    assert describe({"peak_host_mib": 1234.0, "peak_device_mib": 5.0}) == "peak host 1,234 MiB, device 5 MiB"


def test_plan_records_time_and_peak_memory_per_layer(tiny_models):
    model = tiny_models("llava")
    plan = tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method="wanda", nsamples=2))
    assert [entry["layer"] for entry in plan.layers] == list(range(len(plan.layers)))
    for entry in plan.layers:
        assert entry["seconds"] > 0 and 0 < entry["host_mib"] <= entry["peak_host_mib"] + 0.1   # rounded to 0.1 MiB
        assert "peak_device_mib" not in entry      # planned on the CPU: no device memory to report


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_peak_on_cuda():
    peak = PeakMemory(torch.device("cuda"))
    x = torch.ones(2**20, device="cuda")             # 4 MiB
    stats = peak.read()
    del x
    assert stats["peak_device_mib"] >= 4
