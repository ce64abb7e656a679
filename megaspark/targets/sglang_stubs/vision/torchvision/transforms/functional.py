"""Stand-in submodule (see megaspark/targets/sglang_stubs/__init__.py)."""
from megaspark.targets.sglang_stubs.placeholder import module_getattr

__getattr__ = module_getattr(__name__)
