"""An HF draft export served by SGLang against the same export run by megaspark.

:func:`compare_with_sglang` builds the export twice in one process: SGLang's own DSpark
draft class with SGLang's own weight loader (:class:`megaspark.targets.sglang_runtime.
SGLangDraft`), and megaspark's model through :func:`megaspark.export.loading.load_draft`. It
checks SGLang's loading parameter by parameter, then drafts the same blocks with both:
seeded context features of several lengths, one anchor each, greedy. SGLang's corrected
step logits, drafted tokens and confidences must equal megaspark's inference forward
(:class:`megaspark.inference.draft.DraftProposer` + :func:`~megaspark.inference.draft.
sample_block`) in fp32. A weight SGLang reads under another name (a renamed key keeps
SGLang's initial value), a missing q/k norm or a different Markov head shows up here as
different logits even where the load check could not see it.

CPU, fp32, TP 1; Convention S only (the only one SGLang serves).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

#: |SGLang − megaspark| allowed on logits and confidences, relative to the logits' scale
TOLERANCE = 1e-5


def _megaspark_blocks(model, features: Sequence[torch.Tensor], anchors: Sequence[int]) -> list:
    from megaspark.inference.draft import DraftProposer, sample_block

    blocks = []
    for f, anchor in zip(features, anchors):
        proposer = DraftProposer(model)
        h = proposer.hidden(int(anchor), int(f.shape[0]), f)
        blocks.append(sample_block(model, h, int(anchor)))
    return blocks


def compare_with_sglang(path: str, context_lengths: Sequence[int] = (1, 5, 9), seed: int = 0,
                        served_path: Optional[str] = None, target_model: Optional[str] = None) -> dict:
    """SGLang's load check of the export at ``path`` plus its draft blocks against
    megaspark's (``served_path``: SGLang loads that directory instead, e.g. a copy with a
    renamed key, while megaspark loads ``path``; ``target_model``: where the embedding and
    LM head come from when the export does not ship them): ``{"architecture", "problems", "loaded", "ignored", "blocks"}`` where
    ``blocks`` holds ``max_logit_diff``, ``logit_scale``, ``max_confidence_diff`` (None
    without a confidence head), ``tokens`` (megaspark's) and ``sglang_tokens``. A
    difference above :data:`TOLERANCE` or a different token is a problem. One call per
    process (SGLang's runtime is initialized once)."""
    from megaspark.export.loading import load_draft
    from megaspark.parallel import init_single_process_group
    from megaspark.targets.sglang_runtime import SGLangDraft

    init_single_process_group(device="cpu")
    model, dcfg = load_draft(path, target_model=target_model)
    model = model.float()
    served = SGLangDraft(served_path or path)
    result = served.check()
    result["blocks"] = None
    if result["problems"] and served.model is None:
        return result
    if dcfg.convention != "S":
        result["problems"].append("SGLang drafts Convention S only; no block compared")
        return result
    served.attach_target(model.embedding.weight.detach(),
                         model.output_layer.weight.detach())
    g = torch.Generator().manual_seed(seed)
    width = len(dcfg.target_layer_ids) * dcfg.hidden_size
    features = [torch.randn(n, width, generator=g) for n in context_lengths]
    anchors = torch.randint(0, dcfg.vocab_size, (len(features),), generator=g).tolist()
    ours = _megaspark_blocks(model, features, anchors)
    theirs = served.propose(features, anchors)
    logits = torch.stack([torch.stack(b.logits) for b in ours])
    scale = logits.abs().max().item()
    logit_diff = (logits - theirs["logits"].float()).abs().max().item()
    conf_diff = None
    if theirs["confidence"] is not None:
        conf = torch.tensor([b.confidences for b in ours])
        conf_diff = (conf - theirs["confidence"].float()).abs().max().item()
    tokens = [b.tokens for b in ours]
    sglang_tokens = theirs["tokens"].tolist()
    result["blocks"] = {"max_logit_diff": logit_diff, "logit_scale": scale,
                        "max_confidence_diff": conf_diff, "tokens": tokens,
                        "sglang_tokens": sglang_tokens}
    bound = TOLERANCE * max(1.0, scale)
    if logit_diff > bound:
        result["problems"].append(f"SGLang's draft logits differ from megaspark's by {logit_diff:.3g} "
                                  f"(scale {scale:.3g}, allowed {bound:.1g})")
    if conf_diff is not None and conf_diff > TOLERANCE:
        result["problems"].append(f"SGLang's confidences differ from megaspark's by {conf_diff:.3g}")
    if tokens != sglang_tokens:
        result["problems"].append(f"SGLang drafts {sglang_tokens}, megaspark {tokens}")
    if (dcfg.confidence_head and dcfg.markov_rank > 0) != (theirs["confidence"] is not None):
        result["problems"].append("SGLang's confidence head does not match the export's")
    return result


__all__ = ["compare_with_sglang", "TOLERANCE"]
