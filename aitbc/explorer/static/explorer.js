// Live parts of the explorer's pages; every page is complete without them.
"use strict";

function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]); }
function utc(ms) { return new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC"); }

// the block list: new blocks arrive as server-sent events and are put on top (the list keeps 20)
const blocks = document.querySelector("#blocks tbody");
if (blocks && window.EventSource) {
  const live = new EventSource("/events");
  live.addEventListener("block", (ev) => {
    const b = JSON.parse(ev.data);
    const old = blocks.querySelector(`tr[data-height='${b.height}']`);
    const row = document.createElement("tr");
    row.dataset.height = b.height;
    row.innerHTML = `<td><a href='/block/${b.height}'>${b.height}</a></td><td>${esc(utc(b.time_ms))}</td>` +
      `<td><a href='/account/${esc(b.proposer)}'>${esc(b.proposer)}</a></td><td>${b.tx_count}</td>` +
      `<td>${b.final ? "yes" : "not yet"}</td>`;
    if (old) old.replaceWith(row); else blocks.prepend(row);
    while (blocks.rows.length > 20) blocks.deleteRow(blocks.rows.length - 1);
  });
  live.addEventListener("final", (ev) => {
    const f = JSON.parse(ev.data).final_height;
    for (const row of blocks.rows) if (Number(row.dataset.height) <= f) row.cells[4].textContent = "yes";
  });
}

// the verify page: a dropped or chosen receipt file is checked here (static/verify.js)
const drop = document.getElementById("drop");
const verdict = document.getElementById("verdict");
async function check(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const unattested = document.getElementById("unattested");
  const r = window.AITBC.verifyReceiptBytes(bytes, { allowUnattested: unattested && unattested.checked });
  verdict.className = r.valid ? "valid" : "invalid";
  verdict.textContent = r.valid
    ? `VALID receipt ${r.receiptHash}\nprovider ${r.provider}\nattester ${r.attester || "(none)"}\n` +
      `units ${r.fields.units} ${r.fields.unit_type} at ${r.fields.price_per_unit} per unit, model ${r.fields.model}`
    : `INVALID: ${r.reason}`;
}
if (drop && verdict) {
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); if (ev.dataTransfer.files[0]) check(ev.dataTransfer.files[0]); });
  document.getElementById("file").addEventListener("change", (ev) => { if (ev.target.files[0]) check(ev.target.files[0]); });
}
