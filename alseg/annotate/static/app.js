/* alseg review page: correct the predicted masks of the open batch.
 *
 * The mask of the current image is a Uint8Array (0/1) at the image's original size; the canvas
 * #mask shows it as an overlay, scaled by CSS. Submitting encodes it as a 0/255 PNG
 * (canvas.toBlob) and PUTs it to /api/mask/{id} with the seconds spent on the image.
 * Plain JavaScript, no dependencies: the page works offline.
 */
"use strict";

const $ = (id) => document.getElementById(id);
const OVERLAY = [0, 200, 255];      // mask colour
const EDGE = [0, 120, 255];         // its outline (opaque, so a thin stroke shows too)
const UNDO_BYTES = 256 * 1024 * 1024;

const state = {
  batch: null,          // GET /api/batch
  index: -1,            // current item
  item: null,
  mask: null,           // Uint8Array w*h, 0/1
  w: 0, h: 0,
  undo: [], redo: [],
  drafts: new Map(),    // id -> {mask, undo, redo}: unsubmitted edits kept while navigating
  tool: "brush",
  brush: 4,
  opacity: 0.45,
  zoom: 1, fitted: true,
  showUncertainty: false,
  busy: false,
  loadToken: 0,
  pending: new Map(),   // id -> ms not yet sent to the server
  spent: new Map(),     // id -> ms in total on this page (display)
  lastTick: performance.now(),
  drawing: null,        // {value, last: [x, y]} during a stroke
};

// ---------------------------------------------------------------- API
async function api(method, url, body, headers) {
  const res = await fetch(url, { method, body, headers, cache: "no-store" });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const text = (data && data.error) ? data.error : `${res.status} ${res.statusText}`;
    const err = new Error(text);
    err.status = res.status;
    throw err;
  }
  return data;
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------- messages
function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind || "";
  m.setAttribute("role", kind === "error" ? "alert" : "status");
}

// ---------------------------------------------------------------- batch and list
async function loadBatch() {
  try {
    state.batch = await api("GET", "/api/batch");
  } catch (e) {
    say(`could not load the batch: ${e.message}`, "error");
    return;
  }
  const b = state.batch;
  showModelNote(b.model);
  if (b.round === null) {
    $("round").textContent = "no open batch";
    showEmpty(b.message || "no batch is open");
    updateProgress(0, 0);
    return;
  }
  $("round").textContent = `round ${b.round} · working size ${b.working_size}px`;
  updateProgress(b.labelled, b.total);
  renderList();
  const first = b.items.findIndex((it) => !it.labelled);
  await select(first >= 0 ? first : 0);
  if (b.complete) say("Every image of this batch is labelled; run `alseg query` for the next batch.", "ok");
}

// What the model has earned: a warning when it is no better than a constant mask, else its
// validation Dice; and how many pseudo-labels this round was allowed, and why.
function showModelNote(model) {
  const note = $("model-note");
  const health = model && model.health;
  if (!health) { note.hidden = true; return; }
  const parts = [];
  if (model.warning) parts.push(`Warning: ${model.warning}.`);
  else parts.push(`The model's validation Dice is ${health.val_dice.toFixed(3)} ` +
                  `(a constant mask scores ${health.constant_dice.toFixed(3)}).`);
  if (model.gate && model.gate.asked) parts.push(`Pseudo-labels this round: ${model.gate.reason}.`);
  note.textContent = parts.join(" ");
  note.className = model.warning ? "warning" : "";
  note.hidden = false;
}

function updateProgress(labelled, total) {
  $("progress").textContent = `${labelled} of ${total} labelled`;
  $("progress-bar").max = Math.max(total, 1);
  $("progress-bar").value = labelled;
}

function renderList() {
  const ol = $("items");
  ol.textContent = "";
  state.batch.items.forEach((it, k) => {
    const li = document.createElement("li");
    li.dataset.id = it.id;
    const btn = document.createElement("button");
    btn.type = "button";
    btn.title = `${it.id} (${it.width}×${it.height})`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = "";
    img.src = it.urls.image;
    const text = document.createElement("span");
    text.className = "text";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = it.id;
    const why = document.createElement("span");
    why.className = "why";
    why.textContent = it.reason || "";
    text.append(name, why);
    const mark = document.createElement("span");
    mark.className = "mark";
    btn.append(img, text, mark);
    btn.addEventListener("click", () => select(k));
    li.append(btn);
    ol.append(li);
  });
  refreshList();
}

