#!/usr/bin/env python
"""Train a DSpark draft with megatron-core (TP/PP/DP), online against a frozen target.

    torchrun --nproc-per-node 2 pretrain_dspark.py --tensor-model-parallel-size 2 \
        --data-path data/smollm2 --train-iters 200 --save checkpoints/smollm2

Like Megatron-LM's pretrain_gpt.py this file supplies four small functions; the loop,
checkpointing and logging live in megaspark.training.
"""

from __future__ import annotations

from functools import partial


def model_provider(cfg, dcfg, pre_process=True, post_process=True, vp_stage=None):
    """Build this rank's part (one virtual pipeline stage) of the DSpark draft for a
    :class:`~megaspark.arguments.configs.RunConfig`."""
    from megaspark.fp8 import fp8_transformer_config_kwargs
    from megaspark.models.dspark.model import DSparkModel
    from megaspark.models.dspark.te_spec import select_layer_spec

    par = cfg.parallel
    extra = {}
    if par.virtual_pipeline_model_parallel_size:
        extra["virtual_pipeline_model_parallel_size"] = par.virtual_pipeline_model_parallel_size
        if par.pipeline_model_parallel_size == 2:
            # Interleaved with two stages sends activations and gradients between the same
            # pair of ranks in one batched exchange, where they can be matched crosswise;
            # megatron's unbatched even/odd ordering keeps them apart.
            extra["batch_p2p_comm"] = False
    extra.update(fp8_transformer_config_kwargs(cfg.fp8))
    if par.pipeline_model_parallel_size > 1 and cfg.data.pad_to_multiple:
        # micro-batches have their own lengths: stages exchange the shape before each tensor
        extra["variable_seq_lengths"] = True
        extra["moe_token_dispatcher_type"] = "alltoall"  # megatron's check; the draft has no MoE
    tcfg = dcfg.transformer_config(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        bf16=cfg.optim.bf16,
        **extra,
    )
    spec = select_layer_spec(cfg.fp8.transformer_impl, dcfg.qk_norm, attention_type=dcfg.attention_type)
    # the frozen embedding / LM head are loaded from the target right after: no random init
    model = DSparkModel(tcfg, dcfg, pre_process=pre_process, post_process=post_process,
                        seed=cfg.optim.seed, vp_stage=vp_stage, layer_spec=spec, initialize_frozen=False)
    return model, tcfg


def get_batch(data_iterator):
    """Next micro-batch of draft inputs (blocks + target hidden states, built per step)."""
    return next(data_iterator)


def loss_func(inputs, dcfg, sums):
    """Global-denominator loss (DESIGN.md decision 3), scaled so megatron's mean over
    micro-batches and DDP's mean over DP ranks give the token-pooled mean."""
    loss = sums.loss(dcfg.alpha_ce, dcfg.alpha_l1, dcfg.alpha_conf, denominator=inputs.global_denominator)
    return loss * inputs.loss_scale, {"metrics": sums.metrics}


def forward_step(data_iterator, model):
    inputs = get_batch(data_iterator)
    unwrapped = model.module if hasattr(model, "module") else model
    output = model(inputs)
    return output, partial(loss_func, inputs, unwrapped.dspark_config)


def main(argv=None):
    import sys

    from megaspark.arguments import ArgumentError
    from megaspark.checkpoint_files import CheckpointError
    from megaspark.config import ConfigError
    from megaspark.data.chat import DataError
    from megaspark.memory_plan import MemoryPlanError
    from megaspark.export.tensors import ExportError
    from megaspark.models.dspark.te_spec import TransformerEngineUnavailableError
    from megaspark.targets.base import TargetError
    from megaspark.targets.offline import HiddenStatesCacheError
    from megaspark.training.resilience import CollectiveTimeoutError, NonFiniteStepError
    from megaspark.training.pretrain import pretrain

    try:
        pretrain(model_provider, forward_step, argv)
    except (ArgumentError, ConfigError, CheckpointError, DataError, ExportError,
            TransformerEngineUnavailableError, HiddenStatesCacheError, TargetError, MemoryPlanError,
            NonFiniteStepError, CollectiveTimeoutError) as e:
        print(f"pretrain_dspark.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        from megaspark.parallel import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main()
