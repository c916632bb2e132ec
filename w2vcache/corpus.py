"""Corpora as lists of utterances: LibriSpeech and Libri-light trees as downloaded, manifests,
and the bundled mini corpus.

One reader per layout, each returning `Utterance` records in a deterministic order (sorted by id),
and `build_corpus`, which assembles named splits from them the way the command line asks:

- nothing named: the mini corpus in `data/` (train, dev, test-clean, test-other);
- `--librispeech DIR --librilight DIR`: the standard recipe (train = Libri-light 10 h,
  dev = dev-clean + dev-other, test-clean, test-other), as far as the folders given reach: a tree
  with only some splits gives the splits it has, and `Corpus.notes` says what is missing;
- `--split NAME=SOURCE[,SOURCE...]`: exactly the splits named, a source being a directory,
  a manifest file, a LibriSpeech split name (`dev-clean`) or a Libri-light set (`librilight-1h`).
"""

import csv
import json
import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .audio import check_corpus
from .errors import W2VCacheError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the bundled mini corpus
AUDIO_SUFFIXES = (".flac", ".wav")
TRANSCRIPT_SUFFIX = ".trans.txt"

MINI_SPLITS = {
    "train": ["train-clean", "train-other"],
    "dev": ["dev-clean", "dev-other"],
    "test-clean": ["test-clean"],
    "test-other": ["test-other"],
}
STANDARD_SPLITS = {
    "train": ["librilight-10h"],
    "dev": ["dev-clean", "dev-other"],
    "test-clean": ["test-clean"],
    "test-other": ["test-other"],
}
# Libri-light's labelled set: 1h/ holds six 10-minute folds (0-5), 9h/ the other nine hours;
# each has clean/ and other/ halves. The standard 10-minute set is fold 0.
LIBRILIGHT_SETS = {
    "10min": ["1h/0"],
    "1h": [f"1h/{i}" for i in range(6)],
    "10h": [f"1h/{i}" for i in range(6)] + ["9h"],
}
_SHOWN = 5  # offending items listed in an error before "and N more"
_SPLIT_DIR = re.compile(r"(dev|test|train)-(clean|other)(-\d+)?")  # LibriSpeech split folder names
_LIKE_SPLIT_DIR = re.compile(r"(dev|test|train)\W?_?(clean|other)\W?_?\d*", re.IGNORECASE)  # renamed ones


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str  # absolute path of the audio file
    text: str  # transcript as the corpus spells it; see text.normalize
    split: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Corpus:
    splits: dict[str, list[Utterance]]
    sources: dict[str, list[str]]  # split -> the sources it was read from, for provenance
    notes: list[str] = field(default_factory=list)  # what a person should know about how it was assembled
    # split -> utterances left out while reading (skip_bad): {"id", "path", "reason"}
    skipped: dict[str, list[dict]] = field(default_factory=dict)

    def __iter__(self):
        for utterances in self.splits.values():
            yield from utterances

    def __len__(self) -> int:
        return sum(len(u) for u in self.splits.values())


