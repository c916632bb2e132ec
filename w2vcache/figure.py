"""The report's figure: WER by probed layer, and WER by re-initialised blocks (PNG).

FIGURE_PANEL_INCHES per panel at FIGURE_DPI: 500 x 400 pixels with one panel (probes only or
fine-tunes only), 1000 x 400 with both.
"""

from pathlib import Path

from . import record
from .errors import W2VCacheError
from .report import Row, Stat, best_probe, split_order

FIGURE_PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
FIGURE_DPI = 100  # 5 x 4 inches -> 500 x 400 pixels per panel



def figure_size(rows: list[Row]) -> tuple[int, int]:
    """The PNG's width and height in pixels: one panel per kind of experiment present."""
    panels = len({r.kind for r in rows}) or 1
    return round(panels * FIGURE_PANEL_INCHES[0] * FIGURE_DPI), round(FIGURE_PANEL_INCHES[1] * FIGURE_DPI)


def _errors(stats: list[Stat]) -> list[float]:
    return [s.std or 0.0 for s in stats]


def write_figure(rows: list[Row], path) -> Path:
    """WER (%) by probed layer, and by re-initialised blocks, with seed std as error bars."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise W2VCacheError(
            "the figure needs matplotlib: pip install 'w2vcache[plots]', or leave the figure out (--no-figure)"
        ) from None

    probes = [r for r in rows if r.kind == "probe"]
    tunes = [r for r in rows if r.kind == "finetune"]
    panels = [p for p in (probes, tunes) if p] or [[]]
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
        # Unnumbered layers (the CNN output) sit left of layer 0, in table order.
        unnumbered = [r for r in probes if r.layer is None]
        x = {id(r): (r.layer if r.layer is not None else unnumbered.index(r) - len(unnumbered)) for r in probes}
        for split in splits:
            scored = [r for r in probes if split in r.wer_percent]
            if not scored:
                continue
            a.errorbar([x[id(r)] for r in scored], [r.wer_percent[split].mean for r in scored],
                       yerr=_errors([r.wer_percent[split] for r in scored]), label=split, color=colours[split],
                       linestyle="--" if split.startswith("dev") else "-", marker="o", markersize=3, capsize=3)
        best = best_probe(rows)
        if best:
            row, by = best
            a.axvline(x[id(row)], color="0.5", linestyle=":", linewidth=1)
            a.plot([x[id(row)]], [row.wer_percent[by].mean], marker="*", markersize=12, color="black",
                   linestyle="none", label=f"best: layer {row.label} ({by})")
        a.set_xticks([x[id(r)] for r in probes], [r.label for r in probes])
        a.set_xlabel("layer")
        a.set_ylabel("WER (%)")
        a.set_title("Probe WER by layer")
        a.grid(alpha=0.3)
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
