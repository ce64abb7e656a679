"""megaspark's import-only stand-in for ``sgl_kernel`` (see ``sglang_stubs/__init__.py``)."""
from megaspark.targets.sglang_stubs.placeholder import module_getattr

__version__ = "0.0.0+megaspark.stand.in"
__getattr__ = module_getattr(__name__)