def _listing(items) -> str:
    items = sorted(map(str, items))
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def read_transcript_tree(directory, split: str, skipped: list | None = None) -> list[Utterance]:
    """Every utterance under a LibriSpeech-style tree (`*.trans.txt` beside the audio files).

    Serves LibriSpeech splits and Libri-light folds alike: both keep `SPK-CH.trans.txt` lines
    `SPK-CH-NNNN TRANSCRIPT` next to `SPK-CH-NNNN.flac`. An audio file without a transcript line,
    or a line without its audio file, is an error; given a `skipped` list, it is left out and
    appended there as {"id", "path", "reason"} instead (--skip-bad).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise W2VCacheError(f"{directory}: no such directory")
    texts, where = {}, {}
    for transcript in sorted(directory.rglob("*" + TRANSCRIPT_SUFFIX)):
        for n, line in enumerate(transcript.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            if uid in texts:
                raise W2VCacheError(f"{transcript}:{n}: utterance {uid} is listed twice (also in {where[uid]})")
            texts[uid], where[uid] = text.strip(), transcript
    audio = {}
    for suffix in AUDIO_SUFFIXES:
        for path in directory.rglob("*" + suffix):
            audio[path.name[: -len(suffix)]] = path
    if not texts and not audio:
        raise W2VCacheError(
            f"{directory}: no utterances found (expected LibriSpeech layout: "
            f"SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac with SPEAKER-CHAPTER{TRANSCRIPT_SUFFIX})"
        )
    no_text = sorted(audio.keys() - texts.keys())
    no_audio = sorted(texts.keys() - audio.keys())
    if skipped is None and no_text:
        raise W2VCacheError(f"{directory}: {len(no_text)} audio file(s) have no transcript line: "
                            f"{_listing(audio[u] for u in no_text)}; pass --skip-bad to leave them out")
    if skipped is None and no_audio:
        raise W2VCacheError(f"{directory}: {len(no_audio)} transcript line(s) have no audio file: "
                            f"{_listing(f'{u} ({where[u]})' for u in no_audio)}; pass --skip-bad to leave them out")
    for u in no_text:
        skipped.append({"id": u, "path": str(audio[u].resolve()), "reason": "no transcript line"})
    for u in no_audio:
        skipped.append({"id": u, "path": str(where[u]), "reason": "transcript line without an audio file"})
    return [Utterance(u, str(audio[u].resolve()), texts[u], split) for u in sorted(texts) if u in audio]


def find_librispeech_split(root, name: str) -> Path:
    """`root/name`, also accepting the folder above `LibriSpeech/` as downloaded."""
    root = Path(root)
    for candidate in (root / name, root / "LibriSpeech" / name):
        if candidate.is_dir():
            return candidate
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    raise W2VCacheError(
        f"LibriSpeech split {name!r} not found in {root}" + (f" (it has: {', '.join(found)})" if found else "")
    )


def read_librilight(root, subset: str, split: str, skipped: list | None = None) -> list[Utterance]:
    """Libri-light's labelled fine-tuning set: `10min`, `1h` or `10h` (= 1h + 9h)."""
    if subset not in LIBRILIGHT_SETS:
        raise W2VCacheError(f"unknown Libri-light set {subset!r}; choose one of {', '.join(LIBRILIGHT_SETS)}")
    root = Path(root)
    if (root / "librispeech_finetuning").is_dir():
        root = root / "librispeech_finetuning"
    utterances = []
    for part in LIBRILIGHT_SETS[subset]:
        for half in ("clean", "other"):
            folder = root / part / half
            if not folder.is_dir():
                raise W2VCacheError(
                    f"{folder}: missing; expected Libri-light's librispeech_finetuning layout "
                    "(1h/0..5/{clean,other}, 9h/{clean,other})"
                )
            utterances += read_transcript_tree(folder, split, skipped)
    return sorted(utterances, key=lambda u: u.id)


def _manifest_text(path: Path) -> str:
    """A manifest's text, UTF-8 (a byte-order mark allowed); anything else refused with what it
    looks like instead."""
    # An audio file is known by its name before it is read (it may be large), else by its first bytes.
    data = b"fLaC" if path.suffix.lower() in AUDIO_SUFFIXES else path.read_bytes()
    if data[:4] in (b"fLaC", b"RIFF", b"OggS"):
        raise W2VCacheError(f"{path} is audio, not a manifest: --split NAME=SOURCE takes a manifest "
                            "(path<TAB>text per line) or a LibriSpeech-style folder")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise W2VCacheError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            + ("it is UTF-16 (a spreadsheet's 'Unicode text'); " if utf16 else "") + "save it as UTF-8") from None


