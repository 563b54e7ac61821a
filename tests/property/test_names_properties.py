"""Identifiers (run id, bucket, object key and prefix): any text is accepted exactly when it
matches the rule in full, each rule restated here independently of the regexes; a refusal is
always one :class:`ConfigError` line, never another exception."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchgap.errors import ConfigError, StoreError
from patchgap.names import RUN_ID, check_bucket, check_key, check_run_id, check_s3_uri
from patchgap.storage.store import safe_target

pytestmark = pytest.mark.property

ALNUM = set(string.ascii_letters + string.digits)
LOWER = set(string.ascii_lowercase + string.digits)


def _run_id_ok(s: str) -> bool:
    return 1 <= len(s) <= 128 and s[0] in ALNUM and all(c in ALNUM | set("._-") for c in s)


def _bucket_ok(s: str) -> bool:
    parts = s.split(".")
    looks_like_ip = len(parts) == 4 and all(p.isascii() and p.isdigit() and p for p in parts)
    return (
        3 <= len(s) <= 63
        and all(c in LOWER | set(".-") for c in s)
        and s[0] in LOWER
        and s[-1] in LOWER
        and ".." not in s
        and ".-" not in s
        and "-." not in s
        and not looks_like_ip
        and not s.startswith("xn--")
    )


def _key_ok(s: str) -> bool:
    segments = s.split("/")
    return (
        len(s.encode("utf-8", "surrogatepass")) <= 1024
        and all(seg not in ("", ".", "..") for seg in segments)
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in s)
    )


def _verdict(check, text: str) -> bool:  # noqa: ANN001 - one of the check_* functions
    try:
        assert check(text) == text
        return True
    except ConfigError as err:
        assert "\n" not in str(err), str(err)
        return False


# Random text, plus near-misses: valid ones with a trailing newline, a slash, a dot segment.
_TEXT = st.text(max_size=80)
_ID_LIKE = st.from_regex(RUN_ID, fullmatch=True)
_NEAR = st.one_of(
    _ID_LIKE,
    _ID_LIKE.map(lambda s: s + "\n"),
    _ID_LIKE.map(lambda s: "/" + s),
    _ID_LIKE.map(lambda s: s + "/.."),
    _ID_LIKE.map(str.lower),
)
_SEGMENTS = st.lists(st.sampled_from(["a", "b.jsonl", "..", ".", "", "x y", "\n", "é"]), max_size=5)


@settings(max_examples=300)
@given(st.one_of(_TEXT, _NEAR))
def test_run_ids_are_accepted_iff_they_match_in_full(text: str) -> None:
    assert _verdict(check_run_id, text) == _run_id_ok(text)


@settings(max_examples=300)
@given(st.one_of(_TEXT, _NEAR, st.from_regex(r"[a-z0-9.-]{1,70}", fullmatch=True)))
def test_buckets_follow_the_s3_rules(text: str) -> None:
    assert _verdict(check_bucket, text) == _bucket_ok(text)


@settings(max_examples=300)
@given(st.one_of(_TEXT, _NEAR, _SEGMENTS.map("/".join)))
def test_keys_never_climb_and_never_have_empty_parts(text: str) -> None:
    ok = _verdict(check_key, text)
    assert ok == (bool(text) and _key_ok(text))
    prefix_ok = _verdict(lambda s: check_key(s, folder=True), text)
    body = text[:-1] if text.endswith("/") else text
    assert prefix_ok == (bool(body) and _key_ok(body))


@settings(max_examples=200)
@given(st.one_of(_TEXT, _NEAR), st.one_of(_TEXT, _SEGMENTS.map("/".join)))
def test_s3_uris_check_bucket_and_key(bucket: str, key: str) -> None:
    uri = f"s3://{bucket}/{key}"
    ok = _verdict(lambda s: check_s3_uri(s, folder=True), uri)
    body = key[:-1] if key.endswith("/") else key
    assert ok == (_bucket_ok(bucket) and "/" not in bucket and (not key or _key_ok(body)))


@settings(max_examples=200)
@given(st.one_of(_TEXT, _SEGMENTS.map("/".join)))
def test_an_accepted_key_lands_inside_the_target_folder(key: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dest"
        try:
            target = safe_target(root, key)
        except StoreError as err:
            assert "\n" not in str(err)
            return
        assert target.is_relative_to(root.resolve()) and target != root.resolve()
