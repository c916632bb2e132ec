"""`w2vcache similarity STORE [STORE_B]`: layer x layer linear CKA, SVCCA or PWCCA (a thin layer over similarity.py).

The main command group registers it with `main.add_command(similarity_command)`; it also runs on
its own (a `W2VCacheError` becomes a one-line error either way).
"""

import click

from .cli_common import user_errors
from .figure import NO_MATPLOTLIB
from .similarity import DEFAULT_MAX_FRAMES, DEFAULT_MEMORY_BUDGET, LABELS, MEASURES, similarity


@click.command("similarity")
@click.argument("store")
@click.argument("store_b", required=False)
@click.option("--split", default="dev", show_default=True, help="The split whose frames are compared.")
@click.option("--layers", default="all", show_default=True,
              help="Layers of each store: all, numbers and ranges (6-9, 0,8), or names (cnn,layer08).")
@click.option("--measure", type=click.Choice(MEASURES), default="cka", show_default=True,
              help="Linear CKA; or SVCCA (mean canonical correlation) or PWCCA (projection-weighted, "
                   "weighing STORE's side), each layer first cut to the directions holding 99 % of its variance.")
@click.option("--max-frames", type=click.IntRange(min=0), default=DEFAULT_MAX_FRAMES, show_default=True,
              help="Frames in the seeded sample, drawn from the whole split; 0: every frame.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the frame sample.")
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_MEMORY_BUDGET / 2**30, show_default=True,
              help="GB of float64 products held at once; beyond it the layers are taken in several passes.")
@click.option("--out", default="similarity", show_default=True, type=click.Path(file_okay=False),
              help="Where similarity.json, .csv and .png go.")
@click.option("--no-figure", is_flag=True, help="Do not draw similarity.png (drawing it needs matplotlib).")
@user_errors
def similarity_command(store, store_b, split, layers, measure, max_frames, seed, memory_budget, out, no_figure):
    """Layer x layer similarity (linear CKA, SVCCA or PWCCA) of STORE's features, or between STORE and STORE_B.

    Two stores must hold the same utterances (say a fine-tuned model's and its pre-trained
    model's): every layer of STORE is compared with every layer of STORE_B, and the diagonal
    (layer k against layer k) says how much each layer changed. Writes similarity.json (matrix and
    everything the run did), similarity.csv and similarity.png (heatmap; with two stores of the
    same layers, the diagonal as a curve). docs/ANALYSES.md says what the numbers mean.
    """
    r = similarity(store, store_b, split=split, layers=layers, measure=measure,
                   max_frames=max_frames or None, seed=seed, out=out, figure=not no_figure,
                   memory_budget=int(memory_budget * 2**30))
    against = f"store {store} against {store_b}" if store_b else f"store {store}"
    click.echo(f"{LABELS[r.measure]} of {len(r.layers_a)} x {len(r.layers_b)} layers, {against}, split {split}: "
               f"{r.frames} frames (of {r.frames_available}) from {r.utterances} utterances in {r.seconds:.1f} s")
    if r.diagonal is not None:
        click.echo("same layer: " + ", ".join(f"{name} {v:.3f}" for name, v in zip(r.layers_a, r.diagonal)
                                              if v is not None))
    for kind, path in r.files.items():
        click.echo(f"{'figure' if kind == 'png' else 'table'}: {path or NO_MATPLOTLIB}", err=True)
