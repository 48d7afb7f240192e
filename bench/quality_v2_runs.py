"""What benchmark v2's grid (``quality_v2.py``) and screen (``screen.py``) share: methods named by
their `tamp-fx plan` options, fixture 2 and its calibration sets in the workdir, a plan made as a
user makes it, the pruned model evaluated in this process, and Rel. with its interval.

A run plans with `tamp-fx plan` (its wall time is the row's ``plan_seconds``), loads fixture 2 once,
applies the plan's masks to it in memory (:func:`tamp_fx.apply_in_memory`: the bytes `tamp-fx
apply` would write, with no checkpoint written and read again), then answers the held-out
questions and, where asked, measures the perplexities.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from plan_stats import stat_means  # noqa: E402
from quality import run  # noqa: E402
from smollm2_perplexity import split_halves  # noqa: E402

#: bench names that stand for a shortcut with its allocation replaced
ALIASES: dict[str, list[str]] = {
    "das-size": ["--method", "das", "--allocation", "das-size"],
    "tamp-size": ["--method", "tamp", "--allocation", "das-size"],
}
#: the flag each registry's names take, in the order a ``+part`` is looked up
_PARTS = (("--score", "SCORE_NAMES"), ("--tokens", "TOKEN_NAMES"), ("--allocation", "ALLOCATIONS"))
BOOTSTRAP = 2000
#: the CPU of the rows measured before rows recorded their CPU (the first run, 2026-12-02)
FIRST_CPU = "Intel Xeon (AMX)"


def plan_options(method: str) -> list[str]:
    """The `tamp-fx plan` options a bench method name stands for: a ``--method`` shortcut (or one
    of :data:`ALIASES`), then ``+part``s, each a score, a token selection or an allocation of
    tamp_fx's registries: ``wanda+atv`` is ``--method wanda --tokens atv``, ``das+sparsegpt``
    ``--method das --score sparsegpt``. Raises ValueError, naming the choices, for anything else."""
    import tamp_fx.config as config

    base, *parts = method.split("+")
    if base in ALIASES:
        options = list(ALIASES[base])
    elif base in config.METHODS:
        options = ["--method", base]
    else:
        raise ValueError(f"{method}: {base!r} is not a method (choose from {', '.join([*config.METHODS, *ALIASES])})")
    for part in parts:
        flags = [flag for flag, names in _PARTS if part in getattr(config, names)]
        if len(flags) != 1 or flags[0] in options:
            raise ValueError(f"{method}: {part!r} is not one score ({', '.join(config.SCORE_NAMES)}), token selection "
                             f"({', '.join(config.TOKEN_NAMES)}) or allocation ({', '.join(config.ALLOCATIONS)}) "
                             "that the name does not give already")
        options += [flags[0], part]
    return options


def method_name(method: str) -> str:
    """``method`` if :func:`plan_options` knows it (an argparse ``type``)."""
    import argparse
    try:
        plan_options(method)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return method


def cpu() -> str:
    """This machine's CPU as rows record it: its model name and whether it has AMX (which
    multiplies bfloat16 with other kernels than AVX-512 BF16 alone)."""
    import platform
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name} ({'AMX' if 'amx_bf16' in info else 'no AMX'})"


def cpu_of(row: dict) -> str:
    return row.get("cpu", FIRST_CPU)


def weights_id() -> str:
    """The identity of fixture 2's trained weights (the first 12 hex digits of the file's
    sha256): rows measured on other weights belong to another model and must not be mixed."""
    import hashlib

    from tamp_fx.testbeds.fixture2.model import WEIGHTS
    if not WEIGHTS.is_file():
        sys.exit(f"{WEIGHTS} is missing: train fixture 2 first (python -m tamp_fx.testbeds.fixture2.train)")
    return hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:12]


def check_settings(rows: list[dict], settings: dict, results: Path) -> None:
    """Refuse to resume from ``rows`` measured with other settings (they would be mixed silently)."""
    for r in rows:
        if r.get("settings", settings) != settings:
            sys.exit(f"{results} holds rows measured with {r['settings']}, not {settings}: pass the same "
                     "--conversations/--vqa-samples/--max-windows/--dtype (and fixture 2's weights), or use "
                     "another --workdir and --docs")


def begin_runs(args, state, settings: dict, perplexities: bool = True):
    """Before a benchmark's first run: fixture 2's weights added to ``settings`` and the rows of
    ``state`` (a ``quality.Results``) checked against them, the invocation noted, the
    :class:`Fixture2` of ``args`` and the dense model measured on this CPU (Rel.'s pair) unless a
    row has it. Returns the fixture and ``record(row)``, which stores a row with the settings and CPU."""
    settings["weights"] = weights_id()
    check_settings(state.rows, settings, state.results)
    state.invoked()
    fixture, here = Fixture2(args, settings["weights"], state.log), cpu()

    def record(row: dict) -> None:
        state.record(row | {"settings": settings, "cpu": here})

    if not any(r["method"] == "dense" and cpu_of(r) == here for r in state.rows):
        record({"method": "dense", "target": 0.0, "seed": None, "sparsity": 0.0, "plan_seconds": None,
                **fixture.evaluate(None, "dense", perplexities)})
    return fixture, record


# ----------------------------------------------------------------------------- one evaluation

def load_pruned(fixture: Path, plan, dtype: str):
    """Fixture 2 with ``plan`` (a :class:`tamp_fx.Plan`; None: dense) applied in memory, as
    ``load_model(..., dtype)`` would load the checkpoint `tamp-fx apply` writes: loaded in float32
    (what the fixture stores, so the plan's fingerprint check sees the values it was made from),
    pruned, then its parameters cast to ``dtype`` with the buffers (rotary frequencies) left in
    float32 and the configs saying ``dtype``. Returns the model and its processor."""
    import torch

    from tamp_fx import apply_in_memory
    from tamp_fx.load.source import load_model, load_processor, resolve_source

    source = resolve_source(fixture)
    net = load_model(source)
    if plan is not None:
        apply_in_memory(net, plan, where=fixture)
    if dtype != "float32":
        for p in net.parameters():
            p.data = p.data.to(getattr(torch, dtype))
        for config in (net.config, *(getattr(net.config, k) for k in getattr(net.config, "sub_configs", {}))):
            config.dtype = getattr(torch, dtype)
    return net, load_processor(source, net.config)


def evaluate_one(fixture: Path, plan, vqa_samples: int, texts: dict[str, Path], max_windows: int | None,
                 dtype: str = "float32") -> dict:
    """VQA hits per question (by task) on the first ``vqa_samples`` held-out questions and the
    perplexity of each of ``texts`` (name -> file) of fixture 2 pruned by ``plan`` in this process
    (None: dense), its forward passes in ``dtype``."""
    from tamp_fx.evaluate import perplexity
    from tamp_fx.testbeds.fixture2 import scenes
    from tamp_fx.testbeds.vqa import vqa_accuracy

    start = time.perf_counter()
    net, processor = load_pruned(fixture, plan, dtype)
    seconds = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    result = vqa_accuracy(net, processor, vqa_samples, split="next")
    hits: dict[str, str] = {}
    for s, a in zip(scenes.held_out(vqa_samples), result.answers):
        hits[s.task] = hits.get(s.task, "") + ("1" if scenes.normalise(a) == scenes.normalise(s.answer) else "0")
    seconds["vqa"] = time.perf_counter() - start
    out = {"vqa": result.accuracy, "hits": hits}
    for name, text in texts.items():
        start = time.perf_counter()
        p = perplexity(net, processor, text, seqlen=512, max_windows=max_windows)
        out[f"ppl_{name}"], out[f"windows_{name}"] = p.perplexity, p.windows
        seconds[f"ppl_{name}"] = time.perf_counter() - start
    return out | {"eval_seconds": seconds}


class Fixture2:
    """Fixture 2 in ``args.workdir`` (assembled once per weights, ``--conversations`` calibration
    conversations per seed), planned and evaluated with ``args``' settings; every command and
    evaluation goes to ``log`` with its wall time."""

    def __init__(self, args, weights: str, log: list[dict]):
        from tamp_fx.testbeds.fixture2.data import write_descriptions
        self.args, self.log, w = args, log, args.workdir
        _, wiki = split_halves(args.data, w)
        descriptions = w / "descriptions.txt"
        if not descriptions.exists():
            write_descriptions(descriptions)
        self.texts = {"desc": descriptions, "wiki": wiki}
        self.path, self.calib = w / f"fixture-{weights}", w / "calib"   # rebuilt when the weights change
        if not (self.path / "config.json").is_file():
            run(["fixture", "--kind", "next", "--out", str(self.path), "--calib-out", str(self.calib),
                 "--conversations", str(args.conversations), "--overwrite"], log)

    def calibration(self, seed: int) -> Path:
        """Calibration set ``seed``: the fixture's for 0, else its own conversations
        (:func:`tamp_fx.testbeds.fixture2.data.calibration_seed`)."""
        from tamp_fx.testbeds.fixture2.data import calibration_seed, write_conversations
        if seed == 0:
            return self.calib / "calib.jsonl"
        out = self.args.workdir / f"calib-seed{seed}"
        if not (out / "calib.jsonl").is_file():
            write_conversations(out, self.args.conversations, seed=calibration_seed(seed), overwrite=True)
        return out / "calib.jsonl"

    def evaluate(self, plan, label: str, perplexities: bool = True) -> dict:
        """:func:`evaluate_one` of fixture 2 pruned by ``plan`` (None: dense), logged as ``label``."""
        start, cpu_start = time.perf_counter(), time.process_time()
        a = self.args
        out = evaluate_one(self.path, plan, a.vqa_samples, self.texts if perplexities else {}, a.max_windows, a.dtype)
        self.log.append({"command": f"evaluate {label} in process", "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {self.log[-1]['seconds']:7.1f} s  evaluate {label} in process", flush=True)
        return out | {"cpu_seconds": {"eval": round(time.process_time() - cpu_start, 1)}}

    def run(self, method: str, sparsity: float, seed: int, perplexities: bool = True) -> dict:
        """The row of ``method`` at ``sparsity`` on calibration set ``seed``: `tamp-fx plan`, then
        :meth:`evaluate` of its plan."""
        from tamp_fx import Plan
        a, plan_dir = self.args, self.args.workdir / f"plan-{method}-{sparsity}-{seed}"
        options = plan_options(method)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        run(["plan", str(self.path), "--calib", str(self.calibration(seed)), *options, "--sparsity", str(sparsity),
             "--nsamples", str(a.conversations), "--seed", str(seed), "--dtype", a.dtype, "--out", str(plan_dir),
             "--overwrite", "-q"], self.log)
        plan_seconds, after = self.log[-1]["seconds"], resource.getrusage(resource.RUSAGE_CHILDREN)
        data = json.loads((plan_dir / "plan.json").read_text())
        row = {"method": method, "options": options, "target": sparsity, "seed": seed,
               "sparsity": data["summary"]["sparsity"], "plan_seconds": plan_seconds, "plan_stats": plan_statistics(data),
               **self.evaluate(Plan.load(plan_dir), f"{method} {sparsity:.0%} seed {seed}", perplexities)}
        row["cpu_seconds"]["plan"] = round(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime, 1)
        return row


# ----------------------------------------------------------------------------- statistics

def plan_statistics(data: dict) -> dict:
    """What a plan decided, in brief, for the report: the mean sparsity of each projection type
    over the layers (the allocation), and the mean over linears of each modality's diversity and
    of the share of its tokens the token selection kept (AMIA; absent for methods without it)."""
    from tamp_fx.artifact.report import projection_names

    names = projection_names(data)
    by_projection: dict[str, list[float]] = {}
    for name, lp in data["linears"].items():
        by_projection.setdefault(names[name], []).append(lp["sparsity"])
    linears = data["linears"].values()
    return {"sparsity_by_projection": {p: float(np.mean(v)) for p, v in by_projection.items()},
            "selected_fraction": stat_means(linears, "selected_fraction"), "diversity": stat_means(linears, "diversity")}


def hits_of(row: dict) -> dict[str, np.ndarray]:
    """A row's answers, by task: 1 right, 0 wrong, in question order."""
    return {t: np.frombuffer(h.encode(), dtype=np.uint8) - ord("0") for t, h in row["hits"].items()}


def rel_with_interval(row: dict, dense: dict, rng: np.random.Generator) -> tuple[float, float, float]:
    """Rel. = mean over tasks of pruned / dense accuracy, and its paired 95% bootstrap interval."""
    ours, base = hits_of(row), hits_of(dense)
    point = float(np.mean([ours[t].mean() / base[t].mean() if base[t].any() else np.nan for t in base]))
    draws = np.zeros(BOOTSTRAP)
    with np.errstate(divide="ignore", invalid="ignore"):   # a task the dense model never gets right: undefined
        for t in base:
            idx = rng.integers(len(base[t]), size=(BOOTSTRAP, len(base[t])))     # (B, n_t) resampled questions
            dense_acc = base[t][idx].mean(1)
            draws += np.where(dense_acc > 0, ours[t][idx].mean(1) / dense_acc, np.nan)
    draws /= len(base)
    if np.isnan(draws).mean() > 0.025:
        return point, float("nan"), float("nan")
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def task_interval(hits: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    means = hits[rng.integers(len(hits), size=(BOOTSTRAP, len(hits)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)
