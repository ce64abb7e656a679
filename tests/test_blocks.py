"""Tests for megaspark.blocks against the worked numbers of DSPARK_SPEC §13 and brute-force
per-element references of §3.1–§3.7 and §10."""
import math

import pytest
import torch

from megaspark.blocks import (
    CONVENTIONS,
    Blocks,
    anchor_candidates,
    build_blocks,
    context_lengths,
    decay_weights,
    dense_attention_mask,
    prefix_length_pmf,
    sample_anchors,
    sample_prefix_lengths,
)

M = 999  # mask token id used throughout
EXAMPLE_MASK = [0, 0, 1, 1, 1, 0, 1, 1, 1, 1]  # §13 item 7


def example_inputs():
    loss_mask = torch.tensor([EXAMPLE_MASK])
    input_ids = torch.arange(10).unsqueeze(0) + 100  # token id = 100 + position
    return input_ids, loss_mask


def build(anchors, keep=None, *, input_ids=None, loss_mask=None, **kw):
    if input_ids is None:
        input_ids, loss_mask = example_inputs()
    anchors = torch.as_tensor(anchors).reshape(input_ids.shape[0], -1)
    keep = torch.ones_like(anchors, dtype=torch.bool) if keep is None else torch.tensor([keep])
    kw.setdefault("mask_token_id", M)
    return build_blocks(input_ids, loss_mask, anchors, keep, **kw)


def random_batch(seed, bt=3, s=40, n=12, p=0.75):
    g = torch.Generator().manual_seed(seed)
    loss_mask = (torch.rand(bt, s, generator=g) < p).long()
    input_ids = torch.randint(0, 500, (bt, s), generator=g)
    anchors, keep = sample_anchors(loss_mask, n, g)
    return g, input_ids, loss_mask, anchors, keep


# ------------------------------------------------------------------------------------------
# §13 item 1: decay weights
# ------------------------------------------------------------------------------------------

def test_decay_weights_convention_s():
    w = decay_weights(7, 4.0)
    ref = [1, 0.778801, 0.606531, 0.472367, 0.367879, 0.286505, 0.223130]
    assert w.dtype == torch.float32 and w.shape == (7,)
    torch.testing.assert_close(w, torch.tensor(ref), atol=1e-6, rtol=0)
    assert abs(float(w.sum()) - 3.735212) < 1e-5


def test_decay_weights_convention_d():
    w = decay_weights(16, 7.0, "D")
    assert w.shape == (16,)
    assert float(w[0]) == 1.0 and float(w[1]) == 1.0
    assert abs(float(w[2]) - 0.8669) < 1e-4
    assert abs(float(w[3]) - 0.7515) < 1e-4
    assert abs(float(w[15]) - 0.1353) < 1e-4
    torch.testing.assert_close(w[1:], decay_weights(15, 7.0, "S"))


@pytest.mark.parametrize("gamma", [None, 0.0, -1.0])
def test_decay_weights_disabled(gamma):
    for conv in CONVENTIONS:
        assert torch.equal(decay_weights(5, gamma, conv), torch.ones(5))


def test_decay_weights_dtype():
    assert decay_weights(3, 4.0, dtype=torch.float64).dtype == torch.float64


# ------------------------------------------------------------------------------------------
# §13 item 7: anchor sampler
# ------------------------------------------------------------------------------------------

def test_anchor_candidates_example():
    cand = anchor_candidates(torch.tensor([EXAMPLE_MASK]))
    assert cand.dtype == torch.bool
    assert cand[0].nonzero().flatten().tolist() == [2, 3, 6, 7, 8]


def test_sampler_worked_example():
    anchors, keep = sample_anchors(torch.tensor([EXAMPLE_MASK]), 8)
    assert anchors.dtype == torch.long and keep.dtype == torch.bool
    assert anchors.tolist() == [[2, 3, 6, 7, 8, 0, 0, 0]]
    assert keep.tolist() == [[True] * 5 + [False] * 3]


@pytest.mark.parametrize("seq_len", [0, 1])
def test_sampler_tiny_sequences_all_dummy(seq_len):
    anchors, keep = sample_anchors(torch.ones(2, seq_len, dtype=torch.long), 4)
    assert anchors.shape == (2, 4) and not keep.any() and not anchors.any()


