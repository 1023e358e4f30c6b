"""Topic-exchange matching (AMQP 0-9-1 / RabbitMQ semantics), written once for the embedded broker."""

from __future__ import annotations

import pytest

from ion.core.messaging.routing import is_pattern, topic_matches

MATCHES = [
    # exact
    ("a", "a"),
    ("a.b.c", "a.b.c"),
    ("", ""),
    # '*' is exactly one word
    ("*", "a"),
    ("a.*", "a.b"),
    ("*.b", "a.b"),
    ("a.*.c", "a.b.c"),
    ("*.*", "a.b"),
    ("a.*", "a."),       # 'a.' is two words, the second empty
    ("a.*.c", "a..c"),
    # '#' alone matches everything, the empty key too
    ("#", ""),
    ("#", "a"),
    ("#", "a.b.c.d"),
    # '#' at the end: zero or more words
    ("a.#", "a"),
    ("a.#", "a.b"),
    ("a.#", "a.b.c.d"),
    # '#' at the start
    ("#.c", "c"),
    ("#.c", "a.c"),
    ("#.c", "a.b.c"),
    # '#' in the middle
    ("a.#.c", "a.c"),
    ("a.#.c", "a.b.c"),
    ("a.#.c", "a.b.x.y.c"),
    ("a.#.c", "a.c.c"),
    # several wildcards
    ("#.#", "a"),
    ("#.#", ""),
    ("#.*", "a"),
    ("*.#", "a.b.c"),
    ("#.b.#", "b"),
    ("#.b.#", "a.b.c"),
    ("a.#.*.d", "a.x.d"),
    ("a.*.#", "a.b"),
    ("#.a.#.a.#", "a.a"),
    # the words of ION routing keys
    ("ion.sys.*", "ion.sys.c1"),
    ("*.hello", "sys.hello"),
]

NON_MATCHES = [
    # exact
    ("a", "b"),
    ("a.b", "a"),
    ("a", "a.b"),
    ("a.b.c", "a.b.d"),
    ("a", ""),
    ("", "a"),
    ("A", "a"),          # case-sensitive
    # '*' is exactly one word
    ("*", ""),           # the empty key has no word
    ("*", "a.b"),
    ("a.*", "a"),
    ("a.*", "a.b.c"),
    ("*.b", "b"),
    ("*.*", "a"),
    ("*.*", "a.b.c"),
    # '#' at the end
    ("a.#", "b"),
    ("a.#", "ab"),
    ("a.#", "b.a"),
    # '#' at the start
    ("#.c", "c.a"),
    ("#.c", "cc"),
    ("#.c", ""),
    # '#' in the middle
    ("a.#.c", "a.b"),
    ("a.#.c", "b.c"),
    ("a.#.c", "a.b.c.d"),
    # several wildcards
    ("#.*", ""),
    ("*.#", ""),
    ("#.b.#", "a.c"),
    ("a.#.*.d", "a.d"),
    ("a.*.#", "a"),
    ("#.a.#.a.#", "a.b"),
    # wildcards only as whole words
    ("a*", "ab"),
    ("a#", "a"),
    ("a.b*", "a.bc"),
]


@pytest.mark.parametrize("pattern,key", MATCHES)
def test_matches(pattern: str, key: str) -> None:
    """The pattern matches the routing key."""
    assert topic_matches(pattern, key) is True


@pytest.mark.parametrize("pattern,key", NON_MATCHES)
def test_does_not_match(pattern: str, key: str) -> None:
    """The pattern does not match the routing key."""
    assert topic_matches(pattern, key) is False


@pytest.mark.parametrize("key,expected", [
    ("a", False), ("a.b", False), ("", False), ("a*", False), ("#a", False),
    ("*", True), ("#", True), ("a.*", True), ("#.a", True), ("a.#.b", True),
])
def test_is_pattern(key: str, expected: bool) -> None:
    """A key is a pattern exactly when one of its words is '*' or '#'."""
    assert is_pattern(key) is expected


def test_long_keys_and_many_hashes() -> None:
    """Matching stays correct (and fast) for long keys and patterns full of '#'."""
    key = ".".join(["w"] * 127 + ["end"])
    assert topic_matches(".".join(["#"] * 50) + ".end", key)
    assert not topic_matches(".".join(["#"] * 50) + ".nope", key)
    assert topic_matches("#.w.#.end", key)
    assert topic_matches(".".join(["*"] * 128), key)
    assert not topic_matches(".".join(["*"] * 129), key)


def _reference(pattern: list[str], key: list[str]) -> bool:
    """A naive recursive matcher, the definition the module must agree with."""
    if not pattern:
        return not key
    if pattern[0] == "#":
        return any(_reference(pattern[1:], key[i:]) for i in range(len(key) + 1))
    return bool(key) and pattern[0] in ("*", key[0]) and _reference(pattern[1:], key[1:])


def test_agrees_with_reference_on_all_small_cases() -> None:
    """On all patterns over {a, b, *, #} and keys over {a, b} of up to 4 words, it agrees with the naive definition."""
    import itertools

    def all_words(alphabet: str, n: int) -> list[list[str]]:
        return [list(w) for k in range(n + 1) for w in itertools.product(alphabet, repeat=k)]

    keys = all_words("ab", 4)
    for pattern in all_words("ab*#", 4):
        p = ".".join(pattern)
        for key in keys:
            k = ".".join(key)
            assert topic_matches(p, k) is _reference(pattern, key), (p, k)
