// Receipt verification in the browser, from docs/receipts.md alone: the receipt file's parser rules
// (strict JSON), the body's field rules, the canonical hash, the provider signature and the
// attestation (secp256k1 public-key recovery), with the reasons `aitbc receipts verify` gives.
// No server is asked; tests/explorer runs every case of tests/vectors/receipt_rules.json here.
"use strict";

const AITBC = (globalThis.AITBC = globalThis.AITBC || {});

class Refused extends Error {}
const refuse = (msg) => { throw new Refused(msg); };

// ---- sha256 ----------------------------------------------------------------------------------
const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);

function sha256(bytes) {
  const len = bytes.length, total = ((len + 9 + 63) >> 6) << 6;
  const m = new Uint8Array(total);
  m.set(bytes);
  m[len] = 0x80;
  const bits = len * 8;
  for (let i = 0; i < 8; i++) m[total - 1 - i] = Math.floor(bits / 2 ** (8 * i)) & 0xff;
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c,
                             0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < total; off += 64) {
    for (let i = 0; i < 16; i++) {
      w[i] = (m[off + 4 * i] << 24) | (m[off + 4 * i + 1] << 16) | (m[off + 4 * i + 2] << 8) | m[off + 4 * i + 3];
    }
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      hh = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  const out = new Uint8Array(32);
  for (let i = 0; i < 8; i++) { out[4 * i] = h[i] >>> 24; out[4 * i + 1] = h[i] >>> 16; out[4 * i + 2] = h[i] >>> 8; out[4 * i + 3] = h[i]; }
  return out;
}

const utf8 = (s) => new TextEncoder().encode(s);
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const unhex = (s) => Uint8Array.from(s.match(/../g) || [], (x) => parseInt(x, 16));
const concat = (...parts) => { const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0)); let o = 0; for (const p of parts) { out.set(p, o); o += p.length; } return out; };
const domainDigest = (domain, payload) => sha256(concat(utf8(domain), new Uint8Array([0]), payload));

