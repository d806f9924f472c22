"""Strict JSON for signed files (receipt files, genesis files): one file, one meaning to every reader.

Plain JSON lets readers disagree: Python keeps the last of two equal keys and another parser the
first (or refuses), `1.0` and `1e3` are integers to some readers and floats to others, a byte
order mark is skipped by some and an error to others, and Python reads `NaN` and `Infinity`,
which are not JSON. A file that means two things to two readers can carry two receipts (or two
genesis) under one signature, so these files are read strictly (docs/receipts.md, "Receipt file"):

- UTF-8, without a byte order mark;
- no object with the same key twice (at any depth);
- numbers are integers only: no fraction, no exponent, no NaN or Infinity.

`loads` raises StrictJSONError (a ValueError) whose message completes "the file ...".
"""

from __future__ import annotations

import json
from typing import Any

BOM = "\ufeff"


class StrictJSONError(ValueError):
    """Why a document is refused; the message reads after "the file" ("has a duplicate key ...")."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"has a duplicate key {json.dumps(key)} (an object names each key once)")
        out[key] = value
    return out


def _refuse_float(text: str) -> Any:
    raise StrictJSONError(f"has a number that is not an integer: {text} (numbers are integers only: no fraction, "
                          "no exponent)")


def _refuse_constant(text: str) -> Any:
    raise StrictJSONError(f"has {text}, which is not JSON (numbers are integers only)")


def loads(data: bytes | str) -> Any:
    """Parse one strict JSON document (module docstring); raise StrictJSONError saying why not."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if raw.startswith(b"\xef\xbb\xbf"):
            raise StrictJSONError("starts with a UTF-8 byte order mark (write it without one)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError(f"is not UTF-8 (byte {exc.start} is invalid)") from None
    else:
        text = data
        if text.startswith(BOM):
            raise StrictJSONError("starts with a UTF-8 byte order mark (write it without one)")
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_float=_refuse_float,
                          parse_constant=_refuse_constant)
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError("is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise StrictJSONError(f"is not valid JSON: {exc}") from None
