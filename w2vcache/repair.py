"""Repair a store: write again exactly the blocks whose chunks fail verification, then verify again.

A block is the store's unit of writing, so a damaged chunk is mended by writing its whole block
again, the way it was first written: from the audio with the model and settings the store records
(its provenance and its last extraction run's record), or, for a copy (`subset_of` in its
provenance), from the store it was copied from. Everything that could stop the rewrite (the model,
the audio files, the source store) is checked before anything is written. Then the blocks' done
markers are cleared, so a repair killed midway (`kill -9` included) leaves them pending, never
half-rewritten and marked done: the store's verification record still names them, and running
`w2vcache verify --repair` again (or, for an extracted store, the same extract) finishes them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .audio import AudioError, audio_info, check_complete, check_format
from .checkpoints import load_backbone
from .errors import W2VCacheError
from .extract import ExtractConfig, _device, fill_blocks
from .share import _copy_blocks, converted_from
from .store import FeatureStore, VerifyReport, local_root, open_store, record_verification, verify
from .store.layout import SUBSET_KEY, Block
from .store.records import latest, run_records, write_run_record

# Model description keys that say nothing about the features: the library version that wrote the
# config. Everything else the store records about its model must match the model loaded here.
UNCOMPARED_CONFIG_KEYS = ("transformers_version",)


@dataclass
class RepairConfig:
    device: str | None = None  # where the model runs; None: where the store was extracted if that is here, else cpu
    source: str | None = None  # a copy's source store as it is reached now; None: where the copy's provenance says
    threads: int | None = None  # torch's CPU threads; None: as the store's extraction asked (threads.py)
    progress: bool = True


@dataclass
class RepairResult:
    store: str
    rewritten: dict[str, list[int]]  # {split: [block, ...]} written again by this run
    source: str  # what the blocks were rewritten from: the audio with a model, or a source store
    before: VerifyReport
    after: VerifyReport
    seconds: float

    @property
    def ok(self) -> bool:
        return self.after.ok


def repair(path: str | os.PathLike, config: RepairConfig = RepairConfig(),
           report: VerifyReport | None = None) -> RepairResult:
    """Rewrite the damaged blocks of the local store at `path` and verify it again.

    `report`: a verification of the store just made (`verify(path)`), so that it is not read twice.
    Blocks whose chunks fail, and blocks a verification found damaged that are still pending (a
    repair killed midway), are rewritten; a problem outside any block (a corrupt index array) is
    left and stays in the result's `after` report.
    """
    started = time.perf_counter()
    label = os.fspath(path)
    if Path(label).is_file():
        raise W2VCacheError(f"{label} is a pack: repair the store it was packed from, then pack it again")
    before = report if report is not None else verify(path)
    targets = before.damaged_blocks
    if not targets:
        return RepairResult(label, {}, "", before, before, time.perf_counter() - started)
    with FeatureStore.open_writer(path) as store:
        try:
            # Written (again) before any marker is cleared: the record is what tells a later run
            # which pending blocks a killed repair left to rewrite.
            record_verification(store, before, store.verification)
        except OSError as e:
            raise W2VCacheError(f"cannot repair {label}: cannot write to it ({e})") from None
        _reopen_unreadable_markers(store, targets)
        blocks = [store._block(split, b) for split, indices in targets.items() for b in indices]
        rewriter = _from_source if SUBSET_KEY in store.provenance else _from_audio
        with rewriter(store, blocks, config) as (source, rewrite):
            for split, indices in targets.items():
                store.reopen_blocks(split, indices)
            rewrite([b for split in targets for b in store.pending_blocks(split) if b.index in targets[split]])
        _write_run_record(store, {"rewritten": targets, "source": source,
                                  "seconds": time.perf_counter() - started})
    after = verify(path)
    return RepairResult(label, targets, source, before, after, time.perf_counter() - started)


def _reopen_unreadable_markers(store: FeatureStore, targets: dict[str, list[int]]) -> None:
    """A done marker whose own chunk fails says nothing about its block and keeps the split's
    index from being read at all; marking such blocks pending first loses nothing (readers
    refused them already) and lets the checks below read the blocks' audio paths."""
    for split, indices in targets.items():
        done = store._array(split, "done")
        unreadable = []
        for b in indices:
            try:
                done[b]
            except Exception:  # zarr's checksum error (or an unreadable file)
                unreadable.append(b)
        store.reopen_blocks(split, unreadable)


