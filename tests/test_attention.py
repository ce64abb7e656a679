"""The block-attention kernels agree with the literal dense mask (DSPARK_SPEC.md §3.4).

* ``flex``: FlexAttention with a BlockMask built from the anchors, the GPU kernel. On this
  CPU-only torch FlexAttention runs forward only (its backward raises "FlexAttention does
  not support backward on CPU"), so the backward of the compiled GPU kernel is not checked
  here; its forward is, in fp32 within 1e-5 of the dense mask, for GQA (g > 1) and the MLA
  shape (g = 1, a value width different from the query width), with dummy blocks and an
  anchor at position 0.
* ``structured`` sized by the host-known per-block context maxima (no device read-back)
  equals the same kernel reading them from the device, and the dense mask.
* ``sdpa`` (the CPU default: scaled_dot_product_attention per chunk of blocks) equals the
  dense mask forward and backward (gradients of q, k, v) in fp32, for every chunk size.
"""

from __future__ import annotations

import pytest
import torch

from megaspark.blocks import context_lengths, dense_attention_mask, sample_anchors
from megaspark.models.dspark.attention import (
    dense_mask_attention,
    flex_block_attention,
    sdpa_block_attention,
    structured_attention_with_keep,
)


def _case(seed: int, b=2, S=40, N=6, B=4, nkv=2, g=2, hd=16, hd_v=16):
    gen = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(b, S, dtype=torch.long)
    loss_mask[0, 0:S] = 1  # anchors anywhere, including position 0
    loss_mask[1, 30:34] = 1  # few candidates: dummy blocks
    anchors, keep = sample_anchors(loss_mask, N, generator=gen)
    R = N * B
    q = torch.randn(b, nkv, g, R, hd, generator=gen)
    k = torch.randn(b, nkv, S + R, hd, generator=gen)
    v = torch.randn(b, nkv, S + R, hd_v, generator=gen)
    return q, k, v, anchors, keep, S, B


@pytest.mark.parametrize("shape", [dict(nkv=2, g=2), dict(nkv=3, g=1, hd=24, hd_v=16)], ids=["gqa", "mla"])
@pytest.mark.parametrize("seed", [0, 1])
def test_flex_and_structured_equal_the_dense_mask(shape, seed):
    q, k, v, anchors, keep, S, B = _case(seed, **shape)
    assert not bool(keep[1].all()) and bool(keep[0].all())  # dummy blocks are exercised
    scale = 0.3
    allowed = dense_attention_mask(anchors, keep, S, B)
    ref = dense_mask_attention(q, k, v, allowed, scale=scale)
    lengths = context_lengths(anchors, keep)
    flex = flex_block_attention(q, k, v, lengths, keep, B, S, scale=scale)
    assert flex.dtype == q.dtype and flex.shape == ref.shape
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    host_max = tuple(lengths.amax(0).tolist())
    for chunk in (1, 2, 64):
        synced = structured_attention_with_keep(q, k, v, lengths, keep, B, S, chunk, scale=scale)
        hosted = structured_attention_with_keep(q, k, v, lengths, keep, B, S, chunk, scale=scale,
                                                block_context_max=host_max)
        torch.testing.assert_close(hosted, synced, atol=0, rtol=0)
        torch.testing.assert_close(hosted, ref, atol=1e-5, rtol=1e-5)


def test_flex_keeps_the_run_dtype():
    q, k, v, anchors, keep, S, B = _case(3)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    lengths = context_lengths(anchors, keep)
    out = flex_block_attention(q, k, v, lengths, keep, B, S)
    ref = dense_mask_attention(q.float(), k.float(), v.float(), dense_attention_mask(anchors, keep, S, B))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_flex_backward_is_refused_on_this_cpu():
    """The reason the GPU kernel's backward is not checked here (see the module docstring)."""
    q, k, v, anchors, keep, S, B = _case(4)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_block_attention(q, k, v, context_lengths(anchors, keep), keep, B, S)


@pytest.mark.parametrize("shape", [dict(nkv=2, g=2), dict(nkv=3, g=1, hd=24, hd_v=16)], ids=["gqa", "mla"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_equals_the_dense_mask_forward_and_backward(shape, seed):
    q, k, v, anchors, keep, S, B = _case(seed, **shape)
    assert not bool(keep[1].all())
    lengths = context_lengths(anchors, keep)
    allowed = dense_attention_mask(anchors, keep, S, B)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed + 9))

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    ref, ref_grads = run(lambda q, k, v: dense_mask_attention(q, k, v, allowed, scale=0.3))
    host_max = tuple(lengths.amax(0).tolist())
    for chunk in (1, 4, 64):
        for block_max in (None, host_max):
            out, grads = run(lambda q, k, v: sdpa_block_attention(q, k, v, lengths, keep, B, S, chunk, scale=0.3,
                                                                  block_context_max=block_max))
            assert out.dtype == q.dtype
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)
