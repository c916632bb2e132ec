import pytest
import torch

from w2vcache.train import TrainConfig, tri_stage


def test_tri_stage_schedule_at_chosen_updates():
    config = TrainConfig(epochs=10, lr=1e-4, warmup_epochs=1, decay_from_epoch=5)
    per_epoch = 20  # 200 updates in all: warm-up 0-19, hold 20-99, decay 100-199
    expected = {
        0: 1 / 20,  # the first update already moves
        9: 10 / 20,
        19: 1.0,  # the end of epoch 1 reaches the peak
        20: 1.0,
        99: 1.0,  # still holding at the end of epoch 5
        100: 1.0,  # decay starts at the start of epoch 6: (200 - 100) / 100
        150: 0.5,
        199: 1 / 100,  # the last update; the rate reaches 0 at the end
    }
    for update, value in expected.items():
        assert tri_stage(update, per_epoch, config) == pytest.approx(value), update


def test_schedule_drives_the_optimizer():
    from torch.optim.lr_scheduler import LambdaLR

    config = TrainConfig(epochs=4, lr=0.5, warmup_epochs=1, decay_from_epoch=2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=config.lr)
    sched = LambdaLR(opt, lambda u: tri_stage(u, 2, config))
    used = []
    for _ in range(8):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.375, 0.25, 0.125])
