"""Benchmark v2's statistics: Rel. as the paper defines it, with a paired bootstrap interval."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import quality_v2  # noqa: E402


def _row(**hits):
    return {"hits": hits}


def test_rel_is_the_mean_over_tasks_of_pruned_over_dense_accuracy():
    dense = _row(a="1111" * 10, b="1100" * 10)
    pruned = _row(a="1100" * 10, b="1000" * 10)
    rel, lo, hi = quality_v2.rel_with_interval(pruned, dense, np.random.default_rng(0))
    assert rel == (0.5 / 1.0 + 0.25 / 0.5) / 2
    assert lo <= rel <= hi


def test_the_interval_is_paired_a_model_equal_to_dense_has_none():
    # the same questions are resampled for both models: identical answers give Rel. = 1 in
    # every resample (an unpaired bootstrap would spread around 1)
    rng = np.random.default_rng(1)
    hits = {t: "".join(rng.choice(["0", "1"], size=200, p=[0.2, 0.8])) for t in "abc"}
    assert quality_v2.rel_with_interval(_row(**hits), _row(**hits), rng) == (1.0, 1.0, 1.0)


def test_the_interval_narrows_with_more_questions():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 800):
        dense = _row(a="1" * n)
        pruned = _row(a="".join(rng.choice(["0", "1"], size=n)))
        _, lo, hi = quality_v2.rel_with_interval(pruned, dense, rng)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_a_task_the_dense_model_never_answers_leaves_rel_undefined():
    rel, lo, hi = quality_v2.rel_with_interval(_row(a="1010", b="11"), _row(a="1111", b="00"), np.random.default_rng(3))
    assert np.isnan(rel) and np.isnan(lo) and np.isnan(hi)