def read_manifest(path, split: str, skipped: list | None = None) -> list[Utterance]:
    """A TSV (`path<TAB>text[<TAB>id]`, optional header) or JSONL (`{"audio"|"path", "text", "id"?}`)
    manifest; relative audio paths are resolved against the manifest's folder. A line naming
    audio that does not exist is an error, or with a `skipped` list, left out and listed there."""
    path = Path(path)
    rows = []
    content = _manifest_text(path)
    if path.suffix == ".jsonl":
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                audio = record.get("audio", record.get("path"))
                text = record.get("text", record.get("transcript"))
            except (json.JSONDecodeError, AttributeError):
                raise W2VCacheError(f"{path}:{n}: not a JSON object") from None
            if audio is None or text is None:
                raise W2VCacheError(f'{path}:{n}: needs "audio" (or "path") and "text" (or "transcript")')
            for field_name, value in (("audio", audio), ("text", text)):
                if not isinstance(value, str):  # 5 or [..]: a mistake in the file, not a transcript
                    raise W2VCacheError(f"{path}:{n}: {field_name} is {json.dumps(value)}, not a string")
            rows.append((n, audio, text, record.get("id")))
    else:
        lines = list(csv.reader(io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
        header = [c.strip().lower() for c in lines[0]] if lines else []
        columns = {"path": 0, "text": 1, "id": 2}
        if {"path", "audio"} & set(header) and {"text", "transcript"} & set(header):
            pick = lambda *names: next((header.index(n) for n in names if n in header), None)  # noqa: E731
            columns = {"path": pick("path", "audio"), "text": pick("text", "transcript"), "id": pick("id")}
            lines = [None] + lines[1:]  # keep line numbers right
        for n, cells in enumerate(lines, 1):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) <= max(columns["path"], columns["text"]):
                raise W2VCacheError(f"{path}:{n}: expected 'audio path<TAB>transcript[<TAB>id]' "
                                    f"(or the header's columns), got {cells!r}")
            uid = cells[columns["id"]] if columns["id"] is not None and columns["id"] < len(cells) else None
            rows.append((n, cells[columns["path"]], cells[columns["text"]], uid))
    utterances, missing = [], []
    for n, audio, text, uid in rows:
        audio_path = (path.parent / audio).resolve()
        # The id from the name as the manifest writes it: a link farm's names, not its targets'.
        uid = str(uid) if uid else Path(audio).name.split(".")[0]
        if not audio_path.is_file():
            missing.append(f"{audio} (line {n})")
            if skipped is not None:
                skipped.append({"id": uid, "path": str(audio_path), "reason": f"file not found ({path}:{n})"})
            continue
        utterances.append(Utterance(uid, str(audio_path), text.strip(), split))
    if missing and skipped is None:
        raise W2VCacheError(f"{path}: {len(missing)} line(s) name audio that does not exist: {_listing(missing)}; "
                            "pass --skip-bad to leave them out")
    if not utterances and not missing:
        raise W2VCacheError(f"{path}: the manifest lists no utterances")
    seen, dups = set(), set()
    for u in utterances:
        (dups if u.id in seen else seen).add(u.id)
    if dups:
        raise W2VCacheError(f"{path}: duplicate utterance id(s): {_listing(dups)}")
    return sorted(utterances, key=lambda u: u.id)


def read_source(source: str, split: str, librispeech=None, librilight=None,
                skipped: list | None = None) -> list[Utterance]:
    """One source of a split: a path (directory or manifest), a LibriSpeech split name, or
    `librilight-10h|1h|10min`. Split names resolve under `librispeech`, else the bundled corpus.
    `skipped`: see read_transcript_tree."""
    if source.startswith("librilight-"):
        if librilight is None:
            raise W2VCacheError(f"source {source!r} needs --librilight DIR (the librispeech_finetuning folder)")
        return read_librilight(librilight, source.removeprefix("librilight-"), split, skipped)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "1h").is_dir() and (path / "9h").is_dir():
            return read_librilight(path, "10h", split, skipped)
        nested = path / "LibriSpeech"
        folder = path if not nested.is_dir() else nested
        inside = sorted(p.name for p in folder.iterdir() if p.is_dir() and _SPLIT_DIR.fullmatch(p.name))
        if inside or nested.is_dir():
            # Read recursively, a LibriSpeech root would merge every split into one (test into train).
            if not inside:
                raise W2VCacheError(f"source {source!r} holds LibriSpeech/ with no split folder in it "
                                    "(dev-clean, test-clean, train-clean-100, ...)")
            what = "is a LibriSpeech root (" if folder is path else "holds a LibriSpeech root (LibriSpeech/: "
            raise W2VCacheError(f"source {source!r} {what}{', '.join(inside)}): name a split of it, "
                                f"--librispeech {source} --split {split}={inside[0]}")
        return read_transcript_tree(path, split, skipped)
    if path.is_file():
        return read_manifest(path, split, skipped)
    if "/" in source or source.endswith((".tsv", ".jsonl")):
        raise W2VCacheError(f"source {source!r}: no such file or directory")
    root = librispeech if librispeech is not None else mini_corpus_dir()
    return read_transcript_tree(find_librispeech_split(root, source), split, skipped)


def mini_corpus_dir() -> Path:
    if not DATA_DIR.is_dir():
        raise W2VCacheError(
            f"the bundled mini corpus is not at {DATA_DIR}; install w2vcache from a clone "
            "(`pip install -e .`) or name a corpus (--librispeech, --split)"
        )
    return DATA_DIR


def parse_split_spec(spec: str) -> tuple[str, list[str]]:
    name, sep, sources = spec.partition("=")
    sources = [s.strip() for s in sources.split(",") if s.strip()]
    if not sep or not name.strip() or not sources:
        raise W2VCacheError(f"--split {spec!r}: expected NAME=SOURCE[,SOURCE...], e.g. dev=dev-clean,dev-other")
    return name.strip(), sources


def librispeech_folders(root) -> dict[str, str]:
    """LibriSpeech split folders under `root` (or `root/LibriSpeech`): folder name -> the recipe's
    name for it, so that Mini LibriSpeech's `dev-clean-2` stands in for `dev-clean`."""
    found = {}
    for folder in _folders(root):
        match = _SPLIT_DIR.fullmatch(folder.name)
        if match:
            found.setdefault(folder.name, f"{match[1]}-{match[2]}")
    return found


def _folders(root) -> list[Path]:
    """The folders under `root` and `root/LibriSpeech`, where a LibriSpeech download's splits lie."""
    root = Path(root)
    return [folder for parent in (root, root / "LibriSpeech") if parent.is_dir()
            for folder in sorted(parent.iterdir()) if folder.is_dir()]


