"""Pictures of a plan, drawn from ``plan.json`` alone, and a self-contained HTML page of them.

Figures (each only when the plan holds its statistics):

- ``diversity``: the DAS diversity terms (every intra- and inter-modality term, and the
  importance) of each projection type across layers (the paper's Figure 3);
- ``attention``: the last token's attention mass on each modality across layers (Figure 4);
- ``sparsity``: achieved sparsity of every linear, layer x projection heat maps, and achieved
  minus target where they differ;
- ``selected_tokens``: AMIA's (or any token selection's) share of each modality's tokens that
  it selected, per layer and projection, on a log scale (AMIA keeps a few percent).

matplotlib (the ``plot`` extra) is imported only here and only when a figure is drawn; it
draws on its Agg canvas, so no display is needed.
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamp_fx.artifact.colours import ColourScale, difference_scale, percent, sparsity_scale, token_scale
from tamp_fx.artifact.plan import TIMING_KEY, describe_timing
from tamp_fx.errors import TampError, first_line
from tamp_fx.runtime.output import check_output
from tamp_fx.runtime.transaction import Outputs

PLOT_HINT = "drawing figures needs matplotlib: pip install 'tamp-fx[plot]' (or pip install matplotlib)"


def projection_names(data: dict[str, Any]) -> dict[str, str]:
    """Checkpoint weight name -> projection type: the weight's name relative to its decoder
    layer, shortened to the fewest trailing components that still tell the types apart
    (``self_attn.q_proj.weight`` -> ``q_proj``).

    >>> projection_names({"linears": {"m.layers.0.attn.q.weight": {"layer": 0}, "m.layers.0.mlp.up.weight": {"layer": 0}}})
    {'m.layers.0.attn.q.weight': 'q', 'm.layers.0.mlp.up.weight': 'up'}
    """
    relative = {}
    for name, lp in data["linears"].items():
        marker = f".{lp['layer']}."
        rest = name.split(marker, 1)[1] if marker in name else name
        relative[name] = rest.removesuffix(".weight").split(".")
    types = {tuple(parts) for parts in relative.values()}
    for k in range(1, max((len(t) for t in types), default=1) + 1):
        if len({t[-k:] for t in types}) == len(types):
            break
    return {name: ".".join(parts[-k:]) for name, parts in relative.items()}


@dataclass(frozen=True)
class Grid:
    """The plan's linears on a layer x projection grid."""

    layers: list[int]
    projections: list[str]                       # in the order the plan lists them
    cells: dict[tuple[int, str], dict[str, Any]]  # (layer, projection) -> the linear's plan entry

    @classmethod
    def of(cls, data: dict[str, Any]) -> Grid:
        names = projection_names(data)
        cells = {(lp["layer"], names[n]): lp for n, lp in data["linears"].items()}
        projections = list(dict.fromkeys(names.values()))
        return cls(sorted({layer for layer, _ in cells}), projections, cells)

    def value(self, layer: int, projection: str, get: Callable[[dict[str, Any]], float | None]) -> float:
        """``get(linear)`` of one cell, NaN where there is no linear or it has no such value."""
        lp = self.cells.get((layer, projection))
        value = get(lp) if lp is not None else None
        return float("nan") if value is None else float(value)

    def column(self, projection: str, get: Callable[[dict[str, Any]], float | None]) -> list[float]:
        """``get(linear)`` of one projection type, per layer."""
        return [self.value(layer, projection, get) for layer in self.layers]

    def values(self, get: Callable[[dict[str, Any]], float | None]) -> list[list[float]]:
        """A (layers, projections) table of ``get(linear)``."""
        return [[self.value(layer, p, get) for p in self.projections] for layer in self.layers]


def _stat(key: str, sub: str | None = None) -> Callable[[dict[str, Any]], Any]:
    """Getter of a linear's ``stats[key]`` (or ``stats[key][sub]``), None where it is missing."""
    def get(lp: dict[str, Any]) -> Any:
        value = lp.get("stats", {}).get(key)
        return value.get(sub) if sub is not None and isinstance(value, dict) else value
    return get


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - the Agg canvas draws
        from matplotlib.figure import Figure
    except ImportError as error:
        raise TampError(PLOT_HINT) from error
    return Figure


def _layer_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")


def _title(data: dict[str, Any]) -> str:
    m = data.get("model", {})
    return f"{data.get('method')} plan of {m.get('source', '?')} ({m.get('model_type', '?')})"


