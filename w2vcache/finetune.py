"""Fine-tuning W2V with a linear CTC head, optionally with named transformer blocks re-initialised.

The seed experiment: re-initialise the top blocks (`--reinit 11,12`) before fine-tuning and see
whether WER moves. The training loop is `train.py`'s; this module supplies the model (backbone +
dropout + linear head), the freeze schedule (head only for the first epochs, the CNN feature
encoder frozen throughout unless asked), SpecAugment-style time masking, and batches of audio by
total seconds. Under torchrun every rank trains on its share of each global batch with
DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

import functools
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import text
from .audio import SAMPLE_RATE, SHOWN_BAD, AudioError, BadAudioError, audio_info, check_corpus, load_audio
from .backbone import Backbone, check_block_numbers, cnn_features, encode, ints_on, reinit_layers, state_dict_hash
from .batching import length_batches
from .checkpoints import load_backbone
from .corpus import Corpus
from .errors import W2VCacheError
from .runs import DATA, RunRecord, SweepResult, data_fingerprint, finetune_experiment, run_dir
from .spread import Share, in_job, local_processes, rank_device, share_of
from .train import TrainConfig, check_config, check_splits, run_settings, seed_everything, sweep, test_splits_for, train

PRECISIONS = ("fp32", "bf16")
DEFAULT_CNN_MEMORY = 8 * 2**30  # bytes of the frozen CNN's outputs kept (CNNCache): W2V-Base's, 20 h of audio


@dataclass
class FinetuneConfig:
    freeze_epochs: int = 3  # only the head trains during the first epochs
    train_feature_encoder: bool = False  # the CNN stays frozen, as is standard for W2V fine-tuning
    final_dropout: float = 0.1  # before the head
    mask_time_prob: float = 0.05  # share of frames masked (transformers' default for W2V fine-tuning)
    mask_time_length: int = 10  # frames per masked span
    batch_seconds: float = 100.0  # padded audio per batch (global, over all ranks)
    num_workers: int = 2  # audio-loading processes
    precision: str = "fp32"  # bf16: autocast on GPU


class CNNCache:
    """The frozen CNN feature encoder's output for each batch, computed once and kept in memory (up
    to `budget` bytes) for later epochs, evaluations and the sweep's later runs from the same CNN.

    W2V-Base's CNN is a third of a forward pass (measured: 34 % of a frozen epoch's step and of an
    evaluation, 15 % of a step that trains the transformer, on 2 CPU cores), and fine-tuning
    leaves it frozen. A batch is always the same utterances (epochs only reorder batches), so the
    kept tensor is exactly what the CNN would give again, padding included: a run's numbers are the
    same with or without it."""

    def __init__(self, budget: int = DEFAULT_CNN_MEMORY):
        self.budget, self.used, self.held, self.source = budget, 0, {}, None

    def use_for(self, source) -> None:
        """`source`: what the CNN's outputs depend on (its weights' hash, normalisation, precision,
        device); features of another source are dropped."""
        if source != self.source:
            self.held, self.used, self.source = {}, 0, source

    def features(self, backbone: Backbone, waves: list[torch.Tensor], key) -> tuple[torch.Tensor, list[int]]:
        """`cnn_features` of the batch `key` names: kept ones, else computed (and kept if they fit)."""
        if key in self.held:
            cnn, lengths = self.held[key]
            device = next(backbone.model.parameters()).device
            cnn = cnn.to(device, non_blocking=cnn.is_pinned())
            if cnn.is_inference() and not torch.is_inference_mode_enabled():
                cnn = cnn.clone()  # kept during an evaluation (the train split's, as dev): usable in training
            return cnn, lengths
        cnn, lengths = cnn_features(backbone, waves)
        size = cnn.numel() * cnn.element_size()
        if self.used + size <= self.budget:
            # From a GPU into pinned memory, so that bringing it back later waits for no queued work.
            held = torch.empty(cnn.shape, dtype=cnn.dtype, pin_memory=cnn.is_cuda).copy_(cnn.detach())
            self.held[key] = (held, lengths)
            self.used += size
        return cnn, lengths


class CTCModel(nn.Module):
    """W2V + dropout + a linear layer to the 30 symbols."""

    def __init__(self, backbone: Backbone, config: FinetuneConfig):
        super().__init__()
        self.backbone_ref = backbone  # for its frame formula and normalisation; weights via .w2v
        self.w2v = backbone.model
        self.dropout = nn.Dropout(config.final_dropout)
        self.head = nn.Linear(backbone.hidden_size, len(text.VOCAB))
        self.config = config
        self.cnn_cache: CNNCache | None = None  # set by FinetuneTask while the CNN is frozen
        # Masked frames are replaced by a learned vector: the checkpoint's own when it has one.
        # (Only made when masking is on: a parameter that never gets a gradient stalls DDP.)
        if getattr(self.w2v, "masked_spec_embed", None) is None and config.mask_time_prob > 0:
            self.mask_embedding = nn.Parameter(torch.empty(backbone.hidden_size).uniform_())

    @property
    def mask_vector(self) -> torch.Tensor:
        return self.w2v.masked_spec_embed if getattr(self.w2v, "masked_spec_embed", None) is not None else self.mask_embedding

    def mask_frames(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """SpecAugment-style time masking: spans of mask_time_length frames replaced by the mask vector.

        Drawn with torch's RNG, which checkpoints save and restore, so a resumed run draws the same spans.
        """
        p, span = self.config.mask_time_prob, self.config.mask_time_length
        mask = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        for b, n in enumerate(lengths):
            if n <= span:
                continue
            count = int(p * n / span + torch.rand(()).item())
            for start in torch.randint(0, n - span + 1, (count,)).tolist():
                mask[b, start: start + span] = True
        cuda = hidden.is_cuda  # from pinned memory, the copy waits for none of the device's queued work
        mask = (mask.pin_memory() if cuda else mask).to(hidden.device, non_blocking=cuda)
        return torch.where(mask[..., None], self.mask_vector.to(hidden.dtype), hidden)

    def forward(self, waves: list[torch.Tensor], key=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`key`: the batch's identity (AudioBatch.key), under which a frozen CNN's outputs are kept."""
        masking = self.training and self.config.mask_time_prob > 0
        cnn = self.cnn_cache.features(self.backbone_ref, waves, key) if self.cnn_cache is not None and key else None
        hidden, lengths = encode(self.backbone_ref, waves, self.mask_frames if masking else None, cnn=cnn)
        logits = self.head(self.dropout(hidden))
        return logits.float().log_softmax(-1), torch.tensor(lengths)


