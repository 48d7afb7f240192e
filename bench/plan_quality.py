"""Does a planning setting cost quality on fixture 2? One method and sparsity, calibration seed 0,
planned once per combination of the dtypes and within-layer orders given, each pruned model
evaluated as bench/quality_v2.py does (bfloat16 forward passes, 1200 held-out questions). Needs
the grid's fixture and calibration in bench-out/quality-v2 (python bench/quality_v2.py builds
them). Run from the repository root, alone:

    python bench/plan_quality.py --dtypes float32 bfloat16                 # bfloat16 against float32
    python bench/plan_quality.py --sequential groups layers                # the two orders in a layer
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "bench")
from quality_v2_runs import evaluate_one  # noqa: E402

import tamp_fx  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--method", default="sparsegpt")
parser.add_argument("--sparsity", type=float, default=0.6)
parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="compute dtypes of the plan's forward passes")
parser.add_argument("--sequential", nargs="+", default=[None], help="groups and/or layers (default: the method's)")
parser.add_argument("--json", type=Path, default=Path("bench-out/plan-quality.json"))
args = parser.parse_args()

fixture = sorted(Path("bench-out/quality-v2").glob("fixture-*"))[-1]
calib = "bench-out/quality-v2/calib/calib.jsonl"
rows = []
for dtype, order in itertools.product(args.dtypes, args.sequential):
    config = tamp_fx.PlanConfig(method=args.method, sparsity=args.sparsity, nsamples=128, seed=0, sequential=order)
    t = time.perf_counter()
    plan = tamp_fx.plan(fixture, calib, config, dtype=dtype)
    seconds = time.perf_counter() - t
    out = evaluate_one(fixture, plan, 1200, {}, None, "bfloat16")
    rows.append({"method": config.method, "sparsity": config.sparsity, "plan_dtype": dtype, "sequential": config.sequential,
                 "plan_seconds": round(seconds, 1), "vqa": out["vqa"], "stages": plan.timing["parts_s"]})
    print(json.dumps(rows[-1]), flush=True)
args.json.write_text(json.dumps(rows, indent=1))
