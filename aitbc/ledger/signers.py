"""Signatures recovered ahead of the checks that need them: a node catching up has the verifier's
worker processes recover a StreamBlocks message's proposer and vote signatures while it imports
the message before it (aitbc.ledger.verifier.ParallelVerifier.signers), so both cores work.

A recovered signer is keyed by digest || signature, the digest computed from the bytes as they
were received. The check computes the digest again from what it checks (a decoded header, a vote's
own fields) and finds an entry only when the two agree, so a signer recovered elsewhere counts for
exactly what was signed, and a signature without an entry is recovered where it is checked, by the
same function (signer_id): the rules are the same either way."""

from __future__ import annotations

from collections.abc import Mapping

from aitbc import crypto

# digest || signature -> the 20-byte account id of the key that made the signature (signer_id)
Signers = Mapping[bytes, bytes]


def signer_id(digest: bytes, signature: bytes) -> bytes:
    """The account id of the key that made a 65-byte low-S signature over `digest` (CryptoError
    when none can be recovered)."""
    return crypto.sha256(crypto.recover_pubkey(digest, signature))[:20]


def signed_by(account_id: bytes, digest: bytes, signature: bytes, recovered: Signers | None = None) -> bool:
    """`signature` over `digest` is by `account_id`: as recovered beforehand for this very digest,
    or recovered now (CryptoError when no key can be recovered)."""
    got = recovered.get(digest + signature) if recovered else None
    return (got if got is not None else signer_id(digest, signature)) == account_id
