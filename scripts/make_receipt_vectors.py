#!/usr/bin/env python3
"""Write tests/vectors/receipts.json and tests/vectors/receipt_rules.json from fixed keys (RFC 6979
signatures are deterministic, so a re-run writes the same bytes).

receipts.json holds valid receipts (tests/test_receipts.py recomputes every value from the docs);
receipt_rules.json holds one receipt file per rule of docs/receipts.md ("Rejections"), each with the
verdict and the start of the message a verifier gives (tests/test_receipt_rules.py). Run once when
the format changes.
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
    rules = rule_vectors(provider, attester, cases[4]["receipt_file"])
    (ROOT / "tests" / "vectors" / "receipt_rules.json").write_text(json.dumps(rules, indent=2) + "\n")


def _canonical(body: dict) -> bytes:  # docs/receipts.md, without the library's validation
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signed(body: dict, provider: crypto.PrivateKey, attester: crypto.PrivateKey | None) -> dict:
    """A file whose hash and signatures are right for `body`, valid or not: a vector then breaks one rule."""
    rh = crypto.sha256(_canonical(body))
    out = {"receipt": body, "receipt_hash": rh.hex(),
           "provider_signature": provider.sign(crypto.domain_digest(receipts.PROVIDER_DOMAIN, rh)).hex()}
    if attester is not None:
        out["attestation"] = {"attester": attester.address,
                              "signature": attester.sign(crypto.domain_digest(receipts.ATTEST_DOMAIN, rh)).hex()}
    return out


def _high_s(sig_hex: str) -> str:
    """The high-S twin of a low-S signature: same r, s' = n - s, recovery id flipped; valid math, refused."""
    sig = bytes.fromhex(sig_hex)
    s = int.from_bytes(sig[32:64], "big")
    return (sig[:32] + (crypto.SECP256K1_N - s).to_bytes(32, "big") + bytes([sig[64] ^ 1])).hex()