@dataclass
class AudioBatch:
    waves: list  # float32 numpy arrays, this rank's share of the global batch
    texts: list[str]
    global_count: int  # utterances in the global batch, over all ranks
    weight: float  # 0 for a stand-in utterance that must not count (see AudioBatches)
    frames: int  # W2V frames of this share (progress and metrics)
    key: tuple = ()  # (split, its audio files): the same batch in every epoch and run has the same key
    without_ctc_path: int = 0  # utterances whose transcript needs more frames than they have
    ids: tuple = ()  # the utterances', in order (the decoded transcripts name them)


@dataclass
class SplitBatches:
    """One split as fine-tuning reads it: utterances sorted by length, their W2V frames, batches."""

    utterances: list
    frames: list[int]
    batches: list[list[int]]  # indices into utterances, at most batch_seconds of padded audio each


class AudioBatches(torch.utils.data.Dataset):
    """Batch i: this rank's share of the utterances of global batch i, as loaded audio."""

    def __init__(self, utterances, frames: list[int], batches: list[list[int]], rank: int, world: int,
                 min_samples: int = 1, split: str = ""):
        self.utterances, self.frames, self.batches, self.rank, self.world = utterances, frames, batches, rank, world
        self.min_samples = min_samples  # the model's receptive field: shorter audio has no frame
        self.split = split

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        members = self.batches[i]
        mine, weight = members[self.rank:: self.world], 1.0
        if not mine:
            # Fewer utterances than ranks: this rank still has to join the gradient all-reduce,
            # so it runs one utterance with weight 0 and contributes nothing.
            mine, weight = members[:1], 0.0
        try:
            waves = [load_audio(self.utterances[j].path, self.min_samples) for j in mine]
        except AudioError as error:  # a file corrupt in its middle: raised by the loop (_Raising), not in a worker
            return error
        texts = [self.utterances[j].text for j in mine]
        unreachable = sum(text.ctc_frames_needed(text.encode(t).ids) > self.frames[j] for t, j in zip(texts, mine))
        return AudioBatch(waves, texts, len(members), weight, sum(self.frames[j] for j in mine),
                          (self.split, *(str(self.utterances[j].path) for j in mine)), int(unreachable * weight),
                          tuple(self.utterances[j].id for j in mine))


