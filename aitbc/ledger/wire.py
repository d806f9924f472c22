"""Domain <-> proto conversions for LedgerService (no gRPC here, only messages)."""

from __future__ import annotations

from aitbc.errors import InvalidArgument
from aitbc.ledger import finality, state
from aitbc.ledger.block import Block, Header
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import (
    ACTION_NAMES,
    KIND_AUTHORITY_VOTE,
    KIND_EVIDENCE,
    KIND_NAMES,
    KIND_SETTLE,
    KIND_SLASH,
    KIND_TRANSFER,
    Tx,
)
from aitbc.v1 import ledger_pb2

# every kind maps to TRANSACTION_KIND_<its name> (tests/ledger/test_service.py checks the values)
KIND_TO_PROTO = {kind: ledger_pb2.TransactionKind.Value(f"TRANSACTION_KIND_{name}") for kind, name in KIND_NAMES.items()}


def header_to_proto(h: Header) -> ledger_pb2.BlockHeader:
    return ledger_pb2.BlockHeader(
        version=h.version, chain_id=h.chain_id, height=h.height, hash=h.hash.hex(),
        parent_hash=h.parent_hash.hex(), slot=h.slot, timestamp_ms=h.timestamp_ms,
        proposer=h.proposer_address, tx_root=h.tx_root.hex(), state_root=h.state_root.hex(),
        tx_count=h.tx_count, genesis_hash=h.genesis_hash.hex(), set_chain=h.set_chain.hex())


def block_to_proto(b: Block, *, final: bool, canonical: bool, certificate: bytes | None = None) -> ledger_pb2.Block:
    return ledger_pb2.Block(header=header_to_proto(b.header), raw=b.raw, final=final, canonical=canonical,
                            certificate=certificate or b"")


def tx_to_proto(tx: Tx, genesis: Genesis) -> ledger_pb2.Transaction:
    msg = ledger_pb2.Transaction(hash=tx.hash.hex(), raw=tx.raw, kind=KIND_TO_PROTO[tx.kind],
                                 chain_id=tx.chain_id, sender=tx.sender, nonce=tx.nonce,
                                 genesis_hash=tx.genesis_hash.hex())
    if tx.kind == KIND_TRANSFER:
        msg.to = tx.to_address
    msg.amount = tx.amount  # TRANSFER, STAKE, UNSTAKE, ESCROW_DEPOSIT, ESCROW_WITHDRAW (0 for the others)
    if tx.attester_id:
        msg.attester = tx.attester_address
    if tx.receipt is not None:  # MINT, SETTLE
        body = tx.receipt.body
        msg.receipt_hash = tx.receipt.receipt_hash.hex()
        msg.provider = body.provider
        msg.mint_amount = state.mint_amount(body.units, body.price_per_unit, genesis)
    if tx.kind == KIND_SETTLE and tx.quote is not None and tx.receipt is not None:
        msg.attester, msg.quote_hash = tx.receipt.attester, tx.quote.hash().hex()
        msg.fee, msg.client_address = tx.quote.total, tx.quote.client_address
    elif tx.kind == KIND_SLASH:
        msg.slashed_provider = tx.verdict[0].body.provider
        msg.receipt_hash = tx.verdict[0].receipt_hash.hex()
        msg.honest_providers.extend(r.body.provider for r in tx.verdict[1:])
    elif tx.kind == KIND_AUTHORITY_VOTE:
        msg.authority_action, msg.authority_subject = ACTION_NAMES[tx.action], tx.subject_address
    elif tx.kind == KIND_EVIDENCE:
        from aitbc import bech32, crypto

        msg.evidence = tx.evidence
        msg.convicted = bech32.encode(crypto.ADDRESS_HRP, finality.evidence_voter(tx.evidence))
    return msg


def parse_hash(text: str, what: str = "hash") -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise InvalidArgument(f"{what} must be 64 hex characters")
    return raw
