// The histodetect page: send patches to POST /v1/predict in chunks the server accepts,
// show each with its probability, label, uncertainty and Grad-CAM overlay, sort,
// filter and download the results. Plain JavaScript, no build step.
"use strict";

const IMAGE_NAME = /\.(png|jpe?g|tiff?)$/i;
const BROWSER_CAN_SHOW = /\.(png|jpe?g)$/i; // browsers do not display TIFF
const state = {
  rows: [], // {name, url, prob, label, threshold, entropy, sd, overlay, error}
  limits: { max_files: 256, max_upload_bytes: 16 * 2 ** 20, tta: 1 },
  threshold: 0.5,
};
const $ = (selector) => document.querySelector(selector);

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

async function loadModelCard() {
  try {
    const response = await fetch("/v1/model");
    const card = await response.json();
    state.limits = card.serving;
    state.threshold = card.threshold;
    const best = card.validation.best_epoch;
    const parts = [
      `${card.architecture}${card.preset ? ` (${card.preset} preset)` : ""}`,
      best ? `validation AUC ${best.val_auc.toFixed(3)} at epoch ${best.epoch}` : null,
      `threshold ${card.threshold.toFixed(3)}`,
      card.calibration.temperature !== 1 ? `temperature ${card.calibration.temperature.toFixed(2)}` : null,
      card.data.fingerprint ? `data ${card.data.fingerprint.slice(0, 12)}` : null,
    ];
    $("#model-card").textContent = "Model: " + parts.filter(Boolean).join(" · ");
    const choices = card.serving.tta_choices || [1, 4, 8];
    $("#tta").replaceChildren(...choices.map((n) => new Option(String(n), String(n))));
    $("#tta").value = String(card.serving.tta);
  } catch (error) {
    $("#model-card").textContent = `Could not load the model card (${error}).`;
  }
}

// Chunks of files that fit the server's limits on file count and body size.
function chunksOf(files) {
  const budget = state.limits.max_upload_bytes * 0.9; // room for multipart headers
  const chunks = [];
  let chunk = [];
  let bytes = 0;
  for (const item of files) {
    const full = chunk.length >= state.limits.max_files || bytes + item.file.size > budget;
    if (chunk.length && full) {
      chunks.push(chunk);
      chunk = [];
      bytes = 0;
    }
    chunk.push(item);
    bytes += item.file.size;
  }
  if (chunk.length) chunks.push(chunk);
  return chunks;
}

// threshold: the response's, which depends on its number of views (tta).
function addRow(item, result, error, threshold = state.threshold) {
  const url = BROWSER_CAN_SHOW.test(item.file.name) ? URL.createObjectURL(item.file) : null;
  const row = { name: item.name, url, error: error || null };
  if (result) {
    Object.assign(row, {
      prob: result.prob_tumour, label: result.label, threshold, entropy: result.entropy_bits, sd: result.prob_sd_tta,
      overlay: result.overlay_png_base64 ? `data:image/png;base64,${result.overlay_png_base64}` : null,
    });
  }
  state.rows.push(row);
}

async function postChunk(items, query) {
  const form = new FormData();
  for (const item of items) form.append("files", item.file, item.file.name);
  let response;
  let body;
  try {
    response = await fetch(`/v1/predict?${query}`, { method: "POST", body: form });
    body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  } catch (error) {
    items.forEach((item) => addRow(item, null, `network error: ${error}`));
    return;
  }
  if (response.ok) {
    body.results.forEach((result, i) => addRow(items[i], result, null, body.threshold));
  } else if (response.status === 503) { // queue full: wait as told, say so, then again
    const seconds = Number(response.headers.get("Retry-After") || 1);
    const before = $("#status").textContent;
    setStatus(`The server is busy; trying again in ${seconds} s…`);
    await new Promise((resolve) => setTimeout(resolve, 1000 * seconds));
    setStatus(before);
    await postChunk(items, query);
  } else if (items.length > 1 && response.status < 500) {
    // One bad file refuses the whole request: score the files one by one to find it.
    for (const item of items) await postChunk([item], query);
  } else {
    items.forEach((item) => addRow(item, null, body.error || `HTTP ${response.status}`));
  }
}

async function scoreFiles(items) {
  if (!items.length) {
    setStatus("No patch images (.png, .jpg, .tif) found there.", true);
    return;
  }
  const query = new URLSearchParams({ tta: $("#tta").value, overlay: String($("#overlay").checked) });
  const chunks = chunksOf(items);
  let done = 0;
  for (const chunk of chunks) {
    setStatus(`Scoring ${done + 1}-${done + chunk.length} of ${items.length} patches…`);
    await postChunk(chunk, query);
    done += chunk.length;
    render();
  }
  const failed = state.rows.filter((row) => row.error).length;
  setStatus(`Scored ${items.length} patches.` + (failed ? ` ${failed} could not be scored: see the rows marked in red.` : ""),
    failed > 0);
}

