"""Errors KV storage raises for its callers (the scheduler preempts on OutOfKV)."""

from __future__ import annotations


class OutOfKV(Exception):
    """KV storage has no room; the scheduler preempts or waits."""
