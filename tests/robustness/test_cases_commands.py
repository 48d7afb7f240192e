"""Damaged plan folders (inspect, apply, diff), option values out of range or in conflict, and
outputs that clash with an input, a file or each other, for every command: each is refused in one
line (a usage error: exit status 2), with nothing written and every input and its folder as it
was (:func:`support.cases.check`)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from support.cases import TEXT, Case, Workspace, check, params

# --- plan folders: inspect, apply and diff --------------------------------------------------

PLAN_COMMANDS: dict[str, Callable[[Workspace, Path], list]] = {
    "inspect": lambda ws, p: ["inspect", p],
    "apply": lambda ws, p: ["apply", ws.model(), p, "--out", ws.out, "-q"],
    "diff": lambda ws, p: ["diff", ws.plan(), p],
}


def _plan(damage: Callable[[Path], object]) -> Callable[[Workspace], Path]:
    """A copy of the session's plan with ``damage`` done to it."""
    def make(ws: Workspace) -> Path:
        plan = ws.copy(ws.plan(), "plan")
        damage(plan)
        return plan
    return make


def _folder_for(name: str) -> Callable[[Path], None]:
    def damage(plan: Path) -> None:
        (plan / name).unlink()
        (plan / name).mkdir()
    return damage


def _loop(name: str) -> Callable[[Path], None]:
    def damage(plan: Path) -> None:
        (plan / name).unlink()
        (plan / name).symlink_to(plan / name)
    return damage


def _edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(plan: Path) -> None:
        data = json.loads((plan / "plan.json").read_text())
        edit(data)
        (plan / "plan.json").write_text(json.dumps(data))
    return damage


#: damage -> (the plan folder made, what the refusal says)
PLANS: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "missing": (lambda ws: ws.root / "none", "none"),
    "a file": (lambda ws: ws.write("plan", "not a folder"), "plan"),
    "an empty folder": (lambda ws: (ws.root / "plan").mkdir() or ws.root / "plan", "plan"),
    "a symlink loop": (lambda ws: ws.loop("plan"), "plan"),
    "without plan.json": (_plan(lambda p: (p / "plan.json").unlink()), "plan.json"),
    "without masks.safetensors": (_plan(lambda p: (p / "masks.safetensors").unlink()), "masks.safetensors"),
    "plan.json a folder": (_plan(_folder_for("plan.json")), "plan.json"),
    "masks.safetensors a folder": (_plan(_folder_for("masks.safetensors")), "masks.safetensors"),
    "plan.json a symlink loop": (_plan(_loop("plan.json")), "plan.json"),
    "plan.json empty": (_plan(lambda p: (p / "plan.json").write_text("")), "not valid JSON"),
    "linears a list": (_plan(_edit(lambda d: d.update(linears=[]))), '"linears" is missing or not an object'),
    "schema_version 99": (_plan(_edit(lambda d: d.update(schema_version=99))), "schema_version 99"),
    "config a list": (_plan(_edit(lambda d: d.update(config=[]))), '"config" is missing or not an object'),
}
CASES: dict[str, Case] = {f"{command}/plan folder/{damage}": Case(lambda ws, c=command, m=make: PLAN_COMMANDS[c](ws, m(ws)),
                                                                  says)
                          for damage, (make, says) in PLANS.items() for command in PLAN_COMMANDS}
CASES["diff/plan folder/another model's plan"] = Case(
    lambda ws: ["diff", ws.plan(), _plan(_edit(lambda d: d["model"].update(fingerprint="0" * 16)))(ws)],
    "different models")
CASES["inspect/pruned model/a damaged tamp-fx.json"] = Case(
    lambda ws: ["inspect", ws.write("pruned/tamp-fx.json", "{").parent], "tamp-fx.json")
CASES["inspect/pruned model/--plot"] = Case(
    lambda ws: ["inspect", ws.write("pruned/tamp-fx.json", "{}").parent, "--plot", ws.out], "draw a plan")

# --- options: out of range, unknown or in conflict ------------------------------------------


