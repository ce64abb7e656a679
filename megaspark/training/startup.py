"""Start-up pieces shared by every algorithm's run: rank-0 logging, the target (resolved,
then built on the ranks that run it, failures shared with every rank) and the prepared
datasets (checked against the target and their meta.json before training)."""

from __future__ import annotations

import torch

from megaspark import platform
from megaspark.training.logging import print_line


def log0(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print_line(msg)

def load_target(spec, build: bool):
    """(:class:`TargetInfo` on every rank, the target provider of ``spec.backend`` on the ranks
    that run it, else None) for the target start-up resolved (a :class:`TargetSpec`: its
    directory, layer ids, dtype and TP size). The provider is built on the compute device;
    when it fails anywhere, every rank raises (the failing one its own error)."""
    from megaspark.targets.base import TargetError
    from megaspark.targets.checkpoint import TargetInfo

    info = TargetInfo(spec.path, list(spec.layer_ids))
    provider, error = None, None
    if build:
        try:
            provider = _build_provider(spec)
            if not provider.last_hidden_is_post_norm:
                raise TargetError(f"{type(provider).__name__} returns the target's pre-norm last hidden "
                                  "state; the trainer takes the post-final-norm state only")
            print_line(f"rank {torch.distributed.get_rank()}: target {type(provider).__name__} built on "
                       f"{platform.compute_device()} in {spec.dtype}")
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
    status = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(status, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(status) if m is not None]
    if failed:
        rank, message = failed[0]
        raise TargetError(f"the target could not be built on rank {rank}, which runs it: {message}")
    return info, provider

def _build_provider(spec):
    device = platform.compute_device()
    if spec.backend == "offline":
        from megaspark.targets.offline import build_offline_target

        return build_offline_target(spec, device=device)
    if spec.backend == "sglang":
        from megaspark.targets.sglang_colocated import build_colocated_target

        return build_colocated_target(spec, device=device)
    if spec.backend == "sglang-server":
        from megaspark.targets.sglang import build_sglang_target

        return build_sglang_target(spec, device=device)
    from megaspark.targets.hf import HFTargetProvider

    return HFTargetProvider(spec.path, layer_ids=list(spec.layer_ids), dtype=spec.dtype, device=device)

def open_datasets(args, target_info, hf_config, vocab_size: int):
    """``(meta, train, valid or None)`` of ``--data-path``, refused before training when it
    was tokenized for another target or changed after preparation (``--data-verify``; rank
    0 reads, every rank learns the verdict)."""
    from megaspark.data.chat import DataError
    from megaspark.data.dataset import PreparedDataset, check_matches_target, has_split, load_meta, verify_prepared

    meta = load_meta(args.data_path)
    check_matches_target(args.data_path, meta, target_info.tokenizer, hf_config)
    verified = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            verified = [verify_prepared(args.data_path, meta, args.data_verify), None]
        except DataError as e:
            verified = [None, str(e)]
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, not wait
            verified = [None, f"{args.data_path}: checking the dataset failed ({type(e).__name__}: {e})"]
    torch.distributed.broadcast_object_list(verified, src=0)
    if verified[1] is not None:
        raise DataError(verified[1])
    log0(f"megaspark: dataset {args.data_path}: {verified[0]}")
    train_data = PreparedDataset(args.data_path, "train", vocab_size=vocab_size)
    valid_data = None
    if has_split(args.data_path, "valid"):
        valid_data = PreparedDataset(args.data_path, "valid", vocab_size=vocab_size)
    return meta, train_data, valid_data
