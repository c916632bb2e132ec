"""The command line: parse options, call one library function per command, print the result.

Every command is a thin wrapper; the same work is available from Python (a notebook) by calling
the function it wraps. A `W2VCacheError` is shown as a one-line error, never as a traceback.
"""

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .cli_common import human_size, user_errors
from .space import unwritable_folder
from .report_cli import report_command
from .share_cli import copy_command, export_command, pack_command
from .similarity_cli import similarity_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="w2vcache")
def main():
    """Layer-wise interpretability of Wav2Vec 2.0 through fine-tuning.

    Extract every layer of a frozen W2V once into a feature store, train cheap BiLSTM-CTC
    probes on any layer, fine-tune with re-initialised top layers, and report WER.
    """


for command in (report_command, copy_command, pack_command, export_command, similarity_command):
    main.add_command(command)


def threads_option(command):
    return click.option(
        "--threads", type=click.IntRange(min=1),
        help="CPU threads for torch.  [default: 1 for small models and on a GPU; for large ones the cores "
        "no other process keeps busy, looked at again every epoch or block]")(command)


def jobs_option(command):
    return click.option(
        "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
        help="Runs trained at once, each by its own process on this machine, taking the next run no other "
        "holds: a small model's run uses one core, and one probe does not fill a GPU. Each run's "
        "results are those it gets alone.")(command)