def _panels(figure_cls, n: int, *, width: float = 3.2, height: float = 2.6, columns: int = 4):
    cols = min(n, columns)
    rows = -(-n // cols)
    fig = figure_cls(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def diversity_figure(data: dict[str, Any]):
    """Each projection type: every diversity term and the importance across layers (Figure 3)."""
    grid = Grid.of(data)
    terms = list(dict.fromkeys(t for lp in grid.cells.values() for t in _stat("diversity")(lp) or {}))
    if not terms:
        return None
    fig, axes = _panels(_figure_class(), len(grid.projections))
    for ax, p in zip(axes, grid.projections):
        for term in terms:
            ax.plot(grid.layers, grid.column(p, _stat("diversity", term)), marker=".", label=term)
        ax.plot(grid.layers, grid.column(p, _stat("importance")), color="black", linestyle="--", label="importance")
        ax.set_title(p)
        _layer_axis(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("diversity")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{_title(data)}: output diversity per projection (intra / inter modality)")
    return fig


def attention_figure(data: dict[str, Any]):
    """The last token's attention mass on each modality, per layer (Figure 4)."""
    key = "last_token_attention_per_modality"
    layers = [entry for entry in data.get("layers", []) if entry.get(key)]
    if not layers:
        return None
    modalities = [m for m in layers[0][key] if any(entry[key].get(m, 0.0) > 0 for entry in layers)]
    if not modalities:
        return None                                # no mass anywhere (all zero or NaN): nothing to draw
    fig = _figure_class()(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    xs = [entry["layer"] for entry in layers]
    for m in modalities:
        ax.plot(xs, [entry[key].get(m, 0.0) for entry in layers], marker="o", label=m)
    _layer_axis(ax)
    ax.set_ylabel("attention mass of the last token")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{_title(data)}\nlast-token attention per modality")
    return fig


def _heat_maps(data: dict[str, Any], panels: list[tuple[str, list[list[float]], ColourScale]], grid: Grid, title: str):
    """Layer x projection heat maps, one per panel; panels with the same scale share its colour bar."""
    import matplotlib
    fig, axes = _panels(_figure_class(), len(panels), width=max(3.4, 0.55 * len(grid.projections) + 2.0),
                        height=max(3.0, 0.22 * len(grid.layers) + 1.6), columns=len(panels))
    annotate = len(grid.layers) * len(grid.projections) <= 120
    shared: dict[int, tuple[ColourScale, Any, list]] = {}
    for ax, (label, table, scale) in zip(axes, panels):
        norm, cmap = scale.norm(), matplotlib.colormaps[scale.cmap]
        shown = [[max(v, scale.vmin) if scale.log and v == v else v for v in row] for row in table]  # 0 on a log scale
        image = ax.imshow(shown, aspect="auto", norm=norm, cmap=cmap, interpolation="nearest")  # (L, P)
        shared.setdefault(id(scale), (scale, image, []))[2].append(ax)
        ax.set_xticks(range(len(grid.projections)), grid.projections, rotation=45, ha="right")
        step = max(1, len(grid.layers) // 16)
        ax.set_yticks(range(0, len(grid.layers), step), grid.layers[::step])
        ax.set_ylabel("layer")
        ax.set_title(label)
        if annotate:
            for i, row in enumerate(table):
                for j, value in enumerate(row):
                    if value == value:  # not NaN
                        r, g, b, _ = cmap(norm(shown[i][j]))
                        ax.text(j, i, scale.fmt(value), ha="center", va="center", fontsize=7,
                                color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    for scale, image, scale_axes in shared.values():
        bar = fig.colorbar(image, ax=scale_axes, shrink=0.9, ticks=list(scale.ticks),   # a log scale's floor: 0 too
                           format=lambda x, _, s=scale: ("≤ " if s.log and x <= s.vmin else "") + s.fmt(x))
        bar.set_label(scale.label)
        bar.minorticks_off()
    fig.suptitle(f"{_title(data)}:\n{title}")
    return fig


#: Achieved sparsity this close to the target everywhere (in fraction) draws no difference map.
SAME_AS_TARGET = 0.0005


def _finite(table: list[list[float]]) -> list[float]:
    return [v for row in table for v in row if v == v]


def sparsity_figure(data: dict[str, Any]):
    """Achieved sparsity of every linear, and where it differs from the target, achieved minus target."""
    grid = Grid.of(data)
    if not grid.cells:
        return None
    achieved = grid.values(lambda lp: lp["sparsity"])
    gap = grid.values(lambda lp: lp["sparsity"] - lp["target_sparsity"])
    same = max(map(abs, _finite(gap))) < SAME_AS_TARGET
    panels = [(f"achieved sparsity{f' (= target within {100 * SAME_AS_TARGET:g} pp)' if same else ''}", achieved,
               sparsity_scale(_finite(achieved)))]
    if not same:
        panels.append(("achieved - target", gap, difference_scale(_finite(gap))))
    target = data.get("config", {}).get("sparsity")
    overall = f"target {percent(target)} overall, " if isinstance(target, (int, float)) else ""
    return _heat_maps(data, panels, grid, f"sparsity per linear ({overall}"
                                          f"achieved {data.get('summary', {}).get('sparsity', 0):.2%})")


def selected_tokens_figure(data: dict[str, Any]):
    """The share of each modality's tokens the token selection kept, per layer and projection (log scale)."""
    if data.get("parts", {}).get("tokens", "all") == "all":
        return None                                # every token counts: every share is 1
    grid = Grid.of(data)
    modalities = list(dict.fromkeys(m for lp in grid.cells.values() for m in _stat("selected_fraction")(lp) or {}))
    if not modalities:
        return None
    tables = {m: grid.values(_stat("selected_fraction", m)) for m in modalities}
    scale = token_scale([v for table in tables.values() for v in _finite(table)])
    panels = [(f"{m} tokens selected", table, scale) for m, table in tables.items()]
    return _heat_maps(data, panels, grid, f"tokens selected ({data['parts']['tokens']})")


#: figure name -> drawer (None when the plan lacks its statistics)
FIGURES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "diversity": diversity_figure,
    "attention": attention_figure,
    "sparsity": sparsity_figure,
    "selected_tokens": selected_tokens_figure,
}


#: What drawing from a plan whose statistics were edited or damaged raises (a string where a
#: number belongs, a missing key, a list where a mapping belongs, NaN everywhere).
_DAMAGE = (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError)


@contextlib.contextmanager
def _damaged(what: str) -> Iterator[None]:
    """Turn what a damaged plan's statistics make a drawer raise into one line naming ``what``."""
    try:
        yield
    except _DAMAGE as error:
        raise TampError(f"{what} cannot be drawn: the plan's statistics are damaged ({type(error).__name__}: "
                        f"{first_line(error)}): re-run `tamp-fx plan` to write them again") from error


def render(data: dict[str, Any], *, dpi: int = 110) -> dict[str, bytes]:
    """Every figure the plan has statistics for, as PNG bytes keyed by figure name."""
    pngs = {}
    for name, draw in FIGURES.items():
        with _damaged(f"the {name} figure"):                # drawing reads the statistics, saving lays them out
            fig = draw(data)
            if fig is None:
                continue
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi)
        pngs[name] = buffer.getvalue()
    return pngs


def check_outputs(plot_dir: str | Path | None, html_file: str | Path | None, *, overwrite: bool = False,
                  protect: tuple[Path, ...] = ()) -> None:
    """Refuse ``--plot`` and ``--html`` as :func:`write_figures` and :func:`write_html` would, up
    front: before a table is printed or a figure drawn."""
    if plot_dir is not None:
        _check_figures(Path(plot_dir), overwrite, protect)
    if html_file is not None:
        check_output(html_file, overwrite=overwrite, protect=protect, file=True, option="--html")


def _check_figures(out_dir: Path, overwrite: bool, protect: tuple[Path, ...]) -> None:
    """A new ``out_dir`` as a directory output; into an existing one, each figure as a file (inputs, writability)."""
    if not out_dir.is_dir():
        check_output(out_dir, overwrite=overwrite, protect=protect, option="--plot")
        return
    for name in FIGURES:
        check_output(out_dir / f"{name}.png", overwrite=True, protect=protect, file=True, option="--plot")


def write_figures(data: dict[str, Any], out_dir: str | Path, outputs: Outputs) -> list[Path]:
    """Stage the plan's figures as ``NAME.png`` in ``outputs`` (committed with the command's
    other outputs): a new directory ``out_dir`` as a whole; into an existing one each figure
    beside what is there, replacing a file of the same name only with ``--overwrite``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        outputs.check(out_dir)                                                 # before drawing
        pngs = render(data)
        tmp = outputs.directory(out_dir)
        for name, png in pngs.items():
            (tmp / f"{name}.png").write_bytes(png)
        return [out_dir / f"{name}.png" for name in pngs]
    _check_figures(out_dir, outputs.overwrite, outputs.protect)
    pngs = render(data)
    existing = [f"{name}.png" for name in pngs if (out_dir / f"{name}.png").exists()]
    if existing and not outputs.overwrite:
        raise TampError(f"{out_dir} already has {', '.join(existing)}: pass --overwrite to replace "
                        f"{'them' if len(existing) > 1 else 'it'}, or choose another directory")
    for name, png in pngs.items():
        outputs.file(out_dir / f"{name}.png").write_bytes(png)
    return [out_dir / f"{name}.png" for name in pngs]


def _summary_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    s, m, parts = data.get("summary", {}), data.get("model", {}), data.get("parts", {})
    config = data.get("config", {})
    calibration = m.get("calibration", {})
    rows = [("method", f"{data.get('method')} = {parts.get('allocation')} allocation + {parts.get('score')} score + "
                       f"{parts.get('tokens')} tokens"),
            ("target sparsity", f"{config.get('sparsity')}"
                                + (f", pattern {config['pattern']}" if config.get("pattern") else "")),
            ("pruned", f"{s.get('sparsity', 0):.2%} of {s.get('parameters', 0):,} parameters in {s.get('linears')} linears"),
            ("model", f"{m.get('source')} ({m.get('architecture')}, {m.get('num_layers')} decoder layers, "
                      f"fingerprint {m.get('fingerprint')})"),
            ("calibration", f"{calibration.get('samples')} samples of {calibration.get('file')}")]
    rows.append(("planning time", describe_timing(data.get(TIMING_KEY))))
    seconds = [entry["seconds"] for entry in data.get("layers", []) if "seconds" in entry]
    if seconds:
        rows.append(("pruning per layer", f"{sum(seconds) / len(seconds):.2f} s mean, {max(seconds):.2f} s slowest, "
                                          f"over {len(seconds)} layers"))
    host = max((e["peak_host_mib"] for e in data.get("layers", []) if "peak_host_mib" in e), default=None)
    device = max((e["peak_device_mib"] for e in data.get("layers", []) if "peak_device_mib" in e), default=None)
    if host is not None:
        rows.append(("peak memory", f"host {host:,.0f} MiB" + (f", device {device:,.0f} MiB" if device is not None else "")))
    return rows


_LAYER_COLUMNS = {"seconds": ("seconds", "{:.2f}"), "peak_host_mib": ("peak host MiB", "{:,.0f}"),
                  "host_mib": ("host MiB at its end", "{:,.0f}"), "peak_device_mib": ("peak device MiB", "{:,.0f}")}


def _layer_table(data: dict[str, Any]) -> str:
    """Per-layer wall time and peak memory as an HTML table ('' when the plan has none)."""
    layers = data.get("layers", [])
    keys = [k for k in _LAYER_COLUMNS if any(k in entry for entry in layers)]
    if not keys:
        return ""
    head = "".join(f"<th>{_LAYER_COLUMNS[k][0]}</th>" for k in keys)
    body = "\n".join("<tr><td>{}</td>{}</tr>".format(entry.get("layer"), "".join(
        f"<td>{_LAYER_COLUMNS[k][1].format(entry[k]) if k in entry else '-'}</td>" for k in keys)) for entry in layers)
    return f"<details><summary>per layer</summary><table><tr><th>layer</th>{head}</tr>\n{body}</table></details>"


def html_page(data: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One self-contained HTML page: the plan's summary and parts, then its figures inline."""
    e = html.escape
    with _damaged("the report's summary"):
        rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary_rows(data))
        layer_table = _layer_table(data)
    config = e(json.dumps(data.get("config", {}), indent=1))
    figures = "\n".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{e((FIGURES[name].__doc__ or name).splitlines()[0])}</figcaption></figure>"
        for name, png in pngs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(_title(data))}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{text-align:left;padding:.2em .8em;border-bottom:1px solid #ddd}}
img{{max-width:100%}}figure{{margin:2em 0}}figcaption{{color:#555}}</style></head>
<body><h1>{e(_title(data))}</h1>
<table>
{rows}
</table>
<details><summary>config</summary><pre>{config}</pre></details>
{layer_table}
{figures}
</body></html>
"""


def write_html(data: dict[str, Any], out_file: str | Path, outputs: Outputs) -> Path:
    """Stage :func:`html_page` of the plan as the file ``out_file`` in ``outputs``."""
    outputs.check(out_file, file=True)                                         # before drawing
    page = html_page(data, render(data))
    outputs.file(out_file).write_text(page, encoding="utf-8")
    return Path(out_file)
