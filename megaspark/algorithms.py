"""Algorithm presets of the DFlash family, selected by ``--algorithm`` (DSPARK_SPEC.md §4.4,
§3.7, §6.3, §11).

One stack trains all of them; a preset only fills in the flags the user left unset and
pins the few that define the algorithm:

* ``dspark`` — DeepSpec DSpark (Convention S, B = 7, Markov head rank 256, confidence head
  with Markov features, α = (0.1, 0.9, 1.0), γ = 4);
* ``dflash`` — DeepSpec's DFlash baseline: the same backbone and Convention S, no Markov
  head, no confidence head, CE only (α_ce = 1, α_l1 = 0), γ = 4, B = 7. This is exactly
  DSpark with ``markov_rank = 0`` (§13 item 2);
* ``eagle3`` — an Eagle3 draft (megaspark/training/eagle3.py): three tapped layers, one
  decoder layer unrolled for ``--ttt-steps`` test-time-training steps, a draft vocabulary
  of ``--draft-vocab-size`` tokens; its own loss (the DFlash-family flags do not apply);
* ``dflash-original`` — the original DFlash (z-lab, SpecForge): Convention D (slot 0 is the
  anchor and unsupervised, B − 1 drafts per block), B = 16, γ = 7, CE only and no eval-mask
  truncation (SpecForge applies no cumulative product to the weight mask).

``--training-mode vp_drafter`` (§10) is a Convention-D objective; without ``--algorithm``
it selects ``dflash-original``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_ALGORITHM = "dspark"


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    defaults: dict  # argparse dest -> value used when the flag was not given
    pinned: dict = field(default_factory=dict)  # dest -> (value, flag, why) that may not change


_DFLASH_PINNED = {
    "markov_rank": (0, "--markov-rank", "DFlash has no Markov head"),
    "confidence_head": (False, "--no-confidence-head", "DFlash has no confidence head"),
}

ALGORITHMS = {
    "dspark": Algorithm(
        "dspark", "DSpark: Convention S, Markov head, confidence head (DeepSpec)",
        dict(block_size=7, markov_rank=256, confidence_head=True, ce_loss_alpha=0.1,
             l1_loss_alpha=0.9, confidence_loss_alpha=1.0, loss_decay_gamma=4.0,
             slot_convention="S", truncate_eval_mask=True),
    ),
    "dflash": Algorithm(
        "dflash", "DeepSpec DFlash baseline: Convention S, no Markov/confidence head, CE only",
        dict(block_size=7, markov_rank=0, confidence_head=False, ce_loss_alpha=1.0,
             l1_loss_alpha=0.0, confidence_loss_alpha=0.0, loss_decay_gamma=4.0,
             slot_convention="S", truncate_eval_mask=True),
        dict(_DFLASH_PINNED),
    ),
    "dflash-original": Algorithm(
        "dflash-original", "original DFlash (z-lab/SpecForge): Convention D, B=16, gamma=7, CE only",
        dict(block_size=16, markov_rank=0, confidence_head=False, ce_loss_alpha=1.0,
             l1_loss_alpha=0.0, confidence_loss_alpha=0.0, loss_decay_gamma=7.0,
             slot_convention="D", truncate_eval_mask=False),
        dict(_DFLASH_PINNED, slot_convention=("D", "--slot-convention",
                                              "the original DFlash predicts same-position tokens")),
    ),
}


ALGORITHMS["eagle3"] = Algorithm(
    "eagle3", "Eagle3 (EAGLE-3/SpecForge): one 2H-input layer, test-time training, draft vocabulary",
    # the DFlash-family flags do not apply; these keep their checks quiet
    dict(block_size=7, markov_rank=0, confidence_head=False, ce_loss_alpha=1.0, l1_loss_alpha=0.0,
         confidence_loss_alpha=0.0, loss_decay_gamma=4.0, slot_convention="S", truncate_eval_mask=True),
    dict(_DFLASH_PINNED),
)