def corpus_options(command):
    """The options that name a corpus; shared by every command that reads audio."""
    options = [
        click.option(
            "--librispeech",
            type=click.Path(exists=True, file_okay=False),
            help="LibriSpeech as downloaded (the folder holding dev-clean/, test-clean/, ...).",
        ),
        click.option(
            "--librilight",
            type=click.Path(exists=True, file_okay=False),
            help="Libri-light's labelled set as downloaded (librispeech_finetuning/).",
        ),
        click.option(
            "--split",
            "splits",
            multiple=True,
            metavar="NAME=SOURCE[,SOURCE...]",
            help="A split made of sources: a directory, a manifest (.tsv/.jsonl), a LibriSpeech split "
            "name (dev-clean) or librilight-10h|1h|10min. Repeatable; replaces the default splits.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def read_corpus(librispeech, librilight, splits, skip_bad=False):
    """The corpus the options name; how its splits were assembled is said on stderr, one line each."""
    from .corpus import build_corpus

    corpus = build_corpus(librispeech, librilight, list(splits), skip_bad)
    for note in corpus.notes if int(os.environ.get("RANK", "0")) == 0 else ():  # under torchrun, once
        click.echo(note, err=True)
    return corpus


@main.command("corpus")
@corpus_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--skip-bad", is_flag=True, help="Leave out utterances without audio or transcript (listed) instead of stopping.")
@click.option("--model", default=None, help="Check lengths against this model's receptive field (as extract "
              "--model takes it)  [default: W2V's, 400 samples]")
@user_errors
def corpus_command(librispeech, librilight, splits, as_json, skip_bad, model):
    """List a corpus: splits, sources, utterances, speakers, hours.

    Every audio file is checked as extract and finetune check it before any compute (header,
    format, its last samples); the ones they would refuse are listed with why (and left out of the
    counts). A file corrupt in its middle is found only when decoded. With no corpus named, the mini corpus bundled in
    data/.
    """
    from .corpus import W2V_MIN_SAMPLES, summarize

    corpus = read_corpus(librispeech, librilight, splits, skip_bad)
    min_samples = W2V_MIN_SAMPLES
    if model is not None:
        from .checkpoints import load_backbone

        min_samples = load_backbone(model, device="cpu").receptive_field
    rows = summarize(corpus, progress=not as_json and sys.stderr.isatty(), min_samples=min_samples)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'split':<12} {'utterances':>10} {'speakers':>8} {'hours':>8}  sources")
    for r in rows:
        click.echo(
            f"{r['split']:<12} {r['utterances']:>10} {r['speakers']:>8} {r['hours']:>8.3f}  {', '.join(r['sources'])}"
        )
    click.echo(
        f"{'total':<12} {sum(r['utterances'] for r in rows):>10} {'':>8} {sum(r['hours'] for r in rows):>8.3f}"
    )
    for split, skipped in corpus.skipped.items():
        for u in skipped:
            click.echo(f"skipped      {split}/{u['id']}: {u['path']}: {u['reason']}")
    unusable = [(r["split"], u) for r in rows for u in r["unusable"]]
    if unusable:
        which = f"with {model}" if model else "with a W2V-Base-like model (--model names another)"
        click.echo(f"{len(unusable)} audio file(s) cannot be used (extract and finetune {which} refuse them, "
                   "or leave them out with --skip-bad):")
        for split, u in unusable:
            click.echo(f"unusable     {split}/{u['id']}: {u['path']}: {u['reason']}")


@main.command("extract")
@click.option("--model", default="builtin:tiny", show_default=True,
              help="Hugging Face id, local save_pretrained directory, fine-tuning run directory "
                   "(RUNS/finetune/<experiment>/seed<k>: its best epoch's encoder), or builtin:tiny|tiny-ln|base.")
@corpus_options
@click.option("--store", default="features.zarr", show_default=True, help="Where to write the feature store.")
@click.option("--layers", default="all", show_default=True, help="Layers to store: all, or e.g. 0,4-8.")
@click.option("--cnn", "include_cnn", is_flag=True, help="Also store the CNN feature encoder's output.")
@click.option("--dtype", type=click.Choice(["float16", "float32", "int8"]), default="float16", show_default=True,
              help="How features are stored. int8: half of float16's size, per-channel scales per chunk, "
              "read back as float32 (docs/STORE.md).")
@click.option("--compression", type=click.Choice(["none", "zstd"]), default=None,
              help="Layer arrays zstd-compressed (level 1): about 5 % smaller, read at half the speed "
              "(docs/STORE.md)  [default: none, or an existing store's]")
@click.option("--batch-seconds", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Padded audio per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--compute-dtype", type=click.Choice(["float32", "tf32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="tf32: TF32 tensor cores (CUDA); float16, bfloat16: half-precision autocast (GPU, "
              "or a CPU with bf16 support). Its error against float32 is measured on the first batch and shown by "
              "info (benchmarks/compute_dtype.py).")
@click.option("--shard", metavar="I/N", help="Fill only this worker's share of the store (torchrun ranks do this by themselves).")
@click.option("--skip-bad", is_flag=True, help="Record unusable audio files in the store and go on.")
@click.option("--dry-run", is_flag=True, help="Print the store's size from the audio headers and the free space; write nothing.")
@click.option("--no-space-check", "space_check", is_flag=True, flag_value=False, default=True,
              help="Start even when the store's file system has less free space than the store needs.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of --model.")
@click.option("--normalize/--no-normalize", default=None,
              help="Each utterance scaled to zero mean and unit variance before the model, or fed raw.  "
              "[default: as the checkpoint's preprocessor_config.json says (do_normalize); normalised without one]")
@click.option("--chunk-frames", type=click.IntRange(min=1), hidden=True, help="Store layout: frames per chunk.")
@click.option("--block-chunks", type=click.IntRange(min=1), hidden=True, help="Store layout: chunks per block.")
@threads_option
@user_errors
def extract_command(librispeech, librilight, splits, **options):
    """Extract every layer of a frozen W2V into a feature store (resumable: re-run to finish)."""
    from .extract import SHOWN_BAD, ExtractConfig, extract, plan_store

    dry_run = options.pop("dry_run")
    corpus = read_corpus(librispeech, librilight, splits, options["skip_bad"])
    if dry_run:
        size = plan_store(corpus, ExtractConfig(**options))
        click.echo(f"{'split':<12} {'utterances':>10} {'hours':>8} {'size':>10}")
        for name, split in size.splits.items():
            click.echo(f"{name:<12} {split.utterances:>10} {split.hours:>8.3f} {human_size(split.bytes):>10}")
        click.echo(f"{'total':<12} {sum(s.utterances for s in size.splits.values()):>10} "
                   f"{sum(s.hours for s in size.splits.values()):>8.3f} {human_size(size.bytes):>10}")
        click.echo(f"{size.store}: needs {human_size(size.needed)}"
                   + (f" more ({human_size(size.existing)} already written)" if size.existing else "")
                   + f"; {human_size(size.free)} free there" + ("" if size.fits else ": NOT ENOUGH")
                   + (f"; cannot write in {size.unwritable}" if size.unwritable else ""))
        return
    result = extract(corpus, ExtractConfig(**options))
    if result.blocks_written == 0:
        whose = f"of shard {result.shard[0]}/{result.shard[1]} " if result.shard else ""
        click.echo(f"{result.store}: nothing to extract: every block {whose}is already in the store "
                   f"(`w2vcache info {result.store}` shows it)")
    else:
        click.echo(
            f"{result.store}: wrote {result.blocks_written} block(s), {result.utterances_written} utterances, "
            f"{result.audio_seconds / 3600:.3f} h of audio in {result.seconds:.1f} s ({result.speed:.1f}x real time)"
        )
    for split, skipped in result.skipped.items():
        click.echo(f"skipped {len(skipped)} utterance(s) of split {split}, recorded in the store:")
        for s in skipped[:SHOWN_BAD]:
            click.echo(f"  {s['id']}: {s['reason']} ({s['path']})")
        if len(skipped) > SHOWN_BAD:
            click.echo(f"  ... and {len(skipped) - SHOWN_BAD} more: `w2vcache info {result.store}` lists them all")


@main.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@user_errors
def info_command(store, as_json):
    """What is in a feature store: splits, utterances, hours, layers, completeness, provenance."""
    from .layers import describe_layers
    from .store import info

    about = info(store)
    if as_json:
        click.echo(json.dumps(about, indent=2))
        return
    prov, model = about["provenance"], about["provenance"].get("model", {})
    click.echo(f"store      {about['path']} (format {about['format_version']}, {human_size(about['bytes']['total'])} on disk)")
    click.echo(f"model      {model.get('name')}  revision {model.get('revision') or '-'}  weights sha256 {str(model.get('weight_hash'))[:16]}")
    normalised = {True: ", input normalised per utterance", False: ", input raw"}.get(model.get("normalize"), "")
    click.echo(f"features   {describe_layers(about['layers'])}, {about['dtype']}, {prov.get('frame_rate')} frames/s, "
               f"compute {prov.get('compute_dtype')}{normalised}")
    click.echo(f"created    {prov.get('created')}  " + " ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items() if v))
    if about.get("compute_error"):
        click.echo(f"precision  {compute_error_line(about['compute_error'])}")
    verification = about.get("verification")
    if verification:
        damaged = verification.get("damaged_blocks") or {}
        blocks = ", ".join(f"{s} {' '.join(map(str, b))}" for s, b in damaged.items())
        click.echo(f"verify     last verification failed ({verification.get('checked')}): {sum(map(len, damaged.values()))} "
                   f"damaged block(s){' (' + blocks + ')' if blocks else ''}, {verification.get('n_problems')} "
                   f"problem(s); run `w2vcache verify --repair {store}`")
    click.echo(f"\n{'split':<12} {'utterances':>10} {'hours':>8} {'frames':>10} {'complete':>12} {'skipped':>8}  source")
    for name, split in about["splits"].items():
        done = "yes" if split["complete"] else f"{split['blocks_done']}/{split['blocks']} blocks"
        if split.get("damaged_blocks"):
            done = f"{len(split['damaged_blocks'])} damaged"
        click.echo(f"{name:<12} {split['utterances']:>10} {split['hours']:>8.3f} {split['frames']:>10} "
                   f"{done:>12} {len(split['skipped']):>8}  {split['source']}")
    for name, split in about["splits"].items():
        for s in split["skipped"]:
            click.echo(f"skipped    {name}/{s['id']}: {s['path']}: {s['reason']}")


def compute_error_line(measured: dict) -> str:
    """e.g. "computed in bfloat16: relative error vs float32 1.1-1.3 % per layer (rms; worst frame 2.8 %),
    measured on the first batch (train, 22 utterances)"."""
    rms = [e["rms"] for e in measured["layers"].values()]
    worst = max(e["max"] for e in measured["layers"].values())
    on = measured.get("measured_on", {})
    return (f"computed in {measured['dtype']}: relative error vs {measured.get('against', 'float32')} "
            f"{100 * min(rms):.2g}-{100 * max(rms):.2g} % per layer (rms; worst frame {100 * worst:.2g} %), "
            f"measured on the first batch ({on.get('split')}, {on.get('utterances')} utterances)")


@main.command("verify")
@click.argument("store")
@click.option("--repair", is_flag=True,
              help="Rewrite the blocks whose chunks fail (from the audio with the store's own model and "
              "settings; a copy from its source), then verify again. Killed, run it again to finish.")
@click.option("--device", help="With --repair: where the model runs.  [default: where the store was "
              "extracted, if that is here; else cpu]")
@click.option("--source", help="With --repair of a copy: where its source store is now.  [default: "
              "where the copy's provenance says]")
@threads_option
@user_errors
def verify_command(store, repair, device, source, threads):
    """Check every chunk's checksum, the offsets, ids, transcripts and completeness.

    With --repair, write the blocks whose chunks fail again and verify once more.
    """
    from .store import verify

    if not repair and (device or source or threads):
        raise click.UsageError("--device, --source and --threads go with --repair")
    report = verify(store)
    for problem in report.problems:
        click.echo(f"FAIL {problem}")
    repaired = ""
    if repair and report.damaged_blocks:
        from .repair import RepairConfig, repair as repair_store

        blocks = ", ".join(f"{split} {' '.join(map(str, b))}" for split, b in report.damaged_blocks.items())
        click.echo(f"repairing {report.n_damaged} block(s) of {store}: {blocks}")
        result = repair_store(store, RepairConfig(device=device, source=source, threads=threads), report=report)
        rewritten = sum(map(len, result.rewritten.values()))
        repaired = f" ({rewritten} block(s) rewritten from {result.source} in {result.seconds:.1f} s)"
        report = result.after
        for problem in report.problems:
            click.echo(f"FAIL {problem}")
    if not report.ok:
        if report.damaged_blocks and Path(str(store)).is_file():  # a pack: read-only, one file
            advice = "; repair the store it was packed from (`w2vcache verify --repair`), then pack it again"
        elif report.damaged_blocks and (folder := unwritable_folder(str(store))):
            advice = (f"; {folder} cannot be written here (a read-only file system, or no permission): copy the "
                      f"store's folder as it is (cp -r) where you may write and run `w2vcache verify --repair` on the "
                      f"copy, or ask whoever may write there to run it on this one")
        elif report.damaged_blocks:
            advice = (f"; run `w2vcache verify --repair {store}` to rewrite the {report.n_damaged} "
                      f"damaged block(s)")
        elif report.damage and repair:
            advice = "; none is in a block that --repair can rewrite"
        else:
            advice = ""
        raise click.ClickException(f"{store}: {len(report.problems)} problem(s) in {report.chunks_checked} "
                                   f"chunks checked{repaired}{advice}")
    click.echo(f"OK {store}: {report.chunks_checked} chunks checked, all intact and complete{repaired}")


def training_options(command):
    """The training recipe's options, shared by probe and finetune; the command receives them as
    one `train_config` (a TrainConfig) plus `train_split`."""

    @functools.wraps(command)
    def wrapper(*args, epochs, lr, warmup_epochs, decay_from_epoch, dev_split, test_splits, select_by, **kwargs):
        from .train import TrainConfig

        config = TrainConfig(epochs=epochs, lr=lr, warmup_epochs=warmup_epochs, decay_from_epoch=decay_from_epoch,
                             dev_split=dev_split,
                             test_splits=None if test_splits is None else tuple(s for s in test_splits.split(",") if s),
                             select_by=select_by)
        return command(*args, train_config=config, **kwargs)

    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
                     help="Peak learning rate."),
        click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True),
        click.option("--decay-from-epoch", type=click.FloatRange(min=0),
                     help="Hold the peak until this many epochs are done, then decay linearly to 0.  "
                     "[default: half the epochs]"),
        click.option("--train-split", default="train", show_default=True),
        click.option("--dev-split", default="dev", show_default=True),
        click.option("--test-splits",
                     help="Comma-separated; each is tested with the best-dev weights.  "
                     "[default: test-clean,test-other, those of them the store or corpus has]"),
        click.option("--select-by", type=click.Choice(["wer", "cer"]), default="wer", show_default=True,
                     help="The dev error rate that picks the best epoch."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@main.command("probe")
@click.option("--store", default="features.zarr", show_default=True, help="Feature store path or URL.")
@click.option("--layer", "layers", default="all", show_default=True,
              help="A layer (8), a list or range (0-12), all, or weighted (a learnt softmax-weighted sum of "
              "every numbered layer; also in a list: 0-12,weighted).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; one run per layer and seed.")
@training_options
@click.option("--probe", "probe_kind", type=click.Choice(["bilstm", "linear"]), default="bilstm", show_default=True,
              help="BiLSTM-CTC, or one linear layer per frame with CTC (cheapest; ignores --lstm-layers, "
              "--hidden and --dropout).")
@click.option("--lstm-layers", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=1024, show_default=True, help="LSTM units per direction.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--layer-norm", is_flag=True,
              help="With --layer weighted: layer-normalise each layer (no affine parameters) before the sum.")
@click.option("--batch-frames", type=click.IntRange(min=1), default=16000, show_default=True,
              help="Padded frames per batch.")
@click.option("--memory-budget", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="GB of one split's features to hold in memory (every layer of it, for --layer weighted); "
              "more are read batch by batch. Batches built ahead (--prefetch) take about that many batches' "
              "worth more, plus two.")
@click.option("--prefetch", type=click.IntRange(min=0), default=2, show_default=True,
              help="Batches a thread builds ahead while the model steps; 0 builds each in the loop, holding "
              "the least memory. The batches, their order and the results are the same either way.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N (torchrun ranks take cuda:LOCAL_RANK).")
@click.option("--shard", metavar="I/N",
              help="Train only this job's share of the (layer, seed) runs, e.g. one task of a Slurm array "
              "(torchrun ranks share the runs by themselves).")
@jobs_option
@threads_option
@click.option("--out", default="runs", show_default=True, help="Runs directory.")
@user_errors
def probe_command(store, layers, seeds, train_config, train_split, probe_kind, lstm_layers, hidden, dropout,
                  layer_norm, batch_frames, memory_budget, prefetch, device, shard, jobs, threads, out):
    """Train BiLSTM-CTC (or linear-CTC) probes on cached layers, or on their learnt weighted sum;
    finished runs are skipped, killed ones resume, and runs another job is training are left to it."""
    from .probe import ProbeConfig, probe

    result = probe(
        store, layers, seeds, out,
        ProbeConfig(lstm_layers=lstm_layers, hidden=hidden, dropout=dropout, batch_frames=batch_frames,
                    probe=probe_kind, layer_norm=layer_norm, prefetch=prefetch),
        train_config, train_split=train_split, memory_budget=int(memory_budget * 2**30), device=device,
        num_threads=threads, shard=shard, jobs=jobs,
    )
    for line in result.summary(out, "probe"):
        click.echo(line)


@main.command("finetune")
@click.option("--model", default="builtin:tiny", show_default=True,
              help="Hugging Face id, local save_pretrained directory, or builtin:tiny|tiny-ln|base.")
@corpus_options
@click.option("--reinit", "reinits", multiple=True, default=["none"], show_default=True,
              help="Transformer blocks to re-initialise first (1-based): none, 12, 11,12, 10-12. Repeatable: one experiment each.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; one run per re-init set and seed.")
@training_options
@click.option("--freeze-epochs", type=click.IntRange(min=0), default=3, show_default=True,
              help="Epochs during which only the CTC head trains.")
@click.option("--train-feature-encoder", is_flag=True, help="Also train the CNN feature encoder (frozen by default).")
@click.option("--mask-time-prob", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="SpecAugment-style time masking: share of frames masked (0 turns it off).")
@click.option("--mask-time-length", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--final-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--batch-seconds", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="Padded audio per batch, over all ranks.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True, help="Audio-loading processes.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: mixed precision on GPU.")
@click.option("--memory-budget", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="GB of the frozen CNN's outputs to keep in memory on this machine (torchrun's ranks on it share "
              "them), computed once per batch for the later epochs, evaluations and runs (0: computed in every "
              "step). The results are the same either way.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (torchrun ranks take cuda:LOCAL_RANK).")
@click.option("--shard", metavar="I/N",
              help="Train only this job's share of the (re-init, seed) runs, one process per run: torchrun's "
              "ranks then share the job's runs instead of training each together (DDP); 0/1 for all of them.")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--skip-bad", is_flag=True, help="Leave out unusable audio files and utterances without a "
              "transcript (listed, and recorded in each run's config.json) instead of stopping; every file is "
              "decoded first, so that one corrupt in its middle is left out too.")