// ---- bech32 addresses (BIP-173), `ait1...` = bech32(sha256(compressed public key)[:20]) --------
const CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
const GEN = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];
function polymod(values) {
  let chk = 1;
  for (const v of values) {
    const top = chk >>> 25;
    chk = (((chk & 0x1ffffff) << 5) ^ v) >>> 0;
    for (let i = 0; i < 5; i++) if ((top >>> i) & 1) chk = (chk ^ GEN[i]) >>> 0;
  }
  return chk;
}
const hrpExpand = (hrp) => [...[...hrp].map((c) => c.charCodeAt(0) >> 5), 0, ...[...hrp].map((c) => c.charCodeAt(0) & 31)];
function convertBits(data, from, to, pad) {
  let acc = 0, bits = 0;
  const out = [], maxv = (1 << to) - 1;
  for (const v of data) {
    if (v < 0 || v >> from) throw new Error("invalid data value");
    acc = (acc << from) | v; bits += from;
    while (bits >= to) { bits -= to; out.push((acc >> bits) & maxv); }
    acc &= (1 << bits) - 1;
  }
  if (pad) { if (bits) out.push((acc << (to - bits)) & maxv); }
  else if (bits >= from || ((acc << (to - bits)) & maxv)) throw new Error("invalid padding");
  return out;
}
function bech32Encode(hrp, payload) {
  const data = convertBits(payload, 8, 5, true);
  const pm = polymod([...hrpExpand(hrp), ...data, 0, 0, 0, 0, 0, 0]) ^ 1;
  const check = [0, 1, 2, 3, 4, 5].map((i) => Math.floor(pm / 2 ** (5 * (5 - i))) & 31);
  return hrp + "1" + [...data, ...check].map((d) => CHARSET[d]).join("");
}
function bech32Decode(text) {
  for (const c of text) { const o = c.charCodeAt(0); if (o < 33 || o > 126) throw new Error("invalid characters"); }
  if (text.toLowerCase() !== text && text.toUpperCase() !== text) throw new Error("mixed case");
  text = text.toLowerCase();
  const pos = text.lastIndexOf("1");
  if (pos < 1 || pos + 7 > text.length || text.length > 90) throw new Error("bad length or missing separator");
  const hrp = text.slice(0, pos);
  const data = [];
  for (const c of text.slice(pos + 1)) { const i = CHARSET.indexOf(c); if (i < 0) throw new Error("invalid characters"); data.push(i); }
  if (polymod([...hrpExpand(hrp), ...data]) !== 1) throw new Error("bad checksum");
  return [hrp, convertBits(data.slice(0, -6), 5, 8, false)];
}
// Python's repr() of a str, as the CLI's messages print it
function pyRepr(v) {
  if (typeof v === "string") {
    const q = v.includes("'") && !v.includes('"') ? '"' : "'";
    let s = v.replace(/\\/g, "\\\\");
    if (q === "'") s = s.replace(/'/g, "\\'");
    return q + s + q;
  }
  if (v === true) return "True";
  if (v === false) return "False";
  if (v === null) return "None";
  return typeof v === "bigint" || typeof v === "number" ? String(v) : JSON.stringify(v);
}
function validateAddress(address) {
  if (typeof address !== "string" || !address) refuse("address is empty");
  let hrp, payload;
  try { [hrp, payload] = bech32Decode(address); } catch (e) { refuse(`invalid address ${pyRepr(address)}: ${e.message}`); }
  if (hrp !== "ait") refuse(`invalid address ${pyRepr(address)}: prefix must be 'ait', not '${hrp}'`);
  if (payload.length !== 20) refuse(`invalid address ${pyRepr(address)}: payload must be 20 bytes`);
  if (address !== address.toLowerCase()) refuse(`invalid address ${pyRepr(address)}: use lower case`);
  return payload;
}
const addressOf = (pub33) => bech32Encode("ait", sha256(pub33).slice(0, 20));

// ---- secp256k1 public-key recovery (BigInt, Jacobian coordinates) ------------------------------
const P = 2n ** 256n - 2n ** 32n - 977n;
const N = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n;
const GX = 0x79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798n;
const GY = 0x483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8n;
const mod = (a, m = P) => ((a % m) + m) % m;
function powmod(b, e, m) { let r = 1n; b = mod(b, m); while (e > 0n) { if (e & 1n) r = (r * b) % m; b = (b * b) % m; e >>= 1n; } return r; }
const inv = (a, m = P) => powmod(a, m - 2n, m);
const INF = null;
function jDouble(p) {
  if (p === INF || p[1] === 0n) return INF;
  const [x, y, z] = p;
  const ysq = (y * y) % P, s = (4n * x * ysq) % P, mm = (3n * x * x) % P;
  const nx = mod(mm * mm - 2n * s), ny = mod(mm * (s - nx) - 8n * ysq * ysq), nz = (2n * y * z) % P;
  return [nx, ny, nz];
}
function jAdd(p, q) {
  if (p === INF) return q;
  if (q === INF) return p;
  const [x1, y1, z1] = p, [x2, y2, z2] = q;
  const z1s = (z1 * z1) % P, z2s = (z2 * z2) % P;
  const u1 = (x1 * z2s) % P, u2 = (x2 * z1s) % P, s1 = (y1 * z2s * z2) % P, s2 = (y2 * z1s * z1) % P;
  if (u1 === u2) return s1 === s2 ? jDouble(p) : INF;
  const h = mod(u2 - u1), r = mod(s2 - s1), h2 = (h * h) % P, h3 = (h2 * h) % P, u1h2 = (u1 * h2) % P;
  const nx = mod(r * r - h3 - 2n * u1h2), ny = mod(r * (u1h2 - nx) - s1 * h3), nz = (h * z1 * z2) % P;
  return [nx, ny, nz];
}
function jMul(p, k) { let r = INF; for (let i = 255n; i >= 0n; i--) { r = jDouble(r); if ((k >> i) & 1n) r = jAdd(r, p); } return r; }
function affine(p) { if (p === INF) return INF; const zi = inv(p[2]), zi2 = (zi * zi) % P; return [(p[0] * zi2) % P, (p[1] * zi2 * zi) % P]; }
const be = (b) => BigInt("0x" + (hex(b) || "0"));
const HALF_N = N >> 1n;

function recoverAddress(digest, sig, who) {
  // aitbc.crypto.recover_pubkey's checks, in its order and words
  const r = be(sig.slice(0, 32)), s = be(sig.slice(32, 64)), v = sig[64];
  if (!(r > 0n && r < N) || !(s > 0n && s < N)) refuse(`${who}: bad signature: r or s out of range`);
  if (s > HALF_N) refuse(`${who}: bad signature: high-S signatures are not accepted`);
  if (v !== 0 && v !== 1) refuse(`${who}: bad signature: recovery id must be 0 or 1`);
  const x = r, c = mod(x * x * x + 7n);
  let y = powmod(c, (P + 1n) / 4n, P);
  if ((y * y) % P !== c) refuse(`${who}: bad signature: public key cannot be recovered`);
  if ((y & 1n) !== BigInt(v)) y = P - y;
  const e = mod(be(digest), N), ri = inv(r, N);
  const q = affine(jAdd(jMul([x, y, 1n], mod(s * ri, N)), jMul([GX, GY, 1n], mod(-e * ri, N))));
  if (q === INF) refuse(`${who}: bad signature: public key cannot be recovered`);
  const pub = new Uint8Array(33);
  pub[0] = (q[1] & 1n) ? 3 : 2;
  pub.set(unhex(q[0].toString(16).padStart(64, "0")), 1);
  return addressOf(pub);
}

// ---- strict JSON (aitbc.strict_json): no duplicate keys, integers only, no BOM, UTF-8 ----------
const asciiJson = (s) => JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
function strictParse(text) {
  let i = 0;
  const fail = () => refuse("receipt file is not valid JSON");
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  function value() {
    ws();
    const c = text[i];
    if (c === "{") return object();
    if (c === "[") return array();
    if (c === '"') return string();
    if (text.startsWith("true", i)) { i += 4; return true; }
    if (text.startsWith("false", i)) { i += 5; return false; }
    if (text.startsWith("null", i)) { i += 4; return null; }
    for (const k of ["NaN", "Infinity", "-Infinity"]) {
      if (text.startsWith(k, i)) refuse(`receipt file has ${k}, which is not JSON (numbers are integers only)`);
    }
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/.exec(text.slice(i, i + 400));
    if (!m) fail();
    i += m[0].length;
    if (m[2] !== undefined || m[3] !== undefined) {
      refuse(`receipt file has a number that is not an integer: ${m[0]} (numbers are integers only: no fraction, no exponent)`);
    }
    const n = BigInt(m[0]);
    return n <= BigInt(Number.MAX_SAFE_INTEGER) && n >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
  }
  function string() {
    i++;
    let out = "";
    while (true) {
      if (i >= text.length) fail();
      const c = text[i++];
      if (c === '"') return out;
      if (c < " ") fail();
      if (c !== "\\") { out += c; continue; }
      const e = text[i++];
      const map = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };
      if (e in map) out += map[e];
      else if (e === "u" && /^[0-9a-fA-F]{4}$/.test(text.slice(i, i + 4))) { out += String.fromCharCode(parseInt(text.slice(i, i + 4), 16)); i += 4; }
      else fail();
    }
  }
  function object() {
    // duplicates are refused when the object closes, as Python's object_pairs_hook does (an error
    // inside a later value of the same object comes first)
    i++;
    const out = new Map();
    let dup = null;
    const close = () => {
      i++;
      if (dup !== null) refuse(`receipt file has a duplicate key ${asciiJson(dup)} (an object names each key once)`);
      return out;
    };
    ws();
    if (text[i] === "}") return close();
    while (true) {
      ws();
      if (text[i] !== '"') fail();
      const k = string();
      ws();
      if (text[i++] !== ":") fail();
      const v = value();
      if (out.has(k) && dup === null) dup = k;
      else out.set(k, v);
      ws();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "}") return close();
      fail();
    }
  }
  function array() {
    i++;
    const out = [];
    ws();
    if (text[i] === "]") { i++; return out; }
    while (true) {
      out.push(value());
      ws();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "]") { i++; return out; }
      fail();
    }
  }
  const v = value();
  ws();
  if (i !== text.length) fail();
  return v;
}
function decodeFile(bytes) {
  if (bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) refuse("receipt file starts with a UTF-8 byte order mark (write it without one)");
  let text;
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch (e) { refuse("receipt file is not UTF-8"); }
  return strictParse(text);
}

