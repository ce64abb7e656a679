"""HF export / import of drafts (DSPARK_SPEC.md §9).

:mod:`~megaspark.export.tensors` (which tensors a DSpark draft has, their shapes, import key
rules), :mod:`~megaspark.export.hf_config` (``config.json`` ↔ DSparkConfig),
:mod:`~megaspark.export.files` (writing and reading an export directory),
:mod:`~megaspark.export.loading` (a model from an export or a checkpoint; checkpoint →
export), :mod:`~megaspark.export.score_batch` (scoring batch files),
:mod:`~megaspark.export.eagle3` (Eagle3 drafts), :mod:`~megaspark.export.sglang_parity`
(SGLang against megaspark on one export).
"""