@jobs_option
@threads_option
@click.option("--out", default="runs", show_default=True, help="Runs directory.")
@user_errors
def finetune_command(model, librispeech, librilight, splits, reinits, seeds, train_config, train_split,
                     freeze_epochs, train_feature_encoder, mask_time_prob, mask_time_length, final_dropout,
                     batch_seconds, grad_accum, num_workers, precision, memory_budget, device, shard, revision,
                     skip_bad, jobs, threads, out):
    """Fine-tune W2V with a CTC head, top blocks re-initialised first (torchrun for several GPUs)."""
    from .finetune import FinetuneConfig, finetune, parse_reinit
    from .probe import parse_seeds

    result = finetune(
        read_corpus(librispeech, librilight, splits, skip_bad), model,
        [parse_reinit(r) for r in reinits], parse_seeds(seeds), out,
        FinetuneConfig(freeze_epochs=freeze_epochs, train_feature_encoder=train_feature_encoder,
                       final_dropout=final_dropout, mask_time_prob=mask_time_prob, mask_time_length=mask_time_length,
                       batch_seconds=batch_seconds, num_workers=num_workers, precision=precision),
        dataclasses.replace(train_config, grad_accum=grad_accum),
        train_split=train_split, device=device, revision=revision, num_threads=threads, shard=shard,
        cnn_memory=int(memory_budget * 2**30), skip_bad=skip_bad, jobs=jobs,
    )
    if shard is not None or int(os.environ.get("RANK", "0")) == 0:  # DDP ranks did one thing: say it once
        for line in result.summary(out, "finetune"):
            click.echo(line)


@main.command("demo")
@click.option("--out", default="demo", show_default=True, help="Where the stores, runs and report go.")
@click.option("--jobs", type=click.IntRange(min=1),
              help="Runs trained at once, a process each.  [default: 2 where this process may use two cores]")
@threads_option
@user_errors
def demo_command(out, jobs, threads):
    """The whole workflow on the bundled corpus with the built-in model, in a few minutes on a CPU.

    Extracts every layer, probes each one and their learnt weighted sum, fine-tunes the baseline
    and a re-initialised variant, extracts the fine-tuned baseline, compares its layers with the
    pre-trained ones (linear CKA on dev), and reports. The built-in model's weights are random:
    the curves show the workflow, not W2V.
    """
    from .demo import DemoConfig, demo

    demo(out, DemoConfig(jobs=jobs), num_threads=threads)
