"""`tamp-fx eval`: VQA accuracy per task and overall, perplexity, JSON, clear refusals."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tamp_fx.cli.main import app
from tamp_fx.testbeds import vqa
from tamp_fx.testbeds.fixture import scenes

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_vqa_accuracy_is_exact_match_on_the_normalised_answer(monkeypatch):
    samples = vqa.held_out(24)
    # the tasks cycle in blocks of 6: every other block is answered right (in another case, with
    # punctuation), the rest wrong, so each task is right exactly half the time
    fake = [f" {s.answer.upper()}." if (i // 6) % 2 == 0 else "wrong" for i, s in enumerate(samples)]
    monkeypatch.setattr(vqa, "answer", lambda model, processor, samples, **_: fake[:len(samples)])
    result = vqa.vqa_accuracy(None, None, 24)
    assert result.accuracy == 0.5
    assert result.per_task == {t: 0.5 for t in scenes.TASKS}
    assert result.answers == fake


def test_eval_reports_vqa_and_perplexity_as_json(tiny_models, tmp_path):
    model = tiny_models("llava")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = invoke("eval", model, "--text", text, "--seqlen", 32, "--max-windows", 3, "--vqa-samples", 12, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["vqa"]["per_task"]) == set(scenes.TASKS)
    assert report["vqa"]["samples"] == 12 and 0.0 <= report["vqa"]["accuracy"] <= 1.0
    assert report["windows"] == 3 and report["seqlen"] == 32 and report["perplexity"] > 1.0


def test_eval_on_fixture_2s_split(tiny_models):
    from tamp_fx.cli.evaluate import VqaSplit
    from tamp_fx.testbeds.fixture2 import scenes as scenes2
    assert {s.value for s in VqaSplit} == set(vqa.SPLITS)
    r = invoke("eval", tiny_models("llava_next"), "--vqa-split", "next", "--vqa-samples", 12, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["vqa"]["per_task"]) == set(scenes2.TASKS) and report["vqa"]["samples"] == 12


def test_eval_prints_a_table(tiny_models):
    r = invoke("eval", tiny_models("llava"), "--vqa-samples", 6, "--quiet")
    assert r.exit_code == 0, r.output
    assert "VQA overall" in r.stdout and "VQA character" in r.stdout


@pytest.mark.parametrize("family, args, message", [
    ("llama", ["--vqa"], "takes no images, so it cannot answer the VQA split: pass --no-vqa"),
    ("llama", [], "nothing to evaluate"),
    ("llama", [], "(the model takes no images, so there is no VQA)"),
    ("llava", ["--no-vqa"], "nothing to evaluate"),
])
def test_eval_refuses_what_it_cannot_measure(tiny_models, family, args, message):
    r = invoke("eval", tiny_models(family), *args)
    assert r.exit_code == 1
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output


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
