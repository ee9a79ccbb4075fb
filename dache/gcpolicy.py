"""
The garbage collector around the cache.

CPython's cycle collector walks every tracked object of the generation it
collects. Cache entries are tracked and never form cycles, yet with a
million of them a full collection walks them all: about 0.2 s during which no
request is answered, and, while loading, a third of the load time spent
re-walking the growing cache. So:

- during the load the collector is off (loading makes no cycles);
- after it, gc.freeze(): everything loaded moves to the permanent generation,
  which later collections never walk. Entries written after start-up are
  collected as usual. There is no collection before the freeze (it would walk
  the whole cache once more, 0.1-0.2 s per million entries): the little cyclic
  garbage the load's Deferreds may leave is kept, once.

Thresholds stay CPython's: request handling frees almost everything by
reference counting, so young collections are rare and short.
"""

from __future__ import annotations

import gc


def pause() -> None:
    """Stop automatic collection (for the load)."""
    gc.disable()


def settle() -> None:
    """Move every object so far out of the collector's walks, and resume collecting."""
    gc.freeze()
    gc.enable()
