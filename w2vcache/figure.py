"""The report's figure: WER by probed layer (BiLSTM and linear probes on the same axes, weighted
probes right of the last layer), the weighted probes' layer weights, and WER by re-initialised
blocks (PNG).

FIGURE_PANEL_INCHES per panel at FIGURE_DPI: 500 x 400 pixels with one panel (probes only or
fine-tunes only), 1000 x 400 with two, 1500 x 400 with all three.

The similarity figure (report-similarity.png): one heatmap per similarity result under
RUNS/similarity/ (linear CKA, SVCCA or PWCCA), and one panel with the diagonals (each layer against
the same layer of the other store) of those that have one, each panel SIMILARITY_PANEL_INCHES.
"""

import importlib.util
from pathlib import Path

import numpy as np

from . import record
from .errors import W2VCacheError
from .layers import layer_index
from .report import PROBE_NAMES, Row, Similarity, Stat, best_probe, split_order, weight_layers

FIGURE_PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
FIGURE_DPI = 100  # 5 x 4 inches -> 500 x 400 pixels per panel
SIMILARITY_PANEL_INCHES = (5.0, 4.5)  # a heatmap is square plus its colour bar
ANNOTATE_UP_TO = 16  # write the value in each cell of heatmaps up to this many layers a side
NO_MATPLOTLIB = "not drawn: matplotlib is missing (pip install 'w2vcache[plots]')"


def can_plot() -> bool:
    """Whether matplotlib (the 'plots' extra) is installed, so that the figures can be drawn."""
    return importlib.util.find_spec("matplotlib") is not None


def _panels(rows: list[Row]) -> list[list[Row]]:
    """The rows of each panel drawn: probes, weighted probes' layer weights, fine-tunes (those present)."""
    probes = [r for r in rows if r.kind == "probe"]
    weights = [r for r in probes if r.layer_weights]
    tunes = [r for r in rows if r.kind == "finetune"]
    return [p for p in (probes, weights, tunes) if p] or [[]]


def figure_size(rows: list[Row]) -> tuple[int, int]:
    """The PNG's width and height in pixels: one panel per kind of experiment present, and one for
    the layer weights of weighted probes."""
    panels = len(_panels(rows))
    return round(panels * FIGURE_PANEL_INCHES[0] * FIGURE_DPI), round(FIGURE_PANEL_INCHES[1] * FIGURE_DPI)


