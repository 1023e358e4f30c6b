"""Random hex for names and tokens, drawn from the OS ahead of need.

``secrets.token_hex`` is one ``getrandom`` system call per name, and a system call
releases the GIL: on the reactor thread, which then waits to take it back from the
pool threads, a cold deploy of many small files paid ~60 µs per name (three per
item: a staging folder, a trash name, a lock's token), and its pool threads ~5 more
per item (temporary names of records, placements and lock files). :func:`random_hex`
hands out slices of one ``os.urandom`` read of :data:`POOL_BYTES` instead: the same
source (the kernel's CSPRNG), each character used once, safe across threads and forks
(a child process draws a pool of its own, never the parent's next names).

For names and in-process tokens only: the next names sit in the process's memory, so
not for secrets or for tokens shown to other parties (``secrets`` is for those).

(:mod:`ion.core.trace` keeps a pool of its own for span and trace ids, which must be
aligned and never all zeros.)
"""

from __future__ import annotations

import os
import threading
from typing import Final

__all__ = ["random_hex", "POOL_BYTES"]

#: Random bytes read at a time (8,192 hex characters: ~700 names of 12).
POOL_BYTES: Final = 4096

_lock = threading.Lock()
_pool = ""
_at = 0


def random_hex(chars: int) -> str:
    """``chars`` random lowercase hex characters (as ``secrets.token_hex(chars // 2)``, any length)."""
    global _pool, _at
    with _lock:
        at = _at
        if at + chars > len(_pool):
            _pool = os.urandom(max(POOL_BYTES, (chars + 1) // 2)).hex()
            at = 0
        _at = at + chars
        return _pool[at:at + chars]


def _forget_in_child() -> None:
    """After ``fork``: the parent's pool is the parent's; the child draws its own."""
    global _pool, _at, _lock
    _lock = threading.Lock()
    _pool, _at = "", 0


os.register_at_fork(after_in_child=_forget_in_child)
