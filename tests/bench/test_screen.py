"""Benchmark v2's method names and the screen's bookkeeping (no plan, no model: a fake fixture)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import quality_v2  # noqa: E402
import quality_v2_runs  # noqa: E402
import screen  # noqa: E402


def test_a_method_name_is_a_shortcut_then_parts_of_the_registries():
    assert quality_v2_runs.plan_options("wanda") == ["--method", "wanda"]
    assert quality_v2_runs.plan_options("das+sparsegpt") == ["--method", "das", "--score", "sparsegpt"]
    assert quality_v2_runs.plan_options("das+sparsegpt+random") == ["--method", "das", "--score", "sparsegpt",
                                                                    "--tokens", "random"]
    assert quality_v2_runs.plan_options("sparsegpt+amia") == ["--method", "sparsegpt", "--tokens", "amia"]
    assert quality_v2_runs.plan_options("tamp-size") == ["--method", "tamp", "--allocation", "das-size"]
    for bad in ("nonsense", "wanda+nonsense", "wanda+amia+random", "das-size+das"):
        with pytest.raises(ValueError, match=bad.split("+")[0]):
            quality_v2_runs.plan_options(bad)


def test_the_grid_keeps_its_methods_and_their_options():
    assert list(quality_v2.METHODS) == ["magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "das", "amia", "tamp",
                                        "das-size", "tamp-size", "tamp-sparsegpt"]
    assert quality_v2.METHODS["das-size"] == ["--method", "das", "--allocation", "das-size"]
    assert all(options == ["--method", m] for m, options in quality_v2.METHODS.items() if m not in ("das-size", "tamp-size"))


TASKS = ("colour", "count")


def _row(method: str, accuracy: float, n: int = 40, **extra) -> dict:
    rng = np.random.default_rng(len(method))
    hits = {t: "".join(rng.choice(["0", "1"], size=n, p=[1 - accuracy, accuracy])) for t in TASKS}
    return {"method": method, "target": 0.6, "seed": 0, "sparsity": 0.6, "plan_seconds": 3.0, "vqa": accuracy,
            "hits": hits, "eval_seconds": {"load": 1.0, "vqa": 2.0}, "cpu_seconds": {"plan": 5.0, "eval": 3.0},
            "options": [] if method == "dense" else quality_v2_runs.plan_options(method), **extra}


class FakeFixture:
    """Stands for quality_v2_runs.Fixture2: a row per method with a made-up accuracy."""

    def __init__(self, accuracies: dict[str, float]):
        self.accuracies, self.ran = accuracies, []

    def run(self, method, sparsity, seed, perplexities):
        self.ran.append((method, sparsity, seed, perplexities))
        return _row(method, self.accuracies[method])


def _args(tmp_path, *methods, report_only=False) -> argparse.Namespace:
    return argparse.Namespace(workdir=tmp_path / "work", docs=tmp_path / "docs", methods=list(methods), vqa_samples=None,
                              conversations=8, max_windows=None, dtype="float32", sparsity=0.6, seed=0,
                              perplexities=False, report_only=report_only, note="", from_grid=None)


def test_the_screen_resumes_and_reports_the_methods_sorted_by_rel(tmp_path, monkeypatch):
    fake = FakeFixture({"wanda": 0.5, "sparsegpt": 0.8, "das+sparsegpt": 0.7})

    def begin_runs(args, state, settings, perplexities):
        assert settings["vqa_samples"] == screen.QUESTIONS and not perplexities

        def record(row):
            state.record(row | {"settings": settings, "cpu": "test CPU"})
        if not state.rows:
            record(_row("dense", 0.9) | {"seed": None, "plan_seconds": None})
        return fake, record

    monkeypatch.setattr(screen, "begin_runs", begin_runs)
    screen.run_screen(_args(tmp_path, "wanda", "sparsegpt"))
    screen.run_screen(_args(tmp_path, "wanda", "sparsegpt", "das+sparsegpt"))        # resumed: one more plan
    assert [m for m, *_ in fake.ran] == ["wanda", "sparsegpt", "das+sparsegpt"]
    assert fake.ran[0][1:] == (0.6, 0, False)
    rows = [json.loads(line) for line in (tmp_path / "work" / "screen.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dense", "wanda", "sparsegpt", "das+sparsegpt"]
    assert not (tmp_path / "work" / "results.jsonl").exists()          # the grid's rows are not the screen's

    report = (tmp_path / "docs" / "quality-v2-screen.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "plan options" not in line]
    assert [line.split(" | ")[0] for line in table] == ["| dense (test CPU)", "| sparsegpt", "| das+sparsegpt", "| wanda"]
    assert "`--method das --score sparsegpt`" in table[2]
    assert "3 methods at 60%" in report and "CPU time of the plans and evaluations 0.5 min" in report
    saved = json.loads((tmp_path / "docs" / "quality-v2-screen.json").read_text())
    assert len(saved["rows"]) == 4 and saved["sparsity"] == 0.6


def test_rel_is_paired_with_the_dense_row_of_the_same_cpu():
    dense_a = _row("dense", 0.9) | {"cpu": "A"}
    dense_b = _row("wanda", 0.6) | {"method": "dense", "cpu": "B"}    # the same answers as same_as_b
    same_as_b = dense_b | {"method": "wanda", "cpu": "B"}
    denses, pruned = screen.screened([dense_a, dense_b, same_as_b])
    assert list(denses) == ["A", "B"]
    assert (pruned[0]["rel"], pruned[0]["rel_lo"], pruned[0]["rel_hi"]) == (1.0, 1.0, 1.0)


def test_a_row_from_the_grid_is_its_answers_to_the_screens_questions(tmp_path):
    settings = {"conversations": 8, "dtype": "float32", "weights": "w", "sparsity": 0.6, "seed": 0}
    dense = _row("dense", 0.9) | {"cpu": "A"}                                        # 40 questions per task
    grid_row = _row("das", 0.5, n=80) | {"cpu": "A", "settings": settings | {"vqa_samples": 160}}
    other_cpu = grid_row | {"cpu": "B", "plan_seconds": 1.0}
    grid = tmp_path / "quality-v2.json"
    grid.write_text(json.dumps({"rows": [other_cpu, grid_row]}))
    row = screen.from_grid(grid, "das", settings, [dense])
    assert row["hits"] == {t: h[:40] for t, h in grid_row["hits"].items()} and row["from_grid"]
    assert row["vqa"] == sum(h.count("1") for h in row["hits"].values()) / 80
    assert row["plan_seconds"] == 3.0 and row["options"] == ["--method", "das"]
    with pytest.raises(SystemExit, match="no row of tamp"):
        screen.from_grid(grid, "tamp", settings, [dense])
