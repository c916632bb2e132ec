"""Fine-tuning step overhead: one w2vcache training step / one plain transformers Wav2Vec2ForCTC step.

    python benchmarks/finetune_step.py [--model builtin:base] [--device cpu] [--batch-seconds 16] [--steps 3]
                                       [--threads N]

Both sides train the same architecture from the same weights on the same batch from the bundled
corpus, in one process, alternating (after one warm-up step each) and reporting the median step:

- w2vcache: `FinetuneTask.loss(batch)` (backbone unfrozen, as after the freeze epochs; CNN feature
  encoder frozen; time masking and final dropout as FinetuneConfig's defaults), backward, gradient
  clipping and an Adam step, as `train.py` does them (its fused Adam, train.make_optimizer).
- transformers: `Wav2Vec2ForCTC` built from the same config (vocab_size=30, same masking and
  dropout), base-model and head weights copied from w2vcache's, `freeze_feature_encoder()`, fed
  what a hand-written script feeds it: a batch normalised and zero-padded by
  Wav2Vec2FeatureExtractor outside the step, with attention_mask only for layer-norm
  (`feat_extract_norm="layer"`) models; then the same backward and clipping, and the Adam step
  a script writes (`torch.optim.Adam(params, lr)`: unfused on CPU).

Target ratio: at most 1.05. A third step is w2vcache's from a batch's second epoch on, when the
frozen CNN's output for it is kept (finetune.CNNCache), against both. Both sides run with the same thread count: w2vcache's choice
(threads.py: the cores no other process keeps busy, for a model this size) unless --threads says.
"""

import argparse
import copy
import os
import statistics
import time

import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from w2vcache import text, threads
from w2vcache.audio import SAMPLE_RATE
from w2vcache.checkpoints import load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.finetune import AudioBatches, CNNCache, FinetuneConfig, FinetuneTask
from w2vcache.train import TrainConfig, make_optimizer, seed_everything

CLIP_NORM, LR = TrainConfig.clip_norm, TrainConfig.lr


def update(model, loss, optimizer, device):
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-seconds", type=float, default=16.0, help="padded audio in the batch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each, after one warm-up step")
    parser.add_argument("--mask-time-prob", type=float, default=FinetuneConfig.mask_time_prob)
    parser.add_argument("--final-dropout", type=float, default=FinetuneConfig.final_dropout)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: w2vcache's choice, for both sides)")
    args = parser.parse_args()

    # -- w2vcache: the task, unfrozen, and its batch closest to --batch-seconds
    seed_everything(0)
    backbone = load_backbone(args.model, device=args.device)
    threads.use(args.threads, backbone.model)
    config = FinetuneConfig(batch_seconds=args.batch_seconds, mask_time_prob=args.mask_time_prob,
                            final_dropout=args.final_dropout, num_workers=0)
    task = FinetuneTask(backbone, build_corpus(), config, TrainConfig(dev_split="dev"), device=args.device)
    task.start_epoch(config.freeze_epochs)
    task.model.train()
    split = task.splits["train"]
    utterances, frames, batches = split.utterances, split.frames, split.batches
    members = max(batches, key=lambda b: sum(len(utterances[i].text) for i in b))  # most speech
    batch = AudioBatches(utterances, frames, [members], 0, 1)[0]
    waves, texts = batch.waves, batch.texts
    ours_opt = make_optimizer(task.model.parameters(), LR)  # the training loop's (fused Adam)

    # -- transformers: same config and weights, fed as a hand-written script would feed it
    hf_config = copy.deepcopy(backbone.config)  # keeps the attention implementation too
    for key, value in dict(vocab_size=len(text.VOCAB), pad_token_id=text.BLANK_ID, ctc_loss_reduction="mean",
                           ctc_zero_infinity=True, final_dropout=config.final_dropout,
                           mask_time_prob=config.mask_time_prob, mask_time_length=config.mask_time_length).items():
        setattr(hf_config, key, value)
    hf = Wav2Vec2ForCTC(hf_config)
    missing, unexpected = hf.wav2vec2.load_state_dict(backbone.model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"masked_spec_embed"}, (missing, unexpected)
    with torch.no_grad():
        if "masked_spec_embed" in missing:
            hf.wav2vec2.masked_spec_embed.copy_(task.model.mask_vector)
        hf.lm_head.load_state_dict(task.model.head.state_dict())
    hf.freeze_feature_encoder()
    hf.to(args.device).train()
    hf_opt = torch.optim.Adam(hf.parameters(), lr=LR)
    use_mask = hf_config.feat_extract_norm == "layer"
    inputs = Wav2Vec2FeatureExtractor(do_normalize=backbone.normalize)(
        waves, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True, return_tensors="pt")
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(text.encode(t).ids) for t in texts],
                                             batch_first=True, padding_value=-100)
    hf_inputs = dict(input_values=inputs["input_values"].to(args.device), labels=labels.to(args.device),
                     attention_mask=inputs["attention_mask"].to(args.device) if use_mask else None)

    kept = CNNCache()  # the training loop's from the second epoch on: the frozen CNN's output kept

    def kept_step():
        task.model.cnn_cache = kept
        try:
            update(task.model, task.loss(batch), ours_opt, args.device)
        finally:
            task.model.cnn_cache = None

    steps = {
        "w2vcache": lambda: update(task.model, task.loss(batch), ours_opt, args.device),
        "transformers": lambda: update(hf, hf(**hf_inputs).loss, hf_opt, args.device),
        "w2vcache, CNN kept": kept_step,
    }
    seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    padded = len(waves) * max(len(w) for w in waves) / SAMPLE_RATE
    print(f"model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"attention {hf_config._attn_implementation}, batch of {len(waves)} utterances, {seconds:.1f} s of audio "
          f"({padded:.1f} s padded), mask_time_prob {config.mask_time_prob}, final_dropout {config.final_dropout}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    times = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm-up: allocator, kernels, Adam state
    for i in range(args.steps):
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):  # alternate who goes first
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    ours, theirs, with_kept = (statistics.median(times[name]) for name in steps)
    for name in steps:
        print(f"{name:19s} {statistics.median(times[name]):7.3f} s per step (median of "
              f"{', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"ratio w2vcache / transformers: {ours / theirs:.3f}  (target <= 1.05; the CNN computed in the step)")
    print(f"ratio w2vcache with the CNN's output kept / transformers: {with_kept / theirs:.3f} "
          f"(every step after a batch's first; kept / computed: {with_kept / ours:.3f})")
    print("included: forward, CTC loss, backward, clip_grad_norm_, Adam step, zero_grad on both sides; "
          "w2vcache's step also converts the audio, normalises it and encodes the transcripts; "
          "transformers' batch was normalised and padded by Wav2Vec2FeatureExtractor beforehand, "
          + ("with attention_mask (layer-norm model)" if use_mask else
             "fed without attention_mask as transformers recommends for group-norm models"))


if __name__ == "__main__":
    main()