def _collate(item):
    return item


class _Raising:
    """A DataLoader whose batches may be an AudioError from a worker: raised here, as itself (torch
    would re-raise it from its worker as a RuntimeError holding the worker's traceback)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, AudioError):
                raise W2VCacheError(f"{batch}; fix or remove it, or leave it out with --skip-bad "
                                    "(found by decoding it: its header and last samples were fine)")
            yield batch


class FinetuneTask:
    """The fine-tuning experiment as the training loop sees it."""

    def __init__(self, backbone: Backbone, corpus: Corpus, config: FinetuneConfig, train_config: TrainConfig,
                 train_split: str = "train", device: str = "cpu", cnn_cache: CNNCache | None = None):
        """`cnn_cache`: where the frozen CNN's outputs are kept (one may serve a sweep's runs);
        None computes them in every step."""
        self.config, self.seed = config, train_config.seed
        self.device = torch.device(device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.model = CTCModel(backbone, config).to(self.device)
        self.ddp = None
        self.ctc = nn.CTCLoss(blank=text.BLANK_ID, reduction="none", zero_infinity=True)
        self.splits = {}
        train_config = test_splits_for(train_config, corpus.splits)
        for split in (train_split, train_config.dev_split, *train_config.test_splits):
            if split not in corpus.splits:
                raise W2VCacheError(f"the corpus has no split {split!r}; it has {', '.join(corpus.splits)}")
            num_samples = {u.id: audio_info(u.path).num_samples for u in corpus.splits[split]}  # headers, read once
            utterances = sorted(corpus.splits[split], key=lambda u: (num_samples[u.id], u.id))
            samples = [num_samples[u.id] for u in utterances]
            batches = [list(range(b.start, b.stop)) for b in length_batches(samples, int(config.batch_seconds * SAMPLE_RATE))]
            self.splits[split] = SplitBatches(utterances, [backbone.num_frames(n) for n in samples], batches)
        self.train_split = train_split
        if cnn_cache is not None and not config.train_feature_encoder:
            cnn_cache.use_for((state_dict_hash(self.model.w2v.feature_extractor), backbone.normalize,
                               config.precision, str(self.device)))
            self.model.cnn_cache = cnn_cache
        self.frozen = None

    # -- what trains when ------------------------------------------------------------------------

    def start_epoch(self, epoch: int) -> None:
        frozen = epoch < self.config.freeze_epochs
        for p in self.model.w2v.parameters():
            p.requires_grad = not frozen
        if hasattr(self.model, "mask_embedding"):  # our own mask vector is part of the backbone's input
            self.model.mask_embedding.requires_grad = not frozen
        if getattr(self.model.w2v, "masked_spec_embed", None) is not None and self.config.mask_time_prob == 0:
            # The checkpoint's mask vector, unused without masking: no gradient would ever reach it,
            # which DDP takes for a rank that stopped half-way.
            self.model.w2v.masked_spec_embed.requires_grad = False
        extractor = self.model.w2v.feature_extractor
        if not self.config.train_feature_encoder:
            for p in extractor.parameters():
                p.requires_grad = False
        # transformers' CNN marks its *input* as requiring grad in train mode unless this flag is
        # cleared (freeze_feature_encoder does it), which records a graph through the whole frozen CNN
        # back to the audio: measured +24 % per step on W2V-Base. The audio never needs a gradient.
        if hasattr(extractor, "_requires_grad"):
            extractor._requires_grad = False
        if frozen != self.frozen and self.world > 1:
            # DDP syncs the parameters that require grad when it is built: rebuild it when that set changes.
            # A checkpoint's own layerdrop (transformers' default is 0.1, and Hub configs keep theirs)
            # skips random blocks in each step, a different draw on each rank: their parameters get no
            # gradient there, which DDP must be told to expect.
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                               find_unused_parameters=getattr(self.model.w2v.config, "layerdrop", 0) > 0)
        self.frozen = frozen

    def no_sync(self):
        """The batches of an update but its last: their gradients are summed over ranks with the last's."""
        return self.ddp.no_sync() if self.ddp is not None else nullcontext()

    # -- batches ---------------------------------------------------------------------------------

    def _loader(self, split: str, batches: list[list[int]], rank: int, world: int):
        dataset = AudioBatches(self.splits[split].utterances, self.splits[split].frames, batches, rank, world,
                               self.model.backbone_ref.receptive_field, split)
        return _Raising(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_collate,
                                                    num_workers=self.config.num_workers,
                                                    prefetch_factor=2 if self.config.num_workers else None))

    def train_batches(self, epoch: int):
        order = list(self.splits[self.train_split].batches)
        random.Random(self.seed * 100_003 + epoch).shuffle(order)  # identical on every rank and on resume
        return self._loader(self.train_split, order, self.rank, self.world)

    def eval_batches(self, split: str):
        # Every rank evaluates the whole split (simple and exact; only rank 0 writes the result).
        return self._loader(split, self.splits[split].batches, rank=0, world=1)

    # -- loss and decoding -------------------------------------------------------------------------

    def _autocast(self):
        if self.config.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def loss(self, batch: AudioBatch) -> torch.Tensor:
        model = self.ddp if self.ddp is not None else self.model
        encoded = [text.encode(t).ids for t in batch.texts]
        # While the backbone is frozen none of its parameters requires grad, so autograd records
        # nothing through it and the frozen epochs cost a forward pass only. The waves go to the
        # device in one copy (backbone.cnn_features), the targets from pinned memory: on a GPU
        # nothing here waits for the device's queued work.
        with self._autocast():
            log_probs, lengths = model(batch.waves, batch.key)
        targets = ints_on([i for ids in encoded for i in ids], log_probs.device)
        per_utt = self.ctc(log_probs.transpose(0, 1), targets, lengths, torch.tensor([len(ids) for ids in encoded]))
        per_utt = per_utt / ints_on([max(len(ids), 1) for ids in encoded], per_utt.device)
        # Sum over this rank's utterances / global batch size, times world size: DDP averages the
        # gradients over ranks, which then equal those of the mean over the whole global batch.
        return per_utt.sum() * (batch.weight * self.world / batch.global_count)

    def decode(self, batch: AudioBatch) -> tuple[list[str], list[str]]:
        with self._autocast():
            log_probs, lengths = self.model(batch.waves, batch.key)
        return batch.texts, text.greedy_decode(log_probs.float().cpu(), lengths)


