"""Creating a store: validating the plan, laying out a new store, and resuming an existing one.

A new store is written with its root META_KEY attribute last; `_root_state` tells an empty,
finished, half-created or foreign directory apart, `_differences` what stops a resume, and
`_differences_text` how a refusal lists them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from w2vcache.errors import W2VCacheError

from .layout import (
    CREATING_KEY,
    INDEX_CHUNK,
    INT8,
    META_KEY,
    SCALE_DTYPE,
    SCALE_SUFFIX,
    SplitPlan,
    _layer_codecs,
    format_version,
    plan_blocks,
)
from .locks import LOCK_DIR

# Provenance keys that may differ between the runs that create and resume one store.
VOLATILE_PROVENANCE = ("created", "package_versions", "versions", "host", "command")
SHOWN_DIFFERENCES = 5  # how many differences a refusal lists, after their count
# Provenance that restates what is compared (and named) on its own, the layers and splits, or that
# is no setting (when a copy was made): left out of a refusal's differences.
_RESTATED = ("layers", "subset_of.layers", "subset_of.left_out_layers", "subset_of.splits",
             "subset_of.left_out_splits", "subset_of.copied")
MODEL_IDENTITY = ("model.name", "model.revision", "model.weight_hash")  # provenance keys: which model


def _jsonable(value: Any, what: str) -> Any:
    """value after a JSON round trip (tuples become lists), or W2VCacheError if it has none."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise W2VCacheError(f"{what} must be JSON-serialisable: {e}") from None


def _sorted_plan(split: str, plan: SplitPlan | Sequence) -> SplitPlan:
    """Validate one split's plan and put its utterances in store order (length, then id)."""
    if not isinstance(plan, SplitPlan):
        plan = SplitPlan(utterances=list(plan))
    if not plan.utterances:
        raise W2VCacheError(f"split {split}: no utterances to store")
    rows = []
    for row in plan.utterances:
        try:
            utt_id, text, path, n_frames = row
        except (TypeError, ValueError):
            raise W2VCacheError(f"split {split}: utterance {row!r} is not (id, text, path, n_frames)") from None
        if not isinstance(utt_id, str) or not utt_id:
            raise W2VCacheError(f"split {split}: utterance id {utt_id!r} is not a non-empty string")
        if not isinstance(text, str) or not isinstance(path, (str, os.PathLike)):
            raise W2VCacheError(f"split {split}: utterance {utt_id}: text and path must be strings")
        if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
            raise W2VCacheError(f"split {split}: utterance {utt_id} has {n_frames!r} frames; an "
                                f"utterance needs at least 1 (skip it and list it in skipped)")
        rows.append((utt_id, text, os.fspath(path), int(n_frames)))
    rows.sort(key=lambda r: (r[3], r[0]))
    ids = sorted(r[0] for r in rows)
    for a, b in zip(ids, ids[1:]):
        if a == b:
            raise W2VCacheError(f"split {split}: utterance id {a} appears twice")
    skipped = _jsonable(list(plan.skipped), f"split {split}: skipped")
    return SplitPlan(utterances=rows, source=str(plan.source), skipped=skipped)


