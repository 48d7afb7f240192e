"""The layer bar says which layer runs, for how long, and the last layer's time and peak memory;
plan.json records every layer's wall time and peak memory."""
from __future__ import annotations

import mmap

import pytest
import torch

import tamp_fx
from tamp_fx.runtime.memory import PeakMemory, describe
from tamp_fx.runtime.progress import Bars, ItemColumn


def test_layer_bar_shows_current_item_and_note():
    bars = Bars(enabled=False)
    with bars, bars.task("prune layers", 3, item="layer") as advance:
        task = bars._progress.tasks[0]
        assert ItemColumn().render(task).plain.startswith("layer 0: ")
        advance(note="last layer 1.0 s, peak host 10 MiB")
        text = ItemColumn().render(bars._progress.tasks[0]).plain
        assert text.startswith("layer 1: ") and text.endswith("last layer 1.0 s, peak host 10 MiB")
        advance()                                   # no note: the last one stays
        assert ItemColumn().render(bars._progress.tasks[0]).plain.endswith("peak host 10 MiB")
    with bars, bars.task("samples", 2) as advance:  # no item: nothing after the bar
        assert ItemColumn().render(bars._progress.tasks[0]).plain == ""


def test_peak_memory_sees_an_allocation():
    peak = PeakMemory()
    before = peak.read()["peak_host_mib"]
    with mmap.mmap(-1, 64 * 2**20) as pages:        # fresh pages (a heap allocation may reuse resident ones)
        pages.write(b"\1" * len(pages))            # touched: 64 MiB more resident
        after = peak.read()["peak_host_mib"]
    assert after >= before + 60 or peak.host_since_start
    assert describe({"peak_host_mib": 1234.0, "peak_device_mib": 5.0}) == "peak host 1,234 MiB, device 5 MiB"


def test_plan_records_time_and_peak_memory_per_layer(tiny_models):
    model = tiny_models("llava")
    plan = tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method="wanda", nsamples=2))
    assert [entry["layer"] for entry in plan.layers] == list(range(len(plan.layers)))
    for entry in plan.layers:
        assert entry["seconds"] > 0 and entry["peak_host_mib"] > 0
        assert "peak_device_mib" not in entry      # planned on the CPU: no device memory to report


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_peak_on_cuda():
    peak = PeakMemory(torch.device("cuda"))
    x = torch.ones(2**20, device="cuda")             # 4 MiB
    stats = peak.read()
    del x
    assert stats["peak_device_mib"] >= 4