def _no_point_r() -> bytes:
    """The smallest r whose x is not on secp256k1 (x^3 + 7 has no square root mod p): no key recovers."""
    p = 2**256 - 2**32 - 977
    x = 1
    while pow((x**3 + 7) % p, (p - 1) // 2, p) == 1:
        x += 1
    return x.to_bytes(32, "big")


def rule_vectors(provider: crypto.PrivateKey, attester: crypto.PrivateKey, text_file: dict) -> dict:
    """Receipt files that each break one rule (or, verdict valid, stress one): input bytes, options,
    verdict, reason (the message's start)."""
    base = text_file["receipt"]  # the version 2 text receipt of receipts.json
    other = crypto.PrivateKey(crypto.sha256(b"aitbc vector other key"))
    cases: list[dict] = []

    def pretty(doc: object) -> str:
        return json.dumps(doc, indent=2) + "\n"

    def add(name: str, rule: str, text: str | bytes, reason: str = "", *, allow_unattested: bool = False,
            attesters: list[str] | None = None) -> None:
        case: dict = {"name": name, "rule": rule}
        if isinstance(text, str):
            case["input"] = {"text": text}
        else:
            case["input"] = {"hex": text.hex()}
        case["options"] = {"allow_unattested": allow_unattested,
                           "attesters": [attester.address] if attesters is None else attesters}
        if reason:
            case.update(verdict="invalid", reason=reason)
        else:
            case.update(verdict="valid", receipt_hash=json.loads(text)["receipt_hash"])
        cases.append(case)

    def body(**changes: object) -> dict:
        b = dict(base)
        b.update(changes)
        return b

    def signed(**changes: object) -> dict:
        return _signed(body(**changes), provider, attester)

    good = signed()
    # -- valid files: what a strict verifier must still accept
    add("quotes, backslashes and every printable ASCII character in strings", "strings",
        pretty(signed(client="say \"hi\" \\ back", model="".join(map(chr, range(0x20, 0x7F))))))
    add("a file spelling a character with a JSON escape (the hash is over the canonical JSON, not the file)",
        "canonical-json", pretty(good).replace('"tiny-llama"', '"tiny\\u002dllama"'))
    add("minified file, keys in another order", "canonical-json",
        json.dumps({k: good[k] for k in reversed(list(good))}, separators=(",", ":")))
    add("with an informational settlement object", "file-fields",
        pretty({**good, "settlement": {"state": "FINAL", "tx_hash": "ab" * 32, "block_height": 7, "amount": 156}}))
    unattested = _signed(body(), provider, None)
    add("unattested, accepted with --allow-unattested", "unattested", pretty(unattested), allow_unattested=True)
    add("any attester when no attester set is given", "attester-set", pretty(good), attesters=[])
    add("hub_id set, 256-character client", "strings", pretty(signed(hub_id="hub-1", client="c" * 256)))

    # -- the parser: one file, one meaning
    add("duplicate key in the body (Python would keep the last units)", "duplicate-key",
        pretty(good).replace('"units": 52,', '"units": 52,\n    "units": 5200,'),
        'receipt file has a duplicate key "units"')
    add("duplicate key spelled with a JSON escape (\\u0075nits is units)", "duplicate-key",
        pretty(good).replace('"units": 52,', '"units": 52,\n    "\\u0075nits": 5200,'),
        'receipt file has a duplicate key "units"')
    add("duplicate top-level key", "duplicate-key",
        pretty(good).replace('  "receipt_hash"', '  "receipt_hash": "' + "0" * 64 + '",\n  "receipt_hash"', 1),
        'receipt file has a duplicate key "receipt_hash"')
    add("duplicate key in the attestation", "duplicate-key",
        pretty(good).replace('"attester": ', '"attester": "' + other.address + '",\n    "attester": ', 1),
        'receipt file has a duplicate key "attester"')
    add("duplicate key in the settlement (informational, still one meaning)", "duplicate-key",
        pretty({**good, "settlement": {"state": "FINAL"}}).replace('"state": "FINAL"', '"state": "FINAL", "state": "X"'),
        'receipt file has a duplicate key "state"')
    add("UTF-8 byte order mark", "utf-8", b"\xef\xbb\xbf" + pretty(good).encode(),
        "receipt file starts with a UTF-8 byte order mark")
    add("not UTF-8 (a Latin-1 byte in a string)", "utf-8", pretty(signed(client="caf")).replace(
        '"caf"', '"caf\x00"').encode().replace(b"\x00", b"\xe9"), "receipt file is not UTF-8")
    add("UTF-16", "utf-8", pretty(good).encode("utf-16"), "receipt file is not UTF-8")
    add("a number with a fraction (3.0)", "numbers", pretty(good).replace('"price_per_unit": 3,',
                                                                          '"price_per_unit": 3.0,'),
        "receipt file has a number that is not an integer: 3.0")
    add("a number with an exponent (52e0)", "numbers", pretty(good).replace('"units": 52,', '"units": 52e0,'),
        "receipt file has a number that is not an integer: 52e0")
    add("NaN (not JSON; Python reads it)", "numbers", pretty({**good, "settlement": {"amount": 0}}).replace(
        '"amount": 0', '"amount": NaN'), "receipt file has NaN")
    add("Infinity", "numbers", pretty(good).replace('"units": 52,', '"units": Infinity,'),
        "receipt file has Infinity")
    add("truncated JSON", "json", pretty(good)[:200], "receipt file is not valid JSON")
    add("a JSON array", "file-fields", "[" + pretty(good) + "]",
        "not a receipt file: expected an object with a 'receipt' field")

    # -- the file's fields
    add("unknown top-level field", "file-fields", pretty({**good, "note": "paid"}),
        "receipt file has unknown fields: note")
    add("no receipt_hash", "receipt-hash", pretty({k: v for k, v in good.items() if k != "receipt_hash"}),
        "receipt file has no receipt_hash")
    add("receipt_hash in upper case", "receipt-hash", pretty({**good, "receipt_hash": good["receipt_hash"].upper()}),
        "receipt_hash must be 64 lower-case hex characters")
    add("receipt_hash null", "receipt-hash", pretty({**good, "receipt_hash": None}),
        "receipt file has no receipt_hash")
    altered = {**good, "receipt": body(price_per_unit=4)}
    add("a field altered after signing (price 3 -> 4)", "receipt-hash", pretty(altered),
        f"receipt_hash {good['receipt_hash']} does not match the canonical hash")
    add("no provider_signature", "signature-hex",
        pretty({k: v for k, v in good.items() if k != "provider_signature"}), "receipt file has no provider_signature")
    add("provider_signature in upper case", "signature-hex",
        pretty({**good, "provider_signature": good["provider_signature"].upper()}),
        "provider_signature must be 130 lower-case hex characters")
    add("provider_signature of 64 bytes (no recovery id)", "signature-hex",
        pretty({**good, "provider_signature": good["provider_signature"][:128]}),
        "provider_signature must be 130 lower-case hex characters")
    add("provider_signature with spaces", "signature-hex",
        pretty({**good, "provider_signature": good["provider_signature"][:64] + " " + good["provider_signature"][64:]}),
        "provider_signature must be 130 lower-case hex characters")
    add("attestation null", "attestation", pretty({**good, "attestation": None}),
        "attestation must be an object with exactly the fields attester and signature")
    add("attestation with an extra field", "attestation",
        pretty({**good, "attestation": {**good["attestation"], "time": 1}}),
        "attestation must be an object with exactly the fields attester and signature")
    add("attestation attester not an address", "attestation",
        pretty({**good, "attestation": {**good["attestation"], "attester": "ait1bad"}}),
        "attestation attester: invalid address")
    add("attestation attester empty", "attestation",
        pretty({**good, "attestation": {**good["attestation"], "attester": ""}}), "attestation attester: address is empty")
    add("attestation signature in upper case", "signature-hex",
        pretty({**good, "attestation": {**good["attestation"], "signature": good["attestation"]["signature"].upper()}}),
        "attestation signature must be 130 lower-case hex characters")
    add("settlement not an object", "file-fields", pretty({**good, "settlement": "FINAL"}),
        "settlement must be an object")

    # -- the body
    add("body not an object", "body-fields", pretty({**good, "receipt": [base]}), "receipt must be a JSON object")
    add("unknown body field", "body-fields", pretty(signed(tip=1)), "receipt has unknown fields: tip")
    add("body field missing", "body-fields", pretty(_signed({k: v for k, v in base.items() if k != "nonce"},
                                                            provider, attester)), "receipt is missing fields: nonce")
    add("version 3", "version", pretty(signed(version=3)), "receipt version 3 is not supported")
    add("version as a string", "version", pretty(signed(version="2")), "receipt version '2' is not supported")
    add("version 1 body with a version 2 field", "body-fields",
        pretty(signed(version=1, unit_type="gpu_ms", units=840)), "receipt has unknown fields: generated_tokens, ")
    add("unit_type not of its version", "unit-type", pretty(signed(unit_type="gpu_ms")),
        "receipt unit_type must be one of tile_steps, tokens in version 2")
    add("an integer as a string", "integers", pretty(signed(units="52")),
        "receipt field units must be an integer in [0, 2^53-1]")
    add("a boolean as an integer", "integers", pretty(signed(price_per_unit=True)),
        "receipt field price_per_unit must be an integer in [0, 2^53-1]")
    add("a negative integer", "integers", pretty(signed(gpu_ms=-1)),
        "receipt field gpu_ms must be an integer in [0, 2^53-1]")
    add("an integer of 2^53 (not exact in an IEEE double)", "integers", pretty(signed(started_at=2**53)),
        "receipt field started_at must be an integer in [0, 2^53-1]")
    add("a string field as a number", "strings", pretty(signed(client=5)),
        "receipt field client must be printable ASCII, at most 256 characters")
    add("non-ASCII in a string (UTF-8 in the file)", "strings",
        json.dumps(signed(model="caf\u00e9"), indent=2, ensure_ascii=False) + "\n",
        "receipt field model must be printable ASCII")
    add("non-ASCII in a string (JSON escape)", "strings", pretty(signed(model="caf\u00e9")),
        "receipt field model must be printable ASCII")
    add("a control character in a string (tab)", "strings", pretty(signed(client="a\tb")),
        "receipt field client must be printable ASCII")
    add("a string ending in a newline", "strings", pretty(signed(model="tiny-llama\n")),
        "receipt field model must be printable ASCII")
    add("a NUL in a string", "strings", pretty(signed(client="a\u0000")),
        "receipt field client must be printable ASCII")
    add("a string of 257 characters", "strings", pretty(signed(client="c" * 257)),
        "receipt field client must be printable ASCII, at most 256 characters")
    add("prompt_hash in upper case", "hex", pretty(signed(prompt_hash=base["prompt_hash"].upper())),
        "receipt field prompt_hash must be 64 lower-case hex characters")
    add("artifact_sha256 of 63 characters", "hex", pretty(signed(artifact_sha256=base["artifact_sha256"][:63])),
        "receipt field artifact_sha256 must be 64 lower-case hex characters")
    add("artifact_sha256 ending in a newline", "hex", pretty(signed(artifact_sha256=base["artifact_sha256"] + "\n")),
        "receipt field artifact_sha256 must be printable ASCII")
    add("nonce in upper case", "hex", pretty(signed(nonce=base["nonce"].upper())),
        "receipt field nonce must be 32 lower-case hex characters")
    add("nonce of 16 characters", "hex", pretty(signed(nonce=base["nonce"][:16])),
        "receipt field nonce must be 32 lower-case hex characters")
    for name in ("job_id", "model", "chain_id"):
        add(f"empty {name}", "non-empty", pretty(signed(**{name: ""})),
            "receipt fields job_id, model and chain_id must not be empty")
    add("chain_id in upper case", "chain-id", pretty(signed(chain_id="AITBC-devnet")),
        "receipt chain_id 'AITBC-devnet' is not a chain id")
    add("chain_id of 65 characters", "chain-id", pretty(signed(chain_id="a" * 65)),
        "receipt chain_id '" + "a" * 65 + "' is not a chain id")
    add("finished_at before started_at", "times", pretty(signed(finished_at=base["started_at"] - 1)),
        "receipt finished_at is before started_at")
    add("provider not an address", "provider", pretty(signed(provider="ait1notanaddress")),
        "receipt provider: invalid address")
    add("provider empty", "provider", pretty(signed(provider="")), "receipt provider: address is empty")
    add("provider in upper case", "provider", pretty(signed(provider=base["provider"].upper())),
        "receipt provider: invalid address")
    add("tokens: units not prompt + generated", "units", pretty(signed(units=53)),
        "receipt units 53 must be prompt_tokens + generated_tokens (12 + 40)")
    add("tokens: no prompt tokens", "units", pretty(signed(prompt_tokens=0, units=40)),
        "a tokens receipt has prompt_tokens >= 1 and no width, height, steps or images")
    add("tokens: image fields set", "units", pretty(signed(steps=1)),
        "a tokens receipt has prompt_tokens >= 1 and no width, height, steps or images")
    image = dict(unit_type="tile_steps", prompt_tokens=0, generated_tokens=0, width=512, height=512, steps=30,
                 images=2)
    add("tile_steps: units do not add up", "units", pretty(signed(**image, units=3841)),
        "receipt units 3841 must be ceil(width x height / 4096) x steps x images = 3840")
    add("tile_steps: a zero dimension", "units", pretty(signed(**{**image, "width": 0}, units=0)),
        "a tile_steps receipt has width, height, steps and images >= 1 and no token counts")

    # -- signatures
    add("provider signature high-S (the valid twin of a low-S signature)", "low-s",
        pretty({**good, "provider_signature": _high_s(good["provider_signature"])}),
        "provider signature: bad signature: high-S signatures are not accepted")
    add("attester signature high-S", "low-s",
        pretty({**good, "attestation": {**good["attestation"], "signature": _high_s(good["attestation"]["signature"])}}),
        "attester signature: bad signature: high-S signatures are not accepted")
    psig = good["provider_signature"]
    add("provider signature r = 0", "r-s-range", pretty({**good, "provider_signature": "00" * 32 + psig[64:]}),
        "provider signature: bad signature: r or s out of range")
    n = crypto.SECP256K1_N.to_bytes(32, "big").hex()
    add("provider signature s = n", "r-s-range", pretty({**good, "provider_signature": psig[:64] + n + psig[128:]}),
        "provider signature: bad signature: r or s out of range")
    add("provider signature recovery id 2", "recovery-id", pretty({**good, "provider_signature": psig[:128] + "02"}),
        "provider signature: bad signature: recovery id must be 0 or 1")
    add("provider signature r not on the curve", "recovery-id",
        pretty({**good, "provider_signature": _no_point_r().hex() + psig[64:]}),
        "provider signature: bad signature: public key cannot be recovered")
    forged = _signed(body(), other, attester)
    add("provider signature by another key", "provider-signature", pretty(forged), "provider signature is by ")
    rh = bytes.fromhex(good["receipt_hash"])
    cross = other.sign(crypto.domain_digest(receipts.ATTEST_DOMAIN, rh)).hex()
    add("attestation by another key than the named attester", "attester-signature",
        pretty({**good, "attestation": {"attester": attester.address, "signature": cross}}), "attester signature is by ")
    replay = attester.sign(crypto.domain_digest(receipts.PROVIDER_DOMAIN, rh)).hex()
    add("attestation signed over the provider digest (domain separation)", "attester-signature",
        pretty({**good, "attestation": {"attester": attester.address, "signature": replay}}), "attester signature is by ")
    add("unattested without --allow-unattested", "unattested", pretty(unattested), "receipt is not attested")
    add("attester outside the given set", "attester-set", pretty(good),
        f"attester {attester.address} is not authorized", attesters=[other.address])
    return {
        "about": "Receipt files (input: text, or hex when not UTF-8) with what docs/receipts.md says a verifier "
                 "answers: verdict valid or invalid, and for invalid the start of the reason. Options: "
                 "allow_unattested (`aitbc receipts verify --allow-unattested`) and attesters (`--attester`; "
                 "empty: any attester). Keys: tests/vectors/receipts.json.",
        "cases": cases,
    }


if __name__ == "__main__":
    main()