# ----------------------------------------------------------------------------------------------
# From the audio, with the store's own model and settings


@contextmanager
def _from_audio(store: FeatureStore, blocks: list[Block], config: RepairConfig) -> Iterator[tuple[str, Callable]]:
    provenance = store.provenance
    model = provenance.get("model") if isinstance(provenance.get("model"), dict) else {}  # all it records
    name = model.get("name")
    if not name:
        raise W2VCacheError(f"cannot repair {store.path}: its provenance names no model to extract with")
    run = _last_extraction(store)
    default = ExtractConfig()
    extract_config = ExtractConfig(
        model=name, store=store.path, dtype=store.dtype,
        compute_dtype=provenance.get("compute_dtype", default.compute_dtype),
        # the same batches as the extraction (batches never cross a block): the same numbers
        batch_seconds=float(run.get("batch_seconds") or default.batch_seconds),
        device=config.device or _recorded_device(run), revision=model.get("revision"),
        threads=config.threads if config.threads is not None else run.get("threads"))
    try:
        device = _device(extract_config)
    except W2VCacheError as e:
        raise W2VCacheError(f"cannot repair {store.path} (extracted with compute dtype "
                            f"{extract_config.compute_dtype}): {e}") from None
    backbone = _load_model(store, model, device)
    _check_audio(store, blocks, backbone, config.progress)

    def rewrite(pending: list[Block]) -> None:
        fill_blocks(store, pending, backbone, list(store.layers), extract_config, config.progress)

    yield f"the audio ({name})", rewrite


def _last_extraction(store: FeatureStore) -> dict:
    """The config (and device) of the store's last extraction run, from its _runs records; {} if none."""
    last = latest(run_records(store, "extract"), lambda r: isinstance(r.get("config"), dict))
    if last is None:
        return {}
    return {**last["config"], "device": last.get("device") or last["config"].get("device")}


def _recorded_device(run: dict) -> str:
    """Where the store was extracted, if that kind of device is here ("cuda:3" -> "cuda"); else cpu."""
    device = str(run.get("device") or "cpu")
    return "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def _load_model(store: FeatureStore, model: dict, device: str):
    name = model["name"]
    try:
        backbone = load_backbone(name, device=device, revision=model.get("revision"),
                                 normalize=model.get("normalize"))
    except (W2VCacheError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise W2VCacheError(f"cannot repair {store.path}: its model {name} cannot be loaded ({reason}); "
                            f"nothing was written") from None
    loaded = json.loads(json.dumps(backbone.describe(), default=str))
    differs = [key for key in sorted(set(model) | set(loaded), key=str)
               if _comparable(key, model.get(key)) != _comparable(key, loaded.get(key))]
    if differs:
        shown = "; ".join(f"{key}: store has {_short(model.get(key))}, loaded {_short(loaded.get(key))}"
                          for key in differs[:3])
        raise W2VCacheError(f"cannot repair {store.path}: the model {name} loaded here is not the one its "
                            f"features were extracted with ({shown}); nothing was written")
    return backbone


def _comparable(key: str, value: Any) -> Any:
    if key == "config" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in UNCOMPARED_CONFIG_KEYS}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _check_audio(store: FeatureStore, blocks: list[Block], backbone, progress: bool) -> None:
    """Every file of the blocks to rewrite is there, usable, and as long as when it was extracted."""
    bad = []
    bar = tqdm(total=sum(len(b.ids) for b in blocks), desc="checking audio", unit="file",
               disable=not progress, leave=False)
    for block in blocks:
        for path, frames in zip(block.paths, block.lengths):
            bar.update()
            try:
                info = audio_info(path)
                check_format(path, info, backbone.receptive_field)
                check_complete(path, info)
            except AudioError as e:
                bad.append(str(e))
                continue
            if backbone.num_frames(info.num_samples) != frames:
                bad.append(f"{path}: {backbone.num_frames(info.num_samples)} frames now, {frames} when "
                           f"extracted (the file changed)")
    bar.close()
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise W2VCacheError(f"cannot repair {store.path}: {len(bad)} audio file(s) of the damaged blocks "
                            f"cannot be used: {bad[0]}{more}; put them back where the store says they "
                            f"are, then repair again; nothing was written")


