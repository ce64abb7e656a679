#!/usr/bin/env python
"""Score a fixed batch with a DSpark draft: loss, its components and the training metrics.

The draft is an HF export directory or a megaspark training checkpoint (any layout); it
runs at TP = 1 in this single process, through exactly the code that trains it: blocks
from :func:`megaspark.blocks.build_blocks` with the draft's own settings, the draft
forward, :class:`megaspark.losses.LossSums`. So a checkpoint and its HF export must
print the same numbers.

The batch is a safetensors file (see :func:`megaspark.export.score_batch.save_batch`) holding
``input_ids`` and ``loss_mask`` [b, S], ``target_hidden_states`` (the tapped target
layers, [b, S, L·H]), ``target_last_hidden_states`` [b, S, H], ``anchors`` and ``keep``
[b, N].

A batch dumped from a DeepSpec run (github.com/deepseek-ai/DeepSpec, the reference DSpark
trainer) scores as is, as a safetensors file or a ``torch.save`` dict (``.pt``):
``--batch-format auto`` (the default) tells the two apart by their keys; ``megaspark`` or
``deepspec`` forces one. DeepSpec's names, from ``deepspec/data/target_cache_dataset.py``
(``CacheCollator``) and ``deepspec/modeling/dspark/common.py`` (``sample_anchor_positions``,
called inside the draft's forward, so dump its two outputs with the batch):

    DeepSpec                                    megaspark
    input_ids [b, S] int32                      input_ids [b, S]
    loss_mask [b, S] uint8                      loss_mask [b, S]
    target_hidden_states [b, S, L·H] bf16       target_hidden_states [b, S, L·H]
    target_last_hidden_states [b, S, H] bf16    target_last_hidden_states [b, S, H]
    anchor_positions [b, N] int64               anchors [b, N]
    block_keep_mask [b, N] bool                 keep [b, N]
    attention_mask [b, S] (ignored: DeepSpec's DSpark forward does not read it)

The layouts agree: hidden states are the tapped layers concatenated along the last
dimension in ``target_layer_ids`` order, anchors are sorted ascending with the kept ones
first and dummy slots at position 0 with keep False. Loading converts only dtypes (ids,
masks and anchors to int64, keep to bool, hidden states to float32; bf16 -> float32 is
exact), so the same tensors give the same numbers in either format.

    python tools/score_batch.py --draft export/smollm2 --batch batch.safetensors --json
    python tools/score_batch.py --draft export/smollm2 --batch deepspec_batch.pt --batch-format deepspec
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
    from megaspark.checkpoint_files import read_state
    from megaspark.config import DSparkConfig
    from megaspark.export.files import CONFIG_FILE, read_hf_config

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return read_hf_config(path)[0]
    return DSparkConfig.from_dict(read_state(path)["dspark_config"])


# =======================================================================================
# Batch formats
# =======================================================================================

#: our batch tensors (the same as megaspark.export.score_batch.BATCH_TENSORS)
MEGASPARK_KEYS = ("input_ids", "loss_mask", "target_hidden_states", "target_last_hidden_states",
                  "anchors", "keep")
#: DeepSpec name -> ours (deepspec/data/target_cache_dataset.py CacheCollator;
#: deepspec/modeling/dspark/common.py sample_anchor_positions / DSparkForwardOutput)
DEEPSPEC_KEYS = {
    "input_ids": "input_ids",
    "loss_mask": "loss_mask",
    "target_hidden_states": "target_hidden_states",
    "target_last_hidden_states": "target_last_hidden_states",
    "anchor_positions": "anchors",
    "block_keep_mask": "keep",
}
#: our key -> (kind, expected rank): "int" -> int64, "float" -> float32, 0/1 masks ("mask" ->
#: int64, "bool" -> bool; of any dtype, as DeepSpec reads loss_mask as `> 0.5`)
_LAYOUT = {
    "input_ids": ("int", 2), "loss_mask": ("mask", 2),
    "target_hidden_states": ("float", 3), "target_last_hidden_states": ("float", 3),
    "anchors": ("int", 2), "keep": ("bool", 2),
}
BATCH_FORMATS = ("auto", "megaspark", "deepspec")
_FORMAT_KEYS = {"megaspark": tuple(MEGASPARK_KEYS), "deepspec": tuple(DEEPSPEC_KEYS)}


class BatchFormatError(ValueError):
    """A batch that is neither format, or whose tensors have the wrong rank / values."""


def _expected_keys_text() -> str:
    return "; ".join(f"{name} format: {', '.join(keys)}" for name, keys in _FORMAT_KEYS.items())


def detect_batch_format(keys) -> str:
    """``"megaspark"`` or ``"deepspec"`` from the key names (BatchFormatError if neither or both)."""
    keys = set(keys)
    complete = [name for name, need in _FORMAT_KEYS.items() if set(need) <= keys]
    if len(complete) == 1:
        return complete[0]
    if not complete:
        missing = "; ".join(f"{name} lacks {[k for k in need if k not in keys]}"
                            for name, need in _FORMAT_KEYS.items())
        hint = ""
        if not ({"anchors", "anchor_positions"} & keys):
            hint = (" (DeepSpec samples anchor_positions / block_keep_mask inside the draft's "
                    "forward with sample_anchor_positions: dump them with the batch)")
        raise BatchFormatError(
            f"batch has keys {sorted(keys)}, which is neither format ({missing}){hint}. "
            f"Expected keys: {_expected_keys_text()}")
    raise BatchFormatError(
        f"batch has the keys of both formats ({sorted(keys)}); pass --batch-format megaspark or deepspec")


def _convert(name: str, tensor, source: str):
    import torch

    kind, rank = _LAYOUT[name]
    if not isinstance(tensor, torch.Tensor):
        raise BatchFormatError(f"{source} is a {type(tensor).__name__}, not a tensor")
    if tensor.dim() != rank:
        raise BatchFormatError(f"{source} must have {rank} dimensions, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().cpu()
    if kind == "float":
        if not tensor.is_floating_point():
            raise BatchFormatError(f"{source} must be floating point, got {tensor.dtype}")
        return tensor.float()
    if kind in ("mask", "bool"):
        if tensor.is_complex() or (tensor.dtype != torch.bool and bool(((tensor != 0) & (tensor != 1)).any())):
            raise BatchFormatError(f"{source} must be a 0/1 mask, got values {tensor.unique().tolist()[:8]}")
        return tensor.bool() if kind == "bool" else tensor.long()
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise BatchFormatError(f"{source} must be an integer tensor, got {tensor.dtype}")
    return tensor.long()


def normalize_batch(raw: dict, batch_format: str = "auto") -> dict:
    """Our batch dict (keys MEGASPARK_KEYS, int64 / bool / float32) from a megaspark or a
    DeepSpec batch dict; ``batch_format`` is ``auto``, ``megaspark`` or ``deepspec``."""
    if batch_format not in BATCH_FORMATS:
        raise BatchFormatError(f"batch format must be one of {BATCH_FORMATS}, got {batch_format!r}")
    fmt = detect_batch_format(raw) if batch_format == "auto" else batch_format
    need = _FORMAT_KEYS[fmt]
    missing = [k for k in need if k not in raw]
    if missing:
        raise BatchFormatError(f"batch lacks {missing} of the {fmt} format; expected keys: "
                               f"{_expected_keys_text()}")
    rename = DEEPSPEC_KEYS if fmt == "deepspec" else {k: k for k in MEGASPARK_KEYS}
    batch = {ours: _convert(ours, raw[theirs], f"{fmt} batch tensor {theirs!r}")
             for theirs, ours in rename.items()}
    b, S = batch["input_ids"].shape
    names = {ours: theirs for theirs, ours in rename.items()}
    for key, shape in (("loss_mask", (b, S)), ("target_hidden_states", (b, S)),
                       ("target_last_hidden_states", (b, S)), ("anchors", (b,))):
        got = tuple(batch[key].shape[:len(shape)])
        if got != shape:
            raise BatchFormatError(f"{fmt} batch tensor {names[key]!r} has shape {tuple(batch[key].shape)}, "
                                   f"expected leading dims {shape} from {names['input_ids']!r}")
    if batch["keep"].shape != batch["anchors"].shape:
        raise BatchFormatError(f"{fmt} batch tensors {names['anchors']!r} {tuple(batch['anchors'].shape)} "
                               f"and {names['keep']!r} {tuple(batch['keep'].shape)} differ in shape")
    return batch


def read_batch_file(path) -> dict:
    """The raw tensor dict of a safetensors file or a ``torch.save`` dict (e.g. a DeepSpec dump)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = str(path)
    if not os.path.isfile(path):
        raise BatchFormatError(f"{path}: no such batch file")
    try:
        return load_file(path)
    except SafetensorError:
        pass
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report what the file is not
        raise BatchFormatError(f"{path}: neither a safetensors file nor a torch.save dict ({exc})") from exc
    if not isinstance(raw, dict):
        raise BatchFormatError(f"{path}: holds a {type(raw).__name__}, not a dict of tensors")
    return raw