def test_sampler_no_candidates():
    lm = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]])
    anchors, keep = sample_anchors(lm, 3)
    assert not keep.any() and not anchors.any()


@pytest.mark.parametrize("seed", range(6))
def test_sampler_properties_random(seed):
    g = torch.Generator().manual_seed(seed)
    bt, s = 5, 60
    lm = (torch.rand(bt, s, generator=g) < [0.2, 0.5, 0.8, 0.95, 1.0][seed % 5]).long()
    n = [3, 8, 25, 64, 100, 7][seed]
    anchors, keep = sample_anchors(lm, n, g)
    assert anchors.shape == (bt, n) and keep.shape == (bt, n)
    cand = anchor_candidates(lm)
    for b in range(bt):
        n_b = min(int(cand[b].sum()), n)
        assert keep[b].tolist() == [True] * n_b + [False] * (n - n_b)
        kept = anchors[b, :n_b].tolist()
        assert all(0 <= a <= s - 2 and lm[b, a] == 1 and lm[b, a + 1] == 1 for a in kept)
        assert all(x < y for x, y in zip(kept, kept[1:]))  # strictly increasing => unique
        assert anchors[b, n_b:].eq(0).all()


def test_sampler_reproducible_and_random():
    lm = torch.ones(2, 200, dtype=torch.long)
    a1, _ = sample_anchors(lm, 10, torch.Generator().manual_seed(7))
    a2, _ = sample_anchors(lm, 10, torch.Generator().manual_seed(7))
    a3, _ = sample_anchors(lm, 10, torch.Generator().manual_seed(8))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)
    assert not torch.equal(a1[0], a1[1])  # rows are drawn independently


def test_sampler_roughly_uniform():
    # 1000 draws of 2 of 5 candidates: every candidate is chosen with probability 2/5.
    lm = torch.tensor([EXAMPLE_MASK]).expand(1000, 10)
    anchors, keep = sample_anchors(lm, 2, torch.Generator().manual_seed(0))
    assert keep.all()
    freq = torch.bincount(anchors.flatten(), minlength=10).float() / 1000
    for a in [2, 3, 6, 7, 8]:
        assert abs(float(freq[a]) - 0.4) < 0.06
    assert float(freq[[0, 1, 4, 5, 9]].sum()) == 0


# caller-supplied anchors ------------------------------------------------------------------

