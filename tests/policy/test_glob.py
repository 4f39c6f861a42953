"""Anchored globs: ``*`` and ``?`` stay inside one ``/``- or ``:``-separated field, ``**`` not."""

from __future__ import annotations

import pytest

from broker.policy.glob import compile_glob, glob_matches, is_glob


def matches(pattern: str, value: str) -> bool:
    return glob_matches(compile_glob(pattern), value)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("llama-*", "llama-7b"),
        ("llama-*", "llama-"),
        ("system:serviceaccount:training:*", "system:serviceaccount:training:trainer"),
        ("repo:acme/*:ref:refs/heads/main", "repo:acme/evals:ref:refs/heads/main"),
        ("s3://datasets/approved/*", "s3://datasets/approved/set-1.parquet"),
        ("model-?", "model-a"),
        ("repo:acme/**", "repo:acme/evals:ref:refs/heads/main"),
        ("s3://datasets/**", "s3://datasets/a/b/c"),
        ("a**b", "ab"),
        ("a***b", "a/:b"),
        ("exact", "exact"),
    ],
)
def test_matches(pattern: str, value: str) -> None:
    assert matches(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        # `*` never crosses a separator...
        ("repo:acme/*:ref:refs/heads/main", "repo:acme/x:environment:prod:ref:refs/heads/main"),
        ("repo:acme/*:ref:refs/heads/main", "repo:acme/x/y:ref:refs/heads/main"),
        ("system:serviceaccount:training:*", "system:serviceaccount:training:a:b"),
        ("s3://datasets/approved/*", "s3://datasets/approved/../secret/x"),
        # ...and neither does `?`.
        ("a?b", "a/b"),
        ("a?b", "a:b"),
        ("a?b", "ab"),
        # Anchored at both ends.
        ("llama-*", "x-llama-7b"),
        ("llama-7b", "llama-7b-evil"),
        ("llama-7b", "evil-llama-7b"),
    ],
)
def test_does_not_match(pattern: str, value: str) -> None:
    assert not matches(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "literal", "other"),
    [
        ("a.b", "a.b", "axb"),
        ("a+", "a+", "aa"),
        ("[ab]", "[ab]", "a"),
        ("(x|y)", "(x|y)", "x"),
        ("^a$", "^a$", "a"),
        ("a{2}", "a{2}", "aa"),
        ("a\\d", "a\\d", "a1"),
    ],
)
def test_regex_metacharacters_are_literal(pattern: str, literal: str, other: str) -> None:
    assert matches(pattern, literal)
    assert not matches(pattern, other)


@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85"])
@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("repo:acme/*:ref:refs/heads/main", "repo:acme/ev{c}als:ref:refs/heads/main"),
        ("repo:acme/*", "repo:acme/evals{c}"),
        ("system:serviceaccount:training:*", "system:serviceaccount:training:{c}"),
        ("repo:acme/**", "repo:acme/evals:ref:refs/heads/main{c}repo:acme/prod"),
        ("a?b", "a{c}b"),
        ("llama-*", "llama-7b{c}"),
    ],
)
def test_no_wildcard_matches_a_control_character(pattern: str, value: str, control: str) -> None:
    assert matches(pattern, value.replace("{c}", "x"))
    assert not matches(pattern, value.replace("{c}", control))


def test_a_control_character_in_the_pattern_matches_itself() -> None:
    assert matches("a\nb*", "a\nbc")


def test_is_glob() -> None:
    assert is_glob("llama-*")
    assert is_glob("model-?")
    assert not is_glob("llama-7b")
    assert not is_glob("a.b[c]")
