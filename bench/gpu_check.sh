#!/usr/bin/env bash
# The one thing to run on a machine with a CUDA GPU, from the repository root, in about 8 minutes:
#
#   bash bench/gpu_check.sh                 # C_SAMPLES=8 by default; OUT=bench-out/gpu-check
#
# 1. the test suite's CUDA tests (pytest -m cuda: placement on the GPU, the 2:4 semi-structured kernels,
#    device peak memory) and those needing torchvision (-m torchvision: video calibration end to end);
# 2. bench/scale.py case (c): LLaVA-NeXT with Llama-3-8B's language model (random weights, bfloat16) and
#    images of ~2,900 tokens, wanda and tamp on C_SAMPLES samples (128 would take longer than this
#    check's budget; the summary extrapolates linearly, an upper bound since fixed costs scale too);
# 3. bench/semi_structured_speed.py (2:4 against dense bf16 on one Llama-7B-shaped layer);
# 4. only with several GPUs: bench/speed.py --nproc N --device cuda (planning on 1 GPU against all N).
# Each step has its own time limit (140 + 290 + 60 s, about 8 minutes with the set-up; step 4 adds up
# to 300 s); a failed or stopped step is reported and the others still run (scale.py writes its JSON
# after every method). Logs and JSON in $OUT; the checkpoint of (c) (~16 GB) is deleted afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench-out/gpu-check}
C_SAMPLES=${C_SAMPLES:-8}
mkdir -p "$OUT"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1

$PY -c "import tamp_fx" 2>/dev/null || $PY -m pip install --quiet --no-deps -e . || exit 1
# an older setuptools installs only tamp_fx/ in editable mode (package-dir mapped folders are
# missed): link them in, in this copy of the tree, so tamp_fx.cli/.passes/.testbeds import
$PY -c "import tamp_fx.cli, tamp_fx.passes, tamp_fx.testbeds" 2>/dev/null || for d in cli passes testbeds; do
    [ -e "tamp_fx/$d" ] || ln -s "../$d" "tamp_fx/$d"; done
$PY - <<'EOF' | tee "$OUT/gpu.txt" || exit 1
import datetime, torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"{datetime.date.today()} {torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor}), "
      f"torch {torch.__version__}")
EOF

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - start))" >"$OUT/$name.status"
    echo "   exit $rc after $((SECONDS - start)) s"
}

step tests 140 $PY -m pytest -q -m "cuda or torchvision" -p no:cacheprovider tests
step scale-c 290 $PY bench/scale.py --case c --nsamples "$C_SAMPLES" --out-dir "$OUT" --json "$OUT/scale-c.json"
step semi-structured 60 $PY bench/semi_structured_speed.py --repeats 30 --warmup 5
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 1 ]; then  # data-parallel planning (docs/usage.md, Multi-GPU): 1 GPU against all of them
    step multi-gpu 300 $PY bench/speed.py --nproc "$GPUS" --device cuda --nsamples 128 --seqlen 512 --methods wanda tamp
fi

$PY - "$OUT" "$C_SAMPLES" <<'EOF'
import json, pathlib, sys
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
status = lambda name: (out / f"{name}.status").read_text().split()
print("\n==== GPU check summary ====")
print((out / "gpu.txt").read_text().strip())
rc, secs = status("tests")
tail = [l for l in (out / "tests.log").read_text().splitlines() if l.strip()][-1:]
print(f"CUDA and torchvision tests (pytest -m 'cuda or torchvision'): exit {rc}, {secs} s: "
      f"{tail[0] if tail else '(no output)'}")
rc, secs = status("scale-c")
print(f"(c) LLaVA-NeXT-8B shapes, {n} samples of ~3,000 tokens: exit {rc}, {secs} s (checkpoint writing included)")
if (out / "scale-c.json").is_file():
    rows = {r["method"]: r for r in json.loads((out / "scale-c.json").read_text())["rows"]}
    for m, r in rows.items():
        print(f"  {m}: {r['seconds']:.0f} s, peak GPU memory {r['peak_gpu_gib']:.1f} GiB, peak RSS {r['peak_rss_gib']:.1f} GiB, "
              f"{r['tokens_layer0_linear0']} tokens into layer 0's first linear; 128 samples: <= {r['seconds'] * 128 / n:.0f} s")
    if {"wanda", "tamp"} <= rows.keys():
        print(f"  tamp / wanda: {rows['tamp']['seconds'] / rows['wanda']['seconds']:.2f}x")
else:
    print("  " + "\n  ".join((out / "scale-c.log").read_text().splitlines()[-5:]))
rc, secs = status("semi-structured")
print(f"2:4 semi-structured timings: exit {rc}, {secs} s")
print("  " + "\n  ".join(l for l in (out / "semi-structured.log").read_text().splitlines() if l.startswith(("|", "NVIDIA", "Tesla")) or "torch" in l))
if (out / "multi-gpu.status").is_file():
    rc, secs = status("multi-gpu")
    print(f"multi-GPU planning, SmolLM2-135M 128 x 512: exit {rc}, {secs} s")
    print("  " + "\n  ".join(l for l in (out / "multi-gpu.log").read_text().splitlines() if l.startswith("|")))
EOF
