"""Benchmark v2's statistics: Rel. as the paper defines it, with a paired bootstrap interval."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

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


def test_a_partial_report_names_every_run_it_lacks(tmp_path):
    rng = np.random.default_rng(4)
    hits = lambda p: {t: "".join(rng.choice(["0", "1"], size=20, p=[1 - p, p])) for t in ("colour", "text")}  # noqa: E731
    dense = {"method": "dense", "target": 0.0, "seed": None, "sparsity": 0.0, "vqa": 0.9, "hits": hits(0.9),
             "ppl_desc": 3.0, "ppl_wiki": 30.0, "windows_desc": 4, "windows_wiki": 8, "plan_seconds": None}
    done = dense | {"method": "wanda", "target": 0.6, "seed": 0, "sparsity": 0.6, "vqa": 0.7, "hits": hits(0.7),
                    "plan_seconds": 12.0}
    meta = {"machine": "test", "total_seconds": 60.0, "invocations": ["python bench/quality_v2.py"], "note": "",
            "vqa_samples": 40}
    quality_v2.write_outputs([dense, done], tmp_path, meta)
    report = (tmp_path / "quality-v2.md").read_text()
    grid = sum(len(seeds) for seeds in quality_v2.SEEDS.values()) * len(quality_v2.METHODS)
    assert f"**Not run yet** ({grid - 1} of {grid} runs" in report
    assert "wanda 60% seed 0," not in report and "tamp 60% seed 0," in report and "tamp 70% seed 0" in report
    assert "(4 windows of 512 tokens)" in report and (tmp_path / "quality-v2.csv").read_text().count("\n") == 3


def test_each_run_is_paired_with_the_dense_model_measured_on_its_cpu(tmp_path):
    rng = np.random.default_rng(5)
    hits = lambda: {t: "".join(rng.choice(["0", "1"], size=50)) for t in ("colour", "text")}  # noqa: E731
    base = {"target": 0.0, "seed": None, "sparsity": 0.0, "vqa": 0.5, "ppl_desc": 3.0, "ppl_wiki": 30.0,
            "windows_desc": 4, "windows_wiki": 8, "plan_seconds": None}
    dense_a = base | {"method": "dense", "hits": hits()}                       # no "cpu": the first run's
    dense_b = base | {"method": "dense", "hits": hits(), "cpu": "B"}
    run_b = dense_b | {"method": "wanda", "target": 0.6, "seed": 0, "sparsity": 0.6, "plan_seconds": 1.0}
    meta = {"machine": "test", "total_seconds": 1.0, "invocations": [], "note": "", "vqa_samples": 100}
    quality_v2.write_outputs([dense_a, dense_b, run_b], tmp_path, meta)
    rows = list(csv.DictReader((tmp_path / "quality-v2.csv").open()))
    wanda = next(r for r in rows if r["method"] == "wanda")
    assert float(wanda["rel"]) == 1.0 and float(wanda["rel_lo"]) == float(wanda["rel_hi"]) == 1.0
    assert [r["cpu"] for r in rows] == [quality_v2.FIRST_CPU, "B", "B"]
    differ = sum(a != b for t in dense_a["hits"] for a, b in zip(dense_a["hits"][t], dense_b["hits"][t]))
    assert f"{differ} of its 100 answers differ between {quality_v2.FIRST_CPU} and B" in (tmp_path / "quality-v2.md").read_text()


def test_resuming_with_other_settings_is_refused_before_any_work(tmp_path):
    import json
    import subprocess

    work = tmp_path / "work"
    work.mkdir()
    row = {"method": "dense", "settings": {"conversations": 128, "vqa_samples": 600, "max_windows": None}}
    (work / "results.jsonl").write_text(json.dumps(row) + "\n")
    done = subprocess.run([sys.executable, str(Path(quality_v2.__file__)), "--workdir", str(work), "--docs",
                           str(tmp_path / "docs"), "--vqa-samples", "1200"], capture_output=True, text=True)
    assert done.returncode == 1 and "not {'conversations': 128, 'vqa_samples': 1200" in done.stderr
    assert sorted(p.name for p in work.iterdir()) == ["results.jsonl"] and not (tmp_path / "docs").exists()


def test_plan_statistics_average_each_projection_and_modality_over_layers():
    def linear(layer, proj, sparsity, kept_image):
        return f"lm.layers.{layer}.{proj}.weight", {
            "layer": layer, "sparsity": sparsity,
            "stats": {"selected_fraction": {"text": 0.5, "image": kept_image}, "diversity": {"image": 0.25, "text": None}}}
    data = {"linears": dict([linear(0, "attn.q_proj", 0.4, 0.1), linear(1, "attn.q_proj", 0.6, 0.3),
                             linear(0, "mlp.up_proj", 0.7, 0.2)])}
    stats = quality_v2.plan_statistics(data)
    assert stats["sparsity_by_projection"] == {"q_proj": 0.5, "up_proj": 0.7}
    assert np.isclose(stats["selected_fraction"]["image"], 0.2) and stats["selected_fraction"]["text"] == 0.5
    assert stats["diversity"] == {"image": 0.25}          # a null diversity is left out, not averaged as 0
    lines = quality_v2._plan_lines([{"method": "tamp", "target": 0.6, "seed": 0, "plan_stats": stats}])
    assert "| tamp | 60% | 50.0% | 70.0% | 50.0% | 20.0% |" in lines


def test_weights_id_names_the_weights_file_and_refuses_a_missing_one(tmp_path, monkeypatch):
    import tamp_fx.testbeds.fixture2.model as fixture2_model
    ids = {}
    for name, data in (("a", b"one"), ("b", b"two"), ("c", b"one")):
        (tmp_path / name).write_bytes(data)
        monkeypatch.setattr(fixture2_model, "WEIGHTS", tmp_path / name)
        ids[name] = quality_v2.weights_id()
    assert ids["a"] == ids["c"] != ids["b"]      # the content, not the path
    monkeypatch.setattr(fixture2_model, "WEIGHTS", tmp_path / "missing")
    with pytest.raises(SystemExit, match="train fixture 2 first"):
        quality_v2.weights_id()
