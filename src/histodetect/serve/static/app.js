// The histodetect page: send patches to POST /v1/predict in chunks the server accepts,
// show each with its probability, label, uncertainty and Grad-CAM overlay, sort,
// filter and download the results. Plain JavaScript, no build step.
"use strict";

const IMAGE_NAME = /\.(png|jpe?g|tiff?)$/i;
const BROWSER_CAN_SHOW = /\.(png|jpe?g)$/i; // browsers do not display TIFF
const state = {
  rows: [], // {name, key, url, batch, prob, label, threshold, tta, entropy, sd, overlay, resized, converted, error}
  byKey: new Map(), // a file scored again with the same settings replaces its row: no duplicates
  limits: { max_files: 256, max_upload_bytes: 16 * 2 ** 20, tta: 1 },
  threshold: 0.5,
  card: null,
  scoring: Promise.resolve(), // one batch of files at a time: a second pick waits for the first
  batch: 0, // the batch being scored; its rows carry it, for the status line's counts
  generation: 0, // Clear starts a new one: files picked before it are no longer sent or shown
};
const $ = (selector) => document.querySelector(selector);

const patches = (n) => `${n} patch${n === 1 ? "" : "es"}`;

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

async function loadModelCard() {
  try {
    const response = await fetch("/v1/model");
    const card = await response.json();
    state.card = card;
    state.limits = card.serving;
    state.threshold = card.threshold;
    const choices = card.serving.tta_choices || [1, 4, 8];
    $("#tta").replaceChildren(...choices.map((n) => new Option(String(n), String(n))));
    $("#tta").value = String(card.serving.tta);
    if (!card.serving.overlay) { // e.g. a vision transformer: no feature map for Grad-CAM
      $("#overlay").checked = false;
      $("#overlay").disabled = true;
      $("#overlay").parentElement.title = card.serving.no_overlay_because || "this model has no Grad-CAM overlays";
    }
    showModelCard();
  } catch (error) {
    $("#model-card").textContent = `Could not load the model card (${error}).`;
  }
}

