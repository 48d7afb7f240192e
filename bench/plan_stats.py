"""What the plans decided: per-layer sparsity, diversities and AMIA's selected tokens.

Reads the plan directories that `bench/quality.py` keeps (``WORKDIR/plan-METHOD-SPARSITY``)
and prints Markdown: for each plan the range of per-layer sparsity (attention and MLP blocks
separately), and, where the plan has them, the mean diversity terms per block and the mean
fraction of each modality's tokens that AMIA selected.

    python bench/plan_stats.py bench-out/quality --sparsity 0.5
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import mean


def stat_means(linears: Iterable[dict], key: str) -> dict[str, float]:
    """Mean over ``linears`` (plan.json entries) of each entry of their ``stats[key]``: the
    diversity terms, or the share of each modality's tokens AMIA selected. Null entries (NaN
    statistics) are left out."""
    values = defaultdict(list)
    for lp in linears:
        for name, value in ((lp.get("stats") or {}).get(key) or {}).items():
            if value is not None:
                values[name].append(value)
    return {name: mean(v) for name, v in values.items()}


def summarise(plan_dir: Path) -> dict:
    plan = json.loads((plan_dir / "plan.json").read_text())
    by_layer = defaultdict(lambda: [0, 0])  # layer -> [pruned, total]
    by_block = defaultdict(lambda: [0, 0])
    block_linears = defaultdict(list)       # block -> its linears
    for lp in plan["linears"].values():
        size = lp["shape"][0] * lp["shape"][1]
        for key, table in ((lp["layer"], by_layer), (lp["block"], by_block)):
            table[key][0] += lp["sparsity"] * size
            table[key][1] += size
        block_linears[lp["block"]].append(lp)
    layers = [by_layer[i][0] / by_layer[i][1] for i in sorted(by_layer)]
    return {"method": plan["method"], "sparsity": plan["summary"]["sparsity"], "layers": layers,
            "blocks": {b: v[0] / v[1] for b, v in by_block.items()},
            "diversity": {(b, t): v for b, ls in block_linears.items() for t, v in stat_means(ls, "diversity").items()},
            "selected": {(b, m): v for b, ls in block_linears.items()
                         for m, v in stat_means(ls, "selected_fraction").items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    plans = sorted(args.workdir.glob(f"plan-*-{args.sparsity}"))
    print("| plan | overall | attention | mlp | per-layer min | per-layer max | first 3 layers | last 3 layers |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    stats = [summarise(p) for p in plans]
    for s in stats:
        layers = s["layers"]
        print(f"| {s['method']} | {s['sparsity']:.3f} | {s['blocks'].get('attention', 0):.3f} | {s['blocks'].get('mlp', 0):.3f} "
              f"| {min(layers):.3f} | {max(layers):.3f} | {', '.join(f'{x:.2f}' for x in layers[:3])} "
              f"| {', '.join(f'{x:.2f}' for x in layers[-3:])} |")
    for s in stats:
        if s["diversity"]:
            print(f"\n{s['method']}: mean diversity per block and term: "
                  + ", ".join(f"{b}/{t} {v:.3f}" for (b, t), v in sorted(s["diversity"].items())))
        if s["selected"]:
            print(f"\n{s['method']}: mean fraction of tokens AMIA selected: "
                  + ", ".join(f"{b}/{m} {v:.3f}" for (b, m), v in sorted(s["selected"].items())))


if __name__ == "__main__":
    main()
