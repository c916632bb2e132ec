"""The sharing commands: copy, pack, export. Each is a thin wrapper around one function of share.py.

They are plain click commands; cli.py adds them to the `w2vcache` group with `main.add_command`.
A `W2VCacheError` is shown as a one-line error, here as under the group.
"""

import click

from .cli_common import human_size, user_errors

LAYERS_HELP = "Layers to keep: all, numbers and ranges (6-9, 0,8), or names (cnn,layer08)."
SPLITS_HELP = "Splits to keep: all, or names, comma-separated (dev,test-clean)."


@click.command("copy")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--layers", default="all", show_default=True, help=LAYERS_HELP)
@click.option("--splits", default="all", show_default=True, help=SPLITS_HELP)
@click.option("--dtype", type=click.Choice(["int8"]), default=None,
              help="Convert a float16/float32 store to int8 (half of float16's size). Default: the source's dtype.")
@user_errors
def copy_command(src, dst, layers, splits, dtype):
    """Copy a store (or a subset of its layers and splits) from SRC (a path or URL) to a local DST.

    The copy is a complete store that verifies on its own; its provenance says what was left out
    (and, with --dtype int8, what it was converted from). Re-run the same command to finish an
    interrupted copy.
    """
    from .share import copy_store

    r = copy_store(src, dst, layers=layers, splits=splits, dtype=dtype)
    left_out = "; ".join(f"{what} {', '.join(names)}" for what, names in
                         (("layers", r.left_out_layers), ("splits", r.left_out_splits)) if names) or "nothing"
    resumed = f" ({r.blocks_already_done} already done)" if r.blocks_already_done else ""
    converted = f", as {dtype}" if dtype else ""
    click.echo(f"{r.destination}: copied {r.blocks_copied} block(s){resumed} of {len(r.layers)} layer(s) "
               f"and {len(r.splits)} split(s), {human_size(r.bytes_copied)} of features read from {r.source} "
               f"in {r.seconds:.1f} s{converted}; left out: {left_out}")


@click.command("pack")
@click.argument("store")
@click.argument("file_zip", metavar="FILE.zip", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace FILE.zip if it exists.")
@user_errors
def pack_command(store, file_zip, overwrite):
    """Pack a complete STORE into one uncompressed zip that info, verify and probes read directly."""
    from .share import pack_store

    r = pack_store(store, file_zip, overwrite=overwrite)
    click.echo(f"{r.pack}: packed {r.files} files of {r.source}, {human_size(r.bytes)}, "
               f"{r.chunks_verified} chunks verified, in {r.seconds:.1f} s")


@click.command("export")
@click.argument("store")
@click.argument("file_h5", metavar="FILE.h5", type=click.Path(dir_okay=False))
@click.option("--layers", default="all", show_default=True, help=LAYERS_HELP)
@click.option("--splits", default="all", show_default=True, help=SPLITS_HELP)
@click.option("--overwrite", is_flag=True, help="Replace FILE.h5 if it exists.")
@user_errors
def export_command(store, file_h5, layers, splits, overwrite):
    """Export a complete STORE (or some layers and splits) to HDF5 for people who use h5py."""
    from .share import export_hdf5

    r = export_hdf5(store, file_h5, layers=layers, splits=splits, overwrite=overwrite)
    click.echo(f"{r.file}: {r.utterances} utterances ({r.frames} frames) of {len(r.layers)} layer(s) "
               f"in {len(r.splits)} split(s) from {r.source}, {human_size(r.bytes)}, in {r.seconds:.1f} s")
