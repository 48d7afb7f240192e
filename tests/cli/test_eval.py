"""`tamp-fx eval`: VQA on tamp-fx's fixtures only (per task and overall), perplexity, a dense
baseline side by side, JSON on stdout or in a file, clear refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.cli import fails_cleanly, invoke
from tamp_fx.errors import TampError
from tamp_fx.testbeds import vqa
from tamp_fx.testbeds.fixture import scenes
from tamp_fx.testbeds.fixture.model import MARKER


def mark(model: Path, out: Path, fixture: str | None) -> Path:
    """A copy of ``model`` at ``out`` whose config.json says it is ``fixture`` (None: says nothing)."""
    shutil.copytree(model, out)
    if fixture is not None:
        config = out / "config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | {MARKER: fixture}))
    return out


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins: "dense" (the tiny llava marked as fixture 1), "pruned" (``apply`` of a
    magnitude plan of it), "next" (the tiny llava_next marked as fixture 2), "plain" (the tiny
    llava unmarked, in a directory called fixture), "llama"; and "text", a text file."""
    import tamp_fx
    root = tmp_path_factory.mktemp("eval")
    dense = mark(tiny_models("llava"), root / "dense", "llava")
    plan = tamp_fx.plan(dense, dense / "calib.jsonl", tamp_fx.PlanConfig(method="magnitude", nsamples=2))
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return {"dense": dense, "pruned": tamp_fx.apply(dense, plan, root / "pruned"), "text": text,
            "next": mark(tiny_models("llava_next"), root / "model-b", "next"),
            "plain": mark(tiny_models("llava"), root / "fixture", None), "llama": tiny_models("llama")}


