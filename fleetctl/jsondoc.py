"""JSON documents from outside (request bodies, receipt files, stdin): one parser, one set of rules.

The API, ``fleetctl task complete --receipt FILE|-`` and the remote client all read an agent's JSON the
same way: strict UTF-8 with no lone surrogates (escaped or not), integers within SQLite's 64 bits, no
NaN or Infinity, an object at the top. A document refused on one path is refused on every path.
"""

from __future__ import annotations

import json
import re

from fleetctl.errors import UsageError

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"integer {text[:30]} out of range")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:30]} out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def parse_json_object(raw: bytes, what: str = "the body") -> dict:
    """``raw`` as a JSON object, by the API's rules; ``UsageError`` (code ``invalid_json``) otherwise.

    Strict UTF-8 (no lone surrogates, escaped or not), integers within 64 bits, no NaN or Infinity.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})", code="invalid_json") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant, parse_int=_int64, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}", code="invalid_json") from None
    try:
        if _SURROGATE_ESCAPE.search(text):  # strict UTF-8 has none raw: only an escape can make one
            json.dumps(doc, ensure_ascii=False).encode()  # "\ud800" parses, but is not text: refuse it
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid JSON text: it escapes a lone surrogate (\\ud800-\\udfff)",
                         code="invalid_json") from None  # fmt: skip
    if not isinstance(doc, dict):
        raise UsageError(f"{what} must be a JSON object", code="invalid_body")
    return doc
