"""AMQP topic-exchange routing semantics, written once for the embedded broker.

A routing key and a binding pattern are ``.``-separated words; in a pattern
``*`` matches exactly one word and ``#`` zero or more. As on RabbitMQ, the
empty string is zero words (so ``#`` matches it and ``*`` does not), while
``a..b`` is three words, the middle one empty.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["topic_matches", "is_pattern"]


def _words(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()


def is_pattern(binding_key: str) -> bool:
    """True if ``binding_key`` holds a wildcard word."""
    return any(w in ("*", "#") for w in binding_key.split("."))


@lru_cache(maxsize=8192)
def _match_words(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    # Iterative dynamic programme over positions in ``key`` (no recursion, so
    # long keys and many '#' stay linear in len(pattern) * len(key)).
    # ``reachable[i]``: the pattern so far can have consumed exactly key[:i].
    n = len(key)
    reachable = [True] + [False] * n
    for word in pattern:
        if word == "#":
            # zero or more words: every position at or after the first reachable one.
            nxt = [False] * (n + 1)
            seen = False
            for i in range(n + 1):
                seen = seen or reachable[i]
                nxt[i] = seen
        else:
            nxt = [False] * (n + 1)
            for i in range(n):
                if reachable[i] and (word == "*" or word == key[i]):
                    nxt[i + 1] = True
        reachable = nxt
        if not any(reachable):
            return False
    return reachable[n]


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding ``pattern`` matches ``routing_key``."""
    if pattern == routing_key or pattern == "#":
        return True
    if not is_pattern(pattern):
        return False
    return _match_words(_words(pattern), _words(routing_key))
