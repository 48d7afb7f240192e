"""Token selections ATV and balanced against plain float64 references (hypothesis): ATV's rule
(tamp_fx.statistics.atv) on random hidden states, and balanced statistics (input norms and
SparseGPT's Hessian) against a per-modality recomputation."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError
from tamp_fx.modality import Modality
from tamp_fx.statistics.atv import LayerChange
from tamp_fx.statistics.observers import LinearObserver, ObserverContext
from tamp_fx.statistics.tokens import TOKEN_SELECTIONS

FAST = settings(max_examples=60, deadline=None)


def random_samples(seed: int, n_samples: int, width: int, modalities: int):
    """(labels (N,), hidden_in (1, N, D), hidden_out (1, N, D)) per sample, N from 1 to 40."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_samples):
        n = int(torch.randint(1, 41, (1,), generator=gen))
        labels = torch.randint(0, modalities, (n,), generator=gen).to(torch.int8)      # (N,)
        x = torch.randn(1, n, width, generator=gen)
        y = x + torch.rand(1, n, 1, generator=gen) * 3 * torch.randn(1, n, width, generator=gen)   # changed by varying amounts
        out.append((labels, x, y))
    return out


def reference_atv(samples, alpha: float) -> list[list[int]]:
    """ATV's rule written out in float64 loops: every text token, and per other modality the
    round(min(1, alpha * mean d) * N_text) tokens of largest d, at most all of them."""
    ds = []
    for _, x, y in samples:
        x, y = x[0].double(), y[0].double()
        ds.append([1 - float(x[t] @ y[t]) / (float(x[t].norm()) * float(y[t].norm())) for t in range(x.shape[0])])
    total, count = [0.0] * len(Modality), [0] * len(Modality)
    for (labels, _, _), d in zip(samples, ds):
        for t, m in enumerate(labels.tolist()):
            total[m] += d[t]
            count[m] += 1
    mean = [total[m] / count[m] if count[m] else 0.0 for m in range(len(Modality))]
    kept = []
    for (labels, _, _), d in zip(samples, ds):
        labels = labels.tolist()
        n_text = labels.count(Modality.TEXT)
        keep = [t for t, m in enumerate(labels) if m == Modality.TEXT]
        for m in range(1, len(Modality)):
            tokens = [t for t, lab in enumerate(labels) if lab == m]
            k = min(len(tokens), round(min(1.0, alpha * mean[m]) * n_text))
            keep += sorted(tokens, key=lambda t: -d[t])[:k]
        kept.append(sorted(keep))
    return kept


@FAST
@given(seed=st.integers(0, 2**31 - 1), n_samples=st.integers(1, 5), modalities=st.integers(1, 4),
       alpha=st.sampled_from([0.25, 0.5, 1.0, 2.0, 10.0]))
def test_atv_keeps_what_the_rule_says(seed, n_samples, modalities, alpha):
    samples = random_samples(seed, n_samples, width=8, modalities=modalities)
    change = LayerChange()
    for s, (labels, x, y) in enumerate(samples):
        change.add(s, labels, x, y)
    ours = [change.kept(s, labels, alpha).tolist() for s, (labels, _, _) in enumerate(samples)]
    assert ours == reference_atv(samples, alpha)


def test_atv_keeps_all_text_and_the_most_changed_images():
    """A hand-made sample: 4 text tokens; images changed by 0.0, 0.9 and 0.5 (cosine distance
    1 - cos of the angle). d_mean of the images is 0.467, so round(0.467 * 4) = 2 are kept."""
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 0], dtype=torch.int8)
    x = torch.zeros(1, 7, 2)
    x[0, :, 0] = 1.0
    angles = torch.tensor([0.0, 0.0, 0.0, math.acos(0.1), math.acos(0.5), 0.0, 0.0])
    y = torch.stack([angles.cos(), angles.sin()], -1)[None]                 # (1, 7, 2)
    change = LayerChange()
    change.add(0, labels, x, y)
    assert change.mean()[Modality.IMAGE].item() == pytest.approx((0.0 + 0.9 + 0.5) / 3, abs=1e-6)
    assert change.kept(0, labels, 1.0).tolist() == [0, 1, 3, 4, 5, 6]
    assert change.kept(0, labels, 1.0) is change.kept(0, labels, 1.0)    # once per sample, shared by the linears


