"""``needs_sglang``: the mark of tests that drive real SGLang (0.5.23, installed by
``bash tools/install.sh --with-sglang``, which ``tools/run_tests.sh`` and so ``.ci/run``
run). They skip where sglang is not installed, unless ``MEGASPARK_REQUIRE_SGLANG=1`` (set
by tools/run_tests.sh), which turns its absence into an error at collection."""
import importlib.util
import os

import pytest

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
if not HAVE_SGLANG and os.environ.get("MEGASPARK_REQUIRE_SGLANG") == "1":
    raise RuntimeError("MEGASPARK_REQUIRE_SGLANG=1 but sglang is not installed: run "
                       "`bash tools/install.sh --with-sglang`")
needs_sglang = pytest.mark.skipif(not HAVE_SGLANG, reason="sglang not installed "
                                  "(bash tools/install.sh --with-sglang)")
