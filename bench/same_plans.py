"""Do two versions of tamp-fx make the same plans? Byte for byte, on the seven tiny families,
an exported program (.pt2), SmolLM2-135M (GGUF) and fixture 1.

Models and calibration data are built once (with this checkout's testbeds), then each version
plans them in its own process through the public API only (``tamp_fx.plan``,
``tamp_fx.PlanConfig``, ``Plan.save``), so a version from before a reorganisation plans with
its own code. ``masks.safetensors`` and ``weights.safetensors`` must be equal byte for byte and
``plan.json`` equal apart from the per-layer run measurements (seconds, peak memory).

    python bench/same_plans.py --base 54766bf            # base commit vs this working tree
    python bench/same_plans.py --base 54766bf --quick    # tiny families and the program only

Exit status 0 when every plan is the same, 1 otherwise. The full run took 13 minutes on two
cores, part of it beside a test run (a timing of no consequence: only bytes are compared).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_METHODS = ({"method": "wanda"}, {"method": "sparsegpt"}, {"method": "tamp"}, {"method": "owl"},
                {"method": "magnitude", "pattern": "2:4"}, {"method": "das", "allocation": "das-block"})
TINY_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen2_audio", "llama")

# Run inside the version under test: ``root`` first on sys.path, and on ``tamp_fx.__path__``
# so that ``tamp_fx.passes`` / ``tamp_fx.cli`` (top-level folders mapped by pyproject) resolve.
_PLANNER = r"""
import json, sys
root, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
import tamp_fx
tamp_fx.__path__.append(root)
for job in jobs:
    config = tamp_fx.PlanConfig(**job["config"])
    tamp_fx.plan(job["model"], job["calib"], config, **job.get("options", {})).save(job["out"])
    print("planned", job["out"], flush=True)
"""


def _build(work: Path, quick: bool) -> list[dict]:
    """The models, their calibration data and the plans to make of them (jobs without ``out``)."""
    from tamp_fx.testbeds.tiny import build_tiny
    jobs = []
    for family in TINY_FAMILIES:
        model = build_tiny(family, work / "models" / family)
        for config in TINY_METHODS:
            jobs.append({"name": f"{family}-{'-'.join(config.values())}", "model": str(model),
                         "calib": str(model / "calib.jsonl"), "config": {**config, "nsamples": 4}})
    llama = work / "models" / "llama"
    program, inputs = work / "models" / "llama.pt2", work / "models" / "llama-inputs.safetensors"
    subprocess.run([sys.executable, "-m", "tamp_fx.cli", "export", str(llama), "--calib", str(llama / "calib.jsonl"),
                    "--out", str(program), "--calib-out", str(inputs), "--nsamples", "4", "-q"], check=True)
    for config in ({"method": "wanda"}, {"method": "sparsegpt"}, {"method": "tamp"}):
        jobs.append({"name": f"llama.pt2-{config['method']}", "model": str(program), "calib": str(inputs),
                     "config": {**config, "nsamples": 4}})
    if quick:
        return jobs
    from tamp_fx.testbeds.demo import CALIB_TEXT, smollm2_gguf
    from tamp_fx.testbeds.fixture.data import write_conversations
    from tamp_fx.testbeds.fixture.model import build_fixture
    for method in ("wanda", "tamp"):
        jobs.append({"name": f"smollm2-{method}", "model": str(smollm2_gguf()), "calib": str(CALIB_TEXT),
                     "config": {"method": method, "nsamples": 4, "seqlen": 128}})
    fixture = build_fixture(work / "models" / "fixture")
    calib = write_conversations(work / "models" / "fixture-calib", 8)
    for method in ("tamp", "sparsegpt"):
        jobs.append({"name": f"fixture1-{method}", "model": str(fixture), "calib": str(calib),
                     "config": {"method": method, "nsamples": 8}})
    return jobs


def _plan_with(root: Path, jobs: list[dict], out: Path) -> None:
    todo = [{**job, "out": str(out / job["name"])} for job in jobs]
    subprocess.run([sys.executable, "-c", _PLANNER, str(root), json.dumps(todo)], check=True, cwd=root)


def _digest(plan_dir: Path) -> dict[str, str]:
    """sha256 of the masks and weights files, and of plan.json without the run measurements
    (this checkout's :func:`without_run_measurements`: it reads any version's plan.json)."""
    from tamp_fx.artifact.plan import without_run_measurements
    digests = {}
    for name in ("masks.safetensors", "weights.safetensors"):
        path = plan_dir / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"
    data = without_run_measurements(json.loads((plan_dir / "plan.json").read_text()))
    digests["plan.json"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare this working tree against")
    parser.add_argument("--quick", action="store_true", help="tiny families and the program only")
    parser.add_argument("--workdir", type=Path, help="keep models and plans here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="same-plans-") as tmp:
        work = args.workdir or Path(tmp)
        base = work / "base-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], check=True, cwd=ROOT,
                       capture_output=True)
        try:
            jobs = _build(work, args.quick)
            _plan_with(base, jobs, work / "plans-base")
            _plan_with(ROOT, jobs, work / "plans-head")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
        different = 0
        for job in jobs:
            a, b = _digest(work / "plans-base" / job["name"]), _digest(work / "plans-head" / job["name"])
            same = [k for k in a if a[k] == b[k]]
            different += len(same) < len(a)
            print(f"{job['name']:<40} {'same' if len(same) == len(a) else 'DIFFERENT: ' + ', '.join(set(a) - set(same))}")
        print(f"{len(jobs) - different} of {len(jobs)} plans the same byte for byte as {args.base}")
        return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
