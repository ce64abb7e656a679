"""LR schedules of pretrain_dspark.py (constant / linear / cosine / WSD, linear warm-up),
through megaspark's optimizer builder and megatron-core's scheduler, in one gloo rank."""

from __future__ import annotations

import math

import pytest

from tests import dspark_cases as dc
from tests.launcher import run_distributed

ITERS, GBS, LR, MIN_LR = 20, 4, 1e-3, 1e-4


def _worker(rank, world_size):
    from megaspark.parallel import initialize_distributed
    from megaspark.arguments.configs import OptimizationConfig
    from megaspark.training.trainer import build_optimizer, wrap_ddp

    initialize_distributed()
    d, _, weights, _ = dc.make_case("S_vanilla_conf")
    out = {}
    for style in ("constant", "linear", "cosine", "WSD"):
        model = dc.build_model(d, weights)
        optim = OptimizationConfig(
            lr=LR, min_lr=MIN_LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
            clip_grad=1.0, bf16=False, train_iters=ITERS,
            global_batch_size=GBS, lr_warmup_fraction=0.1, lr_decay_style=style,
            lr_wsd_decay_fraction=0.25,
        )
        tcfg = d.transformer_config()
        optimizer, scheduler = build_optimizer(optim, wrap_ddp([model], tcfg))
        lrs = []
        for _ in range(ITERS):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step(increment=GBS)
        lrs.append(optimizer.param_groups[0]["lr"])
        out[style] = lrs
    return out


@pytest.fixture(scope="module")
def lrs():
    return run_distributed(_worker, 1)[0]


def test_linear_warmup_for_every_style(lrs):
    for style, values in lrs.items():
        assert values[0] == pytest.approx(0.0, abs=1e-12), style
        assert values[1] == pytest.approx(LR / 2), style  # warm-up = 10% of 20 iterations
        assert values[2] == pytest.approx(LR), style


def test_decay_shapes(lrs):
    assert all(v == pytest.approx(LR) for v in lrs["constant"][2:])
    # linear and cosine decay from the end of warm-up to min_lr at the last iteration
    assert lrs["linear"][-1] == pytest.approx(MIN_LR)
    assert lrs["cosine"][-1] == pytest.approx(MIN_LR)
    mid = (2 + ITERS) // 2  # halfway through the decay
    assert lrs["linear"][mid] == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5, rel=1e-6)
    assert lrs["cosine"][mid] == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-6)
    assert lrs["cosine"][5] > lrs["linear"][5]  # cosine stays higher early in the decay
    # WSD: stable at the peak until the last 25% of iterations, then decays to min_lr
    wsd = lrs["WSD"]
    assert all(v == pytest.approx(LR) for v in wsd[2:15])
    assert wsd[16] < LR and wsd[-1] == pytest.approx(MIN_LR)