# ---------------------------------------------------------------------------------------------
# Runs


def parse_reinit(spec: str) -> tuple[int, ...]:
    """'none' | '12' | '11,12' | '10-12' -> block numbers (validated against depth later)."""
    spec = str(spec).strip()
    if spec in ("", "none"):
        return ()
    blocks = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise W2VCacheError(f"--reinit {spec!r}: {part!r} is not a block number such as 12 or 11,12") from None
        if hi < lo:
            raise W2VCacheError(f"--reinit {spec!r}: the range {part.strip()} is empty (write it low-high: {hi}-{lo})")
        blocks += range(lo, hi + 1)
    return tuple(sorted(set(blocks)))  # "12,11" is "11,12": one experiment, one run directory


def init_distributed(device: str) -> str:
    """Join torchrun's process group when launched by it; returns this rank's device (rank_device's)."""
    device = rank_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device


def usable_corpus(corpus: Corpus, splits, min_samples: int, skip_bad: bool, progress: bool,
                  listing: Path | None = None) -> Corpus:
    """`corpus` with only `splits`, every file checked first (audio.check_corpus); a bad file is
    refused, all of them listed (in `listing` too, where more than the error shows), or with
    `skip_bad` left out (and listed in corpus.skipped)."""
    missing = [split for split in splits if split not in corpus.splits]
    if missing:
        raise W2VCacheError(f"--test-splits {','.join(missing)}: the corpus has no split {missing[0]!r}; it has "
                            f"{', '.join(corpus.splits)}")
    chosen = {split: corpus.splits[split] for split in dict.fromkeys(splits)}
    # Left out means left out: a file corrupt in its middle, which only decoding finds, too.
    usable, bad = check_corpus(chosen, min_samples, progress, decode=skip_bad)
    if bad and not skip_bad:
        error = BadAudioError(bad, sum(map(len, chosen.values())), skip="leave them out of the fine-tuning")
        if listing is not None and len(bad) > SHOWN_BAD:
            listing.parent.mkdir(parents=True, exist_ok=True)
            error = error.write_listing(listing)
        raise error
    if bad and progress:
        print(f"left out {len(bad)} audio file(s) that cannot be used:", file=sys.stderr)
        for split, uid, path, reason in bad:
            print(f"  {path}: {reason} (utterance {uid}, split {split})", file=sys.stderr)
    skipped = {split: list(corpus.skipped.get(split, [])) for split in chosen}
    for split, uid, path, reason in bad:
        skipped[split].append({"id": uid, "path": path, "reason": reason})
    for split, checked in usable.items():
        if not checked:
            raise W2VCacheError(f"split {split}: no usable utterances (all {len(skipped[split])} cannot be used)")
    return replace(corpus, splits={split: [u for u, _ in checked] for split, checked in usable.items()},
                   skipped=skipped)


