"""The feature store: every layer of W2V for every utterance, in one Zarr v3 hierarchy.

The store receives plain numpy arrays; it knows nothing about models or audio. `extract.py` plans
the splits (ids, transcripts, audio paths, frame counts), calls `FeatureStore.create`, then fills
the blocks `pending_blocks` hands out. Probes read it with `open_store`, from a local directory,
any fsspec URL (s3://, gs://, https://) or a packed .zip (share.py). docs/STORE.md documents the
layout for people who read it with plain `zarr`.

Layout (one split shown; every array's chunks end in a crc32c checksum that zarr checks on read):

    store.zarr/                  root group, attrs["w2vcache"]: layers, dtype, provenance... (last)
      <split>/                   group, attrs: source, n_utterances, n_frames, hours, ...
        ids, texts, paths        (n,) variable-length UTF-8 strings, utterances sorted by length
        lengths                  (n,) int64 frames per utterance
        offsets                  (n+1,) int64 first frame of each utterance; offsets[n] = n_rows
        blocks                   (n_blocks, 2) int64 [first, end) utterance of each block
        done                     (n_blocks,) uint8, chunk 1: block b's features are all written
                                 (1), or written with utterances that failed to decode (2)
        <layer>                  (n_rows, dim) float16/float32/int8, chunked (chunk_frames, dim)
        <layer>.scale            int8 stores only: (n_rows / chunk_frames, dim) float32, chunk
                                 (1, dim): row c scales chunk c of <layer> per channel; reads
                                 return <layer> * scale as float32
        failed/<b>               group for a block with done == 2, written before the marker:
                                 attrs["utterances"] = [{id, path, reason}]; readers leave them out
      .locks/                    writer lock files, only while someone writes

Blocks are the unit of work, resume and sharding. Each block starts on a chunk boundary of the
frame axis (the frames between one block's last utterance and the next chunk boundary are zero
padding), so no two blocks share a chunk and writers of different blocks never touch the same file.

The package's modules, one concept each: `layout` (format constants, block/chunk geometry,
records), `locks` (writer locks, pid liveness, stale-lock takeover), `location` (opening by path,
URL or zip pack), `creation` (laying out a new store, resume differences), `featurestore`
(FeatureStore: reading, writing and reopening blocks, open_store), `writing` (BlockWriter: a block's
chunks filled and written many at once) and `verification` (verify, its record of the damage
found, info).
"""

from .featurestore import FeatureStore, open_store
from .layout import CREATING_KEY, FORMAT_VERSION, SCALE_SUFFIX, SplitPlan, plan_blocks
from .locks import pid_alive
from .location import local_root, public_url, url_protocol
from .verification import VerifyReport, info, record_verification, verify

__all__ = [
    "CREATING_KEY",
    "FORMAT_VERSION",
    "SCALE_SUFFIX",
    "FeatureStore",
    "SplitPlan",
    "VerifyReport",
    "info",
    "local_root",
    "open_store",
    "pid_alive",
    "public_url",
    "plan_blocks",
    "record_verification",
    "url_protocol",
    "verify",
]
