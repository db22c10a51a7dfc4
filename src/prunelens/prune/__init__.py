"""Pruning methods. Layer dropping lives in ``drop`` (what to skip) and ``importance`` (how to choose)."""
