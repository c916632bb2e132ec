import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-speech"


def write_wave(path, seconds=0.5, rate=16000, channels=1, seed=0, subtype="PCM_16"):
    """A short noise-plus-tone file; real audio bytes so soundfile reads it like any recording."""
    rng = np.random.RandomState(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.randn(n)
    if channels > 1:
        x = np.stack([x] * channels, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), rate, subtype=subtype)
    return path


@pytest.fixture(scope="session")
def bundled_store(tmp_path_factory):
    """The bundled corpus extracted once with the built-in model, for tests that only read it."""
    from w2vcache.corpus import build_corpus
    from w2vcache.extract import ExtractConfig, extract

    path = tmp_path_factory.mktemp("bundled") / "features.zarr"
    extract(build_corpus(), ExtractConfig(store=str(path)), progress=False)
    return path


def few_utterances() -> dict:
    """A few bundled utterances by split: 6 to train on, 3 to validate, 3 to test."""
    from w2vcache.corpus import build_corpus

    corpus = build_corpus()
    return {"train": corpus.splits["train"][:6], "dev": corpus.splits["dev"][:3],
            "test-clean": corpus.splits["test-clean"][:3]}


def few_utterance_splits(folder) -> list[str]:
    """Manifests of `few_utterances` written in `folder`, as --split options: enough for a
    fine-tune to run in seconds."""
    picks = few_utterances()
    for name, utts in picks.items():
        (folder / f"{name}.tsv").write_text("".join(f"{u.path}\t{u.text}\t{u.id}\n" for u in utts))
    return [f"--split={name}={folder / name}.tsv" for name in picks]


def run_killed_after_first_checkpoint(args: list[str], sig: int = signal.SIGKILL) -> None:
    """Run `w2vcache ARGS` in a child process that sends itself `sig` (SIGKILL by default) right after
    it has saved its first epoch's checkpoint.pt (best.pt is saved just before it): a kill at a
    fixed point, however fast or loaded the machine."""
    script = textwrap.dedent(f"""
        import os, signal
        import w2vcache.train
        from w2vcache.cli import main
        save = w2vcache.train._save
        def dying_save(obj, path):
            save(obj, path)
            if path.name == "checkpoint.pt":
                os.kill(os.getpid(), {int(sig)})
        w2vcache.train._save = dying_save
        main({[str(a) for a in args]!r}, standalone_mode=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    # SIGTERM is turned into an exit with status 128 + 15 (train.sweep); SIGKILL cannot be caught.
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), err


def make_librispeech_split(root, chapters, seconds=0.5):
    """chapters: {(speaker, chapter): [transcript, ...]} -> a LibriSpeech-layout split at root."""
    root = Path(root)
    for (spk, ch), texts in chapters.items():
        folder = root / str(spk) / str(ch)
        lines = []
        for i, text in enumerate(texts):
            uid = f"{spk}-{ch}-{i:04d}"
            write_wave(folder / f"{uid}.flac", seconds=seconds, seed=i)
            lines.append(f"{uid} {text}")
        (folder / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def shared_fixtures():
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"shared real-speech fixtures not present at {SHARED_FIXTURES}")
    return SHARED_FIXTURES
