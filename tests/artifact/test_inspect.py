"""`tamp-fx inspect --plot/--html` draws what each method's plan holds; `tamp-fx diff` compares plans."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import sys

import pytest
from typer.testing import CliRunner

import tamp_fx
from support.cli import fails_cleanly
from support.snapshot import snapshot
from tamp_fx.artifact.compare import diff_plans
from tamp_fx.artifact.plan import Plan
from tamp_fx.artifact.report import Grid, projection_names
from tamp_fx.cli.main import app
from tamp_fx.config import METHODS
from tamp_fx.runtime.output import OUTPUT_MARKER

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def plans(tiny_models, tmp_path_factory):
    """method -> saved plan directory of the tiny qwen2_vl model (3 samples)."""
    model = tiny_models("qwen2_vl")
    root = tmp_path_factory.mktemp("plans")
    cache = {}

    def get(method: str, model=model):
        if method not in cache:
            p = tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=3))
            cache[method] = p.save(root / method)
        return cache[method]
    return get


def _expected_figures(method: str) -> set[str]:
    allocation, score, tokens = METHODS[method]
    expected = {"sparsity"}
    if allocation.startswith("das"):
        expected.add("diversity")
    if score != "magnitude":                      # every activation-based score runs the samples
        expected.add("attention")
    if tokens != "all":
        expected.add("selected_tokens")
    return expected


@pytest.mark.parametrize("method", list(METHODS))
def test_inspect_draws_what_the_plan_holds(method, plans, tmp_path):
    plan_dir = plans(method)
    r = runner.invoke(app, ["inspect", str(plan_dir), "--plot", str(tmp_path / "fig"), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    pngs = {p.stem: p for p in (tmp_path / "fig").iterdir() if p.name != OUTPUT_MARKER}
    assert set(pngs) == _expected_figures(method)
    for path in pngs.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    page = (tmp_path / "r.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(pngs)            # self-contained: every figure inline, nothing linked
    for data in embedded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG"
    assert "src=\"http" not in page and f"{method} =" in page and "peak memory" in page and "peak host MiB" in page
    assert (plan_dir / "plan.json").is_file()    # the plan is left alone


def test_grid_places_every_linear_once(plans):
    data = Plan.load(plans("tamp")).to_json()   # what `inspect` draws from
    grid = Grid.of(data)
    assert len(grid.cells) == len(data["linears"])  # no two linears share a cell
    assert grid.projections == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    table = grid.values(lambda lp: lp["sparsity"])
    for lp in data["linears"].values():
        name = next(n for n, v in data["linears"].items() if v is lp)
        row, col = grid.layers.index(lp["layer"]), grid.projections.index(projection_names(data)[name])
        assert table[row][col] == lp["sparsity"]


def test_projection_names_keep_enough_components():
    linears = {f"dec.layers.{i}.{part}.weight": {"layer": i} for i in range(2)
               for part in ("attn.out", "mlp.out", "mlp.up")}
    names = projection_names({"linears": linears})
    assert names["dec.layers.1.attn.out.weight"] == "attn.out" and names["dec.layers.0.mlp.up.weight"] == "mlp.up"
    assert len(set(names.values())) == 3


def test_missing_matplotlib_is_one_line(plans, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    r = runner.invoke(app, ["inspect", str(plans("wanda")), "--plot", str(tmp_path / "fig")])
    assert r.exit_code == 1
    assert "pip install 'tamp-fx[plot]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "fig").exists()


def test_plot_refuses_to_write_over_the_plan(plans):
    plan_dir = plans("wanda")
    r = runner.invoke(app, ["inspect", str(plan_dir), "--plot", str(plan_dir), "--overwrite"])
    assert r.exit_code == 1 and "error:" in r.output
    assert (plan_dir / "plan.json").is_file() and (plan_dir / "masks.safetensors").is_file()


def test_diff_matches_brute_force_jaccard(plans):
    a, b = tamp_fx.Plan.load(plans("tamp")), tamp_fx.Plan.load(plans("wanda"))
    result = diff_plans(a, b)
    assert result.linears.keys() == a.linears.keys()
    both = either = 0
    for name, d in result.linears.items():
        ma, mb = a.masks[name], b.masks[name]
        assert d.jaccard == pytest.approx((ma & mb).sum().item() / (ma | mb).sum().item())
        assert d.sparsity_a == a.linears[name].sparsity and d.sparsity_b == b.linears[name].sparsity
        both, either = both + (ma & mb).sum().item(), either + (ma | mb).sum().item()
    assert result.jaccard == pytest.approx(both / either)
    assert result.sparsity_a == pytest.approx(a.summary()["sparsity"], abs=1e-6)
    assert 0 < result.jaccard < 1                # tamp and wanda keep different weights
    same = diff_plans(a, a)
    assert same.jaccard == 1.0 and all(d.jaccard == 1.0 for d in same.linears.values())


def _magnitude_plan(model, out):
    return tamp_fx.plan(model, model / "calib.jsonl",
                        tamp_fx.PlanConfig(method="magnitude", sparsity=0.5, nsamples=1)).save(out)


def test_diff_cli_table_json_and_refusal(plans, tiny_models, tmp_path):
    r = runner.invoke(app, ["diff", str(plans("tamp")), str(plans("wanda"))])
    assert r.exit_code == 0, r.output
    assert "q_proj" in r.output and "Jaccard" in r.output and "DIFFERENT MODELS" not in r.output
    r = runner.invoke(app, ["diff", str(plans("tamp")), str(plans("wanda")), "--json"])
    report = json.loads(r.stdout)
    assert len(report["linears"]) == len(tamp_fx.Plan.load(plans("tamp")).linears) and report["same_model"]
    other_plan = _magnitude_plan(tiny_models("qwen2_vl", seed=1), tmp_path / "other")
    r = runner.invoke(app, ["diff", str(plans("tamp")), str(other_plan)])
    assert r.exit_code == 1 and "different models" in r.output
    assert len(r.output.strip().splitlines()) <= 2 and "Traceback" not in r.output


def test_diff_of_plans_of_different_models_names_both_and_force_says_so(plans, tiny_models, tmp_path):
    """Same architecture, other weights (the fingerprints differ): refused in one line naming
    both plans and models; --force compares them under a banner. Plans that prune other linears
    cannot be compared even with --force."""
    mine, other = plans("wanda"), _magnitude_plan(tiny_models("qwen2_vl", seed=1), tmp_path / "other")
    fingerprints = [tamp_fx.Plan.load(p).model["fingerprint"] for p in (mine, other)]
    said = " ".join(fails_cleanly(["diff", mine, other], "different models", unchanged=[mine, other], code=1).split())
    assert all(str(p) in said for p in (mine, other, *fingerprints)) and "--force" in said
    before = snapshot(mine, other)
    r = runner.invoke(app, ["diff", str(mine), str(other), "--force"])
    assert r.exit_code == 0, r.output
    banner, *table = r.output.strip().splitlines()
    assert banner.startswith("WARNING (--force)") and "DIFFERENT MODELS" in banner and str(other) in banner
    assert "Jaccard" in "".join(table)
    r = runner.invoke(app, ["diff", str(mine), str(other), "--force", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["same_model"] is False
    assert snapshot(mine, other) == before
    a = Plan.load(mine)
    fewer = dataclasses.replace(a, model={**a.model, "fingerprint": "sha256:other"},
                                linears=dict(list(a.linears.items())[1:]))
    with pytest.raises(tamp_fx.TampError, match="even with --force"):
        diff_plans(a, fewer, force=True)


def test_inspect_refuses_a_plan_of_another_schema(plans, tmp_path):
    import shutil
    copy = tmp_path / "plan"
    shutil.copytree(plans("wanda"), copy)
    data = json.loads((copy / "plan.json").read_text())
    (copy / "plan.json").write_text(json.dumps({**data, "schema_version": 99}))
    r = runner.invoke(app, ["inspect", str(copy), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "schema_version 99" in r.output and not (tmp_path / "r.html").exists()


def test_html_planning_time_is_the_recorded_wall_time(plans, tmp_path):
    import html
    import shutil
    plan = Plan.load(plans("tamp"))
    assert plan.wall_seconds > 0 and "dense profile" in plan.timing_text    # tamp: das allocation profiles first
    r = runner.invoke(app, ["inspect", str(plans("tamp")), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    row = re.search(r"<th>planning time</th><td>(.*?)</td>", (tmp_path / "r.html").read_text()).group(1)
    assert row == html.escape(plan.timing_text) and row.startswith(f"{plan.wall_seconds:.1f} s on cpu in float32, peak host memory ")
    old = tmp_path / "old"                                  # a plan.json written before timing was recorded
    shutil.copytree(plans("tamp"), old)
    data = json.loads((old / "plan.json").read_text())
    del data["timing"]
    (old / "plan.json").write_text(json.dumps(data))
    assert Plan.load(old).wall_seconds is None
    r = runner.invoke(app, ["inspect", str(old), "--html", str(tmp_path / "old.html")])
    assert r.exit_code == 0 and "<th>planning time</th><td>unknown" in (tmp_path / "old.html").read_text()


def test_plot_into_an_existing_directory_writes_the_figures_and_prints_the_table(plans, tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "notes.txt").write_text("mine")
    args = ["inspect", str(plans("wanda")), "--plot", str(figures)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "layer total" in r.stdout                     # the table
    assert {p.name for p in figures.iterdir()} == {"notes.txt", *(f"{n}.png" for n in _expected_figures("wanda"))}
    before = (figures / "sparsity.png").stat().st_mtime_ns
    r = runner.invoke(app, args)                         # the figures are there: refused in one line, table shown
    assert r.exit_code == 1 and "layer total" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "--overwrite" in errors[0] and "sparsity.png" in errors[0]
    assert (figures / "sparsity.png").stat().st_mtime_ns == before
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0 and "layer total" in r.stdout
    assert (figures / "sparsity.png").stat().st_mtime_ns != before and (figures / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.rglob(".*tmp-*"))          # no temporary left beside the figures


def test_a_timing_record_describes_what_it_holds():
    """A plan.json timing without its device (damaged or edited) still describes; the peak shows when recorded."""
    from tamp_fx.artifact.plan import describe_timing
    assert describe_timing({"wall_s": 2.0, "parts_s": {}, "dtype": "float32"}) == "2.0 s"
    assert describe_timing({"wall_s": 2.0, "parts_s": {"load": 2.0}, "device": "cpu", "dtype": "bfloat16",
                            "peak_host_mib": 1536}) == "2.0 s on cpu in bfloat16, peak host memory 1,536 MiB (load 2.0 s)"
