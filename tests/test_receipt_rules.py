"""Negative (and edge) receipt vectors, tests/vectors/receipt_rules.json (scripts/make_receipt_vectors.py):
every rule of docs/receipts.md "Rejections" has a file a verifier must refuse with the stated reason.

Checked three ways: the project's verifier (aitbc.receipts), the `aitbc receipts verify` command, and a
second minimal loader here (plain json with a duplicate-key hook and hashlib), which also shows the
vector files themselves are plain JSON that any language loads the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from aitbc import receipts
from aitbc.clients.cli import main
from aitbc.errors import ReceiptError

VECTORS_DIR = Path(__file__).parent / "vectors"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "receipts.md"


class Refused(ValueError):
    pass


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise Refused("duplicate key")
    return dict(pairs)


def _no_float(text: str) -> object:
    raise Refused(f"not an integer: {text}")


def minimal_load(raw: bytes) -> object:
    """The second loader: what docs/receipts.md asks of any JSON reader, in a few lines."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise Refused("BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("not UTF-8") from None
    return json.loads(text, object_pairs_hook=_pairs, parse_float=_no_float, parse_constant=_no_float)


RULES = minimal_load((VECTORS_DIR / "receipt_rules.json").read_bytes())
CASES = RULES["cases"]
PARSER_RULES = {"duplicate-key", "utf-8", "numbers", "json"}


def _input(case: dict) -> bytes:
    inp = case["input"]
    return inp["text"].encode() if "text" in inp else bytes.fromhex(inp["hex"])


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS_DIR.glob("*.json")))
def test_vector_files_are_plain_json(name: str) -> None:
    """No vector file relies on a reader's leniency: UTF-8, no duplicate keys, no floats."""
    minimal_load((VECTORS_DIR / name).read_bytes())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_the_verifier_gives_each_vector_its_verdict_and_reason(case: dict) -> None:
    opts = case["options"]
    try:
        r = receipts.load_receipt_file(_input(case))
        receipts.verify_receipt(r, require_attestation=not opts["allow_unattested"],
                                attesters=frozenset(opts["attesters"]) or None)
    except ReceiptError as exc:
        assert case["verdict"] == "invalid", f"refused a valid vector: {exc.message}"
        assert exc.message.startswith(case["reason"]), (exc.message, case["reason"])
        return
    assert case["verdict"] == "valid", f"accepted an invalid vector (want {case['reason']!r})"
    assert r.receipt_hash.hex() == case["receipt_hash"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_aitbc_receipts_verify_gives_the_same_verdict(case: dict, tmp_path: Path) -> None:
    path = tmp_path / "receipt.json"
    path.write_bytes(_input(case))
    argv = ["receipts", "verify", str(path)]
    if case["options"]["allow_unattested"]:
        argv.append("--allow-unattested")
    for a in case["options"]["attesters"]:
        argv += ["--attester", a]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    first = out.getvalue().splitlines()[0]
    if case["verdict"] == "valid":
        assert (rc, first) == (0, "VALID receipt")
    else:
        assert rc == 1 and first.startswith("INVALID: " + case["reason"]), first


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_a_minimal_second_loader_agrees(case: dict) -> None:
    """The parser rules need nothing but a JSON reader with a duplicate-key hook; a valid file's
    receipt_hash is sha256 of the canonical JSON of its body, recomputed here without the library."""
    try:
        doc = minimal_load(_input(case))
    except (Refused, ValueError):
        assert case["verdict"] == "invalid" and case["rule"] in PARSER_RULES, case["name"]
        return
    assert case["rule"] not in PARSER_RULES, case["name"]
    if case["verdict"] == "valid":
        canonical = json.dumps(doc["receipt"], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        assert hashlib.sha256(canonical.encode()).hexdigest() == doc["receipt_hash"] == case["receipt_hash"]


def test_every_rejection_in_the_docs_table_has_a_vector() -> None:
    """docs/receipts.md "Rejections" lists each message; each has at least one vector refused with
    it, and each vector's reason is in the table (no rule without its row, no row without a test)."""
    text = DOCS.read_text()
    section = text[text.index("\n## Rejections"):]
    rows = re.findall(r"^\| `([^`]+)` \|(.*)\|$", section, re.M)
    starts = [msg.split("...")[0] for msg, _ in rows]
    assert len(rows) >= 40
    reasons = [c["reason"] for c in CASES if c["verdict"] == "invalid"]
    for (msg, when), start in zip(rows, starts, strict=True):
        if "no vector" not in when:
            assert any(r.startswith(start) for r in reasons), f"no vector for {msg!r}"
    for reason in reasons:
        assert any(reason.startswith(st) for st in starts), f"vector reason {reason!r} is not in the table"


def test_the_text_manifest_example_of_the_docs() -> None:
    """docs/receipts.md: a text job's artifact_sha256 is sha256(sha256(utf8(text)))."""
    digest = hashlib.sha256(b"hello").digest()
    want = hashlib.sha256(digest).hexdigest()
    assert receipts.manifest_sha256([digest]) == want
    assert f"artifact_sha256       = {want}" in DOCS.read_text()
