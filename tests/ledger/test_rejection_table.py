"""docs/ledger.md "Rejection messages" and the node's raise sites are the same set.

The raise sites are read from the source with `ast`: every AitbcError raised in the ledger's
transaction, block, genesis, mempool, node and servicer code becomes a template (an f-string's
placeholders written `...`). Each template must be a row of the table, and each row must still be
built by the code (a stale row fails too). Finality votes and certificates have their own section
and are left out; a few messages only wrap another (`malformed transaction: ...`) and are listed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "ledger.md"
ERRORS = {"InvalidArgument", "FailedPrecondition", "AlreadyExists", "PermissionDenied", "ResourceExhausted",
          "CryptoError", "NotFound", "_malformed"}
# (file, functions left out, and why): building a tx (a caller's error, never the node's), votes and
# certificates ("Finality votes" has their messages)
SOURCES = {
    "aitbc/ledger/tx.py": {"_header", "encode_transfer_body", "encode_mint_body", "encode_evidence_body",
                           "attach_signature", "_malformed", "_receipt_part", "_amount", "encode_economy_body",
                           "encode_settle_body", "encode_slash_body", "encode_authority_vote_body"},
    "aitbc/ledger/authorities.py": set(),
    "aitbc/ledger/state.py": set(),
    "aitbc/ledger/genesis.py": set(),
    "aitbc/ledger/block.py": set(),
    "aitbc/ledger/chain.py": set(),
    "aitbc/ledger/mempool.py": set(),
    "aitbc/ledger/node.py": {"_count_votes", "submit_votes"},
    "server/ledger.py": {"SubmitVotes"},
    "aitbc/ledger/finality.py": "only:_split_evidence,check_evidence",
}
# templates that only wrap another message: the table lists what they wrap instead
WRAPPERS = {"genesis ... ...", "...: ..."}


def _template(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "..." for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return "..."


def code_templates() -> dict[str, str]:
    """template -> where it is raised."""
    out: dict[str, str] = {}
    for rel, skip in SOURCES.items():
        tree = ast.parse((ROOT / rel).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(skip, str) and fn.name not in skip.removeprefix("only:").split(","):
                continue
            if isinstance(skip, set) and fn.name in skip:
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS
                        and node.args):
                    t = _template(node.args[0])
                    if node.func.id == "_malformed":
                        t = "malformed transaction: " + t
                    out.setdefault(t, f"{rel}:{fn.name}")
    return out


def doc_rows() -> list[str]:
    text = DOCS.read_text()
    section = text[text.index("\n## Rejection messages\n"):]
    section = section[:section.index("\n## ", 5)]
    rows = re.findall(r"^\| `((?:[^`])+)` \| [A-Z_]+ \|", section, re.M)
    return [r.replace("\\|", "|") for r in rows]


def test_every_raise_site_has_its_row() -> None:
    rows = set(doc_rows())
    missing = {t: where for t, where in code_templates().items() if t not in rows and t not in WRAPPERS}
    assert not missing, f"raised but not in docs/ledger.md 'Rejection messages': {missing}"


def test_every_row_is_still_raised() -> None:
    templates = set(code_templates())
    # the genesis parser messages are the strict JSON reader's, after "genesis FILE "
    strict = ast.parse((ROOT / "aitbc" / "strict_json.py").read_text())
    parser = {"genesis ... " + _template(n.args[0]) for n in ast.walk(strict)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "StrictJSONError"}
    stale = [r for r in doc_rows() if r not in templates | parser]
    assert not stale, f"rows of docs/ledger.md the code no longer raises: {stale}"


def test_the_table_is_not_empty_and_has_no_duplicates() -> None:
    rows = doc_rows()
    assert len(rows) > 90 and len(rows) == len(set(rows))
