"""Load 16 kHz mono audio with soundfile, refusing anything W2V would silently mis-read.

W2V was trained on 16 kHz mono speech: a file at another rate or with several channels gives
features that look fine and mean nothing, so they are refused with the fix in the message
rather than resampled or mixed behind the user's back.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import W2VCacheError

SAMPLE_RATE = 16000  # Hz, what every Wav2Vec 2.0 checkpoint was trained on
INEXACT_LENGTH_FORMATS = ("MP3", "OGG")  # soundfile format names whose headers estimate the length


class AudioError(W2VCacheError):
    """An audio file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # pickled whole: a DataLoader worker hands it back to the main process
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class AudioInfo:
    num_samples: int
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


def _open_error(path, err: Exception) -> AudioError:
    if not Path(path).exists():
        return AudioError(path, "file not found")
    if Path(path).suffix.lower() in (".raw", ".pcm"):
        return AudioError(
            path,
            "headerless raw audio cannot be read; give it a header, e.g. "
            f"`sox -t raw -r 16000 -e signed -b 16 -c 1 {path} out.wav`",
        )
    return AudioError(path, f"not a readable audio file ({err})")


def audio_info(path) -> AudioInfo:
    """Length, rate and channels from the header, without decoding the samples."""
    try:
        info = sf.info(str(path))
        frames = info.frames
        # MP3 and Ogg headers only estimate the length; the exact count (which fixes the number
        # of W2V frames) needs a full decode. Such files are rare in speech corpora.
        if info.format in INEXACT_LENGTH_FORMATS:
            frames = len(sf.read(str(path), dtype="float32", always_2d=True)[0])
    except Exception as err:  # soundfile raises several types for bad headers
        raise _open_error(path, err) from None
    return AudioInfo(int(frames), int(info.samplerate), int(info.channels))


def check_format(path, info: AudioInfo, min_samples: int = 1) -> None:
    """Raise AudioError unless the file is 16 kHz mono and has `min_samples` (callers that feed a
    model pass its receptive field, `Backbone.receptive_field`: the audio one frame needs)."""
    # One message and one sox command for everything wrong with the format, so a single
    # conversion fixes the file.
    wrong, fix = [], []
    if info.sample_rate != SAMPLE_RATE:
        wrong.append(f"sample rate is {info.sample_rate} Hz")
        fix.append(f"-r {SAMPLE_RATE}")
    if info.channels != 1:
        wrong.append(f"has {info.channels} channels")
    if wrong:
        fix.append("out.flac" + (" remix 1" if info.channels != 1 else ""))
        raise AudioError(
            path,
            f"{' and '.join(wrong)}, W2V needs {SAMPLE_RATE} Hz mono; "
            f"convert it first, e.g. `sox {path} {' '.join(fix)}`",
        )
    if info.num_samples < min_samples:
        raise AudioError(
            path,
            f"only {info.num_samples} samples ({1000 * info.num_samples / SAMPLE_RATE:.1f} ms); "
            f"W2V needs at least {min_samples} ({1000 * min_samples / SAMPLE_RATE:.0f} ms) "
            "to produce one frame",
        )


TAIL_SAMPLES = 1024  # samples read at the end of a file to prove it is all there


def check_complete(path, info: AudioInfo) -> None:
    """Raise AudioError if the file ends before its header says it does.

    Reads only the last samples (a seek, which FLAC does through its seek table), so a corpus of
    thousands of files is checked in seconds; an interrupted download is the usual culprit.
    """
    want = min(TAIL_SAMPLES, info.num_samples)
    try:
        with sf.SoundFile(str(path)) as f:
            f.seek(info.num_samples - want)
            got = len(f.read(want, dtype="float32"))
    except Exception as err:
        raise AudioError(path, f"truncated or corrupt: cannot read its last samples ({err})") from None
    if got < want:
        raise AudioError(path, f"truncated: the header promises {info.num_samples} samples, the data ends sooner")


def load_audio(path, min_samples: int = 1) -> np.ndarray:
    """The samples of a 16 kHz mono file as float32 in [-1, 1] (1-D), at least `min_samples` of them."""
    info = audio_info(path)
    check_format(path, info, min_samples)
    try:
        samples, _ = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as err:
        raise AudioError(path, f"cannot decode the audio, the file may be truncated or corrupt ({err})") from None
    # libsndfile returns what it could decode of a truncated file without complaint; the
    # header's length tells us the file is incomplete.
    if len(samples) < info.num_samples:
        raise AudioError(
            path,
            f"truncated: the header promises {info.num_samples} samples but only "
            f"{len(samples)} could be decoded",
        )
    if not np.all(np.isfinite(samples)):
        raise AudioError(path, "contains NaN or infinite samples")
    return samples


# ---------------------------------------------------------------------------------------------
# A corpus's files, all checked before any compute

SHOWN_BAD = 10  # bad files listed in the error itself; the rest go to a file


class BadAudioError(W2VCacheError):
    """Every unusable file of a corpus, found in one pass; `bad` holds (split, id, path, reason).
    `skip`: what --skip-bad does in the command that raised it."""

    def __init__(self, bad: list[tuple[str, str, str, str]], total: int, listing: str | None = None,
                 skip: str = "record them in the store and go on"):
        self.bad, self.total, self.skip = bad, total, skip
        lines = [f"  {path}: {reason} (utterance {uid}, split {split})" for split, uid, path, reason in bad]
        more = len(bad) - SHOWN_BAD
        tail = [f"  ... and {more} more" + (f"; all {len(bad)} are listed in {listing}" if listing else "")] if more > 0 else []
        super().__init__(
            f"{len(bad)} of {total} audio files cannot be used:\n" + "\n".join(lines[:SHOWN_BAD] + tail)
            + f"\nfix or remove them, or pass --skip-bad to {skip}"
        )

    def write_listing(self, path) -> "BadAudioError":
        """The full list as TSV (split, id, path, reason) at `path`; the error that names it."""
        rows = ["split\tid\tpath\treason"] + ["\t".join(row) for row in self.bad]
        Path(path).write_text("\n".join(rows) + "\n", encoding="utf-8")
        return BadAudioError(self.bad, self.total, str(path), self.skip)


def check_corpus(splits: dict, min_samples: int, progress: bool = True, decode: bool = False):
    """Every file of `splits` (name -> utterances) checked: header, format (16 kHz mono, at least
    `min_samples`: the model's receptive field) and its last samples (a truncated file fails
    there), in one pass. Returns each split's usable (utterance, AudioInfo) pairs and the bad
    files as (split, id, path, reason). A file whose middle is corrupt is only found when decoded:
    `decode` decodes every file whole too (FLAC: thousands of times faster than real time)."""
    from tqdm.auto import tqdm

    usable, bad = {}, []
    total = sum(len(utterances) for utterances in splits.values())
    with tqdm(total=total, desc="decoding audio" if decode else "checking audio", unit="file", disable=not progress,
              leave=False) as bar:
        for split, utterances in splits.items():
            usable[split] = []
            for u in utterances:
                bar.update()
                try:
                    info = audio_info(u.path)
                    check_format(u.path, info, min_samples)
                    check_complete(u.path, info)
                    if decode:
                        load_audio(u.path, min_samples)
                except AudioError as err:
                    bad.append((split, u.id, str(u.path), err.reason))
                    continue
                usable[split].append((u, info))
    return usable, bad

