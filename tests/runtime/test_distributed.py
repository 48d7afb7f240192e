"""Planning with `torchrun --nproc-per-node 2` (gloo on the CPU) gives the plan of one process,
and a failure on any rank stops every rank with one line and no output (tamp_fx.runtime.distributed)."""
from __future__ import annotations

import doctest
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tamp_fx
from tamp_fx.artifact.plan import without_run_measurements
from tamp_fx.config import METHODS
from tamp_fx.testbeds.tiny import slow_except

WORKER = Path(__file__).with_name("distributed_worker.py")
FAMILIES = ("llava_next", "qwen2_audio")
TIMEOUT = 300                                   # seconds: a hang fails the test instead of the run
#: every shortcut, and the token selection no shortcut names
RUNS = [*METHODS, "wanda+balanced", "sparsegpt+balanced"]


def _sparsegpt(run: str) -> bool:
    """Whether a run ("wanda+balanced": wanda with --tokens balanced) scores with SparseGPT."""
    shortcut, _, tokens = run.partition("+")
    return tamp_fx.PlanConfig(method=shortcut, tokens=tokens or None).score == "sparsegpt"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.fixture(scope="module")
def plans(tiny_models, tmp_path_factory):
    """Every method on a family, planned by one process and by two, the first time the family is
    asked for: ``plans(family, method)`` -> (one, two) plan directories."""
    done: dict[str, dict[str, Path]] = {}

    def get(family: str, method: str) -> tuple[Path, Path]:
        if family not in done:
            done[family] = {}
            for mode, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
                out = done[family][mode] = tmp_path_factory.mktemp(f"plans-{family}-{mode}")
                r = _run([*launcher, str(WORKER), "plans", str(out), ",".join(RUNS), str(tiny_models(family))])
                assert r.returncode == 0, r.stderr[-3000:]
        return tuple(done[family][mode] / f"{tiny_models(family).name}-{method}" for mode in ("one", "two"))
    return get


def _without_timings(directory: Path) -> dict:
    return without_run_measurements(json.loads((directory / "plan.json").read_text()))


@pytest.mark.parametrize("method", [m for m in RUNS if not _sparsegpt(m)])
@pytest.mark.parametrize("family", slow_except(FAMILIES, "llava_next"))
def test_two_processes_plan_what_one_does(plans, family, method):
    one, two = plans(family, method)
    a, b = tamp_fx.Plan.load(one), tamp_fx.Plan.load(two)
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    # every statistic in plan.json too (diversities, selected fractions, attention mass, sample count)
    assert _without_timings(one) == _without_timings(two)
    assert b.model["calibration"]["samples"] == 3                 # 2 on rank 0, 1 on rank 1: uneven shards


@pytest.mark.parametrize("method", [m for m in RUNS if _sparsegpt(m)])
@pytest.mark.parametrize("family", slow_except(FAMILIES, "llava_next"))
def test_two_processes_sparsegpt_within_the_stated_tolerance(plans, family, method):
    """Hessians are added in rank order, so they differ from one process's by float32 rounding:
    masks may differ only where scores tie to that rounding (at most 1 in 1000 weights), and
    a row whose mask differs is updated differently from there on (SparseGPT's column sweep),
    so weights agree to 1e-4 of the largest in every row whose masks agree (at least 95% of rows)."""
    a, b = (tamp_fx.Plan.load(d) for d in plans(family, method))
    for name in a.masks:
        assert (a.masks[name] != b.masks[name]).float().mean() <= 1e-3, name
        same = (a.masks[name] == b.masks[name]).all(1)                                  # (C_out,) rows that agree
        assert same.float().mean() >= 0.95, name
        scale = a.weights[name].abs().max()
        torch.testing.assert_close(b.weights[name][same], a.weights[name][same], rtol=0, atol=1e-4 * float(scale))