def recipe_plan(librispeech=None, librilight=None) -> tuple[dict[str, list[str]], str]:
    """The standard recipe's splits from the folders that are there, and one line saying how they
    map and which of the recipe's are missing. Without Libri-light, LibriSpeech's own train
    folders (train-clean-100, Mini LibriSpeech's train-clean-5, ...) make the train split."""
    folders = librispeech_folders(librispeech) if librispeech is not None else {}
    plan, missing = {}, []
    if librilight is not None:
        plan["train"] = STANDARD_SPLITS["train"]
    else:
        train = [f for f, kind in folders.items() if kind.startswith("train-")]
        if train:
            plan["train"] = train
        missing.append("Libri-light's 10 h train set (--librilight DIR)")
    for name in ("dev", "test-clean", "test-other"):
        sources = []
        for kind in STANDARD_SPLITS[name]:
            found = [f for f, k in folders.items() if k == kind]
            sources += found
            if not found and librispeech is not None:
                missing.append(kind)
        if sources:
            plan[name] = sources
    if librispeech is None:
        missing.append("LibriSpeech's dev and test splits (--librispeech DIR)")
    if not plan:
        raise W2VCacheError(
            f"{librispeech}: none of the recipe's LibriSpeech splits is there (it has: "
            f"{', '.join(sorted(p.name for p in Path(librispeech).iterdir() if p.is_dir())) or 'no folders'}); "
            "name the splits with --split NAME=SOURCE"
        )
    mapping = "; ".join(f"{name} = {' + '.join(sources)}" for name, sources in plan.items())
    renamed = _renamed_split_folders(librispeech) if librispeech is not None else []
    return plan, (f"splits: {mapping}" + (f" (not there: {', '.join(missing)})" if missing else "")
                  + (f"; not read: {', '.join(renamed)} (LibriSpeech's split folders are named like "
                     "test-clean)" if renamed else ""))


def _renamed_split_folders(root) -> list[str]:
    """Folders under `root` (or `root/LibriSpeech`) named nearly as a split is (test_clean,
    Dev-Clean), which the recipe does not take: said, so that a typo does not drop a split unseen."""
    return [folder.name for folder in _folders(root)
            if _LIKE_SPLIT_DIR.fullmatch(folder.name) and not _SPLIT_DIR.fullmatch(folder.name)]


def build_corpus(librispeech=None, librilight=None, splits: list[str] = (), skip_bad: bool = False) -> Corpus:
    """The corpus the command line describes (see the module docstring). `skip_bad`: audio without
    a transcript line (and lines without audio) are left out, listed in `Corpus.skipped`."""
    plan: dict[str, list[str]] = {}
    for spec in splits:
        name, sources = parse_split_spec(spec)
        if name in plan:
            raise W2VCacheError(f"split {name!r} is named twice (--split {name}=...)")
        plan[name] = sources
    notes = []
    if not plan:
        if librispeech is None and librilight is None:
            plan = MINI_SPLITS
        else:
            plan, note = recipe_plan(librispeech, librilight)
            notes.append(note)
    corpus = Corpus({}, {}, notes)
    origin: dict[str, str] = {}
    for name, sources in plan.items():
        utterances, skipped = [], [] if skip_bad else None
        for source in sources:
            for u in read_source(source, name, librispeech, librilight, skipped):
                if u.id in origin:
                    raise W2VCacheError(
                        f"utterance {u.id} appears twice: in {origin[u.id]} and in split {name} source {source}"
                    )
                origin[u.id] = f"split {name} source {source}"
                utterances.append(u)
        corpus.splits[name] = utterances
        corpus.sources[name] = list(sources)
        if skipped:
            corpus.skipped[name] = skipped
    return corpus


# The audio one frame of W2V-Base needs (its CNN's receptive field); other checkpoints may need
# more, which extract and finetune check against the model they load.
W2V_MIN_SAMPLES = 400


def summarize(corpus: Corpus, progress: bool = False, min_samples: int = W2V_MIN_SAMPLES) -> list[dict]:
    """Per split: sources, usable utterances, speakers (LibriSpeech ids SPK-CH-NNNN) and hours of
    audio, and the files extract and finetune would refuse (audio.check_corpus), with why."""
    usable, bad = check_corpus(corpus.splits, min_samples, progress)
    rows = []
    for name, checked in usable.items():
        rows.append(
            dict(
                split=name,
                sources=corpus.sources[name],
                utterances=len(checked),
                speakers=len({u.id.split("-")[0] for u, _ in checked}),
                hours=sum(info.seconds for _, info in checked) / 3600,
                unusable=[{"id": uid, "path": path, "reason": reason} for split, uid, path, reason in bad if split == name],
            )
        )
    return rows

