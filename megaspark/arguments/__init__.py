"""The flags of a run: defined once (:mod:`.parser`), checked once (:mod:`.validation`) and
handed to the library as typed configs (:mod:`.configs`). Only this package and
``megaspark/training`` see the argparse namespace."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from megaspark.arguments.parser import add_fp8_arguments, add_sglang_arguments, build_parser
from megaspark.arguments.validation import resolve_algorithm, validate_args
from megaspark.errors import ArgumentError


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None):
    """Parse and validate ``pretrain_dspark.py``'s flags (``world_size``: default
    ``$WORLD_SIZE`` or 1)."""
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args


__all__ = ["ArgumentError", "add_fp8_arguments", "add_sglang_arguments", "build_parser", "parse_args",
           "resolve_algorithm", "validate_args"]