def test_cli_module_under_torchrun_writes_the_one_process_plan(plans, tiny_models, tmp_path):
    model = tiny_models("llava_next")
    r = _run([*TORCHRUN, "-m", "tamp_fx.cli", "plan", str(model), "--calib", str(model / "calib.jsonl"),
              "--method", "tamp", "--sparsity", "0.5", "--nsamples", "3", "--out", str(tmp_path / "p")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("tamp (das + wanda + amia): planned") == 1            # the summary from rank 0 only
    assert _without_timings(tmp_path / "p") == _without_timings(plans("llava_next", "tamp")[0])


def test_end_process_outside_torchrun_is_sys_exit(monkeypatch):
    """Under torchrun end_process skips Python's clean-up (os._exit, which the test above runs: about one
    run in five exited -6 without it); in one process it must stay an ordinary, catchable exit."""
    from tamp_fx.runtime import distributed
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as done:
        distributed.end_process(3)
    assert done.value.code == 3


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_calibration_file_under_torchrun_gives_one_line(tiny_models, tmp_path):
    model = tiny_models("qwen2_audio")
    bad = tmp_path / "calib.json"
    bad.write_text("{not json")
    script = shutil.which("tamp-fx", path=str(Path(sys.executable).parent))
    r = _run([*TORCHRUN, script, "plan", str(model), "--calib", str(bad), "--out", str(tmp_path / "p"), "--quiet"])
    assert r.returncode != 0
    errors = _errors(r.stderr)
    assert len(errors) == 1 and "ranks 0, 1 of 2" in errors[0] and "not valid JSON" in errors[0], r.stderr[-3000:]
    assert not (tmp_path / "p").exists()


def _cli(state: Path, fault: str, model: Path, out: Path, **kw) -> subprocess.Popen:
    state.mkdir()
    return subprocess.Popen([*TORCHRUN, str(WORKER), "cli", str(state), fault, "plan", str(model), "--calib",
                             str(model / "calib.jsonl"), "--method", "tamp", "--nsamples", "4", "--out", str(out), "--quiet"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _exits(state: Path) -> dict[int, str]:
    return {int(f.name.split("-")[1]): f.read_text() for f in state.glob("exit-*")}


@pytest.mark.parametrize(("fault", "expected", "exits"), [
    ("corrupt:1", "error: rank 1 of 2: decoder layer 0 failed on calibration sample 3", {0: "1", 1: "1"}),
    ("die:0", "error: rank 1: another of the 2 processes stopped", {1: "1"}),    # gone without a word (OOM killer)
])
def test_a_rank_failing_stops_every_rank_in_one_line(tiny_models, tmp_path, fault, expected, exits):
    """No traceback from any rank either (torchrun's own report of the failed worker aside)."""
    model = tiny_models("llava_next")
    p = _cli(tmp_path / "state", fault, model, tmp_path / "p")
    _, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    errors = _errors(stderr)
    assert len(errors) == 1 and errors[0].startswith(expected), stderr[-3000:]
    assert not [line for line in stderr.splitlines() if line.startswith("[rank")], stderr[-3000:]   # a rank's traceback
    assert _exits(tmp_path / "state") == exits
    assert not (tmp_path / "p").exists()


def test_ctrl_c_stops_every_rank(tiny_models, tmp_path):
    model, state = tiny_models("llava_next"), tmp_path / "state"
    p = _cli(state, "wait", model, tmp_path / "p", start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list(state.glob("ready-*"))) < 2:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:] if p.poll() is not None else "timeout"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)                     # what Ctrl-C in a terminal does: every process gets it
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    errors = _errors(stderr)
    assert errors == ["error: interrupted: nothing was written"], stderr[-3000:]   # rank 0 alone says it
    assert _exits(state) == {0: "130", 1: "130"}
    assert not (tmp_path / "p").exists()


def test_without_torchrun_no_process_group(tiny_models, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    model = tiny_models("qwen2_audio")
    plan = tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method="magnitude", nsamples=2))
    assert plan.linears and not dist.is_initialized()
    assert tamp_fx.runtime.distributed.world().size == 1


def test_doctests():
    assert doctest.testmod(tamp_fx.runtime.distributed).failed == 0


def test_one_process_sums_add_rows_in_sample_order():
    from tamp_fx.statistics.observers import SampleSums
    rows = [torch.tensor(r, dtype=torch.float64) for r in ([1e16, 1.0], [1.0, 1e16], [-1e16, -1e16])]
    sums = SampleSums()
    for row in rows[:2]:
        sums.add(row)
    assert sums.total().tolist() == [1e16 + 1.0, 1.0 + 1e16]        # read part-way ...
    sums.add(rows[2])
    expected = (rows[0] + rows[1]) + rows[2]                        # [0, 0]; other orders give [1, 0] or [0, 1]
    assert torch.equal(sums.total(), expected)                      # ... then on: still left to right