def load_batch(path, batch_format: str = "auto") -> dict:
    """Read and normalise a batch file (megaspark or DeepSpec keys); see the module docstring."""
    try:
        return normalize_batch(read_batch_file(path), batch_format)
    except BatchFormatError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise BatchFormatError(f"{path}: {exc}") from None


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
    device = model.output_layer.weight.device if getattr(model, "output_layer", None) is not None else None
    inputs = DraftInputs.from_blocks(blocks, aux, batch["target_last_hidden_states"].float(), device=device)
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
    p.add_argument("--batch", help="batch to score: a safetensors file or a torch.save dict of tensors")
    p.add_argument("--batch-format", choices=BATCH_FORMATS, default="auto",
                   help="key names of --batch: megaspark (anchors, keep, ...), deepspec "
                        "(anchor_positions, block_keep_mask, ...) or auto (from the keys; default)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--save-outputs", default=None,
                   help="also write h, base logits, logits with the Markov bias and confidence logits "
                        "(safetensors)")
    p.add_argument("--target-model", default=None,
                   help="target to take embed_tokens/lm_head from if the export does not ship them")
    p.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"],
                   help="where the draft scores the batch (default cpu; fp32 either way)")
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

    from megaspark.export.loading import load_draft
    from megaspark.export.score_batch import save_batch
    from megaspark.parallel import init_single_process_group

    if args.save_example_batch:
        save_batch(args.save_example_batch, **example_batch(
            draft_config(args.draft), args.batch_size, args.seq_length, args.seed))
        print(f"wrote {args.save_example_batch}")
        return 0

    import torch
    from safetensors.torch import save_file

    from megaspark.parallel import destroy_distributed

    try:  # before building the model, so a malformed batch fails fast
        batch = load_batch(args.batch, args.batch_format)
    except BatchFormatError as exc:
        p.error(str(exc))

    torch.manual_seed(0)
    init_single_process_group(device=args.device)
    try:
        from megaspark import platform

        model, dcfg = load_draft(args.draft, tp=1, target_model=args.target_model)
        model.to(platform.compute_device())
        results, outputs = score(model, dcfg, batch, with_outputs=bool(args.save_outputs))
    finally:
        import torch

        if torch.distributed.is_initialized():
            destroy_distributed()
    results = _finite(dict(draft=args.draft, batch=args.batch, **results))
    if outputs is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in outputs.items()}, args.save_outputs)
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
