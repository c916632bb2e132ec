"""The command line: parse options, call one library function per command, print the result.

Every command is a thin wrapper; the same work is available from Python (a notebook) by calling
the function it wraps. A `W2VCacheError` is shown as a one-line error, never as a traceback.
"""

import json

import click

from . import __version__
from .errors import W2VCacheError


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except W2VCacheError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="w2vcache")
def main():
    """Layer-wise interpretability of Wav2Vec 2.0 through fine-tuning.

    Extract every layer of a frozen W2V once into a feature store, train cheap BiLSTM-CTC
    probes on any layer, fine-tune with re-initialised top layers, and report WER.
    """


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


@main.command("corpus")
@corpus_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def corpus_command(librispeech, librilight, splits, as_json):
    """List a corpus: splits, sources, utterances, speakers, hours.

    With no corpus named, the mini corpus bundled in data/.
    """
    from .corpus import build_corpus, summarize

    rows = summarize(build_corpus(librispeech, librilight, list(splits)))
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