# ----------------------------------------------------------------------------------------------
# From a copy's source store


@contextmanager
def _from_source(store: FeatureStore, blocks: list[Block], config: RepairConfig) -> Iterator[tuple[str, Callable]]:
    subset = store.provenance[SUBSET_KEY]
    where = config.source or (subset.get("source") if isinstance(subset, dict) else None)
    if not where:
        raise W2VCacheError(f"cannot repair {store.path}: it is a copy whose provenance names no source; "
                            f"give the source store with --source")
    try:
        source = open_store(where)
    except W2VCacheError as e:
        raise W2VCacheError(f"cannot repair {store.path}: it is a copy of {where}, which cannot be opened "
                            f"({e}); give the source's present location with --source; nothing was "
                            f"written") from None
    try:
        _check_source(store, source, blocks)

        def rewrite(pending: list[Block]) -> None:
            by_split: dict[str, list[Block]] = {}
            for block in pending:
                by_split.setdefault(block.split, []).append(block)
            _copy_blocks(source, store, by_split, config.progress)

        yield source.path, rewrite
    finally:
        source.close()


def _check_source(store: FeatureStore, source: FeatureStore, blocks: list[Block]) -> None:
    """The source holds the features this copy was made of, laid out the same, its blocks done."""
    def refuse(why: str) -> None:
        raise W2VCacheError(f"cannot repair {store.path} from {source.path}: {why}; nothing was written")

    own = {k: v for k, v in store.provenance.items() if k != SUBSET_KEY}
    theirs = {k: v for k, v in source.provenance.items() if k != SUBSET_KEY}
    if own != theirs:
        keys = sorted(k for k in set(own) | set(theirs) if own.get(k) != theirs.get(k))
        refuse(f"it holds other features than the copy was made from (provenance {', '.join(keys)} differs)")
    # The provenance names the features' dtype before any conversion: an int8 copy of a float16
    # store says float16 too, so the stores' own dtypes are compared as well. A converted copy is
    # written again by converting its float source, as `copy` did; anything else takes its own dtype.
    made_from = converted_from(store)
    if source.dtype != made_from:
        refuse(f"its dtype is {source.dtype}; {store.dtype} features made from {made_from} ones are to be rewritten")
    for layer, dim in store.layers.items():
        if source.layers.get(layer) != dim:
            refuse(f"it has no layer {layer} of dim {dim}")
    for split in sorted({b.split for b in blocks}):
        if split not in source.splits:
            refuse(f"it has no split {split}")
        mine, theirs_index = store._split_index(split), source._split_index(split, refresh=True)
        if (mine.ids != theirs_index.ids or mine.lengths.tolist() != theirs_index.lengths.tolist()
                or mine.offsets.tolist() != theirs_index.offsets.tolist()):
            refuse(f"its split {split} holds other utterances or another layout")
        not_done = [b.index for b in blocks if b.split == split and not theirs_index.done[b.index]]
        if not_done:
            refuse(f"its {split} blocks {not_done} are not extracted")


# ----------------------------------------------------------------------------------------------


def _write_run_record(store: FeatureStore, what: dict) -> None:
    """This run's record in <store>/_runs/repair-..., beside the extraction and copy runs."""
    write_run_record(local_root(store.path), "repair", {"repair": what})
