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
from pathlib import Path
from statistics import mean


def summarise(plan_dir: Path) -> dict:
    plan = json.loads((plan_dir / "plan.json").read_text())
    by_layer = defaultdict(lambda: [0, 0])  # layer -> [pruned, total]
    by_block = defaultdict(lambda: [0, 0])
    diversity = defaultdict(list)  # (block, term) -> values
    selected = defaultdict(list)  # (block, modality) -> values
    for lp in plan["linears"].values():
        size = lp["shape"][0] * lp["shape"][1]
        for key, table in ((lp["layer"], by_layer), (lp["block"], by_block)):
            table[key][0] += lp["sparsity"] * size
            table[key][1] += size
        for term, value in lp["stats"].get("diversity", {}).items():
            diversity[(lp["block"], term)].append(value)
        for modality, value in lp["stats"].get("selected_fraction", {}).items():
            selected[(lp["block"], modality)].append(value)
    layers = [by_layer[i][0] / by_layer[i][1] for i in sorted(by_layer)]
    return {"method": plan["method"], "sparsity": plan["summary"]["sparsity"], "layers": layers,
            "blocks": {b: v[0] / v[1] for b, v in by_block.items()},
            "diversity": {k: mean(v) for k, v in diversity.items()},
            "selected": {k: mean(v) for k, v in selected.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    plans = sorted(args.workdir.glob(f"plan-*-{args.sparsity}"))
    print(f"| plan | overall | attention | mlp | per-layer min | per-layer max | first 3 layers | last 3 layers |")
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
