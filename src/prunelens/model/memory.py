"""Giving freed heap memory back to the operating system, and a model's weights back with it."""

from __future__ import annotations

import gc
from typing import Any


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them, and the KV cache grows by
    reallocation every step, so without this the resident size creeps up during decoding)."""
    if _TRIM is not None:
        _TRIM(0)


def release_weights(lm: Any) -> Any:
    """Drop a ``LoadedModel``'s weights — its model and its adapter, which holds the same modules —
    keeping its tokenizer and info (all a candidate's checks read), and give the memory back, so the
    next model loads into the room this one left (sequential comparisons: one model at a time)."""
    lm.model = None
    lm.adapter = None
    gc.collect()
    release_freed_memory()
    return lm
