"""AMQP topic-exchange routing semantics, written once for the embedded broker.

A routing key and a binding pattern are ``.``-separated words; in a pattern
``*`` matches exactly one word and ``#`` zero or more.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["topic_matches", "is_pattern"]


def is_pattern(binding_key: str) -> bool:
    """True if ``binding_key`` holds a wildcard word."""
    return any(w in ("*", "#") for w in binding_key.split("."))


@lru_cache(maxsize=8192)
def _match_words(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' swallows zero or more words.
        return any(_match_words(rest, key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    return (head == "*" or head == key[0]) and _match_words(rest, key[1:])


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding ``pattern`` matches ``routing_key``."""
    if pattern == routing_key or pattern == "#":
        return True
    if not is_pattern(pattern):
        return False
    return _match_words(tuple(pattern.split(".")), tuple(routing_key.split(".")))
