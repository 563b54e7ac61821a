"""Identifiers a user types (run ids, buckets, object keys and prefixes): each is checked by a
full match of its whole text, never a ``^...$`` search (``$`` also matches before a trailing
newline), and a key never climbs out of its bucket or folder.

Standard library only (ground floor).
"""

from __future__ import annotations

import re

from patchgap.errors import ConfigError

#: A run id is one path component: it names ``runs/<run-id>/`` in the bucket.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: S3 bucket naming rules: 3-63 characters of lowercase letters, digits, '.' and '-', starting
#: and ending with a letter or digit.
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
#: One segment of an object key: printable, no '/' and no control characters.
_SEGMENT = re.compile(r"[^/\x00-\x1f\x7f]+")


def check_run_id(run: str, what: str = "run id") -> str:
    """``run`` unchanged when it is a valid run id, else a one-line :class:`ConfigError`."""
    if not isinstance(run, str) or RUN_ID.fullmatch(run) is None:
        raise ConfigError(
            f"{what} {run!r} is not valid: 1-128 letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (no '/')"
        )
    return run


def check_bucket(bucket: str, what: str = "bucket") -> str:
    """``bucket`` unchanged when it follows the S3 naming rules, else a one-line error."""
    ok = (
        isinstance(bucket, str)
        and BUCKET.fullmatch(bucket) is not None
        and ".." not in bucket
        and ".-" not in bucket
        and "-." not in bucket
        and _IP_ADDRESS.fullmatch(bucket) is None
        and not bucket.startswith("xn--")
    )
    if not ok:
        raise ConfigError(
            f"{what} {bucket!r} is not a valid S3 bucket name: 3-63 lowercase letters, digits, "
            "'.' and '-', starting and ending with a letter or digit, e.g. patchgap"
        )
    return bucket


def check_key(key: str, what: str = "key", *, folder: bool = False) -> str:
    """``key`` unchanged when it is a relative object key of non-empty segments with no ``.`` or
    ``..`` among them, else a one-line error. With ``folder`` one trailing ``/`` is allowed (a
    prefix)."""
    body = key[:-1] if folder and isinstance(key, str) and key.endswith("/") else key
    segments = body.split("/") if isinstance(body, str) else []
    ok = (
        bool(body)
        and len(body.encode("utf-8", "surrogatepass")) <= 1024
        and all(_SEGMENT.fullmatch(s) is not None and s not in (".", "..") for s in segments)
    )
    if not ok:
        raise ConfigError(
            f"{what} {key!r} is not a valid object key: '/'-separated non-empty parts, no "
            "leading '/', no '.' or '..' parts, no control characters, at most 1024 bytes"
        )
    return key


def check_s3_uri(uri: str, what: str = "URI", *, folder: bool = False) -> str:
    """``uri`` unchanged when it is ``s3://<bucket>/<key>`` with a valid bucket and key (a bare
    ``s3://<bucket>/`` where ``folder``), else a one-line error."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ConfigError(f"{what} {uri!r} is not an s3:// URI, e.g. s3://patchgap/incoming/")
    bucket, _, key = uri[len("s3://") :].partition("/")
    check_bucket(bucket, f"{what} {uri!r}: bucket")
    if key or not folder:
        check_key(key, f"{what} {uri!r}: key", folder=folder)
    return uri
