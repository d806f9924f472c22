#!/usr/bin/env python3
"""Write tests/vectors/receipts.json from fixed keys (RFC 6979 signatures are deterministic).

Run once when the format changes; tests/test_receipts.py recomputes every value from the docs.
"""

from __future__ import annotations

import json
from pathlib import Path

from aitbc import crypto, receipts

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    provider = crypto.PrivateKey(crypto.sha256(b"aitbc vector provider key"))
    attester = crypto.PrivateKey(crypto.sha256(b"aitbc vector attester key"))
    png_digests = [crypto.sha256(b"first image bytes"), crypto.sha256(b"second image bytes")]
    cases = []
    for name, digests, unit_type, units in (
        ("one image", png_digests[:1], "gpu_ms", 5823),
        ("two images", png_digests, "gpu_ms", 10241),
    ):
        body = receipts.ReceiptBody(
            job_id="01a21319ab374d0868b54d7b5836", provider=provider.address, client="devnet-client",
            units=units, unit_type=unit_type, price_per_unit=3, model="tiny-sd",
            prompt_hash=crypto.sha256(b"a futuristic city skyline at night").hex(),
            started_at=1795616779065, finished_at=1795616784926,
            artifact_sha256=receipts.manifest_sha256(digests), nonce="1a8480b9cfc16d1906f537d2adc111b7",
            hub_id="", chain_id="aitbc-devnet",
        )
        signed = receipts.sign_receipt(body, provider).attest(attester)
        cases.append({
            "name": name,
            "artifact_digests": [d.hex() for d in digests],
            "canonical_json": body.canonical_bytes().decode(),
            "receipt_hash": signed.receipt_hash.hex(),
            "provider_digest": crypto.domain_digest(receipts.PROVIDER_DOMAIN, signed.receipt_hash).hex(),
            "attest_digest": crypto.domain_digest(receipts.ATTEST_DOMAIN, signed.receipt_hash).hex(),
            "receipt_file": signed.to_json_dict(),
        })
    out = {
        "provider_private_key": provider.secret.hex(),
        "provider_public_key": provider.pubkey.hex(),
        "provider_address": provider.address,
        "attester_private_key": attester.secret.hex(),
        "attester_public_key": attester.pubkey.hex(),
        "attester_address": attester.address,
        "cases": cases,
    }
    (ROOT / "tests" / "vectors" / "receipts.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
