#!/usr/bin/env python
"""Score a fixed batch with a DSpark draft: loss, its components and the training metrics.

The draft is an HF export directory or a megaspark training checkpoint (any layout); it
runs at TP = 1 in this single process, through exactly the code that trains it: blocks
from :func:`megaspark.blocks.build_blocks` with the draft's own settings, the draft
forward, :class:`megaspark.losses.LossSums`. So a checkpoint and its HF export must
print the same numbers.

The batch is a safetensors file (see :func:`megaspark.export.hf.save_batch`) holding
``input_ids`` and ``loss_mask`` [b, S], ``target_hidden_states`` (the tapped target
layers, [b, S, L·H]), ``target_last_hidden_states`` [b, S, H], ``anchors`` and ``keep``
[b, N].

    python tools/score_batch.py --draft export/smollm2 --batch batch.safetensors --json
    python tools/score_batch.py --draft checkpoints/smollm2 --save-example-batch batch.safetensors

``--save-example-batch`` writes a random batch of the right shapes for the draft
(random tokens and hidden states; useful for comparing two copies of one draft).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # allow `python tools/score_batch.py` from a checkout
    sys.path.insert(0, str(_REPO))


def draft_config(path: str):
    """The DSparkConfig of an HF export or a checkpoint, without building the model."""
    from megaspark.config import DSparkConfig
    from megaspark.export.hf import CONFIG_FILE, read_hf_config
    from megaspark.training.checkpointing import read_state

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return read_hf_config(path)[0]
    return DSparkConfig.from_dict(read_state(path)["dspark_config"])


def example_batch(dcfg, batch_size: int = 2, seq_length: int = 32, seed: int = 0) -> dict:
    """Random tokens / hidden states; the first quarter of each sequence is the prompt."""
    import torch

    from megaspark.blocks import sample_anchors

    g = torch.Generator().manual_seed(seed)
    b, S = batch_size, seq_length
    input_ids = torch.randint(0, dcfg.vocab_size, (b, S), generator=g)
    loss_mask = torch.zeros(b, S, dtype=torch.long)
    loss_mask[:, S // 4:] = 1
    aux = torch.randn(b, S, dcfg.context_width, generator=g)
    last = torch.randn(b, S, dcfg.hidden_size, generator=g)
    anchors, keep = sample_anchors(loss_mask, dcfg.num_anchors, generator=g)
    return dict(input_ids=input_ids, loss_mask=loss_mask, target_hidden_states=aux,
                target_last_hidden_states=last, anchors=anchors, keep=keep)


def score(model, dcfg, batch: dict, with_outputs: bool = False):
    """(results dict, outputs dict or None) of one batch at TP = 1."""
    import torch

    from megaspark.blocks import build_blocks
    from megaspark.losses import LOSS_EPS, reduce_metrics
    from megaspark.models.dspark.model import DraftInputs

    aux = batch["target_hidden_states"].float()
    if aux.shape[-1] != dcfg.context_width:
        raise ValueError(f"target_hidden_states has width {aux.shape[-1]}, the draft taps "
                         f"{len(dcfg.target_layer_ids)} layers of {dcfg.hidden_size} = {dcfg.context_width}")
    blocks = build_blocks(
        batch["input_ids"].long(), batch["loss_mask"].long(), batch["anchors"].long(), batch["keep"].bool(),
        block_size=dcfg.block_size, mask_token_id=dcfg.mask_token_id, gamma=dcfg.gamma,
        convention=dcfg.convention, truncate_eval_mask=dcfg.truncate_eval_mask,
    )
    inputs = DraftInputs.from_blocks(blocks, aux, batch["target_last_hidden_states"].float())
    with torch.no_grad():
        h = model(dataclasses.replace(inputs, labels=None))  # [b, N, B, H]
        sums = model.loss_sums(h, inputs)
        den = sums.denominator
        results = dict(
            loss=float(sums.loss(dcfg.alpha_ce, dcfg.alpha_l1, dcfg.alpha_conf)),
            ce_loss=float(sums.ce_sum / (den + LOSS_EPS)),
            l1_loss=float(sums.l1_sum / (den + LOSS_EPS)),
            confidence_loss=float(sums.conf_sum / (den + LOSS_EPS)),
            denominator=float(den),
            alphas=dict(ce=dcfg.alpha_ce, l1=dcfg.alpha_l1, confidence=dcfg.alpha_conf),
            convention=dcfg.convention,
            metrics=reduce_metrics([sums.metrics]),
        )
        outputs = None
        if with_outputs:
            feat, _, conf = model.heads(h, inputs.prev_ids)
            base = h.float() @ model.output_layer.weight.float().t()
            logits = base
            if feat is not None:  # the Markov bias W2·f (teacher-forced previous tokens)
                logits = base + feat.float() @ model.markov_head.markov_w2.weight.float().t()
            outputs = dict(h=h, base_logits=base, logits=logits)
            if conf is not None:
                outputs["confidence_logits"] = conf
    return results, outputs


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="score_batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True, help="HF export directory or megaspark checkpoint")
    p.add_argument("--batch", help="batch safetensors file to score")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--save-outputs", default=None,
                   help="also write h, base logits, logits with the Markov bias and confidence logits "
                        "(safetensors)")
    p.add_argument("--target-model", default=None,
                   help="target to take embed_tokens/lm_head from if the export does not ship them")
    g = p.add_argument_group("example batch")
    g.add_argument("--save-example-batch", default=None, metavar="PATH",
                   help="write a random batch for this draft to PATH and exit")
    g.add_argument("--batch-size", type=int, default=2)
    g.add_argument("--seq-length", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.batch and not args.save_example_batch:
        p.error("give --batch to score or --save-example-batch to write one")
    warnings.filterwarnings("ignore", module=r"megatron\.")

    from megaspark.export.hf import init_single_process_group, load_batch, load_draft, save_batch

    if args.save_example_batch:
        save_batch(args.save_example_batch, **example_batch(
            draft_config(args.draft), args.batch_size, args.seq_length, args.seed))
        print(f"wrote {args.save_example_batch}")
        return 0

    import torch
    from safetensors.torch import save_file

    from megaspark.parallel import destroy_distributed

    torch.manual_seed(0)
    init_single_process_group()
    try:
        model, dcfg = load_draft(args.draft, tp=1, target_model=args.target_model)
        results, outputs = score(model, dcfg, load_batch(args.batch), with_outputs=bool(args.save_outputs))
    finally:
        import torch

        if torch.distributed.is_initialized():
            destroy_distributed()
    results = _finite(dict(draft=args.draft, batch=args.batch, **results))
    if outputs is not None:
        save_file({k: v.contiguous() for k, v in outputs.items()}, args.save_outputs)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{args.draft} on {args.batch}: loss {results['loss']:.6f} = "
              f"{dcfg.alpha_ce} x CE {results['ce_loss']:.6f} + {dcfg.alpha_l1} x L1 {results['l1_loss']:.6f}"
              f" + {dcfg.alpha_conf} x confidence {results['confidence_loss']:.6f} "
              f"(denominator {results['denominator']:.4f})")
        for k, v in results["metrics"].items():
            print(f"  {k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