// Files (and folders, recursively) from a drop.
async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files].map((file) => ({ file, name: file.name }));
  const items = [];
  async function walk(entry, fromFolder) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      if (!fromFolder || IMAGE_NAME.test(file.name)) items.push({ file, name: entry.fullPath.replace(/^\//, "") });
      return;
    }
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, true);
    }
  }
  for (const entry of entries) await walk(entry, false);
  return items;
}

function visibleRows() {
  const low = Number($("#min-prob").value);
  const high = Number($("#max-prob").value);
  const labelFilter = $("#label-filter").value;
  const rows = state.rows.filter((row) => {
    if (labelFilter === "error") return row.error !== null;
    if (row.error) return labelFilter === "all";
    if (labelFilter !== "all" && String(row.label) !== labelFilter) return false;
    return row.prob >= low && row.prob <= high;
  });
  const byProb = (a, b) => (a.prob ?? -1) - (b.prob ?? -1);
  const order = {
    "prob-desc": (a, b) => byProb(b, a),
    "prob-asc": byProb,
    "uncertainty-desc": (a, b) => (b.entropy ?? -1) - (a.entropy ?? -1),
    name: (a, b) => a.name.localeCompare(b.name),
  }[$("#sort").value];
  return rows.sort(order);
}

function cell(tr, className, content) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = content ?? "";
  tr.append(td);
  return td;
}

function picture(url, alt) {
  if (!url) {
    const none = document.createElement("div");
    none.className = "no-preview";
    none.textContent = alt === "overlay" ? "—" : "no preview";
    return none;
  }
  const img = document.createElement("img");
  img.src = url;
  img.alt = alt;
  img.className = alt === "overlay" ? "overlay" : "patch";
  return img;
}

function render() {
  const rows = visibleRows();
  const body = document.createDocumentFragment();
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.className = row.error ? "result failed" : "result";
    tr.dataset.name = row.name;
    cell(tr, null, picture(row.url, "patch"));
    cell(tr, null, picture(row.overlay, "overlay"));
    cell(tr, "name", row.name);
    if (row.error) {
      const td = cell(tr, "error", row.error);
      td.colSpan = 3;
    } else {
      const prob = cell(tr, "prob", row.prob.toFixed(4));
      prob.dataset.prob = String(row.prob);
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.innerHTML = `<span style="width:${(100 * row.prob).toFixed(1)}%"></span>` +
        `<i style="left:${(100 * row.threshold).toFixed(1)}%" title="threshold ${row.threshold.toFixed(3)}"></i>`;
      prob.append(bar);
      cell(tr, `label label-${row.label}`, row.label === 1 ? "tumour" : "normal");
      cell(tr, "uncertainty", `${row.entropy.toFixed(3)} bits` + (row.sd !== null ? ` · ±${row.sd.toFixed(3)}` : ""));
    }
    body.append(tr);
  }
  $("#results tbody").replaceChildren(body);
  $("#results").hidden = state.rows.length === 0;
  $("#controls").hidden = state.rows.length === 0;
  $("#shown").textContent = `${rows.length} of ${state.rows.length} shown`;
}

function csvField(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function downloadCsv() {
  const header = ["file", "prob_tumour", "label", "entropy_bits", "prob_sd_tta", "error"];
  const lines = [header.join(",")];
  for (const row of visibleRows()) {
    lines.push([row.name, row.prob, row.label, row.entropy, row.sd, row.error].map(csvField).join(","));
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  link.download = "histodetect-results.csv";
  link.click();
  URL.revokeObjectURL(link.href);
}

function clearRows() {
  state.rows.forEach((row) => row.url && URL.revokeObjectURL(row.url));
  state.rows = [];
  render();
  setStatus("");
}

function picked(input, fromFolder) {
  const items = [...input.files]
    .filter((file) => !fromFolder || IMAGE_NAME.test(file.name))
    .map((file) => ({ file, name: file.webkitRelativePath || file.name }));
  input.value = "";
  return scoreFiles(items);
}

function main() {
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    await scoreFiles(await droppedFiles(event.dataTransfer));
  });
  $("#file-input").addEventListener("change", (event) => picked(event.target, false));
  $("#folder-input").addEventListener("change", (event) => picked(event.target, true));
  for (const id of ["#sort", "#min-prob", "#max-prob", "#label-filter"]) $(id).addEventListener("input", render);
  $("#download").addEventListener("click", downloadCsv);
  $("#clear").addEventListener("click", clearRows);
  loadModelCard();
}

main();