def _plan_with(*extra) -> Callable[[Workspace], list]:
    return lambda ws: ws.plan_args(ws.model(), ws.write("calib.txt", TEXT), *extra)


def _apply_with(*extra) -> Callable[[Workspace], list]:
    return lambda ws: ["apply", ws.model(), ws.plan(), "--out", ws.out, "-q", *extra]


def _eval_with(*extra) -> Callable[[Workspace], list]:
    return lambda ws: ["eval", ws.model(), "--seqlen", 16, "-q", *extra]


def _text(ws: Workspace) -> Path:
    return ws.write("eval.txt", TEXT)


CASES.update({
    "plan/option/an unknown method": Case(_plan_with("--method", "nope"), "--method", exit=2),
    "plan/option/an unknown allocation": Case(_plan_with("--allocation", "nope"), "--allocation", exit=2),
    "plan/option/an unknown score": Case(_plan_with("--score", "nope"), "--score", exit=2),
    "plan/option/an unknown token selection": Case(_plan_with("--tokens", "nope"), "--tokens", exit=2),
    "plan/option/a seed that is not a number": Case(_plan_with("--seed", "abc"), "--seed", exit=2),
    "plan/option/an unknown log format": Case(_plan_with("--log-format", "nope"), "--log-format", exit=2),
    "plan/option/a huge sparsity": Case(_plan_with("--sparsity", "1e308"), "--sparsity", exit=2),
    "plan/option/an infinite --atv-alpha": Case(_plan_with("--atv-alpha", "1e400"), "--atv-alpha", exit=2),
    "plan/option/a pattern that is not N:M": Case(_plan_with("--pattern", "x:4"), "pattern"),
    "plan/option/a pattern of more zeros than weights": Case(_plan_with("--pattern", "4:2"), "pattern"),
    "plan/option/a huge --seqlen": Case(_plan_with("--seqlen", 10 ** 9), "--seqlen"),
    "plan/option/an unknown device": Case(_plan_with("--device", "tpu"), "tpu"),
    "plan/option/an unknown dtype": Case(_plan_with("--dtype", "int3"), "int3"),
    "plan/option/an unknown option": Case(_plan_with("--sparsty", "0.5"), "--sparsty", exit=2),
    "apply/option/an unknown quantizer": Case(_apply_with("--quantize", "nope"), "--quantize", exit=2),
    "apply/option/an unknown format": Case(_apply_with("--format", "nope"), "--format", exit=2),
    "apply/option/semi-structured without a 2:4 plan": Case(_apply_with("--format", "semi-structured"), "2:4"),
    "apply/option/pt2e-x86 for a Hugging Face model": Case(_apply_with("--quantize", "pt2e-x86"), "pt2e-x86"),
    "eval/option/--vqa on a model that is not a fixture": Case(lambda ws: _eval_with("--vqa")(ws), "--vqa"),
    "eval/option/nothing to evaluate": Case(_eval_with(), "nothing to evaluate"),
    "eval/option/--json that looks like an option": Case(
        lambda ws: _eval_with("--text", _text(ws), "--json", "-x")(ws), "--json"),
    "eval/option/a missing baseline": Case(
        lambda ws: _eval_with("--text", _text(ws), "--baseline", ws.root / "none")(ws), "does not exist"),
    "eval/option/an unknown device": Case(lambda ws: _eval_with("--text", _text(ws), "--device", "tpu")(ws), "tpu"),
    "export/option/--out not .pt2": Case(lambda ws: ["export", ws.model(), "--calib", ws.write("c.txt", TEXT), "--out",
                                                     ws.root / "m.onnx", "--calib-out", ws.root / "i.safetensors"],
                                         "--out model.pt2"),
    "export/option/--calib-out not .safetensors": Case(
        lambda ws: ["export", ws.model(), "--calib", ws.write("c.txt", TEXT), "--out", ws.root / "m.pt2",
                    "--calib-out", ws.root / "i.json"], "--calib-out inputs.safetensors"),
    "fixture/option/an unknown kind": Case(lambda ws: ["fixture", "--out", ws.out, "--kind", "nope"], "--kind", exit=2),
    "any/option/an unknown command": Case(lambda ws: ["prune", ws.model()], "prune", exit=2),
})