def printed(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """(the header, metric -> the rest of its row) of the table eval printed."""
    header, rows = [], {}
    for line in map(str.strip, stdout.splitlines()):
        for sep in "┃│":
            if line.startswith(sep):
                cells = [c.strip() for c in line.strip(sep).split(sep)]
                if sep == "┃":
                    header = cells
                else:
                    rows[cells[0]] = cells[1:]
    return header, rows


def number(cell: str) -> float:
    return float(cell[:-1]) / 100 if cell.endswith("%") else float(cell)


def fake_answers(right_on: str):
    """An ``answer`` for :mod:`vqa`: every answer right on the model called ``right_on``, on any
    other the first half right (one in each task of 12 questions) and the rest wrong."""
    def answer(model, processor, samples, **_):
        right = Path(model.config.name_or_path).name == right_on
        return [s.answer if right or i < len(samples) // 2 else "wrong" for i, s in enumerate(samples)]
    return answer


def test_vqa_accuracy_is_exact_match_on_the_normalised_answer(monkeypatch):
    samples = vqa.held_out(24)
    # the tasks cycle in blocks of 6: every other block is answered right (in another case, with
    # punctuation), the rest wrong, so each task is right exactly half the time
    fake = [f" {s.answer.upper()}." if (i // 6) % 2 == 0 else "wrong" for i, s in enumerate(samples)]
    monkeypatch.setattr(vqa, "answer", lambda model, processor, samples, **_: fake[:len(samples)])
    result = vqa.vqa_accuracy(None, None, 24)
    assert result.accuracy == 0.5
    assert result.per_task == {t: 0.5 for t in scenes.TASKS} and result.questions == {t: 4 for t in scenes.TASKS}
    assert result.answers == fake


@pytest.mark.parametrize("split", sorted(vqa.SPLITS))
def test_the_default_number_of_questions_is_the_whole_split(split):
    size = vqa.SPLITS[split].size
    assert size == {"llava": 600, "next": 1200}[split]          # as --vqa-split's help says
    assert vqa.sample_count(split) == size == vqa.VqaTask(split).total
    assert vqa.sample_count(split, 7) == 7 == vqa.VqaTask(split, 7).total
    with pytest.raises(TampError, match=f"is more than the {split} split has .*pass at most {size:,},"):
        vqa.sample_count(split, size + 1)
    with pytest.raises(TampError, match="must be at least 1, got 0"):
        vqa.sample_count(split, 0)


def test_eval_asks_the_whole_split_by_default(models, monkeypatch):
    monkeypatch.setattr(vqa, "answer", fake_answers("dense"))
    r = invoke(["eval", models["dense"], "--json", "-", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["vqa"]
    assert report["samples"] == vqa.SPLITS["llava"].size and report["accuracy"] == 1.0 and report["split"] == "llava"


def test_the_fixtures_are_recognised_by_config_json_and_a_pruned_copy_stays_one(models):
    assert vqa.fixture_of(models["dense"]) == "llava" and vqa.fixture_of(models["next"]) == "next"
    assert vqa.fixture_of(models["pruned"]) == "llava"          # apply copies config.json
    assert vqa.fixture_of(models["plain"]) is None and vqa.fixture_of(models["llama"]) is None


def test_eval_reports_vqa_and_perplexity_as_json(models):
    r = invoke(["eval", models["dense"], "--text", models["text"], "--seqlen", 32, "--max-windows", 3,
                "--vqa-samples", 12, "--json", "-"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["vqa"]["per_task"]) == set(scenes.TASKS)
    assert report["vqa"]["samples"] == 12 and 0.0 <= report["vqa"]["accuracy"] <= 1.0
    assert report["windows"] == 3 and report["seqlen"] == 32 and report["perplexity"] > 1.0


def test_eval_asks_fixture_2_its_own_split(models):
    from tamp_fx.testbeds.fixture2 import scenes as scenes2
    r = invoke(["eval", models["next"], "--vqa-samples", 12, "--json", "-", "-v"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["vqa"]
    assert report["split"] == "next" and set(report["per_task"]) == set(scenes2.TASKS) and report["samples"] == 12


def test_eval_prints_how_many_questions_each_row_asked(models, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    r = invoke(["eval", models["dense"], "--vqa-samples", 7, "--quiet"])
    assert r.exit_code == 0, r.output
    header, rows = printed(r.stdout)
    assert header == ["metric", "value", "measured on"]
    # 7 questions: the six tasks take turns, so the first asks 2 and the others 1
    asked = {metric: cells[-1] for metric, cells in rows.items()}
    assert asked == {f"VQA {scenes.TASKS[0]}": "2 held-out questions",
                     **{f"VQA {t}": "1 held-out question" for t in scenes.TASKS[1:]},
                     "VQA overall": "7 held-out questions (llava split)"}


def test_vqa_is_skipped_with_a_reason_on_a_model_that_is_not_a_fixture(models, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    r = invoke(["eval", models["plain"], "--text", models["text"], "--seqlen", 32, "--max-windows", 2, "-q"])
    assert r.exit_code == 0, r.output
    assert (f"VQA skipped: {models['plain']} is not one of tamp-fx's fixtures; its synthetic questions mean nothing "
            "on other models") in " ".join(r.output.split())
    _, rows = printed(r.stdout)
    assert list(rows) == ["perplexity"] and rows["perplexity"][-1].endswith("2 windows of 32 tokens")


def test_baseline_puts_dense_pruned_and_their_ratio_side_by_side_and_json_holds_the_same(models, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(vqa, "answer", fake_answers("dense"))
    out = tmp_path / "results.json"
    r = invoke(["eval", models["pruned"], "--baseline", models["dense"], "--text", models["text"], "--seqlen", 32,
                "--max-windows", 2, "--vqa-samples", 12, "--json", out, "-q"])
    assert r.exit_code == 0, r.output
    header, rows = printed(r.stdout)
    assert header == ["metric", "dense", "pruned", "pruned/dense", "measured on"]
    assert list(rows) == [*(f"VQA {t}" for t in scenes.TASKS), "VQA overall", "perplexity"]
    for metric, (dense, pruned, ratio, _) in rows.items():
        assert number(ratio) == pytest.approx(number(pruned) / number(dense), abs=2e-3), metric
    assert rows["VQA overall"][:3] == ["100.0%", "50.0%", "0.500"]      # the dense column is the baseline's
    assert rows["perplexity"][0] != rows["perplexity"][1]

    report = json.loads(out.read_text())
    assert f"results written to {out}" in " ".join(r.output.split())
    assert not list(tmp_path.glob(".results.json.*")), "a temporary file was left behind"
    for name, column in (("baseline", 0), (None, 1)):
        part = report[name] if name else report
        assert f"{part['vqa']['accuracy']:.1%}" == rows["VQA overall"][column]
        assert all(f"{acc:.1%}" == rows[f"VQA {t}"][column] for t, acc in part["vqa"]["per_task"].items())
        assert f"{part['perplexity']:.3f}" == rows["perplexity"][column]
    assert {m: f"{v:.3f}" for m, v in report["ratio"].items()} == {m: cells[2] for m, cells in rows.items()}
    assert report["model"] == str(models["pruned"]) and report["baseline"]["model"] == str(models["dense"])


def test_eval_help_has_its_own_device_help_and_verbosity_options():
    r = invoke(["eval", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "plan" not in text.split("--device", 1)[1].split("--dtype", 1)[0]
    assert all(option in text for option in ("--verbose", "-v", "--quiet", "-q", "--json FILE"))


def test_evaluate_runs_the_callers_task(tiny_models):
    from dataclasses import dataclass

    from tamp_fx.errors import TampError
    from tamp_fx.evaluate import evaluate

    @dataclass(frozen=True)
    class Count:                # a task of the caller's own: how many parameters the model has
        name = "count"
        label = "models"
        total = 1
        refusal = "cannot be counted"
        absent = "nothing to count"
        ok: bool = True

        def applies(self, processor):
            return self.ok

        def run(self, net, processor, advance):
            advance(1)
            return sum(p.numel() for p in net.parameters())

    result = evaluate(tiny_models("llama"), task=Count(), task_required=True)
    assert result.vqa > 0 and result.perplexity is None and set(result.seconds) == {"count"}
    with pytest.raises(TampError, match="cannot be counted"):
        evaluate(tiny_models("llama"), task=Count(ok=False), task_required=True)


@pytest.mark.parametrize("name, args, message", [
    ("llama", ["--vqa", "--text", "{text}"], "is not one of tamp-fx's fixtures; its synthetic questions mean nothing"),
    ("llama", [], "nothing to evaluate on {llama} (it is not one of tamp-fx's fixtures, so no VQA): pass --text"),
    ("plain", [], "nothing to evaluate on {plain} (it is not one of tamp-fx's fixtures, so no VQA)"),
    ("dense", ["--no-vqa"], "nothing to evaluate on {dense} (--no-vqa turned VQA off): pass --text FILE"),
    ("dense", ["--vqa-samples", "601"], "--vqa-samples 601 is more than the llava split has (600 held-out questions): "
                                        "pass at most 600"),
    ("dense", ["--vqa-samples", "0"], "Invalid value for '--vqa-samples'"),
    ("dense", ["--vqa-split", "next"], "leave out --vqa-split"),
    ("pruned", ["--baseline", "{plain}"], "--baseline {plain} is not the llava fixture"),
    ("dense", ["--json", "-q"], "--json takes a file name, or - for stdout; got -q"),
    ("dense", ["--json", "{dense}/config.json"], "would be written inside the input"),
])
def test_eval_refuses_what_it_cannot_measure(models, name, args, message):
    fails_cleanly(["eval", models[name], *(a.format(**models) for a in args)], message.format(**models),
                  unchanged=[models[name]])
