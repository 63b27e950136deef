"""Learning-rate schedules: grouprl's constant and cosine, and transformers' through
get_scheduler (hand-computed factors), also after a resume that changes the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.config import ConfigError, TrainConfig
from grouprl.training.optim import build_scheduler, lr_factor


def test_grouprl_schedules_count_the_first_update_as_one_warmup_step():
    f = [lr_factor(s, schedule="cosine", warmup_steps=2, total_steps=6) for s in range(6)]
    # warm-up 1/2, 2/2; then 0.5·(1 + cos(π·(s−2)/4))
    assert f[:2] == [0.5, 1.0]
    assert f[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_transformers_schedules_are_used_as_they_are():
    kw = {"min_lr_rate": 0.1}
    f = [
        lr_factor(s, schedule="cosine_with_min_lr", warmup_steps=2, total_steps=10, kwargs=kw)
        for s in range(11)
    ]
    # transformers' warm-up starts at 0; then 0.1 + 0.9·0.5·(1 + cos(π·(s−2)/8))
    assert f[:3] == [0.0, 0.5, 1.0]
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert f[2:] == pytest.approx(want)
    lin = [lr_factor(s, schedule="linear", warmup_steps=0, total_steps=4) for s in range(5)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # the scheduler the learner builds follows the same factors
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=2.0)
    cfg = TrainConfig(lr_schedule="linear", warmup_steps=0)
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0, 1.5, 1.0, 0.5])


def test_a_schedule_missing_its_arguments_names_the_keys():
    with pytest.raises(
        ConfigError, match="train.lr_schedule 'cosine_with_min_lr'.*lr_schedule_kwargs"
    ):
        lr_factor(0, schedule="cosine_with_min_lr", warmup_steps=0, total_steps=4)