// The threshold shown is the one the chosen number of views decides with (each has its own).
function showModelCard() {
  const card = state.card;
  if (!card) return;
  const tta = $("#tta").value;
  const threshold = (card.thresholds_by_tta || {})[tta] ?? card.threshold;
  const best = card.validation.best_epoch;
  const parts = [
    `${card.architecture}${card.preset ? ` (${card.preset} preset)` : ""}`,
    best ? `validation AUC ${best.val_auc.toFixed(3)} at epoch ${best.epoch}` : null,
    `threshold ${threshold.toFixed(3)} at ${tta} view${tta === "1" ? "" : "s"}`,
    card.calibration.temperature !== 1 ? `temperature ${card.calibration.temperature.toFixed(2)}` : null,
    card.data.fingerprint ? `data ${card.data.fingerprint.slice(0, 12)}` : null,
  ];
  $("#model-card").textContent = "Model: " + parts.filter(Boolean).join(" · ");
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

// answer: the response's threshold and tta (the threshold depends on the number of views).
function addRow(item, result, error, answer = { threshold: state.threshold, tta: null }) {
  let url = BROWSER_CAN_SHOW.test(item.file.name) ? URL.createObjectURL(item.file) : null;
  if (!url && result && result.patch_png_base64) url = `data:image/png;base64,${result.patch_png_base64}`; // a TIFF, as scored
  const row = { name: item.name, key: item.key, url, batch: state.batch, error: error || null };
  if (result) {
    Object.assign(row, {
      prob: result.prob_tumour, label: result.label, threshold: answer.threshold, tta: answer.tta,
      entropy: result.entropy_bits, sd: result.prob_sd_tta,
      overlay: result.overlay_png_base64 ? `data:image/png;base64,${result.overlay_png_base64}` : null,
      resized: result.resized_from || null, converted: result.converted_from || null,
    });
  }
  const earlier = state.byKey.get(row.key);
  if (earlier) {
    if (earlier.url) URL.revokeObjectURL(earlier.url);
    state.rows.splice(state.rows.indexOf(earlier), 1);
  }
  state.byKey.set(row.key, row);
  state.rows.push(row);
}

// Sends the files; false when the server did not answer at all (stopped, or the network is down).
async function postChunk(items, query, cleared) {
  const form = new FormData();
  for (const item of items) form.append("files", item.file, item.file.name);
  let response;
  let body;
  try {
    response = await fetch(`/v1/predict?${query}`, { method: "POST", body: form });
    body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  } catch (error) {
    items.forEach((item) => addRow(item, null, `no answer from the server (${error.message}): is it still running?`));
    return false;
  }
  if (response.ok) {
    body.results.forEach((result, i) => addRow(items[i], result, null, body));
  } else if (response.status === 503) { // queue full: wait as told, say so, then again
    const seconds = Number(response.headers.get("Retry-After") || 1);
    const before = $("#status").textContent;
    setStatus(`The server is busy; trying again in ${seconds} s…`);
    await new Promise((resolve) => setTimeout(resolve, 1000 * seconds));
    if (cleared()) return true;
    setStatus(before);
    return postChunk(items, query, cleared);
  } else if (items.length > 1 && response.status < 500) {
    // One bad file refuses the whole request: score the files one by one to find it.
    for (const [i, item] of items.entries()) {
      if (cleared()) return true;
      if (!(await postChunk([item], query, cleared))) {
        items.slice(i + 1).forEach((rest) => addRow(rest, null, "not sent: the server stopped answering"));
        return false;
      }
    }
  } else {
    items.forEach((item) => addRow(item, null, body.error || `HTTP ${response.status}`));
  }
  return true;
}

async function scoreFiles(items, generation) {
  if (!items.length) {
    setStatus("No patch images (.png, .jpg, .tif) found there.", true);
    return;
  }
  const query = new URLSearchParams({ tta: $("#tta").value, overlay: String($("#overlay").checked) });
  // Browsers do not display TIFF (Kaggle's patches are TIFF): the server sends those back as PNG.
  if (items.some((item) => !BROWSER_CAN_SHOW.test(item.file.name))) query.set("preview", "true");
  // The same file (path, size, time) at the same settings is one row; at another TTA or with an overlay, another.
  const settings = `${query.get("tta")}|${query.get("overlay")}`;
  items.forEach((item) => { item.key = `${item.name}|${item.file.size}|${item.file.lastModified}|${settings}`; });
  const chunks = chunksOf(items);
  const batch = ++state.batch;
  const cleared = () => state.generation !== generation;
  let done = 0;
  let answered = true;
  for (const chunk of chunks) {
    if (!answered) { // the server has gone: say so once instead of trying every chunk
      chunk.forEach((item) => addRow(item, null, "not sent: the server stopped answering"));
      continue;
    }
    setStatus(`Scoring ${done + 1}-${done + chunk.length} of ${items.length} patches…`);
    answered = await postChunk(chunk, query, cleared);
    if (cleared()) break;
    done += chunk.length;
    render();
  }
  if (cleared()) { // Clear was pressed while this batch was scoring: drop what came back since, unshown
    for (const row of state.rows) if (row.url) URL.revokeObjectURL(row.url);
    state.rows = [];
    state.byKey.clear();
    setStatus("");
    return;
  }
  render();
  const failed = state.rows.filter((row) => row.batch === batch && row.error).length;
  const scored = `Scored ${items.length - failed} of ${patches(items.length)}.`;
  if (!answered) setStatus(`${scored} The server stopped answering: start it again, then add the files of the red rows again.`, true);
  else if (failed) setStatus(`${scored} ${failed} could not be scored: see the rows marked in red.`, true);
  else setStatus(`Scored ${patches(items.length)}.`);
}

function enqueue(items) {
  const generation = state.generation;
  const run = () => (state.generation === generation ? scoreFiles(items, generation) : undefined);
  state.scoring = state.scoring.then(run, run);
  return state.scoring;
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

// A probability bound; an emptied field means no bound (Number("") would be 0).
function bound(input, none) {
  const value = input.value.trim() === "" ? NaN : Number(input.value);
  return Number.isFinite(value) ? value : none;
}

function visibleRows() {
  const low = bound($("#min-prob"), 0);
  const high = bound($("#max-prob"), 1);
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
    name: (a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }), // patch9 before patch10
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
  img.addEventListener("error", () => img.replaceWith(picture(null, "cannot display"))); // not an image after all
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
    const name = cell(tr, "name", row.name);
    // The server changed what it scored: say so next to the name.
    const notes = [row.converted && `converted from ${row.converted} to RGB`,
      row.resized && `resized from ${row.resized.join("×")}`].filter(Boolean);
    if (notes.length) {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = notes.join("; ");
      name.append(note);
    }
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
  $("#results").classList.toggle("no-overlays", !rows.some((row) => row.overlay));
  $("#results").hidden = state.rows.length === 0;
  $("#controls").hidden = state.rows.length === 0;
  $("#shown").textContent = `${rows.length} of ${state.rows.length} shown`;
}

function csvField(value) {
  let text = value === null || value === undefined ? "" : String(value);
  // A file name such as =HYPERLINK(...).png would be a formula in a spreadsheet: text starting
  // with = + - @ or a tab gets a leading ' (OWASP's advice for CSV injection). Numbers stay as they are.
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function downloadCsv() {
  const header = ["file", "prob_tumour", "label", "threshold", "tta", "entropy_bits", "prob_sd_tta",
    "resized_from", "converted_from", "error"];
  const lines = [header.join(",")];
  for (const row of visibleRows()) {
    lines.push([row.name, row.prob, row.label, row.threshold, row.tta, row.entropy, row.sd,
      row.resized && row.resized.join("x"), row.converted, row.error].map(csvField).join(","));
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  link.download = "histodetect-results.csv";
  link.click();
  URL.revokeObjectURL(link.href);
}

function clearRows() {
  state.generation += 1;
  state.rows.forEach((row) => row.url && URL.revokeObjectURL(row.url));
  state.rows = [];
  state.byKey.clear();
  render();
  setStatus("");
}

function picked(input, fromFolder) {
  const items = [...input.files]
    .filter((file) => !fromFolder || IMAGE_NAME.test(file.name))
    .map((file) => ({ file, name: file.webkitRelativePath || file.name }));
  input.value = "";
  return enqueue(items);
}

function main() {
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    await enqueue(await droppedFiles(event.dataTransfer));
  });
  $("#file-input").addEventListener("change", (event) => picked(event.target, false));
  $("#folder-input").addEventListener("change", (event) => picked(event.target, true));
  for (const id of ["#sort", "#min-prob", "#max-prob", "#label-filter"]) $(id).addEventListener("input", render);
  $("#tta").addEventListener("change", showModelCard);
  $("#download").addEventListener("click", downloadCsv);
  $("#clear").addEventListener("click", clearRows);
  loadModelCard();
}

main();
