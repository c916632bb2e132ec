"""`w2vcache report RUNS`: the table and figure of finished runs (a thin layer over report.py).

The main command group registers it with `main.add_command(report_command)`; it also runs on its
own (a `W2VCacheError` becomes a one-line error either way).
"""

from pathlib import Path

import click

from .cli_common import user_errors
from .figure import NO_MATPLOTLIB, can_plot
from .report import FORMATS, REPORT_NAME, load_report, render_markdown, write_files


@click.command("report")
@click.argument("runs", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help=f"Where to write the files.  [default: RUNS/{REPORT_NAME}]")
@click.option("--format", "formats", type=click.Choice(FORMATS), multiple=True,
              help="Table file(s) to write; repeatable.  [default: all]")
@click.option("--no-figure", is_flag=True,
              help="Do not draw report.png and report-similarity.png (drawing them needs matplotlib).")
@user_errors
def report_command(runs, out, formats, no_figure):
    """The WER table and figure of the finished runs under RUNS (mean and spread over seeds).

    Writes report.md (WER/CER in %, mean ± sample std over seeds), report.csv and report.json
    (the same in %, unrounded) and report.png (WER by layer; WER by re-initialised blocks).
    Similarity results under RUNS/similarity/ (`w2vcache similarity ... --out
    RUNS/similarity/NAME`) are reported too: their diagonals in the table, their heatmaps and
    diagonal curves in report-similarity.png.
    Prints the Markdown to stdout and the paths written to stderr, so `> table.md` keeps only
    the table. Failed and unfinished runs are listed, never averaged.
    """
    runs = Path(runs)
    found, rows, similarities = load_report(runs)
    draw = not no_figure and can_plot()  # without matplotlib the tables are still written
    written = write_files(found, rows, Path(out) if out else runs / REPORT_NAME, formats or FORMATS,
                          figure=draw, runs_dir=runs, similarities=similarities)
    click.echo(render_markdown(rows, found, runs, similarities=similarities), nl=False)
    for kind, path in written.items():
        click.echo(f"{'figure' if kind.endswith('png') else 'table'}: {path}", err=True)
    if not (no_figure or draw):
        click.echo(f"figure: {NO_MATPLOTLIB}", err=True)