def finetune(corpus: Corpus, model: str = "builtin:tiny", reinits=((),), seeds=(0,), out="runs",
             config: FinetuneConfig = FinetuneConfig(), train_config: TrainConfig = TrainConfig(),
             train_split: str = "train", device: str = "cpu", revision: str | None = None,
             progress: bool = True, num_threads: int | None = None, shard: str | None = None,
             cnn_memory: int = DEFAULT_CNN_MEMORY, skip_bad: bool = False, jobs: int = 1) -> SweepResult:
    """Fine-tune `model` once per (re-init set, seed); finished runs are skipped, killed ones resume.

    `num_threads`: torch's CPU threads; None chooses them (threads.py).
    `skip_bad`: leave out the audio files that cannot be used (listed on stderr and in each run's
    config.json) instead of refusing them all, before any run starts; every file is then decoded
    whole first, so that one corrupt in its middle is left out too.
    `cnn_memory`: bytes of the frozen CNN's outputs kept for later epochs and runs (CNNCache), on
    this machine (torchrun's ranks on it share them); 0 computes them in every step. The results
    are the same either way.
    Under torchrun, without `shard`, the ranks train each run together (DDP). With `shard` ("I/N",
    this job's share of the runs; "0/1" for all), no process group is made: under torchrun each
    rank takes its share of the job's runs alone, on cuda:LOCAL_RANK with device "cuda".
    `jobs`: runs trained at once, by that many processes on this machine (spread.in_processes)."""
    if jobs < 1:
        raise W2VCacheError(f"--jobs {jobs}: needs 1 or more")
    if config.precision not in PRECISIONS:
        raise W2VCacheError(f"--precision {config.precision!r}: choose one of {', '.join(PRECISIONS)}")
    reinits = [tuple(blocks) for blocks in reinits]
    twice = sorted({blocks for blocks in reinits if reinits.count(blocks) > 1})
    if twice:
        raise W2VCacheError(f"--reinit {', '.join(','.join(map(str, b)) or 'none' for b in twice)} given more than once")
    if config.precision == "bf16" and not device.startswith("cuda"):
        # It would be recorded as bf16 and run in float32.
        raise W2VCacheError(f"--precision bf16: mixed precision runs on a GPU (--device cuda); on --device {device} "
                            "use fp32")
    # --shard spreads runs, one process each; without it torchrun's ranks share each run (DDP).
    share = share_of(shard) if shard is not None else Share()
    joins = shard is None and not dist.is_initialized()
    asked_device = device  # --jobs get it as asked: each resolves it itself
    device = rank_device(device) if shard is not None else init_distributed(device)
    joins = joins and dist.is_initialized()  # the process group is this call's to end
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if jobs > 1 and dist.is_initialized():
        raise W2VCacheError(f"--jobs {jobs}: under torchrun without --shard the ranks train each run together "
                            "(DDP); give --shard to spread the runs instead, or drop --jobs")
    train_config = test_splits_for(train_config, corpus.splits,
                                   "the corpus" if progress and main_rank and not in_job() else None)
    check_splits(corpus.splits, train_split, train_config.dev_split, "the corpus")
    check_config(train_config)
    # What a run would refuse half-way is refused before the first one: the model, each re-init
    # set against its blocks, and every audio file trained or tested on. The command checks; its
    # --jobs get the corpus checked.
    if not in_job():
        checking = load_backbone(model, revision=revision)
        for blocks in reinits:
            try:
                check_block_numbers(blocks, checking.num_layers)
            except W2VCacheError as error:
                raise W2VCacheError(f"--reinit {','.join(map(str, blocks))}: {error}") from None
        corpus = usable_corpus(corpus, (train_split, train_config.dev_split, *train_config.test_splits),
                               checking.receptive_field, skip_bad, progress and main_rank,
                               Path(out) / "finetune" / "bad-audio.tsv" if main_rank else None)
        del checking
        if progress and main_rank:
            for note in text.transcript_notes({s: [u.text for u in utterances] for s, utterances in corpus.splits.items()}):
                print(f"note: {note}", file=sys.stderr)
    # The budget is the machine's: torchrun's ranks on it each keep their part.
    cnn_cache = CNNCache(cnn_memory // local_processes()) if cnn_memory > 0 else None

    world = dist.get_world_size() if dist.is_initialized() else 1
    trained_on = data_fingerprint({split: [(u.id, u.text) for u in corpus.splits[split]]
                                   for split in dict.fromkeys((train_split, train_config.dev_split))})

    def backbone_for(blocks: tuple[int, ...], seed: int) -> Backbone:
        backbone = load_backbone(model, device=device, revision=revision)
        reinit_layers(backbone, list(blocks), seed)
        return backbone

    def settings(blocks: tuple[int, ...], seed: int, backbone: Backbone) -> tuple[RunRecord, TrainConfig]:
        run_record = RunRecord(
            kind="finetune", experiment=finetune_experiment(blocks), layer=None, reinit=list(blocks), seed=seed,
            model=asdict(config) | {"backbone": {k: backbone.describe()[k] for k in ("name", "revision", "weight_hash")}},
            data={"train_split": train_split, "sources": corpus.sources, DATA: trained_on,
                  # which utterances were left out (by id: paths change with where a corpus is mounted)
                  **({"skipped": {split: sorted(u["id"] for u in entries) for split, entries in corpus.skipped.items()
                                  if entries}} if any(corpus.skipped.values()) else {})},
            device=device, threads=num_threads, world_size=world,
        )
        return run_record, TrainConfig(**{**asdict(train_config), "seed": seed})

    def start(blocks: tuple[int, ...], seed: int, directory: Path) -> None:
        seed_everything(seed)
        backbone = backbone_for(blocks, seed)
        run_record, tc = settings(blocks, seed, backbone)
        task = FinetuneTask(backbone, corpus, config, tc, train_split, device, cnn_cache)
        if progress and main_rank:
            print(f"finetune {run_record.experiment} seed {seed} -> {directory}")
        result = train(task, tc, directory, run_record, progress=progress and main_rank, num_threads=num_threads)
        if main_rank and result and (result.get("best_epoch") or 0) <= config.freeze_epochs < tc.epochs:
            print(f"note: {directory}: its best dev epoch ({result['best_epoch']}) trained the CTC head alone "
                  f"(--freeze-epochs {config.freeze_epochs}), so its encoder is the one it started from",
                  file=sys.stderr)

    # A finished run's settings are checked against the model as it is now (its weights' hash
    # after the re-init), so the model is loaded for it: seconds, against a wrong table.
    def settings_now(blocks: tuple[int, ...], seed: int) -> dict:
        seed_everything(seed)  # the model as start() loads it (each run's start seeds anew)
        return run_settings(*settings(blocks, seed, backbone_for(blocks, seed)))

    runs = ((run_dir(out, "finetune", finetune_experiment(blocks), seed), functools.partial(start, blocks, seed),
             functools.partial(settings_now, blocks, seed))
            for blocks in reinits for seed in seeds)
    result = sweep(runs, share, jobs=jobs, job=functools.partial(
        finetune, corpus, model, reinits, seeds, out, config, train_config, train_split, asked_device, revision,
        progress, num_threads, shard, cnn_memory))
    if joins:
        # Gloo's threads, left to the interpreter's exit, abort the process (SIGABRT) now and then.
        dist.destroy_process_group()
    return result
