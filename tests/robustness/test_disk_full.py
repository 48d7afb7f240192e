"""A full disk in every writer (plan's plan.json and masks, apply's shards and ``.pt2``, export's
``.pt2`` and calibration, inspect's figures and page) is one line that says the disk ran out,
never a traceback or a C++ ``terminate``, and leaves nothing behind, the parent folders made for
a nested ``--out`` included, every input unchanged.

Each case runs on a real tmpfs just too small for its output: one process in a user and mount
namespace (``unshare``, no root needed) mounts a fresh one per case and runs the command
in-process there; where namespaces are not allowed the cases are skipped."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tamp_fx
from tamp_fx.write.export import export_decoder

PAGE = 4096
TESTS = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from typer.testing import CliRunner
from support.cli import snapshot
from tamp_fx.cli.main import app

cases, disk, report = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], Path(sys.argv[3])
results = {}
for name, case in cases.items():
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={case['size']}", "tmpfs", disk], check=True)
    try:
        before = snapshot(disk, *case["inputs"])
        result = CliRunner().invoke(app, case["args"])
        failure = result.exception if not isinstance(result.exception, SystemExit) else None
        results[name] = {"code": result.exit_code, "output": result.output, "exception": repr(failure),
                         "filled": case["args"][-1],
                         "changed": sorted(k for k, v in snapshot(disk, *case["inputs"]).items() ^ before.items())}
    finally:
        subprocess.run(["umount", disk], check=True)
    report.write_text(json.dumps(results))        # after every case: a crash leaves the others' results
"""


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _pages(*paths: Path) -> int:
    """Bytes the files under ``paths`` take on a tmpfs (whole pages)."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in files)


@pytest.fixture(scope="module")
def full_disk(llama, saved_plan, tmp_path_factory):
    """name -> what the command did on a disk too small for it (exit code, output, paths changed)."""
    if not _namespaces_work():
        pytest.skip("unshare --user --mount is not allowed here: no tmpfs to fill")
    root = tmp_path_factory.mktemp("disk-full")
    disk = root / "disk"
    disk.mkdir()
    exported = export_decoder(llama, llama / "calib.jsonl", root / "model.pt2", root / "inputs.safetensors",
                              nsamples=2, seqlen=16)
    program_plan = tamp_fx.plan(exported.program, exported.calibration, tamp_fx.PlanConfig(nsamples=2))
    program_plan.save(root / "program-plan")
    plan_json = saved_plan / "plan.json"
    hf_inputs = [llama, saved_plan]
    plan = ["plan", llama, "--calib", llama / "calib.jsonl", "--method", "sparsegpt", "--nsamples", 4, "-q"]
    export = ["export", llama, "--calib", llama / "calib.jsonl", "--nsamples", 2, "--seqlen", 16, "-q"]
    cases = {
        "plan.json": (PAGE, plan + ["--out", disk / "a" / "b" / "plan"], hf_inputs),
        "plan masks": (_pages(plan_json) + PAGE, plan + ["--out", disk / "a" / "plan"], hf_inputs),
        "apply shards": (_pages(*[f for f in llama.iterdir() if f.suffix != ".safetensors"]) + 2 * PAGE,
                         ["apply", llama, saved_plan, "-q", "--out", disk / "a" / "pruned"], hf_inputs),
        "apply pt2": (PAGE, ["apply", exported.program, root / "program-plan", "-q", "--out",
                             disk / "a" / "pruned.pt2"], [root]),
        "export pt2": (PAGE, export + ["--calib-out", disk / "c" / "i.safetensors", "--out", disk / "a" / "m.pt2"],
                       [llama]),
        "export calibration": (_pages(exported.program) + 2 * PAGE,
                               export + ["--out", disk / "m.pt2", "--calib-out", disk / "a" / "i.safetensors"],
                               [llama]),
        "inspect plot": (PAGE, ["inspect", saved_plan, "-q", "--plot", disk / "a" / "figs"], [saved_plan]),
        "inspect html": (PAGE, ["inspect", saved_plan, "-q", "--html", disk / "a" / "r.html"], [saved_plan]),
    }                                                  # the last argument: the output the disk fills on
    spec = {name: {"size": size, "args": [str(a) for a in args], "inputs": [str(p) for p in inputs]}
            for name, (size, args, inputs) in cases.items()}
    (root / "cases.json").write_text(json.dumps(spec))
    report = root / "report.json"
    script = root / "driver.py"
    script.write_text(DRIVER)
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, script,
                          root / "cases.json", disk, report, TESTS], capture_output=True, text=True, timeout=600)
    results = json.loads(report.read_text()) if report.exists() else {}
    yield {name: results.get(name, {"crash": run.returncode, "stderr": run.stderr[-3000:]}) for name in cases}
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", ["plan.json", "plan masks", "apply shards", "apply pt2", "export pt2",
                                  "export calibration", "inspect plot", "inspect html"])
def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, case):
    result = full_disk[case]
    assert "crash" not in result, result                              # a C++ terminate kills the process
    lines = [line for line in result["output"].splitlines() if line.strip()]
    assert result["code"] == 1 and len(lines) == 1, result
    assert lines[0].startswith(f"error: no space left on device while writing {result['filled']} ("), result
    assert "Traceback" not in result["output"] and "terminate" not in result["output"]
    assert result["exception"] == "None", result
    assert result["changed"] == [], result                            # nothing new on the disk, inputs the same
