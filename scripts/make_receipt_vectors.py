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
    common = dict(
        job_id="01a21319ab374d0868b54d7b5836", provider=provider.address, client="devnet-client", price_per_unit=3,
        started_at=1795616779065, finished_at=1795616784926, nonce="1a8480b9cfc16d1906f537d2adc111b7", hub_id="",
        chain_id="aitbc-devnet",
    )
    image_prompt = crypto.sha256(b"a futuristic city skyline at night").hex()
    bodies = [  # version 1 (still verifiable), then version 2 (what miners sign today)
        ("one image (v1)", png_digests[:1], dict(version=1, units=5823, unit_type="gpu_ms", model="tiny-sd",
                                                prompt_hash=image_prompt)),
        ("two images (v1)", png_digests, dict(version=1, units=10241, unit_type="gpu_ms", model="tiny-sd",
                                              prompt_hash=image_prompt)),
        # 512x512 = 64 tiles, x 30 steps x 2 images = 3840 units, whatever the GPU time (5861 ms)
        ("two images 512x512, 30 steps (v2)", png_digests,
         dict(units=receipts.tile_steps(512, 512, 30, 2), unit_type="tile_steps", model="sd-1.5",
              prompt_hash=image_prompt, gpu_ms=5861, width=512, height=512, steps=30, images=2)),
        # 520x520 is 270,400 pixels: 66.02 tiles, rounded up to 67, x 4 steps x 1 image = 268 units
        ("one image 520x520, 4 steps (v2)", png_digests[:1],
         dict(units=receipts.tile_steps(520, 520, 4, 1), unit_type="tile_steps", model="tiny-sd",
              prompt_hash=image_prompt, gpu_ms=131, width=520, height=520, steps=4, images=1)),
        ("text, 12 + 40 tokens (v2)", [crypto.sha256(b"generated text")],
         dict(units=52, unit_type="tokens", model="tiny-llama", prompt_hash=crypto.sha256(b"Once upon a time").hex(),
              gpu_ms=840, prompt_tokens=12, generated_tokens=40)),
    ]
    for name, digests, fields in bodies:
        body = receipts.ReceiptBody(**common, **fields, artifact_sha256=receipts.manifest_sha256(digests))
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
