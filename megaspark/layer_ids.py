"""The target-layer-id convention (DESIGN.md decision 2): layer id ``k`` is the output of
target decoder layer ``k`` (HF ``hidden_states[k + 1]``); valid ids lie in ``[0, N - 2]``.
One home for the rule, used by the draft config, the target providers and the tools."""

from __future__ import annotations

from typing import Sequence

DEFAULT_NUM_TAPS = 5  # DFlash's default number of tapped layers (--num-target-taps)


def default_target_layer_ids(num_target_layers: int, n: int) -> list[int]:
    """DFlash default taps (DSPARK_SPEC.md §1.2) for a target with ``num_target_layers`` layers.

    ``n == 1`` gives ``[N // 2]``; otherwise ``round(1 + i * (N - 4) / (n - 1))`` for
    ``i = 0 … n-1`` (Python ``round``, ties to even), i.e. evenly spaced from layer 1 to
    layer ``N - 3``. Example: ``(36, 5) -> [1, 9, 17, 25, 33]``.

    Raises ``ValueError`` when the rule cannot give ``n`` distinct valid ids (a shallow
    target asked for too many taps: at most ``N - 3`` for ``n >= 2``).
    """
    N = int(num_target_layers)
    if n < 1:
        raise ValueError(f"number of target layers to tap must be >= 1, got {n}")
    if N < 1:
        raise ValueError(f"target must have at least one decoder layer, got {N}")
    if n == 1:
        ids = [N // 2]
    else:
        ids = [round(1 + i * (N - 4) / (n - 1)) for i in range(n)]
    try:
        validate_target_layer_ids(ids, N)
    except ValueError as e:
        max_taps = max(N - 3, 1)
        raise ValueError(
            f"the default layer-id rule gives {ids} for a {N}-layer target and {n} taps, "
            f"which is not a valid selection ({e}). Ask for at most {max_taps} taps or pass "
            f"explicit layer ids."
        ) from None
    return ids


def validate_target_layer_ids(ids: Sequence[int], num_target_layers: int) -> list[int]:
    """Check a layer-id list (DESIGN.md decision 2); return it as a list of ints.

    Valid ids are non-empty, strictly increasing, each in ``[0, N - 2]``.
    """
    N = int(num_target_layers)
    ids = list(ids)
    if not ids:
        raise ValueError("target layer ids must be a non-empty list")
    for k in ids:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"target layer ids must be integers, got {ids!r}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"target layer ids must be strictly increasing, got {ids}")
    for k in ids:
        if k == -1:
            raise ValueError(
                f"target layer id -1 (the embedding output) is not supported in {ids}: serving "
                f"engines capture aux hidden states at decoder-layer outputs only, so a draft "
                f"trained on the embedding output could not be served"
            )
        if k == N - 1:
            raise ValueError(
                f"target layer id {k} is the last decoder layer of this {N}-layer target: its raw "
                f"output is not exposed (HF's last hidden state and serving engines' last state "
                f"are post-final-norm), so training on it would silently mismatch serving. "
                f"Valid ids are 0..{N - 2}"
            )
        if not 0 <= k <= N - 2:
            raise ValueError(
                f"target layer id {k} is out of range for a {N}-layer target: valid ids are "
                f"0..{N - 2} (id k = output of decoder layer k = HF hidden_states[k+1]; the "
                f"embedding (-1) and the last layer ({N - 1}) cannot be captured by serving engines)"
            )
    return ids