# --- outputs: over an input, under a file, taken, or a link loop ------------------------------

OUTPUT_COMMANDS: dict[str, Callable[[Workspace, Path], list]] = {
    "plan": lambda ws, out: ws.plan_args(ws.model(), ws.write("calib.txt", TEXT), out=out),
    "apply": lambda ws, out: ["apply", ws.model(), ws.plan(), "--out", out, "-q"],
    "export": lambda ws, out: ["export", ws.model(), "--calib", ws.write("calib.txt", TEXT), "--out", out,
                               "--calib-out", ws.root / "i.safetensors", "-q"],
    "eval --json": lambda ws, out: ["eval", ws.model(), "--text", ws.write("calib.txt", TEXT), "--no-vqa", "--json",
                                    out, "-q"],
    "inspect --html": lambda ws, out: ["inspect", ws.plan(), "--html", out],
    "fixture": lambda ws, out: ["fixture", "--out", out],
    "demo": lambda ws, out: ["demo", "--out", out, "-q"],
}


def _under_a_file(ws: Workspace) -> Path:
    return ws.write("file", "a file") / "out.pt2"


def _taken(ws: Workspace) -> Path:
    return ws.write("taken.pt2", "keep me")


#: clash -> (the --out made, what the refusal says, the commands it applies to)
OUTPUTS: dict[str, tuple[Callable[[Workspace], Path], str, tuple[str, ...]]] = {
    "the calibration or text file": (lambda ws: ws.root / "calib.txt", "input", ("plan", "eval --json")),
    "inside the model": (lambda ws: ws.model() / "out.pt2", "input", ("plan", "apply", "export", "eval --json")),
    "under a file": (_under_a_file, "is a file", tuple(OUTPUT_COMMANDS)),
    "taken, without --overwrite": (_taken, "already exists", tuple(c for c in OUTPUT_COMMANDS if c != "demo")),
    "a symlink loop": (lambda ws: ws.loop("loop.pt2"), "loop.pt2", ("plan", "apply", "export", "eval --json")),
}
CASES.update({f"{command}/output/{clash}": Case(lambda ws, c=command, m=make: OUTPUT_COMMANDS[c](ws, m(ws)), says)
              for clash, (make, says, commands) in OUTPUTS.items() for command in commands})
#: a refusal names the option to change, not always --out
CASES.update({f"{command}/output/taken, the refusal names {option}":
              Case(lambda ws, c=command: OUTPUT_COMMANDS[c](ws, _taken(ws)), f"choose another {option} or pass --overwrite")
              for command, option in (("plan", "--out"), ("eval --json", "--json"), ("inspect --html", "--html"))})
CASES["export/output/--calib-out taken, the refusal names --calib-out"] = Case(
    lambda ws: ["export", ws.model(), "--calib", ws.write("c.txt", TEXT), "--out", ws.root / "m.pt2",
                "--calib-out", ws.write("taken.safetensors", "keep me")], "choose another --calib-out or pass --overwrite")
CASES["inspect --html/output/plan.json of the plan shown"] = Case(
    lambda ws: ["inspect", ws.plan(), "--html", ws.plan() / "plan.json", "--overwrite"], "input")
CASES["demo/output/a folder tamp-fx did not write"] = Case(
    lambda ws: ["demo", "--out", ws.write("mine/fixture/notes.txt", "months of work").parent.parent, "-q"],
    "did not write")
CASES["export/output/--out and --calib-out the same file"] = Case(
    lambda ws: ["export", ws.model(), "--calib", ws.write("c.txt", TEXT), "--out", ws.root / "m.pt2",
                "--calib-out", ws.root / "m.pt2"], "m.pt2")


@pytest.mark.parametrize("case", params(CASES))
def test_a_bad_option_or_output_is_refused_cleanly(case, ws):
    check(CASES[case], ws)