def drive(observer: LinearObserver, context: ObserverContext, samples) -> None:
    for s, (labels, x) in enumerate(samples):
        context.labels, context.sample = labels, s
        observer(x, x[..., :3])
        observer.finish_sample(None)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n_samples=st.integers(1, 4), modalities=st.integers(1, 4))
def test_balanced_norms_and_hessian_equal_a_per_modality_float64_recomputation(seed, n_samples, modalities):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_samples):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        labels = torch.randint(0, modalities, (n,), generator=gen).to(torch.int8)
        samples.append((labels, torch.randn(1, n, 6, generator=gen) * torch.rand(6, generator=gen) * 4))
    context = ObserverContext()
    wanda, observer = (LinearObserver(context, selector=TOKEN_SELECTIONS["balanced"].selector(PlanConfig()), hessian=h)
                       for h in (False, True))               # norms, then the Hessian (which keeps no norms)
    drive(wanda, context, samples)
    drive(observer, context, samples)

    # each (sample, modality present) counts 1 in total, shared equally by its tokens
    sq, h, weight = torch.zeros(6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64), 0.0
    for labels, x in samples:
        x = x[0].double()
        for m in set(labels.tolist()):
            xm = x[labels == m]                                                # (n_m, 6)
            sq += (xm * xm).sum(0) / xm.shape[0]
            h += 2 * xm.T @ xm / xm.shape[0]
            weight += 1
    torch.testing.assert_close(wanda.stats.input_norm().double(), (sq / weight).sqrt(), rtol=1e-5, atol=1e-7)
    assert observer.stats.n_tokens == pytest.approx(weight)
    torch.testing.assert_close(observer.stats.hessian().double(), h / weight, rtol=1e-5, atol=1e-6)
    assert observer.selected_fraction() == {Modality(m).name.lower(): 1.0
                                            for m in sorted({m for lab, _ in samples for m in lab.tolist()})}


def test_balanced_weighs_samples_equally_where_all_weighs_tokens():
    """One modality: within a sample balanced is "all"; across samples of 5 and 9 tokens "all"
    weighs the second more, balanced both the same."""
    gen = torch.Generator().manual_seed(0)
    samples = [(torch.zeros(n, dtype=torch.int8), torch.randn(1, n, 6, generator=gen)) for n in (5, 9)]

    def stats(name, part, hessian=False):
        context = ObserverContext()
        observer = LinearObserver(context, selector=TOKEN_SELECTIONS[name].selector(PlanConfig()), hessian=hessian)
        drive(observer, context, part)
        return observer.stats

    torch.testing.assert_close(stats("all", samples[:1]).input_norm(), stats("balanced", samples[:1]).input_norm())
    torch.testing.assert_close(stats("all", samples[:1], True).hessian(), stats("balanced", samples[:1], True).hessian())
    assert not torch.allclose(stats("all", samples).input_norm(), stats("balanced", samples).input_norm())
    assert not torch.allclose(stats("all", samples, True).hessian(), stats("balanced", samples, True).hessian())


@pytest.mark.parametrize("kwargs, message", [
    ({"tokens": "atv", "atv_alpha": 0.0}, "atv_alpha must be a positive number"),
    ({"tokens": "atv", "atv_alpha": float("nan")}, "atv_alpha must be a positive number"),
    ({"method": "wanda", "atv_alpha": 2.0}, "applies to tokens 'atv'"),
])
def test_atv_alpha_is_checked(kwargs, message):
    with pytest.raises(TampError, match=message):
        PlanConfig(**kwargs)
