"""random_hex: random names drawn from one OS read, never handed out twice, not shared with a fork."""

from __future__ import annotations

import string
import threading

from ion.core.tokens import POOL_BYTES, random_hex
from ion.testing.processes import in_forked_child


def test_lengths_and_alphabet():
    """Any length asked, longer than a pool too, in lowercase hex."""
    for n in (1, 8, 12, 32, 2 * POOL_BYTES + 3):
        value = random_hex(n)
        assert len(value) == n and set(value) <= set(string.hexdigits.lower())


def test_no_name_is_handed_out_twice_across_threads_and_pool_refills():
    """Threads drawing at once, over several refills, never get the same characters twice."""
    seen: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [random_hex(32) for _ in range(2000)]  # several pools' worth between the threads
        with lock:
            seen.extend(mine)

    workers = [threading.Thread(target=draw) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(seen)) == len(seen) == 8000


def test_a_forked_child_draws_a_pool_of_its_own():
    """A forked child does not hand out the parent's next names."""
    random_hex(12)  # the parent has a pool (maybe drawn just now)
    child = in_forked_child(lambda: random_hex(32))
    assert len(child) == 32 and child != random_hex(32)  # the parent's next name is not the child's
