"""The heat maps' colour scales stay readable: a uniform plan is drawn mid-scale under distinct
ticks, token shares of 1% get a colour of their own, and every colour bar says what it shows."""
from __future__ import annotations

import io

import pytest

from tamp_fx.artifact.colours import difference_scale, sparsity_scale, token_scale
from tamp_fx.artifact.report import selected_tokens_figure, sparsity_figure

pytest.importorskip("matplotlib")


def _labels(scale) -> list[str]:
    return [scale.fmt(t) for t in scale.ticks]


@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 0.625, 0.95])
def test_a_constant_sparsity_is_drawn_mid_scale_under_distinct_ticks(value):
    scale = sparsity_scale([value] * 12)
    assert 0.0 <= scale.vmin <= value <= scale.vmax <= 1.0
    assert scale.vmax - scale.vmin == pytest.approx(0.1)          # a sane width, not 0.1 percentage points
    if value > 0:                                                 # the colour of its value, not the scale's bottom
        assert 0.25 < scale.norm()(value) < 0.75
    labels = _labels(scale)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


def test_varied_sparsities_span_whole_tenths_with_distinct_ticks():
    scale = sparsity_scale([0.42, 0.5, 0.58, 0.61])
    assert (scale.vmin, scale.vmax) == (pytest.approx(0.4), pytest.approx(0.7))
    labels = _labels(scale)
    assert len(set(labels)) == len(labels) and "50%" in labels


def test_the_token_scale_gives_one_percent_a_colour_of_its_own():
    scale = token_scale([0.0, 0.01, 0.05, 0.1, 1.0])
    norm = scale.norm()
    assert norm(0.01) >= 0.25                                     # on 0-100% it would be 0.01: black like 0%
    assert norm(0.01) < norm(0.05) < norm(0.1) < norm(1.0) == pytest.approx(1.0)
    assert {"1%", "10%", "100%"} <= set(_labels(scale))


def test_the_difference_scale_is_symmetric_about_zero():
    scale = difference_scale([-0.002, 0.0005, 0.0])
    assert scale.vmin == -scale.vmax and scale.norm()(0.0) == pytest.approx(0.5)
    assert _labels(scale) == ["-0.2", "-0.1", "0", "+0.1", "+0.2"]     # round percentage points


def _data(achieved, target, selected=None):
    """A plan.json-like dict of 3 layers x 2 projections with these per-linear values."""
    linears = {}
    for i in range(3):
        for j, proj in enumerate(("q_proj", "up_proj")):
            stats = {"selected_fraction": {"image": selected[i][j], "text": 1.0}} if selected else {}
            linears[f"m.layers.{i}.x.{proj}.weight"] = {"layer": i, "shape": [8, 8], "sparsity": achieved[i][j],
                                                        "target_sparsity": target[i][j], "stats": stats}
    return {"method": "tamp", "model": {"source": "tiny"}, "config": {"sparsity": 0.5}, "summary": {"sparsity": 0.5},
            "parts": {"tokens": "amia"}, "linears": linears}


def _colour_bars(fig):
    fig.savefig(io.BytesIO(), format="png")                       # lay out and draw the tick labels
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_a_uniform_plan_draws_one_labelled_map_with_distinct_ticks():
    uniform = [[0.5, 0.5]] * 3
    fig = sparsity_figure(_data(uniform, uniform))
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 1                                         # achieved = target: no second, identical panel
    assert 0.25 < maps[0].images[0].norm(0.5) < 0.75
    [bar] = _colour_bars(fig)
    assert "sparsity" in bar.get_ylabel()
    ticks = [t.get_text() for t in bar.get_yticklabels()]
    assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks


def test_where_achieved_differs_from_target_the_difference_is_drawn():
    target = [[0.5, 0.5]] * 3
    achieved = [[0.5, 0.52], [0.49, 0.5], [0.5, 0.5]]
    fig = sparsity_figure(_data(achieved, target))
    assert len([ax for ax in fig.axes if ax.images]) == 2
    labels = {bar.get_ylabel() for bar in _colour_bars(fig)}
    assert any("achieved - target" in label for label in labels) and len(labels) == 2


def test_token_selection_map_is_labelled_and_log_scaled():
    half = [[0.5, 0.5]] * 3
    fig = selected_tokens_figure(_data(half, half, selected=[[0.01, 0.02], [0.05, 0.1], [0.03, 0.01]]))
    bars = _colour_bars(fig)
    assert len(bars) == 1 and "tokens selected" in bars[0].get_ylabel()   # image and text panels share it
    image = next(ax for ax in fig.axes if ax.images).images[0]
    assert image.norm(0.01) >= 0.25
