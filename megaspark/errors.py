"""Errors shared across layers: :class:`ArgumentError` is raised by the flag validator and by
the few library checks that are about a flag's value (e.g. FP8 shapes); both name the flag."""

from __future__ import annotations


class ArgumentError(ValueError):
    """An impossible flag or flag combination (the message names the flags)."""
