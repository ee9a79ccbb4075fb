"""
The garbage collector around the cache.

CPython's cycle collector walks every tracked object of the generation it
collects. Cache entries are tracked and never form cycles, yet with a
million of them a full collection walks them all: about 0.2 s during which no
request is answered, and, while loading, a third of the load time spent
re-walking the growing cache. So:

- during the load the collector is off (loading makes no cycles);
- after it, one collection, then gc.freeze(): everything loaded moves to the
  permanent generation, which later collections never walk. Entries written
  after start-up are collected as usual.

Thresholds stay CPython's: request handling frees almost everything by
reference counting, so young collections are rare and short.
"""

from __future__ import annotations

import gc


def pause() -> None:
    """Stop automatic collection (for the load)."""
    gc.disable()


def settle() -> None:
    """Collect once, move every surviving object out of the collector's walks, resume."""
    gc.collect()
    gc.freeze()
    gc.enable()
