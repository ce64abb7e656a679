"""Worker of tests/test_sglang_colocated.py: one co-located SGLang provider per process
(SGLang initializes its runtime once per process), compared with the HF provider on the
same micro-batches. Prints one JSON line of findings; the test asserts on them.

usage: python tests/sglang_parity_worker.py MODEL [LAYER_ID ...]
"""
from __future__ import annotations

import json
import sys

import torch


def padded(samples, S):
    ids = torch.zeros(len(samples), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def main():
    model = sys.argv[1]
    layer_ids = [int(x) for x in sys.argv[2:]] or None
    torch.manual_seed(0)
    from megaspark.targets.hf import HFTargetProvider
    from megaspark.targets.sglang_colocated import SGLangColocatedProvider

    sgl = SGLangColocatedProvider(model, layer_ids=layer_ids, device="cpu", dtype=torch.float32,
                                  max_tokens=160)
    hf = HFTargetProvider(model, layer_ids=layer_ids, dtype=torch.float32, device="cpu")
    V = min(hf.vocab_size, len(hf.tokenizer))
    # unequal lengths; 4 samples = 226 tokens > max_tokens: two prefills in one compute()
    lengths = [64, 37, 12, 113]
    samples = [torch.randint(3, V, (n,)).tolist() for n in lengths]
    S = 128
    ids, mask = padded(samples, S)
    got = sgl.compute(ids, mask)
    ref = hf.compute(ids, mask)
    unmasked = hf.compute(ids)  # how the trainer calls the HF provider (right padding is causal-invisible)
    res = {"layer_ids": sgl.layer_ids, "hf_layer_ids": hf.layer_ids,
           "shapes": [list(got.aux_hidden_states.shape), list(got.last_hidden_states.shape)],
           "ref_shapes": [list(ref.aux_hidden_states.shape), list(ref.last_hidden_states.shape)],
           "dtypes": [str(got.aux_hidden_states.dtype), str(got.last_hidden_states.dtype)],
           "samples": []}
    for i, s in enumerate(samples):
        n = len(s)
        alone = hf.compute(torch.tensor([s]))  # HF's run of the sample by itself
        ga, gl = got.aux_hidden_states[i], got.last_hidden_states[i]
        res["samples"].append({
            "n": n,
            # bit-exact against HF's own run of this sample
            "aux_equal_alone": torch.equal(ga[:n], alone.aux_hidden_states[0]),
            "last_equal_alone": torch.equal(gl[:n], alone.last_hidden_states[0]),
            # against the HF provider's padded batch, and how far that batch is from HF alone
            "aux_vs_batch": (ga[:n] - ref.aux_hidden_states[i, :n]).abs().max().item(),
            "last_vs_batch": (gl[:n] - ref.last_hidden_states[i, :n]).abs().max().item(),
            "batch_vs_alone": max(
                (ref.aux_hidden_states[i, :n] - alone.aux_hidden_states[0]).abs().max().item(),
                (ref.last_hidden_states[i, :n] - alone.last_hidden_states[0]).abs().max().item()),
            "scale": ref.aux_hidden_states[i, :n].abs().max().item(),
            "zero_after_end": bool((ga[n:] == 0).all() and (gl[n:] == 0).all()),
            "equal_unmasked_batch": torch.equal(ga[:n], unmasked.aux_hidden_states[i, :n])
            and torch.equal(gl[:n], unmasked.last_hidden_states[i, :n]),
        })
    # no mask: every position is a token (as the HF provider)
    nomask = sgl.compute(ids[:1, :64])
    res["nomask_equal"] = torch.equal(nomask.aux_hidden_states[0], hf.compute(ids[:1, :64]).aux_hidden_states[0])
    try:
        SGLangColocatedProvider(model, layer_ids=layer_ids, device="cpu", max_tokens=64)
        res["second_runner"] = "built"
    except RuntimeError as e:
        res["second_runner"] = str(e)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