def _root_state(root: Path) -> str:
    """'empty', 'initialised', 'half' (our creation was interrupted) or 'foreign'."""
    if not root.exists():
        return "empty"
    if not root.is_dir():
        return "foreign"
    entries = [e for e in root.iterdir() if e.name != LOCK_DIR]
    if not entries:
        return "empty"
    try:
        attrs = json.loads((root / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return "foreign"
    if META_KEY in attrs:
        return "initialised"
    if CREATING_KEY in attrs:
        return "half"
    return "foreign"


def _wipe(root: Path) -> None:
    """Remove a half-created store, its root zarr.json last: a wipe killed midway is still 'half'."""
    for entry in root.iterdir():
        if entry.name in (LOCK_DIR, "zarr.json"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (root / "zarr.json").unlink(missing_ok=True)


def _write_split(group: zarr.Group, split: str, plan: SplitPlan, layers: Mapping[str, int],
                 dtype: str, compression: str, chunk_frames: int, block_chunks: int,
                 frame_rate: float | None) -> None:
    ids, texts, paths, lengths = zip(*plan.utterances)
    lengths = np.array(lengths, dtype=np.int64)
    offsets, blocks = plan_blocks(lengths, chunk_frames, block_chunks)
    n, n_rows = len(ids), int(offsets[-1])
    n_frames = int(lengths.sum())
    g = group.create_group(split, attributes={
        "source": plan.source,
        "n_utterances": n,
        "n_frames": n_frames,
        "n_rows": n_rows,
        "hours": None if not frame_rate else n_frames / frame_rate / 3600,
        "chunk_frames": chunk_frames,
        "block_chunks": block_chunks,
        "n_blocks": len(blocks),
        "complete": False,
        "skipped": plan.skipped,
    })
    text_codecs = [ZstdCodec(level=3), Crc32cCodec()]
    index_codecs = [Crc32cCodec()]
    for name, values in (("ids", ids), ("texts", texts), ("paths", paths)):
        a = g.create_array(name, shape=(n,), dtype=str, chunks=(min(n, INDEX_CHUNK),),
                           compressors=text_codecs)
        a[:] = np.array(values, dtype=object)
    for name, values in (("lengths", lengths), ("offsets", offsets)):
        a = g.create_array(name, shape=values.shape, dtype="int64",
                           chunks=(min(len(values), INDEX_CHUNK),), compressors=index_codecs, filters=None)
        a[:] = values
    a = g.create_array("blocks", shape=blocks.shape, dtype="int64",
                       chunks=(min(len(blocks), INDEX_CHUNK), 2), compressors=index_codecs, filters=None)
    a[:] = blocks
    # One chunk (one file) per block: marking a block done never rewrites another's marker.
    g.create_array("done", shape=(len(blocks),), dtype="uint8", chunks=(1,), fill_value=0,
                   compressors=index_codecs, filters=None)
    for layer, dim in layers.items():
        g.create_array(layer, shape=(n_rows, dim), dtype=dtype, chunks=(chunk_frames, dim),
                       fill_value=0, compressors=_layer_codecs(compression), filters=None,
                       dimension_names=("frame", "feature"))
        if dtype == INT8:
            # Row c: the scales of the layer's chunk c, one file each, so a block's writer writes
            # its chunks' scales and no other's. Scales do not compress: never zstd.
            g.create_array(layer + SCALE_SUFFIX, shape=(n_rows // chunk_frames, dim), dtype=SCALE_DTYPE,
                           chunks=(1, dim), fill_value=0, compressors=index_codecs, filters=None,
                           dimension_names=("chunk", "feature"))


def _differences(meta: dict, read_split: Callable, asked: dict,
                 plans: Mapping[str, SplitPlan]) -> list[str]:
    """What differs between an existing store and what `create` was asked for, causes first: a
    refusal lists only the first few, and another model (its name, weights) is the cause of the
    config keys and layer dims that differ with it."""
    have_prov = {k: v for k, v in meta["provenance"].items() if k not in VOLATILE_PROVENANCE}
    want_prov = {k: v for k, v in asked["provenance"].items() if k not in VOLATILE_PROVENANCE}
    # The store's dtype and compression, where asked for, are compared (and named) below.
    restated = _RESTATED + tuple(key for key in ("dtype", "compression") if asked[key] is not None)
    prov_diffs = sorted((d for d in _dict_diff(have_prov, want_prov)
                         if not any(d[0] == k or d[0].startswith(k + ".") for k in restated)),
                        key=lambda d: d[0].count("."))
    prov_diffs = [(key, f"provenance {key}: store has {have}, asked for {want}") for key, have, want in prov_diffs]
    diffs = [text for key, text in prov_diffs if key in MODEL_IDENTITY]
    for key in ("dtype", "compression", "chunk_frames", "block_chunks"):
        if asked[key] is not None and asked[key] != meta.get(key):
            diffs.append(f"{key}: store has {meta.get(key)}, asked for {asked[key]}")
    have_layers, want_layers = meta["layers"], asked["layers"]
    if set(have_layers) != set(want_layers):
        diffs.append(f"layers: store has {list(have_layers)}, asked for {list(want_layers)}")
    diffs += [text for key, text in prov_diffs if key not in MODEL_IDENTITY]
    if set(have_layers) == set(want_layers):
        diffs += [f"dim of {k}: store has {have_layers[k]}, asked for {v}"
                  for k, v in want_layers.items() if have_layers[k] != v]
    if set(meta["splits"]) != set(plans):
        diffs.append(f"splits: store has {sorted(meta['splits'])}, asked for {sorted(plans)}")
        return diffs
    for split, plan in plans.items():
        have_ids, have_texts, have_lengths = read_split(split)
        want_ids = [u[0] for u in plan.utterances]
        if have_ids != want_ids:
            only_store = sorted(set(have_ids) - set(want_ids))
            only_asked = sorted(set(want_ids) - set(have_ids))
            if only_store or only_asked:
                diffs.append(f"split {split} utterance ids: store has {len(have_ids)}, asked for "
                             f"{len(want_ids)} ({len(only_store)} only in store, e.g. "
                             f"{only_store[:3]}; {len(only_asked)} only asked for, e.g. {only_asked[:3]})")
                continue
        have = dict(zip(have_ids, zip(have_texts, have_lengths)))
        bad_len = [(u[0], have[u[0]][1], u[3]) for u in plan.utterances if have[u[0]][1] != u[3]]
        if bad_len:
            i, h, w = bad_len[0]
            diffs.append(f"split {split}: {len(bad_len)} utterances have other frame counts "
                         f"(e.g. {i}: store has {h}, asked for {w})")
        bad_text = [u[0] for u in plan.utterances if have[u[0]][0] != u[1]]
        if bad_text:
            diffs.append(f"split {split}: {len(bad_text)} transcripts differ (e.g. {bad_text[0]})")
    return diffs


def _differences_text(diffs: Sequence[str]) -> str:
    """The differences as a refusal names them: a single one inline; several counted, then the
    first SHOWN_DIFFERENCES one per line."""
    if len(diffs) == 1:
        return diffs[0]
    first = f", the first {SHOWN_DIFFERENCES}" if len(diffs) > SHOWN_DIFFERENCES else ""
    return "\n".join([f"{len(diffs)} differ{first}:"] + [f"  {d}" for d in diffs[:SHOWN_DIFFERENCES]])


def _dict_diff(have: Any, want: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, stored value, asked value) for each leaf where two JSON values differ."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(have) | set(want), key=str):
            if have.get(key, _ABSENT) != want.get(key, _ABSENT):
                out += _dict_diff(have.get(key, _ABSENT), want.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    have, want = ("(absent)" if v is _ABSENT else repr(v) for v in (have, want))
    return [(prefix.rstrip("."), have, want)]


_ABSENT = object()


def _create_layout(root: Path, plans: Mapping[str, SplitPlan], provenance: dict,
                   layers: dict[str, int], dtype: str, compression: str, chunk_frames: int,
                   block_chunks: int) -> None:
    """Write a new store; the root's META_KEY attribute, written last, marks it complete."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Not overwrite=True: zarr would delete the whole directory, our .locks included.
    group = zarr.create_group(str(root), zarr_format=3, overwrite=False,
                              attributes={CREATING_KEY: {"pid": os.getpid(), "started": started}})
    frame_rate = provenance.get("frame_rate")
    frame_rate = frame_rate if isinstance(frame_rate, (int, float)) and frame_rate > 0 else None
    for split, plan in plans.items():
        _write_split(group, split, plan, layers, dtype, compression, chunk_frames, block_chunks, frame_rate)
    group.attrs.put({META_KEY: {
        "format_version": format_version(dtype),
        "layers": layers,
        "dtype": dtype,
        "compression": compression,
        "chunk_frames": chunk_frames,
        "block_chunks": block_chunks,
        "splits": list(plans),
        "provenance": provenance,
    }})
