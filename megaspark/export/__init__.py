"""HF export / import of DSpark drafts (DSPARK_SPEC.md §9): see :mod:`megaspark.export.hf`."""

from megaspark.export.hf import (
    ExportError,
    build_hf_config,
    canonical,
    config_to_dspark,
    export_checkpoint,
    export_hf,
    hf_tensor_shapes,
    init_single_process_group,
    load_batch,
    load_draft,
    load_hf_draft_weights,
    parameter_counts,
    read_hf,
    read_hf_config,
    save_batch,
    target_embeddings,
    trainable_parameter_count,
)

__all__ = [
    "ExportError", "build_hf_config", "canonical", "config_to_dspark", "export_checkpoint", "export_hf",
    "hf_tensor_shapes", "init_single_process_group", "load_batch", "load_draft", "load_hf_draft_weights",
    "parameter_counts", "read_hf", "read_hf_config", "save_batch", "target_embeddings",
    "trainable_parameter_count",
]