// ---- the receipt body (aitbc.receipts.ReceiptBody: docs/receipts.md "Fields") ------------------
const FIELDS = [ // dataclass order: the order the checks run in
  ["job_id", "s"], ["provider", "s"], ["client", "s"], ["units", "i"], ["unit_type", "s"], ["price_per_unit", "i"],
  ["model", "s"], ["prompt_hash", "s"], ["started_at", "i"], ["finished_at", "i"], ["artifact_sha256", "s"],
  ["nonce", "s"], ["hub_id", "s"], ["chain_id", "s"], ["version", "i"], ["gpu_ms", "i"], ["width", "i"],
  ["height", "i"], ["steps", "i"], ["images", "i"], ["prompt_tokens", "i"], ["generated_tokens", "i"]];
const V2_ONLY = ["gpu_ms", "width", "height", "steps", "images", "prompt_tokens", "generated_tokens"];
const UNIT_TYPES = { 1: ["gpu_ms", "images", "tokens"], 2: ["tile_steps", "tokens"] };
const MAX_UINT = 2 ** 53 - 1;
const isInt = (v) => typeof v === "number" || typeof v === "bigint";
const isMap = (v) => v instanceof Map;
const sortedList = (xs) => [...xs].sort().join(", ");

function checkBody(data) {
  if (!isMap(data)) refuse("receipt must be a JSON object");
  const ver = data.get("version");
  const names = FIELDS.map(([n]) => n).filter((n) => !(ver === 1 || ver === true) || !V2_ONLY.includes(n));
  const missing = names.filter((n) => !data.has(n)), extra = [...data.keys()].filter((k) => !names.includes(k));
  if (missing.length) refuse(`receipt is missing fields: ${sortedList(missing)}`);
  if (extra.length) refuse(`receipt has unknown fields: ${sortedList(extra)}`);
  const f = (n) => (data.has(n) ? data.get(n) : 0);
  if (!(typeof ver === "number" && (ver === 1 || ver === 2))) refuse(`receipt version ${pyRepr(ver)} is not supported (expected one of 1, 2)`);
  for (const [name, kind] of FIELDS) {
    const v = f(name);
    if (kind === "i") {
      if (!isInt(v) || v < 0 || v > MAX_UINT) refuse(`receipt field ${name} must be an integer in [0, 2^53-1]`);
    } else if (typeof v !== "string" || !/^[\x20-\x7e]*$/.test(v) || v.length > 256) {
      refuse(`receipt field ${name} must be printable ASCII, at most 256 characters`);
    }
  }
  if (!UNIT_TYPES[ver].includes(f("unit_type"))) refuse(`receipt unit_type must be one of ${UNIT_TYPES[ver].join(", ")} in version ${ver}`);
  if (ver >= 2) {
    const [w, h, st, im, pt, gt, u] = ["width", "height", "steps", "images", "prompt_tokens", "generated_tokens", "units"].map((n) => BigInt(f(n)));
    if (f("unit_type") === "tile_steps") {
      if (!(w && h && st && im) || pt || gt) refuse("a tile_steps receipt has width, height, steps and images >= 1 and no token counts");
      const want = ((w * h + 4095n) / 4096n) * st * im;
      if (u !== want) refuse(`receipt units ${u} must be ceil(width x height / 4096) x steps x images = ${want}`);
    } else {
      if (w || h || st || im || pt < 1n) refuse("a tokens receipt has prompt_tokens >= 1 and no width, height, steps or images");
      if (u !== pt + gt) refuse(`receipt units ${u} must be prompt_tokens + generated_tokens (${pt} + ${gt})`);
    }
  }
  for (const n of ["prompt_hash", "artifact_sha256"]) if (!/^[0-9a-f]{64}$/.test(f(n))) refuse(`receipt field ${n} must be 64 lower-case hex characters`);
  if (!/^[0-9a-f]{32}$/.test(f("nonce"))) refuse("receipt field nonce must be 32 lower-case hex characters");
  if (!f("job_id") || !f("chain_id") || !f("model")) refuse("receipt fields job_id, model and chain_id must not be empty");
  if (!/^[a-z0-9][a-z0-9._-]{0,63}$/.test(f("chain_id"))) {
    refuse(`receipt chain_id ${pyRepr(f("chain_id"))} is not a chain id: 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit`);
  }
  if (f("finished_at") < f("started_at")) refuse("receipt finished_at is before started_at");
  try { validateAddress(f("provider")); } catch (e) { if (e instanceof Refused) refuse(`receipt provider: ${e.message}`); throw e; }
  // canonical JSON: minified, keys sorted, ASCII (strings are printable ASCII by now)
  const canon = "{" + names.slice().sort().map((n) => `${JSON.stringify(n)}:${isInt(f(n)) ? String(f(n)) : JSON.stringify(f(n))}`).join(",") + "}";
  return { canonical: canon, fields: Object.fromEntries(names.map((n) => [n, f(n)])) };
}

