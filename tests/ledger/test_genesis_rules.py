"""Genesis integer bounds and file parsing (docs/ledger.md, "Genesis"): every bound is enforced with a
message naming the field and the range, at the bound accepted, one past it refused; `aitbc chain init`
refuses out-of-range options the same way (exit 2, no traceback, no file); a genesis file that could
mean two genesis to two readers (duplicate key, float, BOM) is refused."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from aitbc.clients import chain_cli
from aitbc.errors import InvalidArgument
from aitbc.ledger.genesis import INTEGER_BOUNDS, Genesis, make_genesis

from .helpers import ATTESTER, AUTH

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ledger.md"
BOUNDS = [  # (field, least, most): what docs/ledger.md states
    ("block_time_ms", 50, 3_600_000),
    ("max_price_per_unit", 0, 2**53 - 1),
    ("max_mint_per_receipt", 1, 2**64 - 1),
    ("genesis_time_ms", 0, 2**53 - 1),
    ("max_block_txs", 1, 2**32 - 1),
]


def _genesis(**kw: int) -> Genesis:
    return make_genesis("aitbc-test", [AUTH[0].address], [ATTESTER.address], **kw)


def test_the_bounds_are_the_documented_ones() -> None:
    assert {name: (lo, hi) for name, (lo, hi, _) in INTEGER_BOUNDS.items()} == {n: (lo, hi) for n, lo, hi in BOUNDS}


@pytest.mark.parametrize(("field", "least", "most"), BOUNDS)
def test_each_integer_is_accepted_at_its_bounds_and_refused_past_them(field: str, least: int, most: int) -> None:
    for ok in (least, most):
        assert getattr(_genesis(**{field: ok}), field) == ok
    for bad in (least - 1, most + 1):
        with pytest.raises(InvalidArgument, match=rf"^genesis {field} must be an integer in \[{least}, .*got {bad}$"):
            _genesis(**{field: bad})
    with pytest.raises(InvalidArgument, match=f"^genesis {field} must be an integer"):
        _genesis(**{field: True})  # a boolean is not an integer


def test_the_default_caps_are_in_range_and_stated() -> None:
    g = _genesis()
    assert (g.max_price_per_unit, g.max_mint_per_receipt) == (10**12, 10**18)
    text = DOCS.read_text()
    assert "| `max_mint_per_receipt` | integer | cap on the amount one receipt mints, `[1, 2^64-1]`" in text


def _init(tmp_path: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = chain_cli.main(["chain", "init", "--chain-id", "aitbc-test", "--authority", AUTH[0].address,
                             "--out", str(tmp_path / "genesis.json"), *extra])
    return rc, err.getvalue()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-price-per-unit", str(2**53), "genesis max_price_per_unit must be an integer in [0, 2^53-1]"),
    ("--max-mint-per-receipt", str(2**64), "genesis max_mint_per_receipt must be an integer in [1, 2^64-1]"),
    ("--max-mint-per-receipt", "0", "genesis max_mint_per_receipt must be an integer in [1, 2^64-1]"),
    ("--block-time", "0.01", "genesis block_time_ms must be an integer in [50, 3,600,000]"),
    ("--max-block-txs", str(2**32), "genesis max_block_txs must be an integer in [1, 2^32-1]"),
])
def test_chain_init_refuses_out_of_range_values_by_name(tmp_path: Path, option: str, value: str, message: str) -> None:
    rc, err = _init(tmp_path, option, value)
    assert rc == 2 and err.startswith("error: " + message) and "Traceback" not in err
    assert not (tmp_path / "genesis.json").exists()


def test_chain_init_accepts_the_largest_mint_cap(tmp_path: Path) -> None:
    rc, _ = _init(tmp_path, "--max-mint-per-receipt", str(2**64 - 1))
    assert rc == 0
    assert Genesis.load(tmp_path / "genesis.json").max_mint_per_receipt == 2**64 - 1


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('"block_time_ms": 1000,', '"block_time_ms": 1000,\n  "block_time_ms": 50,'),
     'has a duplicate key "block_time_ms"'),
    (lambda t: t.replace('"block_time_ms": 1000,', '"block_time_ms": 1000.0,'), "has a number that is not an integer"),
    (lambda t: "\ufeff" + t, "starts with a UTF-8 byte order mark"),
])
def test_a_genesis_file_with_two_meanings_is_refused(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "genesis.json"
    _genesis().save(path)
    assert Genesis.load(path) == _genesis()
    path.write_text(edit(path.read_text()))
    with pytest.raises(InvalidArgument, match=f"^genesis {path} {message}"):
        Genesis.load(path)