function refreshList() {
  if (!state.batch) return;
  const lis = $("items").children;
  state.batch.items.forEach((it, k) => {
    const li = lis[k];
    const edited = state.drafts.has(it.id) || (k === state.index && state.undo.length > 0);
    li.classList.toggle("current", k === state.index);
    li.classList.toggle("labelled", it.labelled);
    li.classList.toggle("edited", edited && !it.labelled);
    li.querySelector(".mark").textContent = it.labelled ? "✓" : (edited ? "•" : "");
    li.querySelector(".mark").title = it.labelled ? "labelled" : (edited ? "edited, not submitted" : "");
  });
  const cur = lis[state.index];
  if (cur) cur.scrollIntoView({ block: "nearest" });
}

function showEmpty(text) {
  $("stage").hidden = true;
  $("empty-state").hidden = false;
  $("empty-state").textContent = text;
  for (const id of ["accept", "submit", "skip", "empty", "upload-file"]) $(id).disabled = true;
}

// ---------------------------------------------------------------- loading an item
function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${url}`));
    img.src = url;
  });
}

async function maskFromUrl(url, w, h) {
  const res = await fetch(url, { cache: "no-store" });
  if (!res.ok) return null;
  const bitmap = await createImageBitmap(await res.blob(), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false;  // a mask at the working size is scaled nearest-neighbour
  ctx.drawImage(bitmap, 0, 0, w, h);
  const data = ctx.getImageData(0, 0, w, h).data;
  const mask = new Uint8Array(w * h);
  for (let i = 0; i < mask.length; i++) mask[i] = data[4 * i] >= 128 ? 1 : 0;
  return mask;
}

function saveDraft() {
  if (state.item && state.undo.length > 0) {
    state.drafts.set(state.item.id, { mask: state.mask, undo: state.undo, redo: state.redo });
  }
}

async function select(k) {
  if (!state.batch || k < 0 || k >= state.batch.items.length) return;
  saveDraft();
  const token = ++state.loadToken;
  const it = state.batch.items[k];
  state.index = k;
  state.item = it;
  $("stage").removeAttribute("data-loaded-id");
  refreshList();
  const draft = state.drafts.get(it.id);
  let mask = null, source = "";
  try {
    await loadImage($("image"), it.urls.image);
    if (draft) {
      mask = draft.mask; source = "your unsubmitted edits";
    }
    if (!mask && it.labelled) {
      mask = await maskFromUrl(it.urls.mask, it.width, it.height);
      if (mask) source = "the stored mask";
    }
    if (!mask && it.urls.predicted) {
      mask = await maskFromUrl(it.urls.predicted, it.width, it.height);
      if (mask) source = "the model's prediction";
    }
  } catch (e) {
    if (token === state.loadToken) say(e.message, "error");
    return;
  }
  if (token !== state.loadToken) return;  // the expert moved on meanwhile
  if (!mask) { mask = new Uint8Array(it.width * it.height); source = "an empty mask (no prediction)"; }
  state.w = it.width; state.h = it.height;
  state.mask = mask;
  state.undo = draft ? draft.undo : [];
  state.redo = draft ? draft.redo : [];
  state.drafts.delete(it.id);
  const canvas = $("mask");
  canvas.width = state.w; canvas.height = state.h;
  const unc = $("uncertainty");
  if (it.urls.uncertainty) { unc.src = it.urls.uncertainty; } else { unc.removeAttribute("src"); }
  $("show-uncertainty").disabled = !it.urls.uncertainty;
  $("accept").disabled = !it.urls.predicted;
  for (const id of ["submit", "skip", "empty", "upload-file"]) $(id).disabled = false;
  $("stage").hidden = false;
  $("empty-state").hidden = true;
  applyUncertainty();
  const defaultBrush = Math.max(1, Math.round(Math.min(state.w, state.h) / 30));
  $("brush-size").max = String(Math.max(16, Math.round(Math.min(state.w, state.h) / 3)));
  if (!state.brushSet) setBrush(defaultBrush, false);
  state.source = source;
  updateInfo();
  if (state.fitted) fit(); else applyZoom();
  renderAll();
  updateUndoButtons();
  updateTimer();
  $("stage").dataset.loadedId = it.id;
}

function updateInfo() {
  const it = state.item;
  if (!it) return;
  let fg = 0;
  for (let i = 0; i < state.mask.length; i++) fg += state.mask[i];
  const parts = [it.id, it.reason, `${it.width}×${it.height} px`];
  if (it.score !== null && it.score !== undefined) parts.push(`uncertainty ${Number(it.score).toPrecision(3)}`);
  parts.push(it.labelled ? "labelled" : "not labelled yet");
  parts.push(`mask ${fg} px, from ${state.source || "?"}`);
  $("item-info").textContent = parts.join(" · ");
}

// ---------------------------------------------------------------- drawing the overlay
function renderAll() { render(0, 0, state.w, state.h); }

function render(x0, y0, x1, y1) {
  const { w, h, mask } = state;
  x0 = Math.max(0, Math.floor(x0) - 1); y0 = Math.max(0, Math.floor(y0) - 1);
  x1 = Math.min(w, Math.ceil(x1) + 1); y1 = Math.min(h, Math.ceil(y1) + 1);
  if (x1 <= x0 || y1 <= y0) return;
  const ctx = $("mask").getContext("2d");
  const img = ctx.createImageData(x1 - x0, y1 - y0);
  const d = img.data;
  const fill = Math.round(state.opacity * 255);
  let o = 0;
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++, o += 4) {
      const i = y * w + x;
      if (!mask[i]) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
      const c = edge ? EDGE : OVERLAY;
      d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2];
      d[o + 3] = edge ? Math.max(fill, 230) : fill;
    }
  }
  ctx.putImageData(img, x0, y0);
}

// ---------------------------------------------------------------- editing
function pushUndo() {
  state.undo.push(state.mask.slice());
  const limit = Math.max(5, Math.floor(UNDO_BYTES / Math.max(1, state.mask.length)));
  while (state.undo.length > limit) state.undo.shift();
  state.redo = [];
  updateUndoButtons();
  refreshList();
}

function undo() {
  if (!state.undo.length || state.drawing) return;
  state.redo.push(state.mask);
  state.mask = state.undo.pop();
  renderAll(); updateInfo(); updateUndoButtons(); refreshList();
}

function redo() {
  if (!state.redo.length || state.drawing) return;
  state.undo.push(state.mask);
  state.mask = state.redo.pop();
  renderAll(); updateInfo(); updateUndoButtons(); refreshList();
}

function updateUndoButtons() {
  $("undo").disabled = state.undo.length === 0;
  $("redo").disabled = state.redo.length === 0;
}

function dab(cx, cy, value) {
  const { w, h, mask } = state;
  const r = state.brush / 2;
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(w - 1, Math.floor(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(h - 1, Math.floor(cy + r));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      if (dx * dx + dy * dy <= r * r) mask[y * w + x] = value;
    }
  }
  const px = Math.floor(cx), py = Math.floor(cy);  // a 1-px brush still marks the pixel under it
  if (px >= 0 && py >= 0 && px < w && py < h) mask[py * w + px] = value;
  render(cx - r, cy - r, cx + r + 1, cy + r + 1);
}

function strokeTo(x, y) {
  const [lx, ly] = state.drawing.last;
  const dist = Math.hypot(x - lx, y - ly);
  const step = Math.max(0.5, state.brush / 4);
  const n = Math.max(1, Math.ceil(dist / step));
  for (let k = 1; k <= n; k++) dab(lx + (x - lx) * k / n, ly + (y - ly) * k / n, state.drawing.value);
  state.drawing.last = [x, y];
}

function floodFill(px, py) {
  const { w, h, mask } = state;
  if (px < 0 || py < 0 || px >= w || py >= h) return;
  const start = py * w + px;
  const from = mask[start], to = from ? 0 : 1;
  pushUndo();
  const stack = new Int32Array(w * h + 1);
  let top = 0;
  stack[top++] = start;
  mask[start] = to;
  while (top > 0) {
    const i = stack[--top];
    const x = i % w;
    if (x > 0 && mask[i - 1] === from) { mask[i - 1] = to; stack[top++] = i - 1; }
    if (x < w - 1 && mask[i + 1] === from) { mask[i + 1] = to; stack[top++] = i + 1; }
    if (i >= w && mask[i - w] === from) { mask[i - w] = to; stack[top++] = i - w; }
    if (i + w < w * h && mask[i + w] === from) { mask[i + w] = to; stack[top++] = i + w; }
  }
  renderAll();
  updateInfo();
}

function toImage(ev) {
  const rect = $("mask").getBoundingClientRect();
  return [(ev.clientX - rect.left) * state.w / rect.width, (ev.clientY - rect.top) * state.h / rect.height];
}

function onPointerDown(ev) {
  if (!state.mask || ev.button !== 0) return;
  ev.preventDefault();
  const [x, y] = toImage(ev);
  if (state.tool === "fill") {
    floodFill(Math.floor(x), Math.floor(y));
    return;
  }
  pushUndo();
  state.drawing = { value: state.tool === "eraser" ? 0 : 1, last: [x, y] };
  $("mask").setPointerCapture(ev.pointerId);
  dab(x, y, state.drawing.value);
}

function onPointerMove(ev) {
  moveCursor(ev);
  if (!state.drawing) return;
  const events = ev.getCoalescedEvents ? ev.getCoalescedEvents() : [ev];
  for (const e of (events.length ? events : [ev])) {
    const [x, y] = toImage(e);
    strokeTo(x, y);
  }
}

function onPointerUp(ev) {
  if (!state.drawing) return;
  const [x, y] = toImage(ev);
  strokeTo(x, y);
  state.drawing = null;
  updateInfo();
}

function moveCursor(ev) {
  const cur = $("cursor");
  if (state.tool === "fill" || !state.mask) { cur.hidden = true; return; }
  const rect = $("stage").getBoundingClientRect();
  const size = state.brush * state.zoom;
  cur.hidden = false;
  cur.style.width = cur.style.height = `${Math.max(4, size)}px`;
  cur.style.left = `${ev.clientX - rect.left}px`;
  cur.style.top = `${ev.clientY - rect.top}px`;
}

// ---------------------------------------------------------------- tools, zoom, overlays
function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll("button.tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  $("stage").classList.toggle("fill", tool === "fill");
  if (tool === "fill") $("cursor").hidden = true;
}

function setBrush(size, byUser = true) {
  const max = Number($("brush-size").max);
  state.brush = Math.min(max, Math.max(1, Math.round(size)));
  $("brush-size").value = String(state.brush);
  $("brush-size-value").textContent = String(state.brush);
  if (byUser) state.brushSet = true;
}

function fit() {
  if (!state.w) return;
  const vp = $("viewport"), stage = $("stage");
  // measure without the zoomed stage's scrollbars, or fitting after a zoom-in comes out smaller
  stage.style.width = "0px";
  stage.style.height = "0px";
  const z = Math.min((vp.clientWidth - 16) / state.w, (vp.clientHeight - 16) / state.h);
  state.zoom = Math.max(0.05, Math.min(32, z));
  state.fitted = true;
  applyZoom();
}

function setZoom(z) {
  state.zoom = Math.max(0.05, Math.min(32, z));
  state.fitted = false;
  applyZoom();
}

function applyZoom() {
  const stage = $("stage");
  stage.style.width = `${Math.round(state.w * state.zoom)}px`;
  stage.style.height = `${Math.round(state.h * state.zoom)}px`;
  stage.classList.toggle("pixelated", state.zoom >= 2);
  $("zoom-value").textContent = `${Math.round(state.zoom * 100)}%`;
}

function applyUncertainty() {
  const on = state.showUncertainty && state.item && !!state.item.urls.uncertainty;
  $("uncertainty").hidden = !on;
  $("show-uncertainty").checked = on;
}

function setOpacity(value) {
  state.opacity = Math.min(1, Math.max(0, value));
  if (state.mask) renderAll();
}

// ---------------------------------------------------------------- time on each image
function tick() {
  const now = performance.now();
  const dt = Math.min(now - state.lastTick, 2000);  // a sleeping laptop is not expert time
  state.lastTick = now;
  const visible = document.visibilityState === "visible";
  if (visible && state.item && !state.busy) {
    const id = state.item.id;
    state.pending.set(id, (state.pending.get(id) || 0) + dt);
    state.spent.set(id, (state.spent.get(id) || 0) + dt);
  }
  $("timer").classList.toggle("paused", !visible);
  updateTimer();
}

function updateTimer() {
  const ms = state.item ? (state.spent.get(state.item.id) || 0) : 0;
  const s = Math.floor(ms / 1000);
  $("timer").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function pendingSeconds(id) {
  return Math.round((state.pending.get(id) || 0) / 100) / 10;
}

function flushTime() {  // the page is going away: record the time not yet sent
  for (const [id, ms] of state.pending) {
    if (ms < 500) continue;
    fetch(`/api/time/${enc(id)}?seconds=${(ms / 1000).toFixed(1)}&action=view`, { method: "POST", keepalive: true });
    state.pending.set(id, 0);
  }
}

// ---------------------------------------------------------------- submitting
function maskBlob(mask, w, h) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  const d = img.data;
  for (let i = 0; i < w * h; i++) {
    const v = mask[i] ? 255 : 0;
    d[4 * i] = d[4 * i + 1] = d[4 * i + 2] = v;
    d[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return new Promise((resolve, reject) => c.toBlob((b) => (b ? resolve(b) : reject(new Error("could not encode the mask"))), "image/png"));
}

async function upload(what, getBlob, allowEmpty = false) {
  if (state.busy || !state.item) return;
  const it = state.item, k = state.index;
  state.busy = true;
  setActionsDisabled(true);
  say(`sending ${what} for ${it.id}…`, "");
  try {
    const blob = await getBlob();
    const seconds = pendingSeconds(it.id);
    const url = `/api/mask/${enc(it.id)}?seconds=${seconds}` + (allowEmpty ? "&allow_empty=true" : "");
    const res = await api("PUT", url, blob, { "Content-Type": "image/png" });
    state.pending.set(it.id, 0);
    it.labelled = true;
    state.drafts.delete(it.id);
    if (state.index === k) { state.undo = []; state.redo = []; updateUndoButtons(); }
    updateProgress(res.labelled, res.total);
    state.batch.labelled = res.labelled;
    refreshList();
    const outcome = { stored: "stored", replaced: "replaced the earlier mask", unchanged: "unchanged (same mask)" }[res.outcome] || res.outcome;
    const done = res.complete ? " The batch is complete: run `alseg query` for the next one." : "";
    say(`${it.id}: ${outcome} (${res.labelled} of ${res.total} labelled).${done}`, "ok");
    if (!res.complete) await goNextUnlabelled(k); else await select(k);
  } catch (e) {
    say(`${it.id}: refused: ${e.message}`, "error");
  } finally {
    state.busy = false;
    setActionsDisabled(false);
  }
}

function setActionsDisabled(disabled) {
  for (const id of ["submit", "skip", "empty", "upload-file"]) $(id).disabled = disabled;
  $("accept").disabled = disabled || !(state.item && state.item.urls.predicted);
}

async function goNextUnlabelled(from) {
  const items = state.batch.items;
  for (let d = 1; d <= items.length; d++) {
    const k = (from + d) % items.length;
    if (!items[k].labelled) return select(k);
  }
  return select(from);
}

function submitCurrent() {
  const { mask, w, h } = state;
  return upload("your mask", () => maskBlob(mask.slice(), w, h));
}

function acceptPrediction() {
  const it = state.item;
  if (!it || !it.urls.predicted) return;
  return upload("the prediction", async () => {  // the predicted PNG itself, byte for byte
    const res = await fetch(it.urls.predicted, { cache: "no-store" });
    if (!res.ok) throw new Error("could not fetch the predicted mask");
    return res.blob();
  });
}

function nothingHere() {
  const { w, h } = state;
  return upload("an empty mask", () => maskBlob(new Uint8Array(w * h), w, h), true);
}

function uploadFile(file) {
  return upload(`the file ${file.name}`, async () => file);
}

async function skip() {
  if (state.busy || !state.item) return;
  const it = state.item, k = state.index;
  state.busy = true;
  try {
    const seconds = pendingSeconds(it.id);
    await api("POST", `/api/skip/${enc(it.id)}?seconds=${seconds}`);
    state.pending.set(it.id, 0);
    say(`${it.id}: skipped (${seconds} s recorded); it stays in the batch.`, "ok");
  } catch (e) {
    say(`${it.id}: could not skip: ${e.message}`, "error");
    return;
  } finally {
    state.busy = false;
  }
  await select((k + 1) % state.batch.items.length);
}

function step(d) {
  if (!state.batch || !state.batch.items.length) return;
  const n = state.batch.items.length;
  select((state.index + d + n) % n);
}

// ---------------------------------------------------------------- keyboard
function onKey(ev) {
  const t = ev.target;
  const tag = t && t.tagName;
  if (tag === "TEXTAREA" || tag === "SELECT" || (tag === "INPUT" && t.type !== "range" && t.type !== "checkbox")) return;
  if (tag === "INPUT" && t.type === "range" && ev.key.startsWith("Arrow")) return;
  const key = ev.key;
  const ctrl = ev.ctrlKey || ev.metaKey;
  if (ctrl) {
    if (key.toLowerCase() === "z" && ev.shiftKey) { redo(); ev.preventDefault(); }
    else if (key.toLowerCase() === "z") { undo(); ev.preventDefault(); }
    else if (key.toLowerCase() === "y") { redo(); ev.preventDefault(); }
    return;
  }
  if (ev.altKey) return;
  if (key === "Enter") {
    if (tag === "BUTTON" || tag === "A") return;  // a focused button gets its own Enter
    ev.preventDefault();
    submitCurrent();
    return;
  }
  const actions = {
    b: () => setTool("brush"), e: () => setTool("eraser"), f: () => setTool("fill"),
    z: undo, y: redo, Z: redo,
    "+": () => setZoom(state.zoom * 1.25), "=": () => setZoom(state.zoom * 1.25), "-": () => setZoom(state.zoom / 1.25),
    "0": fit,
    u: () => { state.showUncertainty = !state.showUncertainty; applyUncertainty(); },
    a: acceptPrediction, s: skip, x: nothingHere,
    n: () => step(1), ArrowRight: () => step(1), p: () => step(-1), ArrowLeft: () => step(-1),
    "[": () => setBrush(state.brush - Math.max(1, Math.round(state.brush / 5))),
    "]": () => setBrush(state.brush + Math.max(1, Math.round(state.brush / 5))),
  };
  const action = actions[key];
  if (action) { ev.preventDefault(); action(); }
}

// ---------------------------------------------------------------- wiring
function init() {
  document.addEventListener("mousedown", (ev) => {  // clicks on buttons keep the keyboard on the page
    if (ev.target.closest("button")) ev.preventDefault();
  });
  document.querySelectorAll("button.tool").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  $("brush-size").addEventListener("input", (ev) => setBrush(Number(ev.target.value)));
  $("brush-size").addEventListener("change", (ev) => ev.target.blur());
  $("opacity").addEventListener("input", (ev) => setOpacity(Number(ev.target.value) / 100));
  $("opacity").addEventListener("change", (ev) => ev.target.blur());
  $("show-uncertainty").addEventListener("change", (ev) => {
    state.showUncertainty = ev.target.checked; applyUncertainty(); ev.target.blur();
  });
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("zoom-in").addEventListener("click", () => setZoom(state.zoom * 1.25));
  $("zoom-out").addEventListener("click", () => setZoom(state.zoom / 1.25));
  $("zoom-fit").addEventListener("click", fit);
  $("viewport").addEventListener("wheel", (ev) => {
    if (!ev.ctrlKey) return;
    ev.preventDefault();
    setZoom(state.zoom * (ev.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });
  $("accept").addEventListener("click", acceptPrediction);
  $("submit").addEventListener("click", submitCurrent);
  $("skip").addEventListener("click", skip);
  $("empty").addEventListener("click", nothingHere);
  $("upload-file").addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    ev.target.blur();
    if (file) await uploadFile(file);
    ev.target.value = "";
  });
  const canvas = $("mask");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  canvas.addEventListener("pointerleave", () => { $("cursor").hidden = true; });
  document.addEventListener("keydown", onKey);
  new ResizeObserver(() => { if (state.fitted) fit(); }).observe($("viewport"));
  document.addEventListener("visibilitychange", () => {
    state.lastTick = performance.now();
    if (document.visibilityState === "hidden") flushTime();
  });
  window.addEventListener("pagehide", flushTime);
  setInterval(tick, 250);
  setTool("brush");
  setOpacity(Number($("opacity").value) / 100);
  loadBatch();
}

document.addEventListener("DOMContentLoaded", init);