function signatureHex(value, name) {
  if (value === undefined || value === null) refuse(`receipt file has no ${name}`);
  if (typeof value !== "string" || !/^[0-9a-f]{130}$/.test(value)) refuse(`${name} must be 130 lower-case hex characters (65 bytes r || s || v)`);
  return unhex(value);
}

// The verdict of `aitbc receipts verify FILE [--allow-unattested] [--attester A ...]`:
// {valid: true, ...} or {valid: false, reason}.
function verifyReceiptBytes(bytes, options = {}) {
  try {
    const doc = decodeFile(bytes);
    if (!isMap(doc) || !doc.has("receipt")) refuse("not a receipt file: expected an object with a 'receipt' field");
    const extra = [...doc.keys()].filter((k) => !["receipt", "receipt_hash", "provider_signature", "attestation", "settlement"].includes(k));
    if (extra.length) refuse(`receipt file has unknown fields: ${sortedList(extra)}`);
    const body = checkBody(doc.get("receipt"));
    const claimed = doc.get("receipt_hash");
    if (claimed === undefined || claimed === null) refuse("receipt file has no receipt_hash (it is required: it names the receipt that was signed)");
    if (typeof claimed !== "string" || !/^[0-9a-f]{64}$/.test(claimed)) refuse("receipt_hash must be 64 lower-case hex characters");
    const psig = signatureHex(doc.get("provider_signature"), "provider_signature");
    let attester = "", asig = null;
    if (doc.has("attestation")) {
      const att = doc.get("attestation");
      if (!isMap(att) || att.size !== 2 || !att.has("attester") || !att.has("signature")) {
        refuse("attestation must be an object with exactly the fields attester and signature");
      }
      try { validateAddress(att.get("attester")); } catch (e) { if (e instanceof Refused) refuse(`attestation attester: ${e.message}`); throw e; }
      attester = att.get("attester");
      asig = signatureHex(att.get("signature"), "attestation signature");
    }
    if (doc.has("settlement") && !isMap(doc.get("settlement"))) refuse("settlement must be an object (it is informational and not signed)");
    const h = sha256(utf8(body.canonical));
    if (claimed !== hex(h)) refuse(`receipt_hash ${claimed} does not match the canonical hash ${hex(h)}: a field was altered`);
    const signer = recoverAddress(domainDigest("AITBC/receipt/provider/v1", h), psig, "provider signature");
    if (signer !== body.fields.provider) refuse(`provider signature is by ${signer}, not the receipt's provider ${body.fields.provider}`);
    if (!attester) {
      if (!options.allowUnattested) refuse("receipt is not attested");
    } else {
      const a = recoverAddress(domainDigest("AITBC/receipt/attest/v1", h), asig, "attester signature");
      if (a !== attester) refuse(`attester signature is by ${a}, not the named attester ${attester}`);
      if (options.attesters && options.attesters.length && !options.attesters.includes(attester)) refuse(`attester ${attester} is not authorized`);
    }
    return { valid: true, receiptHash: hex(h), provider: body.fields.provider, attester, fields: body.fields };
  } catch (e) {
    if (e instanceof Refused) return { valid: false, reason: e.message };
    throw e;
  }
}

Object.assign(AITBC, { verifyReceiptBytes, sha256, hex, unhex, bech32Encode, addressOf });