def _matplotlib():
    """matplotlib's Figure and Agg canvas, or an error saying how to install or skip it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise W2VCacheError(
            "the figure needs matplotlib: pip install 'w2vcache[plots]', or leave the figure out (--no-figure)"
        ) from None
    return Figure, FigureCanvasAgg


def _errors(stats: list[Stat]) -> list[float]:
    return [s.std or 0.0 for s in stats]


def write_figure(rows: list[Row], path) -> Path:
    """WER (%) by probed layer, and by re-initialised blocks, with seed std as error bars."""
    Figure, FigureCanvasAgg = _matplotlib()
    panels = _panels(rows)
    probes = [r for r in rows if r.kind == "probe"]
    weighted = [r for r in probes if r.layer_weights]
    tunes = [r for r in rows if r.kind == "finetune"]
    # Figure + Agg canvas rather than pyplot: no global backend switch, no display, no leaked figures.
    fig = Figure(figsize=(FIGURE_PANEL_INCHES[0] * len(panels), FIGURE_PANEL_INCHES[1]), dpi=FIGURE_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    splits = split_order(s for r in rows for s in r.wer_percent)
    colours = {s: f"C{i}" for i, s in enumerate(splits)}

    ax = iter(axes)
    if probes:
        a = next(ax)
        # Unnumbered layers (the CNN output) sit left of layer 0, in table order; weighted probes
        # right of the last layer, apart from the curve.
        numbered = [r.layer for r in probes if r.layer is not None]
        named = list(dict.fromkeys(r.label for r in probes if r.layer is None and not r.weighted))
        x = {}
        for r in probes:
            if r.layer is not None:
                x[id(r)] = r.layer
            elif r.weighted:
                x[id(r)] = max(numbered, default=-1) + 1.5
            else:
                x[id(r)] = named.index(r.label) - len(named)
        kinds = list(dict.fromkeys(r.probe for r in probes))
        for kind in kinds:
            linear = kind != "bilstm"
            mine = [r for r in probes if r.probe == kind]
            for split in splits:
                scored = [r for r in mine if split in r.wer_percent and not r.weighted]
                style = dict(color=colours[split], marker="s" if linear else "o", markersize=3, capsize=3)
                if scored:
                    name = f"{split} ({PROBE_NAMES.get(kind, kind)})" if len(kinds) > 1 else split
                    dashes = ("-." if split.startswith("dev") else ":") if linear else ("--" if split.startswith("dev") else "-")
                    a.errorbar([x[id(r)] for r in scored], [r.wer_percent[split].mean for r in scored],
                               yerr=_errors([r.wer_percent[split] for r in scored]), label=name, linestyle=dashes,
                               **style)
                points = [r for r in mine if split in r.wer_percent and r.weighted]
                if points:
                    a.errorbar([x[id(r)] for r in points], [r.wer_percent[split].mean for r in points],
                               yerr=_errors([r.wer_percent[split] for r in points]), linestyle="none",
                               markerfacecolor="none" if linear else colours[split], **style)
        best = best_probe(rows)
        if best:
            row, by = best
            a.axvline(x[id(row)], color="0.5", linestyle=":", linewidth=1)
            a.plot([x[id(row)]], [row.wer_percent[by].mean], marker="*", markersize=12, color="black",
                   linestyle="none", label=f"best: layer {row.label} ({by})")
        ticks = dict(sorted({x[id(r)]: r.label for r in probes}.items()))
        a.set_xticks(list(ticks), list(ticks.values()))
        a.set_xlabel("layer")
        a.set_ylabel("WER (%)")
        a.set_title("Probe WER by layer")
        a.grid(alpha=0.3)
        a.legend(fontsize="small")
    if weighted:
        a = next(ax)
        layers = weight_layers(weighted)
        width = 0.8 / len(weighted)
        for i, row in enumerate(weighted):
            stats = [row.layer_weights.get(layer) for layer in layers]
            xs = [j + (i - (len(weighted) - 1) / 2) * width for j in range(len(layers))]
            a.bar(xs, [s.mean if s else 0.0 for s in stats], width, yerr=[(s.std or 0.0) if s else 0.0 for s in stats],
                  capsize=2, color=f"C{i}", label=f"{PROBE_NAMES.get(row.probe, row.probe)} probe")
        a.axhline(1 / len(layers), color="0.5", linestyle="--", linewidth=1, label="equal weights")
        a.set_xticks(range(len(layers)), [_tick(layer) for layer in layers])
        a.set_xlabel("layer")
        a.set_ylabel("softmax weight")
        a.set_title("Weighted probes: layer weights")
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize="small")
    if tunes:
        a = next(ax)
        shown = [s for s in splits if not s.startswith("dev") and any(s in r.wer_percent for r in tunes)]
        shown = shown or [s for s in splits if any(s in r.wer_percent for r in tunes)]
        width = 0.8 / len(shown)
        for i, split in enumerate(shown):
            xs = [x + (i - (len(shown) - 1) / 2) * width for x in range(len(tunes))]
            stats = [r.wer_percent.get(split) for r in tunes]
            a.bar(xs, [s.mean if s else 0.0 for s in stats], width,
                  yerr=[(s.std or 0.0) if s else 0.0 for s in stats], capsize=3,
                  label=split, color=colours[split])
        a.set_xticks(range(len(tunes)), [r.label for r in tunes])
        a.set_ylim(0, 1.2 * a.get_ylim()[1])  # headroom for the legend above the bars
        a.set_xlabel("re-initialised blocks")
        a.set_ylabel("WER (%)")
        a.set_title("Fine-tuning WER")
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize="small", loc="upper left", ncols=len(shown))

    with record.replacing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")  # no bbox_inches="tight": it would change the size
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Similarity


def similarity_figure_size(similarities: list[Similarity]) -> tuple[int, int]:
    """The similarity PNG's width and height in pixels: a heatmap per result, and one panel for the
    diagonals where any result has one."""
    panels = len(similarities) + any(s.diagonal is not None for s in similarities)
    return (round(panels * SIMILARITY_PANEL_INCHES[0] * FIGURE_DPI),
            round(SIMILARITY_PANEL_INCHES[1] * FIGURE_DPI))


def _tick(name: str) -> str:
    number = layer_index(name)
    return name if number is None else str(number)


def write_similarity_figure(similarities: list[Similarity], path) -> Path:
    """Each result's heatmap (0 to 1: linear CKA, SVCCA or PWCCA), then the diagonals as curves by
    layer on one axes."""
    Figure, FigureCanvasAgg = _matplotlib()

    diagonals = [s for s in similarities if s.diagonal is not None]
    panels = len(similarities) + bool(diagonals)
    fig = Figure(figsize=(SIMILARITY_PANEL_INCHES[0] * panels, SIMILARITY_PANEL_INCHES[1]), dpi=FIGURE_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = iter(fig.subplots(1, panels, squeeze=False)[0])
    for result in similarities:
        _heatmap(fig, next(axes), result)
    if diagonals:
        _diagonals(next(axes), diagonals)
    with record.replacing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    return Path(path)


def _heatmap(fig, ax, result: Similarity) -> None:
    """Store A's layers up, store B's across; undefined cells (no variance) left blank."""
    matrix = np.array([[np.nan if v is None else v for v in row] for row in result.matrix], dtype=float)
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=result.label)
    ax.set_xticks(range(len(result.layers_b)), [_tick(n) for n in result.layers_b])
    ax.set_yticks(range(len(result.layers_a)), [_tick(n) for n in result.layers_a])
    ax.set_xlabel(f"layer of {_short(result.model_b or result.model_a)}", fontsize="small")
    ax.set_ylabel(f"layer of {_short(result.model_a)}", fontsize="small")
    ax.set_title(f"{result.name}: split {result.split}, {result.frames} frames", fontsize="medium")
    if max(matrix.shape) <= ANNOTATE_UP_TO:
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                        color="black" if v > 0.6 else "white")


def _short(model: str | None, parts: int = 3) -> str:
    """A model's name short enough for an axis: a run directory's path keeps its last parts
    ("finetune/reinit-none/seed0"), which name the run."""
    pieces = str(model).split("/")
    return str(model) if len(pieces) <= parts else ".../" + "/".join(pieces[-parts:])


def _diagonals(ax, diagonals: list[Similarity]) -> None:
    """Each layer's similarity with the same layer of the other store: how much each layer changed."""
    layers = list(dict.fromkeys(layer for s in diagonals for layer in s.layers_a))
    for s in diagonals:
        points = [(layers.index(n), v) for n, v in zip(s.layers_a, s.diagonal) if v is not None]
        ax.plot([x for x, _ in points], [v for _, v in points], marker="o", markersize=4, label=s.name)
        most = s.changed_most
        if most:
            ax.plot([layers.index(most[0])], [most[1]], marker="*", markersize=12, color="black", linestyle="none")
    ax.set_xticks(range(len(layers)), [_tick(n) for n in layers])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{', '.join(dict.fromkeys(s.label for s in diagonals))} with the same layer")
    ax.set_title("How much each layer changed (1: not at all; *: most)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
