"""The GPU's own paths (waves staged in pinned memory, the group-norm CNN batched, layers copied
back without blocking), against the CPU's forward: skipped where there is no CUDA GPU. The
device's overflow check runs in test_extract's float16 overflow test, on both devices."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from w2vcache.audio import load_audio
from w2vcache.backbone import forward_layers
from w2vcache.checkpoints import load_backbone
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, extract
from w2vcache.store import open_store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-ln"])
def test_extraction_on_a_gpu_equals_each_utterance_alone_on_the_cpu(tmp_path, model):
    corpus = build_corpus(splits=["dev=dev-clean"])
    path = tmp_path / "gpu.zarr"
    result = extract(corpus, ExtractConfig(model=model, store=str(path), dtype="float32", include_cnn=True,
                                           device="cuda", batch_seconds=12, chunk_frames=64, block_chunks=4),
                     progress=False)
    assert result.utterances_written == len(corpus.splits["dev"])
    store, backbone = open_store(path), load_backbone(model)
    for u in corpus.splits["dev"]:
        outputs, frames = forward_layers(backbone, [load_audio(u.path)], include_cnn=True)
        for name, alone in zip(store.layers, outputs):
            # float32 on both, TF32 off on the GPU: what differs is the order of the sums
            np.testing.assert_allclose(store.read("dev", name, u.id), alone[0, : frames[0]].numpy(),
                                       atol=1e-4, rtol=1e-4, err_msg=f"{u.id} {name}")


def test_a_batch_mixing_host_and_device_waves_keeps_its_order():
    backbone = load_backbone("builtin:tiny", device="cuda")
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (4000, 7000, 5000)]
    mixed = [waves[0], torch.from_numpy(waves[1]).cuda(), torch.from_numpy(waves[2])]
    got, frames = forward_layers(backbone, mixed)
    want, _ = forward_layers(backbone, waves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert frames == [backbone.num_frames(len(w)) for w in waves]



@pytest.mark.parametrize("layer", ["layer02", "weighted"])
def test_a_probe_on_a_gpu_gathers_the_batches_the_host_assembles(bundled_store, layer):
    """By default a GPU holds the features and gathers each batch: the values the host pads."""
    from w2vcache.probe import ProbeConfig, ProbeTask
    from w2vcache.train import TrainConfig

    config = ProbeConfig(hidden=16, lstm_layers=1, batch_frames=1500)
    on_gpu = ProbeTask(open_store(bundled_store), layer, config, TrainConfig(seed=3), device="cuda")
    on_host = ProbeTask(open_store(bundled_store), layer, replace(config, resident=False), TrainConfig(seed=3),
                        device="cuda")
    assert on_gpu.resident and not on_host.resident
    for a, b in zip(on_gpu.train_batches(1), on_host.train_batches(1), strict=True):
        assert a.features.device.type == "cuda" and a.features.dtype == torch.float32
        assert torch.equal(a.features, b.features) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-ln"])
def test_a_finetune_loss_on_a_gpu_equals_the_cpus_with_the_cnn_computed_or_kept(model):
    """The waves, targets and masks go to the GPU without waiting on it, the group-norm CNN runs
    batched there, its kept outputs come back from pinned memory: the loss is the CPU's."""
    from w2vcache.finetune import CNNCache, FinetuneConfig, FinetuneTask
    from w2vcache.train import TrainConfig, seed_everything

    losses = {}
    for device in ("cpu", "cuda"):
        seed_everything(0)
        task = FinetuneTask(load_backbone(model), build_corpus(), FinetuneConfig(batch_seconds=8, num_workers=0),
                            TrainConfig(dev_split="dev"), device=device, cnn_cache=CNNCache())
        task.start_epoch(5)  # the whole model trains
        task.model.eval()  # no masking or dropout: the same computation on both devices
        batch = next(iter(task.train_batches(0)))
        losses[device] = [task.loss(batch) for _ in range(2)]  # the CNN computed, then kept
        assert losses[device][0].device.type == device
    for computed_or_kept in range(2):
        torch.testing.assert_close(losses["cuda"][computed_or_kept].cpu(), losses["cpu"][computed_or_kept],
                                   rtol=1e-3, atol=1e-4)