def test_caller_anchors_sorted_and_padded():
    lm = torch.tensor([EXAMPLE_MASK, EXAMPLE_MASK])
    given = torch.tensor([[7, -1, 2], [-1, -1, -1]])
    anchors, keep = sample_anchors(lm, 5, anchors=given)
    assert anchors.tolist() == [[2, 7, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert keep.tolist() == [[True, True, False, False, False], [False] * 5]


@pytest.mark.parametrize("bad", [4, 5, 9, 0, 10, 1])
def test_caller_anchors_non_candidate_raises(bad):
    lm = torch.tensor([EXAMPLE_MASK, EXAMPLE_MASK])
    given = torch.tensor([[2, 3], [6, bad]])
    with pytest.raises(ValueError, match=rf"anchor {bad} of sample 1"):
        sample_anchors(lm, 4, anchors=given)


def test_caller_anchors_duplicate_raises():
    with pytest.raises(ValueError, match="appears twice"):
        sample_anchors(torch.tensor([EXAMPLE_MASK]), 4, anchors=torch.tensor([[3, 6, 3]]))


def test_caller_anchors_bad_shape_raises():
    lm = torch.tensor([EXAMPLE_MASK])
    with pytest.raises(ValueError, match="width"):
        sample_anchors(lm, 2, anchors=torch.tensor([[2, 3, 6]]))
    with pytest.raises(ValueError):
        sample_anchors(lm, 4, anchors=torch.tensor([[2], [3]]))
    with pytest.raises(ValueError):
        sample_anchors(lm, 4, anchors=torch.tensor([[2.0]]))


# ------------------------------------------------------------------------------------------
# §13 items 8, 9, 10: eval mask, label/prev/aligned indices, noise ids and positions
# ------------------------------------------------------------------------------------------

def test_eval_mask_truncation_example():
    blocks = build([2, 3, 7, 8], block_size=3, gamma=4.0)
    assert isinstance(blocks, Blocks)
    assert blocks.valid.int().tolist() == [[[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 0, 0]]]
    assert blocks.eval_mask.int().tolist() == [[[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]]
    assert blocks.weights.dtype == torch.float32
    assert abs(float(blocks.weights.sum()) - 5.557602) < 1e-5
    untrunc = build([2, 3, 7, 8], block_size=3, truncate_eval_mask=False)
    assert torch.equal(untrunc.eval_mask, untrunc.valid)
    assert untrunc.eval_mask.int().tolist()[0][1] == [1, 0, 1]


def test_label_prev_aligned_indices_example():
    blocks = build([2, 3, 7, 8, 0, 0], [True] * 4 + [False] * 2, block_size=3)
    x = torch.arange(10) + 100
    kept_labels = [[3, 4, 5], [4, 5, 6], [8, 9, 9], [9, 9, 9]]
    assert blocks.label_index[0, :4].tolist() == kept_labels
    assert blocks.labels[0, :4].tolist() == [[int(x[p]) for p in row] for row in kept_labels]
    prev_positions = [[2, 3, 4], [3, 4, 5], [7, 8, 9], [8, 9, 9]]
    assert blocks.prev_ids[0, :4].tolist() == [[int(x[p]) for p in r] for r in prev_positions]
    assert blocks.aligned_index[0, :4].tolist() == [[2, 3, 4], [3, 4, 5], [7, 8, 8], [8, 8, 8]]
    # dummy blocks: label index 0, aligned index 0, nothing valid, weight 0
    assert blocks.label_index[0, 4:].eq(0).all() and blocks.aligned_index[0, 4:].eq(0).all()
    assert not blocks.valid[0, 4:].any() and blocks.weights[0, 4:].eq(0).all()
    assert blocks.num_anchors == 6 and blocks.seq_len == 10 and blocks.batch_size == 1


def test_noise_ids_and_positions_example():
    blocks = build([2, 7, 5], [True, True, False], block_size=3)
    assert blocks.noise_ids.tolist() == [[102, M, M, 107, M, M, M, M, M]]
    # dummy anchors are normalised to 0, so dummy blocks sit at positions 0..B-1
    assert blocks.anchors.tolist() == [[2, 7, 0]]
    assert blocks.position_ids.tolist() == [list(range(10)) + [2, 3, 4, 7, 8, 9, 0, 1, 2]]


# ------------------------------------------------------------------------------------------
# §13 item 11: attention mask
# ------------------------------------------------------------------------------------------

def reference_mask(anchors, keep, s, bsz):
    bt, n = anchors.shape
    out = torch.zeros(bt, n * bsz, s + n * bsz, dtype=torch.bool)
    for b in range(bt):
        for q in range(n * bsz):
            j = q // bsz
            if not keep[b, j]:
                continue
            for kk in range(s + n * bsz):
                out[b, q, kk] = kk < int(anchors[b, j]) if kk < s else (kk - s) // bsz == j
    return out


def test_attention_mask_matches_reference_and_invariants():
    _, _, lm, anchors, keep = random_batch(3, bt=2, s=17, n=5, p=0.6)
    s, bsz = 17, 3
    mask = dense_attention_mask(anchors, keep, s, bsz)
    assert mask.dtype == torch.bool and mask.shape == (2, 15, 17 + 15)
    assert torch.equal(mask, reference_mask(anchors, keep, s, bsz))
    ctx = context_lengths(anchors, keep)
    for b in range(2):
        for j in range(5):
            rows = mask[b, j * bsz : (j + 1) * bsz]
            if keep[b, j]:
                a = int(anchors[b, j])
                assert rows.sum(-1).eq(a + bsz).all()
                assert not rows[:, a].any()  # never the anchor's own context position
                own = torch.zeros(5 * bsz, dtype=torch.bool)
                own[j * bsz : (j + 1) * bsz] = True
                assert rows[:, s:].eq(own).all()  # own block only, including later slots
            else:
                assert not rows.any()
    # structured form agrees with the dense one
    assert ctx.dtype == torch.long
    assert torch.equal(mask[:, ::bsz, :s].sum(-1), ctx)
    assert torch.equal(ctx, torch.where(keep, anchors, 0))


def test_attention_mask_example():
    keep = torch.tensor([[True, True, False]])
    mask = dense_attention_mask(torch.tensor([[2, 7, 0]]), keep, 10, 2)
    assert mask[0].sum(-1).tolist() == [4, 4, 9, 9, 0, 0]
    assert mask[0, 0, :10].nonzero().flatten().tolist() == [0, 1]
    assert mask[0, 3, 10:].nonzero().flatten().tolist() == [2, 3]


# ------------------------------------------------------------------------------------------
# §13 item 17: per-position counts
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_counts_non_increasing(seed):
    _, x, lm, anchors, keep = random_batch(seed, bt=4, s=64, n=20, p=0.8)
    for conv in CONVENTIONS:
        blocks = build_blocks(x, lm, anchors, keep, block_size=6, mask_token_id=M, convention=conv)
        count = blocks.eval_mask.sum(dim=(0, 1))
        assert (count[1:] <= count[:-1]).all() if conv == "S" else (count[2:] <= count[1:-1]).all()
        first = 0 if conv == "S" else 1  # first supervised slot of a sampled block
        assert int(count[first]) == int(keep.sum())
        if conv == "D":
            assert int(count[0]) == 0


# ------------------------------------------------------------------------------------------
# brute-force reference for build_blocks (§3.2–§3.7, §10)
# ------------------------------------------------------------------------------------------

def reference_blocks(x, lm, anchors, keep, bsz, conv, gamma, truncate, prefix):
    bt, s = x.shape
    n = anchors.shape[1]
    out = {k: [[[0] * bsz for _ in range(n)] for _ in range(bt)] for k in
           ("label_index", "labels", "prev_ids", "aligned_index", "valid", "eval_mask", "weights")}
    noise = [[M] * (n * bsz) for _ in range(bt)]
    for b in range(bt):
        for j in range(n):
            kp = bool(keep[b, j])
            a = int(anchors[b, j]) if kp else 0
            pi = int(prefix[b, j]) if prefix is not None else 1
            running = True
            for k in range(bsz):
                lam = a + 1 + k if conv == "S" else a + k
                lh = min(lam, s - 1) if kp else 0
                v = kp and lam < s and bool(lm[b, lh])
                if conv == "D":
                    v = v and k >= pi
                if prefix is not None or not truncate:
                    e = v
                elif conv == "D" and k == 0:
                    e = False
                else:
                    running = running and v
                    e = running
                if gamma is None or gamma <= 0:
                    w = 1.0
                else:
                    shift = k if conv == "S" else max(k - pi, 0)
                    w = math.exp(-shift / gamma)
                out["label_index"][b][j][k] = lh
                out["labels"][b][j][k] = int(x[b, lh])
                out["prev_ids"][b][j][k] = int(x[b, a]) if k == 0 else out["labels"][b][j][k - 1]
                out["aligned_index"][b][j][k] = max(lh - 1, 0)
                out["valid"][b][j][k] = v
                out["eval_mask"][b][j][k] = e
                out["weights"][b][j][k] = w if e else 0.0
                if kp and k < pi and a + k < s:
                    noise[b][j * bsz + k] = int(x[b, a + k])
    return out, noise


@pytest.mark.parametrize("conv,truncate,vp", [
    ("S", True, False), ("S", False, False), ("D", True, False), ("D", False, False),
    ("D", True, True),
])
@pytest.mark.parametrize("seed", range(3))
def test_build_blocks_matches_reference(conv, truncate, vp, seed):
    g, x, lm, anchors, keep = random_batch(seed, bt=3, s=30, n=9, p=0.7)
    bsz, gamma = 5, [4.0, 7.0, None][seed]
    prefix = sample_prefix_lengths(anchors.shape, bsz, generator=g) if vp else None
    blocks = build_blocks(x, lm, anchors, keep, block_size=bsz, mask_token_id=M, gamma=gamma,
                          convention=conv, truncate_eval_mask=truncate, prefix_lengths=prefix)
    ref, noise = reference_blocks(x, lm, anchors, keep, bsz, conv, gamma, truncate, prefix)
    for name in ("label_index", "labels", "prev_ids", "aligned_index"):
        t = getattr(blocks, name)
        assert t.dtype == torch.long and t.tolist() == ref[name], name
    assert blocks.valid.tolist() == ref["valid"]
    assert blocks.eval_mask.tolist() == ref["eval_mask"]
    torch.testing.assert_close(blocks.weights, torch.tensor(ref["weights"], dtype=torch.float32))
    assert blocks.noise_ids.tolist() == noise
    assert blocks.block_size == bsz and blocks.convention == conv


def test_loss_mask_dtypes_equivalent():
    x, lm = example_inputs()
    a = torch.tensor([[2, 3, 7, 8]])
    keep = torch.ones(1, 4, dtype=torch.bool)
    ref = build_blocks(x, lm, a, keep, block_size=3, mask_token_id=M)
    for lm2 in (lm.bool(), lm.float(), lm.int()):
        b = build_blocks(x, lm2, a, keep, block_size=3, mask_token_id=M)
        assert torch.equal(b.eval_mask, ref.eval_mask) and torch.equal(b.weights, ref.weights)


# ------------------------------------------------------------------------------------------
# Convention D (§3.7)
# ------------------------------------------------------------------------------------------

def test_convention_d_example():
    # anchor 1 is not a sampler candidate (loss_mask[1] = 0) but build_blocks accepts it: its
    # slot-0 label is unsupervised, which must not truncate the rest of the block.
    blocks = build([2, 3, 6, 7, 1], block_size=4, convention="D", gamma=7.0)
    assert blocks.label_index[0].tolist() == [[2, 3, 4, 5], [3, 4, 5, 6], [6, 7, 8, 9],
                                              [7, 8, 9, 9], [1, 2, 3, 4]]
    assert blocks.valid[0].int().tolist() == [[0, 1, 1, 0], [0, 1, 0, 1], [0, 1, 1, 1],
                                              [0, 1, 1, 0], [0, 1, 1, 1]]
    assert blocks.eval_mask[0].int().tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1],
                                                  [0, 1, 1, 0], [0, 1, 1, 1]]
    assert blocks.aligned_index[0, 2].tolist() == [5, 6, 7, 8]
    assert blocks.prev_ids[0, 2].tolist() == [106, 106, 107, 108]
    w = decay_weights(4, 7.0, "D")
    torch.testing.assert_close(blocks.weights[0, 2], w * torch.tensor([0.0, 1, 1, 1]))
    assert float(blocks.weights[0, 2, 1]) == 1.0  # first predicted slot has weight 1
    # same noise ids / positions as convention S
    s_blocks = build([2, 3, 6, 7, 1], block_size=4)
    assert torch.equal(blocks.noise_ids, s_blocks.noise_ids)
    assert torch.equal(blocks.position_ids, s_blocks.position_ids)


def test_convention_d_slot0_never_valid():
    _, x, lm, anchors, keep = random_batch(11, bt=4, s=50, n=15, p=0.9)
    for truncate in (True, False):
        b = build_blocks(x, lm, anchors, keep, block_size=7, mask_token_id=M, convention="D",
                         truncate_eval_mask=truncate)
        assert not b.valid[..., 0].any() and not b.eval_mask[..., 0].any()
        assert b.weights[..., 0].eq(0).all()


# ------------------------------------------------------------------------------------------
# §10 / §13 item 22: VP-drafter
# ------------------------------------------------------------------------------------------

BETA_REF = [0.1297, 0.1167, 0.1050, 0.0945, 0.0851, 0.0766, 0.0689, 0.0620, 0.0558, 0.0502,
            0.0452, 0.0407, 0.0366, 0.0330]


def test_prefix_pmf_matches_spec():
    pmf = prefix_length_pmf(16, 0.9)
    assert pmf[:2].eq(0).all()
    ref = torch.tensor(BETA_REF, dtype=torch.float64)
    torch.testing.assert_close(pmf[2:], ref, atol=1e-4, rtol=0)
    assert abs(float(pmf.sum()) - 1) < 1e-12


def test_prefix_sampling_frequencies():
    pi = sample_prefix_lengths((400, 500), 16, 0.9, torch.Generator().manual_seed(0))
    assert pi.shape == (400, 500) and pi.dtype == torch.long
    freq = torch.bincount(pi.flatten(), minlength=16).double() / pi.numel()
    torch.testing.assert_close(freq, prefix_length_pmf(16, 0.9), atol=3e-3, rtol=0)


@pytest.mark.parametrize("bsz", [2, 3, 4, 7, 16])
def test_prefix_range(bsz):
    pi = sample_prefix_lengths(2000, bsz, 0.9, torch.Generator().manual_seed(bsz))
    lo = min(2, bsz - 1)
    assert int(pi.min()) >= lo and int(pi.max()) <= bsz - 1
    if bsz >= 4:
        assert set(pi.tolist()) == set(range(lo, bsz))  # every value actually occurs


def test_prefix_sampling_reproducible():
    a = sample_prefix_lengths((3, 4), 16, generator=torch.Generator().manual_seed(1))
    b = sample_prefix_lengths((3, 4), 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_vp_slots_example():
    # all-supervised sequence, B = 6, anchors 1 and 6 (the second runs off the end at S = 10)
    x = torch.arange(10).unsqueeze(0) + 100
    lm = torch.ones(1, 10, dtype=torch.long)
    pi = torch.tensor([[3, 2, 4]])
    b = build([1, 6, 0], [True, True, False], input_ids=x, loss_mask=lm, block_size=6,
              convention="D", gamma=7.0, prefix_lengths=pi)
    assert b.noise_ids.tolist() == [[101, 102, 103, M, M, M, 106, 107, M, M, M, M] + [M] * 6]
    assert b.eval_mask.int().tolist() == [[[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0] * 6]]
    assert float(b.weights[0, 0, 3]) == 1.0 and float(b.weights[0, 1, 2]) == 1.0
    torch.testing.assert_close(b.weights[0, 0, 3:], torch.exp(-torch.arange(3.0) / 7.0))
    assert torch.equal(b.prefix_lengths, pi)


def test_vp_properties_random():
    g, x, lm, anchors, keep = random_batch(5, bt=4, s=80, n=16, p=0.85)
    bsz = 16
    pi = sample_prefix_lengths(anchors.shape, bsz, generator=g)
    b = build_blocks(x, lm, anchors, keep, block_size=bsz, mask_token_id=M, gamma=7.0,
                     convention="D", prefix_lengths=pi)
    k = torch.arange(bsz)
    before = k < pi[..., None]
    assert b.weights[before.expand_as(b.weights)].eq(0).all()
    noise = b.noise_ids.reshape(4, 16, bsz)
    pos = b.anchors[..., None] + k
    real = x.gather(1, pos.clamp(max=79).reshape(4, -1)).reshape(pos.shape)
    shown = before & keep[..., None] & (pos < 80)
    assert torch.equal(noise[shown], real[shown])
    assert noise[~shown].eq(M).all()
    first = b.weights.gather(2, pi[..., None]).squeeze(-1)  # slot k = π
    valid_first = b.valid.gather(2, pi[..., None]).squeeze(-1)
    assert first[valid_first].eq(1.0).all() and valid_first.any()


@pytest.mark.parametrize("seed", range(3))
def test_vp_prefix_one_equals_dflash(seed):
    _, x, lm, anchors, keep = random_batch(seed, bt=3, s=60, n=14, p=0.8)
    kw = dict(block_size=16, mask_token_id=M, gamma=7.0, convention="D")
    vp = build_blocks(x, lm, anchors, keep, prefix_lengths=torch.ones_like(anchors), **kw)
    dflash = build_blocks(x, lm, anchors, keep, truncate_eval_mask=False, **kw)
    for name in ("anchors", "keep", "noise_ids", "position_ids", "label_index", "labels",
                 "prev_ids", "aligned_index", "valid", "eval_mask", "weights"):
        assert torch.equal(getattr(vp, name), getattr(dflash, name)), name
    # hence the VP loss Σω·ce/(Σω+1e-6) equals the DFlash loss
    ce = torch.rand(vp.weights.shape, generator=torch.Generator().manual_seed(seed))
    loss = lambda w: (w * ce).sum() / (w.sum() + 1e-6)
    assert float(loss(vp.weights)) == float(loss(dflash.weights))


# ------------------------------------------------------------------------------------------
# argument validation
# ------------------------------------------------------------------------------------------

def test_bad_arguments():
    x, lm = example_inputs()
    a = torch.tensor([[2, 3]])
    keep = torch.ones(1, 2, dtype=torch.bool)
    ok = dict(block_size=3, mask_token_id=M)
    build_blocks(x, lm, a, keep, **ok)  # sanity: valid call works
    cases = [
        (dict(block_size=0), "block_size"),
        (dict(mask_token_id=-1), "mask_token_id"),
        (dict(convention="X"), "convention"),
        (dict(prefix_lengths=torch.ones(1, 2, dtype=torch.long)), "convention 'D'"),
        (dict(convention="D", prefix_lengths=torch.ones(1, 3, dtype=torch.long)), "shape"),
        (dict(convention="D", prefix_lengths=torch.full((1, 2), 3)), r"\[1, B-1"),
        (dict(convention="D", prefix_lengths=torch.zeros(1, 2, dtype=torch.long)), r"\[1, B-1"),
    ]
    for override, msg in cases:
        with pytest.raises(ValueError, match=msg):
            build_blocks(x, lm, a, keep, **{**ok, **override})
    with pytest.raises(ValueError, match="shape"):
        build_blocks(x, lm[:, :9], a, keep, **ok)
    with pytest.raises(ValueError, match="keep shape"):
        build_blocks(x, lm, a, keep[:, :1], **ok)
    with pytest.raises(ValueError, match="bool"):
        build_blocks(x, lm, a, keep.long(), **ok)
    with pytest.raises(ValueError, match="batch size"):
        build_blocks(x, lm, a.expand(2, 2), keep.expand(2, 2), **ok)
    with pytest.raises(ValueError, match="outside"):
        build_blocks(x, lm, torch.tensor([[2, 10]]), keep, **ok)
    with pytest.raises(ValueError, match="integer"):
        build_blocks(x.float(), lm, a, keep, **ok)
    # out-of-range anchors are fine in dummy slots
    build_blocks(x, lm, torch.tensor([[2, 10]]), torch.tensor([[True, False]]), **ok)

    with pytest.raises(ValueError, match="num_anchors"):
        sample_anchors(lm, 0)
    with pytest.raises(ValueError, match="loss_mask"):
        sample_anchors(lm[0], 4)
    with pytest.raises(ValueError, match="block_size"):
        decay_weights(0, 4.0)
    with pytest.raises(ValueError, match="convention"):
        decay_weights(3, 4.0, "s")
    with pytest.raises(ValueError, match="block_size"):
        sample_prefix_lengths(4, 1)
    with pytest.raises(ValueError, match="prefix_weight_base"):
        sample_prefix_lengths(4, 16, 0.0)
    with pytest.raises(ValueError, match="block_size"):
        dense_attention_mask(a, keep, 10, 0)
    with pytest.raises(ValueError, match="keep shape"):
        dense_attention_mask(a, keep[:, :1], 10, 2)
    with pytest.raises(ValueError, match="keep shape"):
        context_lengths(a, keep[:, :1])


# ------------------------------------------------------------------------------------------
# scale: the production shapes run vectorised (S = 4096, N = 512, B = 16)
# ------------------------------------------------------------------------------------------

def test_production_shapes():
    g = torch.Generator().manual_seed(0)
    bt, s, n, bsz = 2, 4096, 512, 16
    lm = (torch.rand(bt, s, generator=g) < 0.9).long()
    x = torch.randint(0, 150_000, (bt, s), generator=g)
    anchors, keep = sample_anchors(lm, n, g)
    assert keep.all()
    b = build_blocks(x, lm, anchors, keep, block_size=bsz, mask_token_id=M)
    assert b.noise_ids.shape == (bt, n * bsz) and b.position_ids.shape == (bt, s + n * bsz)
    assert b.weights.shape == (bt, n, bsz)
    mask = dense_attention_mask(anchors[:1], keep[:1], s, bsz)
    assert torch.equal(mask[0, ::bsz, :s].sum(-1), anchors[0])
