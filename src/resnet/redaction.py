"""Credentials kept out of what the pipeline publishes (reports, job summaries, pull-request comments)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

__all__ = ["redact", "scrub", "bare_key", "redact_override"]


def redact(value: Any) -> Any:
    """Hide credentials in URLs (``https://user:token@host/x?sig=...``) before a value is published."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_URL_CREDENTIALS = re.compile(r"(\w+://)[^/\s@]+@")


def scrub(text: str, secrets: Sequence[str]) -> str:
    """Log text without the secret values and URL credentials it may contain."""
    for value in secrets:
        text = text.replace(value, "***")
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def bare_key(key: str) -> str:
    """``params.yaml:++train.lr`` -> ``train.lr``."""
    return key.split(":", 1)[-1].lstrip("+~")


def redact_override(override: str, keys: frozenset[str]) -> str:
    key, _, value = override.partition("=")
    bare = bare_key(key)
    return f"{key}=***" if bare in keys else f"{key}={redact(value)}"
