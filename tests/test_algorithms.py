"""The DFlash family on one stack (DSPARK_SPEC.md §3.7, §4.4, §10, §13 items 2 and 22):
``--algorithm dspark|dflash|dflash-original`` presets, the VP-drafter training mode, and
their model-level reductions at TP = 1 and TP = 2.

The block-level VP properties (prefix range and pmf, real-token inputs for k < π, zero
weight before π, decay 1 at the first masked slot) are in tests/test_blocks.py; §13 item 2
for Convention S is in tests/test_losses.py. This file adds the model-level item 22
(π = 1 gives the DFlash Convention-D loss, sampled prefixes give Σω·CE/Σω on the model's
own logits, equal at TP = 1 and 2) and the flag presets.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaspark.arguments import ArgumentError, build_parser, validate_args
from megaspark.config import ConfigError, DSparkConfig
from tests import dspark_cases as dc
from tests import reference
from tests.launcher import run_distributed

EPS = 1e-6
TPS = (1, 2)


# =============================================================================== flag presets
def _args(tmp_path, *flags, world_size=1):
    args = build_parser().parse_args(["--data-path", str(tmp_path), *flags])
    validate_args(args, world_size)
    return args


ALGO_FIELDS = ("block_size", "markov_rank", "confidence_head", "ce_loss_alpha", "l1_loss_alpha",
               "confidence_loss_alpha", "loss_decay_gamma", "slot_convention", "truncate_eval_mask")


@pytest.mark.parametrize("flags, expected", [
    ((), ("dspark", 7, 256, True, 0.1, 0.9, 1.0, 4.0, "S", True)),
    (("--algorithm", "dflash"), ("dflash", 7, 0, False, 1.0, 0.0, 0.0, 4.0, "S", True)),
    (("--algorithm", "dflash-original"), ("dflash-original", 16, 0, False, 1.0, 0.0, 0.0, 7.0, "D", False)),
    (("--training-mode", "vp_drafter"), ("dflash-original", 16, 0, False, 1.0, 0.0, 0.0, 7.0, "D", False)),
])
def test_presets_fill_the_defaults(tmp_path, flags, expected):
    a = _args(tmp_path, *flags)
    assert (a.algorithm,) + tuple(getattr(a, f) for f in ALGO_FIELDS) == expected


def test_explicit_flags_override_presets(tmp_path):
    a = _args(tmp_path, "--algorithm", "dflash-original", "--block-size", "8", "--loss-decay-gamma", "5",
              "--l1-loss-alpha", "0.5")
    assert (a.block_size, a.loss_decay_gamma, a.l1_loss_alpha, a.slot_convention) == (8, 5.0, 0.5, "D")
    a = _args(tmp_path, "--markov-rank", "64", "--no-confidence-head")
    assert (a.algorithm, a.markov_rank, a.confidence_head) == ("dspark", 64, False)
    a = _args(tmp_path, "--training-mode", "vp_drafter", "--prefix-weight-base", "0.7")
    assert a.prefix_weight_base == 0.7
    assert _args(tmp_path, "--training-mode", "vp_drafter", "--algorithm", "dspark",
                 "--slot-convention", "D").slot_convention == "D"


@pytest.mark.parametrize("flags, needles", [
    (("--algorithm", "dflash", "--markov-rank", "64"), ("DFlash has no Markov head", "--markov-rank 64")),
    (("--algorithm", "dflash-original", "--slot-convention", "S"), ("--slot-convention S",)),
    (("--training-mode", "vp_drafter", "--algorithm", "dspark"), ("Convention-D", "dflash-original")),
    (("--training-mode", "vp_drafter", "--algorithm", "dflash"), ("Convention-D",)),
    (("--prefix-weight-base", "0.5"), ("--prefix-weight-base", "vp_drafter")),
    (("--training-mode", "vp_drafter", "--prefix-weight-base", "0"), ("--prefix-weight-base must be > 0",)),
    (("--algorithm", "dflash-original", "--block-size", "1"), ("--block-size",)),
    (("--draft-attention", "gqa", "--kv-lora-rank", "8"), ("--kv-lora-rank", "gqa")),
    (("--draft-attention", "mla", "--kv-channels", "16"), ("--kv-channels", "--qk-nope-head-dim")),
    (("--draft-attention", "mla", "--transformer-impl", "transformer_engine"),
     ("--draft-attention mla", "--transformer-impl local")),
    (("--draft-attention", "mla", "--v-head-dim", "-1"), ("--v-head-dim must be >= 0",)),
    (("--no-confidence-head", "--confidence-loss-alpha", "0.5"), ("--confidence-loss-alpha 0.5",)),
    (("--algorithm", "dflash", "--confidence-loss-alpha", "1"), ("no effect without a confidence head",)),
])
def test_contradictions_are_refused(tmp_path, flags, needles):
    with pytest.raises(ArgumentError) as e:
        _args(tmp_path, *flags)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_mla_selects_the_local_layer_spec(tmp_path):
    assert _args(tmp_path, "--draft-attention", "mla").transformer_impl == "local"


def test_gqa_shape_flags_are_refused_for_an_mla_draft_of_a_deepseek_target(tmp_path):
    import transformers

    hf = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=6,
                                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                       kv_lora_rank=32, q_lora_rank=None, vocab_size=320)
    assert DSparkConfig.from_hf_config(hf, num_target_taps=2).attention_type == "mla"
    with pytest.raises(ConfigError, match="--kv-channels.*MLA.*deepseek_v3"):
        DSparkConfig.from_hf_config(hf, num_target_taps=2, kv_channels=16)
    assert DSparkConfig.from_hf_config(hf, num_target_taps=2, attention_type="gqa",
                                       kv_channels=16).attention_type == "gqa"


def test_vp_prefixes_only_in_training_batches_and_layout_independent():
    from megaspark.training.batches import MicroBatch, make_draft_inputs

    d = _dflash_d(training_mode="vp_drafter")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 64, (3, 24), generator=g)
    mb = MicroBatch(ids, torch.ones_like(ids), [10, 11, 12])
    train = make_draft_inputs(mb, d, seed=5)
    evaluation = make_draft_inputs(mb, d, seed=5, training=False)
    anchor_only = make_draft_inputs(mb, _dflash_d(), seed=5)
    B = d.block_size
    shown = train.noise_ids.reshape(3, -1, B)[..., 1:] != d.mask_token_id
    assert shown.any() and train.weights.reshape(3, -1, B)[..., 1].eq(0).all()  # π >= 2 everywhere
    assert torch.equal(evaluation.noise_ids, anchor_only.noise_ids)
    assert torch.equal(evaluation.weights, anchor_only.weights)
    # sample 11 gets the same anchors and prefixes alone as in the micro-batch of three
    alone = make_draft_inputs(MicroBatch(ids[1:2], torch.ones_like(ids[1:2]), [11]), d, seed=5)
    assert torch.equal(alone.noise_ids[0], train.noise_ids[1])
    assert torch.equal(alone.weights[0], train.weights[1])
    assert not torch.equal(make_draft_inputs(mb, d, seed=6).noise_ids, train.noise_ids)


def test_vp_acceptance_metrics_count_from_the_first_masked_slot():
    """Training τ of VP blocks: acceptance starts at slot π (not at slot 1, which shows a
    real token); anchor-only blocks are unchanged. §13 item 16 example: τ = 2.98."""
    from megaspark.losses import _acceptance_metrics

    c = torch.tensor([[[0.0, 0.0, 0.0, 0.9, 0.8, 0.5],   # VP block, π = 3
                       [0.0, 0.9, 0.8, 0.5, 0.7, 0.6]]])  # anchor-only block (Convention D)
    e = torch.tensor([[[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]]], dtype=torch.bool)
    m = {}
    _acceptance_metrics(m, c, e, torch.ones(1, 2, dtype=torch.bool), first_slot=1)
    tau = float(m["tau"][0] / m["tau"][1])
    assert tau == pytest.approx((2.98 + 2.98) / 2)
    assert float(m["accept_rate@1"][0] / m["accept_rate@1"][1]) == pytest.approx(0.9)
    assert float(m["count@3"][0]) == 2.0 and float(m["count@4"][0]) == 0.0


def test_config_refuses_vp_with_convention_s():
    fields = dict(dc.BASE, training_mode="vp_drafter")
    with pytest.raises(ConfigError, match="Convention-D"):
        DSparkConfig(**fields).validate()
    with pytest.raises(ConfigError, match="--training-mode"):
        DSparkConfig(**dict(dc.BASE, training_mode="vp")).validate()
    with pytest.raises(ConfigError, match="--prefix-weight-base"):
        DSparkConfig(**dict(dc.BASE, convention="D", training_mode="vp_drafter",
                            prefix_weight_base=0.0)).validate()


# =============================================================================== model level
def _dflash_d(**overrides) -> DSparkConfig:
    """The original DFlash objective on the shared tiny shape (B = 6 so prefixes vary)."""
    fields = dict(dc.BASE, convention="D", block_size=6, num_anchors=4, markov_rank=0,
                  confidence_head=False, confidence_with_markov=False, alpha_ce=1.0, alpha_l1=0.0,
                  alpha_conf=0.0, gamma=7.0, truncate_eval_mask=False)
    fields.update(overrides)
    return DSparkConfig(**fields).validate(2)


def _inputs(d: DSparkConfig, batch: dict, prefix=None):
    from megaspark.blocks import build_blocks
    from megaspark.models.dspark.model import DraftInputs

    blocks = build_blocks(batch["input_ids"], batch["loss_mask"], batch["anchors"], batch["keep"],
                          block_size=d.block_size, mask_token_id=d.mask_token_id, gamma=d.gamma,
                          convention=d.convention, truncate_eval_mask=d.truncate_eval_mask,
                          prefix_lengths=prefix)
    return DraftInputs.from_blocks(blocks, batch["target_hidden_states"], batch["target_last_hidden_states"])


def _loss_and_grads(d, weights, inputs, tp):
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict

    model = dc.build_model(d, weights, tp=tp)
    sums = model(inputs)
    loss = sums.loss(d.alpha_ce, d.alpha_l1, d.alpha_conf)
    loss.backward()
    with torch.no_grad():
        h = model(dataclasses.replace(inputs, labels=None)).detach().clone()
    return dict(loss=float(loss), den=float(sums.denominator), h=h,
                grads={k: v.clone() for k, v in hf_state_dict(model, grads=True).items()})


def _vp_worker_part(tp):
    from megaspark.blocks import sample_prefix_lengths

    d_flash = _dflash_d()
    d_vp = _dflash_d(training_mode="vp_drafter", prefix_weight_base=0.9)
    rc = dc.reference_cfg(d_flash)
    L = len(d_flash.target_layer_ids)
    weights = reference.random_weights(rc, 3, L=L)
    batch = reference.random_batch(rc, 2, 24, L, 4)
    ones = torch.ones_like(batch["anchors"])
    sampled = sample_prefix_lengths(batch["anchors"].shape, d_vp.block_size, d_vp.prefix_weight_base,
                                    generator=torch.Generator().manual_seed(5))
    out = {}
    for name, d, prefix in (("dflash", d_flash, None), ("vp_pi1", d_vp, ones), ("vp", d_vp, sampled)):
        inputs = _inputs(d, batch, prefix)
        r = _loss_and_grads(d, weights, inputs, tp)
        r.update(labels=inputs.labels.clone(), weights=inputs.weights.clone(),
                 noise_ids=inputs.noise_ids.clone(), prefix=prefix)
        out[name] = r
    out["lm_head"] = weights["lm_head.weight"]
    out["reference_dflash"] = float(reference.reference_forward_loss(weights, rc, batch)["loss"])
    return out


def _worker(rank, world_size):
    from megaspark.parallel import initialize_distributed

    results = {}
    for tp in TPS:
        initialize_distributed(tensor_model_parallel_size=tp)
        results[tp] = _vp_worker_part(tp)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 2)


@pytest.fixture(scope="module", params=TPS, ids=lambda tp: f"tp{tp}")
def res(request, runs):
    return runs[0][request.param]


def _ce(h, lm_head, labels):
    U = h.double() @ lm_head.double().t()
    return -U.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)


def test_dflash_d_loss_matches_the_independent_reference(res):
    """The original-DFlash objective (Convention D, CE only, no truncation) equals the
    independent dense reference of tests/reference.py."""
    assert res["dflash"]["loss"] == pytest.approx(res["reference_dflash"], rel=1e-5)


def test_item22_prefix_one_is_the_dflash_loss(res):
    a, b = res["vp_pi1"], res["dflash"]
    assert torch.equal(a["noise_ids"], b["noise_ids"]) and torch.equal(a["weights"], b["weights"])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    for k in b["grads"]:
        torch.testing.assert_close(a["grads"][k], b["grads"][k], rtol=1e-6, atol=1e-8)


def test_item22_sampled_prefixes_give_the_weighted_ce(res):
    r = res["vp"]
    pi = r["prefix"]
    assert int(pi.min()) >= 2 and int(pi.max()) <= 5 and len(set(pi.flatten().tolist())) > 1
    w = r["weights"].double()  # [b, N, B]
    k = torch.arange(w.shape[-1])
    assert w[k.expand_as(w) < pi[..., None]].eq(0).all()
    first = w.gather(2, pi[..., None]).squeeze(-1)
    assert (first[first > 0] == 1.0).all() and (first > 0).any()  # decay starts at π
    ce = _ce(r["h"], res["lm_head"], r["labels"]).reshape(w.shape)
    expected = float((w * ce).sum() / (w.sum() + EPS))
    assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert r["loss"] != pytest.approx(res["dflash"]["loss"], rel=1e-3)  # the prefixes matter


def test_vp_and_dflash_d_agree_across_tp(runs):
    one, two = runs[0][1], runs[0][2]
    for name in ("dflash", "vp_pi1", "vp"):
        assert one[name]["loss"] == pytest.approx(two[name]["loss"], rel=1e-5), name
        for k, g in one[name]["grads"].items():
            torch.testing.assert_close(two[name]["grads"][k], g, rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
    assert runs[0][2]["vp"]["loss"] == pytest.approx(runs[1][2]["vp"]["loss"], rel=1e-6)
