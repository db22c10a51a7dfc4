"""Giving freed heap memory back to the operating system."""

from __future__ import annotations


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
