"""Does planning in bfloat16 cost quality on fixture 2? SparseGPT 60%, calibration seed 0, planned in
float32 and in bfloat16, each pruned model evaluated as bench/quality_v2.py does (bfloat16 forward
passes, 1200 held-out questions). Needs the grid's fixture and calibration in bench-out/quality-v2
(python bench/quality_v2.py builds them). Run from the repository root:

    python bench/dtype_quality.py
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "bench")
from quality_v2_runs import evaluate_one  # noqa: E402

import tamp_fx  # noqa: E402

fixture = sorted(Path("bench-out/quality-v2").glob("fixture-*"))[-1]
calib = "bench-out/quality-v2/calib/calib.jsonl"
rows = []
for dtype in ("float32", "bfloat16"):
    t = time.perf_counter()
    plan = tamp_fx.plan(fixture, calib, tamp_fx.PlanConfig(method="sparsegpt", sparsity=0.6, nsamples=128, seed=0), dtype=dtype)
    seconds = time.perf_counter() - t
    out = evaluate_one(fixture, plan, 1200, {}, None, "bfloat16")
    rows.append({"plan_dtype": dtype, "plan_seconds": round(seconds, 1), "vqa": out["vqa"], "stages": plan.timing["parts_s"]})
    print(json.dumps(rows[-1]), flush=True)
with open("bench-out/dtype-quality.json", "w") as f:
    json.dump(rows, f, indent=1)
