"""Streaming DAS diversity (O(N C)) against the O(N^2 C) definition, on one machine in one run.

    python bench/das_speed.py --n 2048 --c 1024
"""
from __future__ import annotations

import argparse

import torch
from timing import median_seconds

from tamp_fx.statistics.diversity import diversity_terms


def quadratic(z: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The definition: mean pairwise cosine similarity from the full N x N matrix."""
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = zn @ zn.T                                                      # (N, N)
    out = {}
    mods = torch.unique(labels).tolist()
    for i, a in enumerate(mods):
        ma = labels == a
        block = sim[ma][:, ma]
        n = int(ma.sum())
        if n > 1:
            out[str(a)] = 1 - float((block.sum() - block.diagonal().sum()) / (n * (n - 1)))
        for b in mods[i + 1:]:
            out[f"{a}-{b}"] = 1 - float(sim[ma][:, labels == b].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--c", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, args.c, generator=g)
    labels = torch.randint(0, 2, (args.n,), generator=g)                # text and image tokens
    fast = median_seconds(lambda: diversity_terms(z, labels), args.repeats)
    slow = median_seconds(lambda: quadratic(z, labels), args.repeats)
    print(f"N = {args.n}, C = {args.c}, two modalities, float32 input, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after a warm-up")
    print(f"streaming O(N C) diversity (float32 rows and sums, float64 dots): {fast * 1e3:.1f} ms")
    print(f"O(N^2 C) definition (float32 N x N):   {slow * 1e3:.1f} ms  ({slow / fast:.1f}x slower)")


if __name__ == "__main__":
    main()
