"""Import-only stand-ins that let the pure-Python SGLang wheel run on a CPU-only torch.

SGLang imports two packages that have no working CPU build on PyPI:

* ``sgl_kernel`` (``kernel/sgl_kernel``): PyPI's wheel is a CUDA build. The stand-in
  registers no ``torch.ops.sgl_kernel`` operators, so SGLang's CPU layers detect that the
  optimized CPU kernels are absent and take their ``forward_native`` (pure torch) paths.
  Any name imported from it is a placeholder that raises if it is ever *called*.
* ``torchvision`` (``vision/torchvision``): imported at module level by SGLang's
  multimodal config modules; PyPI's wheel needs CUDA libraries beside the CPU torch. The
  stand-in's names are placeholders too; no text target ever calls them.

:func:`megaspark.targets.sglang_runtime.prepare_environment` puts each directory on
``sys.path`` (and ``PYTHONPATH``, which SGLang's spawned scheduler processes inherit)
only on the CPU, and only where the real package cannot be imported. GPU images have the
real packages and never see these.
"""
