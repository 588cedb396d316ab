/* alseg review page: the expert's workplace for a project's batches, open and past.
 *
 * The mask of the current image is a Uint8Array (0/1) at the image's original size, the one copy
 * of it. The canvas #mask shows it as an overlay over the image inside #stage, which is placed in
 * #viewport by (zoom, pan): zoom keeps the point under the cursor, dragging with the space bar or
 * the middle button pans. The overlay is drawn at the displayed resolution, not the image's: one
 * canvas pixel per 1, 2, 4... image pixels (the power of two nearest above the zoom), over the
 * whole image while that stays under OVERLAY_PX canvas pixels, else over the visible part and a
 * margin, redrawn from the mask when a zoom or pan leaves it; an edit redraws only the canvas
 * pixels it touched. So a 24-megapixel photo costs the mask (24 MB), not a 96 MB RGBA canvas.
 * The image itself is shown from the smallest of its sizes (the server's display-sized previews,
 * /api/image/{id}?max_side=N, then the full image) that has a pixel for each screen pixel at the
 * current zoom: fitted in a window, a 6000x4000 photo is a 2048-px JPEG (11 MB decoded, not 96);
 * zoomed in past it, the next size up replaces it in the same <img>, and zoomed out again, the
 * larger one is let go. Strokes land in the full-resolution mask whichever size is shown.
 * Each undo step keeps only the box of the mask its edit changed (a stroke's, a fill's, a
 * polygon's, a clear's), as it was: undo and redo swap that box with the mask's.
 * Masks arrive as PNG and are inflated here (a small inflate through one reused buffer: no
 * DecompressionStream chunks, 24 MB of garbage on a 24 MP mask) and written where they are set: a
 * new mask is zeroed, its pages never written hold no memory. A mask no draft keeps is freed
 * (its buffer detached) when the next image is chosen, not left to the garbage collector. Other
 * images a browser reads are decoded through a small canvas in bands. Submitting encodes the
 * mask as a 0/255 greyscale PNG row by row (CompressionStream) and PUTs it to
 * /api/mask/{id}?round=R with the seconds spent on the image
 * (wall and active: input in the last 30 s, tab visible), strokes and clicks. A submit that
 * would replace another stored mask comes back 409 and is resent with replace=1 only after the
 * expert confirms. Display settings (window/level, channel) are an SVG filter on the image: the
 * image's pixels are never copied. With a token (?token= in the address, kept in sessionStorage)
 * every request carries it. Plain JavaScript, no dependencies: the page works offline.
 *
 * Volumes: an image that is a slice of a volume (its item has urls.volume) gets the slice scroller
 * (GET /api/volume/{id}): a slider and a strip of the volume's slices in slice order, this batch's
 * slices marked. A neighbouring slice is shown for context only: its pixels replace the image in
 * #image (the same window/level filter applies), the mask, overlay and outline are hidden, and
 * nothing can be drawn; the mask in progress, its undo steps and any open polygon stay exactly as
 * they were, and come back with the slice (Home, Esc, or any editing key). Clicking a marked slice
 * of the batch opens it for labelling, as choosing it in the list does (unsubmitted edits kept as
 * drafts).
 */
"use strict";

const $ = (id) => document.getElementById(id);
const OVERLAY = [0, 200, 255];      // mask colour
const EDGE = [0, 120, 255];         // its outline (opaque, so a thin stroke shows too)
const UNDO_BYTES = 64 * 1024 * 1024;  // the mask boxes the undo steps keep, at most, in all
const UNDO_STEPS = 500;
const FILL_MARK = 2;                // a flood fill's pixels before they take their value (masks are 0/1)
const OVERLAY_PX = 4 << 20;         // the most canvas pixels (16 MB RGBA) the overlay may hold
const BAND_BYTES = 4 << 20;         // RGBA rows handled at once when a canvas decodes a mask
const DRAW_BYTES = 1 << 20;         // RGBA rows of the overlay drawn at once (one buffer, kept)
const IDLE_MS = 30000;              // no input for this long: the expert is not working on the image
const JOB_POLL_MS = 1000;
const CLOSE_PX = 10;                // a polygon click this near its first point closes it

// The token arrives once in the address (?token=...): keep it for this tab, drop it from the URL bar.
const TOKEN = (() => {
  const url = new URL(window.location.href);
  const given = url.searchParams.get("token");
  if (given) {
    sessionStorage.setItem("alseg_token", given);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem("alseg_token");
})();

const state = {
  batch: null,          // GET /api/batch (the round shown)
  index: -1,            // current item
  item: null,
  mask: null,           // Uint8Array w*h, 0/1
  w: 0, h: 0,
  view: null,           // the overlay canvas: {k, x0, y0, x1, y1, cw, ch}: image px x0..x1, y0..y1, k per canvas px
  levels: null,         // the current image's sizes, smallest first: [{side, url}] (side: its long side, px)
  level: null,          // the one #image shows
  undo: [], redo: [],   // steps {x0, y0, x1, y1, data}: the mask's pixels in that box before (undo) / after (redo)
  edit: null,           // the step a stroke in progress writes into
  drafts: new Map(),    // round/id -> {mask, undo, redo}: unsubmitted edits kept while navigating
  tool: "brush",
  brush: 4,
  opacity: 0.45,
  zoom: 1, panX: 0, panY: 0, fitted: true,
  showUncertainty: false,
  busy: false,
  loadToken: 0,
  pending: new Map(),   // id -> {wall, active} ms not yet sent to the server
  spent: new Map(),     // id -> active ms in total on this page (display)
  effort: new Map(),    // id -> {strokes, clicks} not yet sent
  lastTick: performance.now(),
  lastInput: performance.now(),
  drawing: null,        // {value, last: [x, y]} during a stroke
  poly: null,           // {points: [[x, y]...], down: [sx, sy] | null, lasso} while a polygon is drawn
  panning: null,        // {x, y, panX, panY} during a pan
  space: false,         // the space bar is held: dragging pans
  display: { channel: "all", lo: 0, hi: 255 },
  job: null,
  jobTimer: null,
  encoding: null,       // the mask a submit is encoding now (it reads the mask itself, not a copy)
  volume: null,         // GET /api/volume/{id} of the current item, when it is a volume's slice
  context: null,        // the index (in volume.slices) of the neighbour shown for context; null: the slice itself
  wheelSlices: 0,       // Alt+wheel travel not yet turned into slices
};

// ---------------------------------------------------------------- API
function withToken(headers) {
  return TOKEN ? { ...(headers || {}), Authorization: `Bearer ${TOKEN}` } : (headers || {});
}

async function api(method, url, body, headers) {
  const res = await fetch(url, { method, body, headers: withToken(headers), cache: "no-store" });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const text = (data && data.error) ? data.error : `${res.status} ${res.statusText}`;
    const err = new Error(text);
    err.status = res.status;
    err.data = data;
    throw err;
  }
  return data;
}

const enc = encodeURIComponent;
const roundQuery = () => (state.batch && state.batch.round !== null ? `round=${state.batch.round}` : "");
const draftKey = (id) => `${state.batch ? state.batch.round : ""}/${id}`;

// ---------------------------------------------------------------- messages
function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind || "";
  m.setAttribute("role", kind === "error" ? "alert" : "status");
}

// ---------------------------------------------------------------- batch, rounds and list
async function loadBatch(round) {
  let batch;
  try {
    batch = await api("GET", "/api/batch" + (round === undefined || round === null ? "" : `?round=${round}`));
  } catch (e) {
    say(`could not load the batch: ${e.message}`, "error");
    return;
  }
  saveDraft();
  state.batch = batch;
  state.index = -1; state.item = null;
  const b = state.batch;
  showModelNote(b.model);
  $("annotator").textContent = b.annotator ? `signed in as ${b.annotator}` : "";
  renderRounds();
  showJob(b.job);
  if (b.round === null) {
    $("round").textContent = "no open batch";
    $("items").textContent = "";
    showEmpty(b.message || "no batch is open");
    updateProgress(0, 0);
    return;
  }
  $("round").textContent = `round ${b.round}${b.latest ? "" : " (past)"} · working size ${b.working_size}px`;
  updateProgress(b.labelled, b.total);
  renderList();
  const first = b.items.findIndex((it) => !it.labelled);
  await select(first >= 0 ? first : 0);
  if (b.complete && b.latest) say(completeText(), "ok");
  if (b.job && b.job.state === "running") pollJob();
}

function completeText() {
  if (!state.batch.can_start_next) return "Every image of this batch is labelled; stop the server and run `alseg query` for the next batch.";
  if (state.batch.next_mode === "auto") return "Every image of this batch is labelled; the next round starts by itself.";
  return "Every image of this batch is labelled; press 'Next batch' to train and choose the next one.";
}

function renderRounds() {
  const sel = $("round-select");
  sel.textContent = "";
  for (const r of state.batch.rounds || []) {
    const opt = document.createElement("option");
    opt.value = String(r.round);
    opt.textContent = `round ${r.round}: ${r.labelled} of ${r.total} labelled${r.open ? " (open)" : ""}`;
    sel.append(opt);
  }
  if (state.batch.round !== null) sel.value = String(state.batch.round);
  sel.disabled = !(state.batch.rounds && state.batch.rounds.length > 1);
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
    img.decoding = "async";
    img.alt = "";
    img.width = 44; img.height = 44;
    img.src = it.urls.thumb || it.urls.image;
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
  if (!state.batch || !state.batch.items) return;
  const lis = $("items").children;
  state.batch.items.forEach((it, k) => {
    const li = lis[k];
    if (!li) return;
    const edited = state.drafts.has(draftKey(it.id)) || (k === state.index && state.undo.length > 0);
    li.classList.toggle("current", k === state.index);
    li.classList.toggle("labelled", it.labelled);
    li.classList.toggle("edited", edited);
    const mark = li.querySelector(".mark");
    mark.textContent = edited ? "•" : (it.labelled ? "✓" : "");
    mark.title = edited ? "edited, not submitted" : (it.labelled ? `labelled${it.labelled_by ? " by " + it.labelled_by : ""}` : "");
  });
  const cur = lis[state.index];
  if (cur) cur.scrollIntoView({ block: "nearest" });
}

function showEmpty(text) {
  $("stage").hidden = true;
  $("empty-state").hidden = false;
  $("empty-state").textContent = text;
  for (const id of ["accept", "submit", "skip", "empty", "upload-file", "undo-submit", "clear"]) $(id).disabled = true;
}

// ---------------------------------------------------------------- the next round
function showJob(job) {
  state.job = job || null;
  const b = state.batch;
  const running = job && job.state === "running";
  const offer = b && b.can_start_next && b.latest && (b.round === null || b.complete);
  $("next-panel").hidden = !(offer || running || (job && job.state === "failed"));
  $("next-batch").disabled = !!running || !offer;
  const text = $("job");
  const bar = $("job-bar");
  if (running) {
    const step = job.step || "working";
    const count = job.total ? ` ${job.done || 0} of ${job.total}` : "";
    text.textContent = `next round: ${step}${count}…`;
    bar.hidden = !job.total;
    if (job.total) { bar.max = job.total; bar.value = job.done || 0; }
  } else if (job && job.state === "failed") {
    text.textContent = `the next round failed: ${job.message || "see the server's log"}`;
    bar.hidden = true;
  } else {
    text.textContent = "";
    bar.hidden = true;
  }
  $("next-panel").dataset.state = job ? job.state : "none";
}

async function startNext() {
  try {
    const job = await api("POST", "/api/next");
    showJob(job);
    say("Training on the labelled batch and choosing the next one; you can keep browsing and correcting.", "ok");
    pollJob();
  } catch (e) {
    say(`could not start the next round: ${e.message}`, "error");
  }
}

function pollJob() {
  if (state.jobTimer) return;
  state.jobTimer = setTimeout(async () => {
    state.jobTimer = null;
    let job;
    try {
      job = await api("GET", "/api/job");
    } catch (e) {
      say(`lost track of the next round: ${e.message}`, "error");
      return;
    }
    showJob(job);
    if (job.state === "running") { pollJob(); return; }
    if (job.state === "done") {
      const viewingLatest = state.batch && state.batch.latest;
      if (viewingLatest && !state.busy) {
        await loadBatch();
        if (state.batch.round !== null) say(`Round ${state.batch.round} is ready: ${state.batch.total} images.`, "ok");
        else say(job.message || "the next round is done, with no new batch", "ok");
      } else {
        say(`The next round is ready (round ${job.round}); choose it in the rounds list.`, "ok");
        const latest = await api("GET", "/api/batch?round=" + state.batch.round).catch(() => null);
        if (latest) { state.batch.rounds = latest.rounds; renderRounds(); }
      }
    } else if (job.state === "failed") {
      say(`the next round failed: ${job.message || "see the server's log"}`, "error");
    }
  }, JOB_POLL_MS);
}

// ---------------------------------------------------------------- loading an item
// The sizes the image can be shown at, smallest first: the server's previews, then the image itself.
function imageLevels(it) {
  const full = { side: Math.max(it.width, it.height), url: it.urls.image };
  return [...(it.previews || []).filter((p) => p.side < full.side), full];
}

// The smallest size with at least one pixel per screen (device) pixel at ``zoom``; else the image itself.
function levelFor(levels, zoom, w, h) {
  const shown = Math.max(w, h) * zoom * (window.devicePixelRatio || 1);
  return levels.find((l) => l.side >= shown - 0.5) || levels[levels.length - 1];
}

// Show the size the zoom needs. The <img> keeps showing the last one until the new one has loaded;
// then the last one's decoded pixels have no holder (zoomed out, the full image's 96 MB go).
function updateImageLevel() {
  if (!state.levels || state.context !== null) return;  // a neighbour shown for context keeps its one size
  const want = levelFor(state.levels, state.zoom, state.w, state.h);
  if (want === state.level) return;
  state.level = want;
  const img = $("image"), token = state.loadToken;
  img.onload = () => { if (token === state.loadToken) img.dataset.side = String(want.side); };
  img.onerror = () => { if (token === state.loadToken) say(`could not load ${want.url}`, "error"); };
  img.src = want.url;
}

// ---------------------------------------------------------------- volumes: the slice scroller
async function loadVolume(it, token) {
  if (!it.urls.volume) { hideVolume(); return; }
  let vol;
  try {
    vol = await api("GET", it.urls.volume);
  } catch (e) {
    if (token === state.loadToken) { hideVolume(); say(`could not load the slices of ${it.id}'s volume: ${e.message}`, "error"); }
    return;
  }
  if (token !== state.loadToken || state.item !== it) return;  // the expert moved on meanwhile
  if (!vol.group || vol.slices.length < 2) { hideVolume(); return; }
  state.volume = vol;
  renderVolume();
}

function hideVolume() {
  state.volume = null;
  $("volume-bar").hidden = true;
  $("volume-bar").removeAttribute("data-volume-of");
  $("slice-strip").textContent = "";
}

const batchIndexOf = (id) => (state.batch ? state.batch.items.findIndex((x) => x.id === id) : -1);

function renderVolume() {
  const vol = state.volume, strip = $("slice-strip");
  $("volume-name").textContent = vol.group;
  $("slice-range").max = String(vol.slices.length - 1);
  strip.textContent = "";
  vol.slices.forEach((s, j) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "tick";
    b.dataset.index = String(j);
    b.dataset.id = s.id;
    const inBatch = batchIndexOf(s.id) >= 0;
    b.classList.toggle("batch", inBatch);
    b.classList.toggle("labelled", s.labelled);
    b.classList.toggle("current", j === vol.current);
    b.title = `slice ${s.index}: ${s.id}` + (j === vol.current ? " (being labelled)" : inBatch ? " (in this batch: click to label it)" : " (click to view)")
      + (s.labelled ? ", labelled" : "");
    b.addEventListener("click", () => tickClicked(j));
    strip.append(b);
  });
  $("volume-bar").hidden = false;
  updateVolumeView();
  $("volume-bar").dataset.volumeOf = vol.id;
}

// Which slice is shown: the slider, the strip's mark, the note over the image, the buttons.
function updateVolumeView() {
  const vol = state.volume;
  if (!vol) return;
  const j = state.context === null ? vol.current : state.context;
  const s = vol.slices[j];
  $("slice-range").value = String(j);
  $("slice-value").textContent = `slice ${s.index} (${j + 1} of ${vol.slices.length})` + (state.context === null ? "" : " · context");
  const ticks = $("slice-strip").children;
  for (let k = 0; k < ticks.length; k++) ticks[k].classList.toggle("shown", k === j);
  $("slice-back").hidden = state.context === null;
  $("slice-label").hidden = state.context === null || batchIndexOf(s.id) < 0;
  const note = $("context-note");
  note.hidden = state.context === null;
  note.textContent = state.context === null ? "" :
    `slice ${s.index}, for context (read-only): Home or Esc goes back to slice ${vol.slices[vol.current].index}`;
}

function tickClicked(j) {
  const vol = state.volume;
  if (!vol) return;
  const k = batchIndexOf(vol.slices[j].id);
  if (j !== vol.current && k >= 0) { select(k); return; }  // a slice of the batch: label it
  showSlice(j);
}

// Show slice ``j`` of the volume in place of the slice being labelled, for context.
function showSlice(j) {
  const vol = state.volume;
  if (!vol || !state.mask || state.drawing) return;
  j = Math.max(0, Math.min(vol.slices.length - 1, Math.round(j)));
  if (j === vol.current) { backToSlice(); return; }
  if (j === state.context) return;
  state.context = j;
  const s = vol.slices[j], img = $("image"), token = state.loadToken;
  $("stage").classList.add("context");
  $("cursor").hidden = true;
  img.onload = () => { if (token === state.loadToken && state.context === j) img.dataset.shownId = s.id; };
  img.onerror = () => { if (token === state.loadToken && state.context === j) say(`could not load slice ${s.id}`, "error"); };
  img.src = s.url;
  setActionsDisabled(state.busy);
  updateUndoButtons();
  updateVolumeView();
}

// The slice being labelled again, with its mask exactly as it was left.
function backToSlice() {
  if (state.context === null) return;
  state.context = null;
  $("stage").classList.remove("context");
  const img = $("image"), token = state.loadToken, it = state.item;
  if (state.levels) {
    const want = levelFor(state.levels, state.zoom, state.w, state.h);
    state.level = want;
    img.onload = () => { if (token === state.loadToken && state.context === null) { img.dataset.side = String(want.side); img.dataset.shownId = it.id; } };
    img.onerror = () => { if (token === state.loadToken) say(`could not load ${want.url}`, "error"); };
    img.src = want.url;
  }
  setActionsDisabled(state.busy);
  updateUndoButtons();
  updateVolumeView();
}

function stepSlice(d) {
  const vol = state.volume;
  if (!vol) return;
  showSlice((state.context === null ? vol.current : state.context) + d);
}

// The next (d = 1) or previous (d = -1) slice of this volume that is in the batch: open it to label.
function jumpBatchSlice(d) {
  const vol = state.volume;
  if (!vol) return;
  for (let j = vol.current + d; j >= 0 && j < vol.slices.length; j += d) {
    const k = batchIndexOf(vol.slices[j].id);
    if (k >= 0) { select(k); return; }
  }
  say("no other slice of this volume is in the batch that way", "");
}

function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${url}`));
    img.src = url;
  });
}

async function maskFromUrl(url, w, h) {
  const res = await fetch(url, { cache: "no-store", headers: withToken() });
  if (!res.ok) return null;
  const blob = await res.blob();
  const mask = await maskFromPng(blob, w, h).catch(() => null);
  return mask || maskByCanvas(blob, w, h);
}

// A PNG of 8-bit channels at the image's size, decoded here row by row: the mask is the first
// channel >= 128. The zlib data is inflated by ``inflate`` below through one reused buffer, not by a
// DecompressionStream, whose output chunks (a 24 MP mask inflates to 24 MB) are garbage the collector
// leaves in the page for long: measured, 24 MB of the page's memory after loading a 6000x4000 photo.
// Only the foreground is written: the mask starts zeroed, and pages of it never written hold no
// memory. No decoded bitmap or RGBA copy of the whole mask is made. Null for anything else (another
// size, bit depth, palette, interlacing): the canvas decodes those.
async function maskFromPng(blob, w, h) {
  const bytes = new Uint8Array(await blob.arrayBuffer());  // a mask's PNG is small: kB, not MB
  return decodeMaskPng(bytes, w, h);
}

function decodeMaskPng(bytes, w, h) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (bytes.length < 33 || signature.some((b, i) => bytes[i] !== b)) return null;
  const type = (at) => String.fromCharCode(bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]);
  if (type(8) !== "IHDR") return null;
  const [pw, ph, depth, colour, interlace] = [view.getUint32(16), view.getUint32(20), bytes[24], bytes[25], bytes[28]];
  const channels = { 0: 1, 2: 3, 4: 2, 6: 4 }[colour];
  if (pw !== w || ph !== h || depth !== 8 || !channels || interlace !== 0) return null;
  const idat = [];  // the IDAT chunks' data, joined: the zlib stream (small, like the file)
  let size = 0;
  for (let at = 8; at + 12 <= bytes.length;) {
    const length = view.getUint32(at), kind = type(at);
    if (at + 12 + length > bytes.length) throw new Error("PNG cut short");
    if (kind === "IDAT") { idat.push(bytes.subarray(at + 8, at + 8 + length)); size += length; }
    if (kind === "IEND") break;
    at += 12 + length;
  }
  const zlib = new Uint8Array(size);
  for (let k = 0, o = 0; k < idat.length; o += idat[k].length, k++) zlib.set(idat[k], o);
  const stride = w * channels, bpp = channels;
  const mask = new Uint8Array(w * h);
  let prev = new Uint8Array(stride), row = new Uint8Array(stride);
  let filter = -1, fill = 0, y = 0;
  inflate(zlib, (value) => {
    for (let i = 0; i < value.length && y < h;) {
      if (filter < 0) { filter = value[i++]; fill = 0; continue; }
      const n = Math.min(stride - fill, value.length - i);
      row.set(value.subarray(i, i + n), fill);
      fill += n; i += n;
      if (fill < stride) continue;
      if (!unfilter(filter, row, prev, bpp)) throw new Error("bad PNG filter");
      for (let x = 0, o = y * w; x < w; x++) if (row[x * bpp] >= 128) mask[o + x] = 1;
      [prev, row] = [row, prev];
      filter = -1; y++;
    }
  });
  if (y < h) throw new Error("PNG cut short");
  return mask;
}

// ---------------------------------------------------------------- inflate (RFC 1950, 1951)
const INFLATE_WINDOW = 32768;       // the farthest back a deflate match may reach
const INFLATE_PIECE = 256 * 1024;   // output handed on at once
const LENGTH_BASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
                     131, 163, 195, 227, 258];
const LENGTH_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
                   2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577];
const DIST_EXTRA = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
const CODE_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
let FIXED_CODES = null;

// A canonical Huffman code from its code lengths: how many codes of each length, symbols in code order.
function huffman(lengths) {
  const counts = new Uint16Array(16), offsets = new Uint16Array(16), symbols = new Uint16Array(lengths.length);
  for (const l of lengths) counts[l]++;
  counts[0] = 0;
  for (let l = 1; l < 16; l++) offsets[l] = offsets[l - 1] + counts[l - 1];
  for (let s = 0; s < lengths.length; s++) if (lengths[s]) symbols[offsets[lengths[s]]++] = s;
  return { counts, symbols };
}

// Inflate the zlib stream ``src`` (held whole), calling ``sink(bytes)`` with the output in order, in
// pieces of at most INFLATE_PIECE bytes that are views of one buffer (valid only during the call).
function inflate(src, sink) {
  if (src.length < 2 || (src[0] & 15) !== 8 || ((src[0] << 8) | src[1]) % 31 !== 0 || (src[1] & 32)) {
    throw new Error("not a zlib stream");
  }
  let pos = 2, acc = 0, held = 0;  // bits not yet used: ``held`` of them, in ``acc`` (lowest first)
  const bits = (n) => {
    while (held < n) {
      if (pos >= src.length) throw new Error("deflate data cut short");
      acc |= src[pos++] << held; held += 8;
    }
    const v = acc & ((1 << n) - 1);
    acc >>>= n; held -= n;
    return v;
  };
  const decode = (code) => {  // one symbol, bit by bit (puff's canonical decoding)
    let value = 0, first = 0, index = 0;
    for (let len = 1; len < 16; len++) {
      value |= bits(1);
      const count = code.counts[len];
      if (value - first < count) return code.symbols[index + value - first];
      index += count; first = (first + count) << 1; value <<= 1;
    }
    throw new Error("bad deflate code");
  };
  const out = new Uint8Array(INFLATE_WINDOW + INFLATE_PIECE + 258);
  let o = 0, from = 0;  // out[from..o) not handed on yet; out[..o) the window matches read from
  const flush = () => {
    if (o > from) sink(out.subarray(from, o));
    if (o > INFLATE_WINDOW) { out.copyWithin(0, o - INFLATE_WINDOW, o); o = INFLATE_WINDOW; }
    from = o;
  };
  const full = INFLATE_WINDOW + INFLATE_PIECE;
  for (let last = 0; !last;) {
    last = bits(1);
    const kind = bits(2);
    if (kind === 0) {  // stored: a byte-aligned length, its one's complement, the bytes
      acc = 0; held = 0;
      if (pos + 4 > src.length) throw new Error("deflate data cut short");
      const len = src[pos] | (src[pos + 1] << 8);
      if ((len ^ (src[pos + 2] | (src[pos + 3] << 8))) !== 0xffff) throw new Error("bad stored block");
      pos += 4;
      if (pos + len > src.length) throw new Error("deflate data cut short");
      for (let k = 0; k < len; k++) {
        out[o++] = src[pos++];
        if (o >= full) flush();
      }
      continue;
    }
    let lit, dist;
    if (kind === 1) {
      if (!FIXED_CODES) {
        const l = new Uint8Array(288).fill(8, 0, 144).fill(9, 144, 256).fill(7, 256, 280).fill(8, 280);
        FIXED_CODES = [huffman(l), huffman(new Uint8Array(30).fill(5))];
      }
      [lit, dist] = FIXED_CODES;
    } else if (kind === 2) {
      const nlit = bits(5) + 257, ndist = bits(5) + 1, ncode = bits(4) + 4;
      const codeLengths = new Uint8Array(19);
      for (let k = 0; k < ncode; k++) codeLengths[CODE_ORDER[k]] = bits(3);
      const lengthCode = huffman(codeLengths);
      const lengths = new Uint8Array(nlit + ndist);
      for (let k = 0; k < nlit + ndist;) {
        const sym = decode(lengthCode);
        if (sym < 16) { lengths[k++] = sym; continue; }
        let repeat, value = 0;
        if (sym === 16) {
          if (k === 0) throw new Error("bad deflate lengths");
          value = lengths[k - 1]; repeat = 3 + bits(2);
        } else repeat = sym === 17 ? 3 + bits(3) : 11 + bits(7);
        if (k + repeat > nlit + ndist) throw new Error("bad deflate lengths");
        lengths.fill(value, k, k + repeat);
        k += repeat;
      }
      lit = huffman(lengths.subarray(0, nlit));
      dist = huffman(lengths.subarray(nlit));
    } else throw new Error("bad deflate block type");
    for (;;) {
      const sym = decode(lit);
      if (sym < 256) { out[o++] = sym; if (o >= full) flush(); continue; }
      if (sym === 256) break;
      if (sym > 285) throw new Error("bad deflate length");
      const len = LENGTH_BASE[sym - 257] + bits(LENGTH_EXTRA[sym - 257]);
      const dsym = decode(dist);
      if (dsym > 29) throw new Error("bad deflate distance");
      const back = DIST_BASE[dsym] + bits(DIST_EXTRA[dsym]);
      if (back > o) throw new Error("deflate distance too far back");
      for (let k = 0; k < len; k++, o++) out[o] = out[o - back];
      if (o >= full) flush();
    }
  }
  flush();
}

// Undo a PNG row filter in place (``prev``: the row above, unfiltered; zeros for the first).
function unfilter(filter, row, prev, bpp) {
  const n = row.length;
  switch (filter) {
    case 0: return true;
    case 1: for (let i = bpp; i < n; i++) row[i] = (row[i] + row[i - bpp]) & 255; return true;
    case 2: for (let i = 0; i < n; i++) row[i] = (row[i] + prev[i]) & 255; return true;
    case 3:
      for (let i = 0; i < n; i++) row[i] = (row[i] + (((i >= bpp ? row[i - bpp] : 0) + prev[i]) >> 1)) & 255;
      return true;
    case 4:
      for (let i = 0; i < n; i++) {
        const a = i >= bpp ? row[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
        const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        row[i] = (row[i] + (pa <= pb && pa <= pc ? a : pb <= pc ? b : c)) & 255;
      }
      return true;
    default: return false;
  }
}

// Any other image the browser reads, scaled to w x h (nearest neighbour: a mask at the working
// size), through a canvas of a few rows at a time: no full-size canvas or RGBA copy of a large mask.
async function maskByCanvas(blob, w, h) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const band = Math.max(1, Math.min(h, Math.floor(BAND_BYTES / (4 * w))));
  const c = document.createElement("canvas");
  c.width = w; c.height = band;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false;
  const mask = new Uint8Array(w * h);
  try {
    for (let y0 = 0; y0 < h; y0 += band) {
      const rows = Math.min(band, h - y0);
      ctx.clearRect(0, 0, w, band);
      ctx.drawImage(bitmap, 0, -y0, w, h);  // the whole mask scaled, shifted: this band lands in the canvas
      const data = ctx.getImageData(0, 0, w, rows).data;
      for (let i = 0, o = y0 * w, n = w * rows; i < n; i++) mask[o + i] = data[4 * i] >= 128 ? 1 : 0;
    }
  } finally {
    bitmap.close();
    c.width = c.height = 0;  // free the scratch canvas now, not at the next collection
  }
  return mask;
}

function saveDraft() {
  if (state.item && state.undo.length > 0) {
    state.drafts.set(draftKey(state.item.id), { mask: state.mask, undo: state.undo, redo: state.redo });
  }
}

// Let a mask go that nothing holds any more (no draft keeps it, no submit is encoding it): detaching
// its buffer frees its memory now (up to 24 MB on a 24 MP photo). Only dropped, it would wait for a
// garbage collection, which the page's little other garbage may not bring for long: measured, the
// last photo's mask was still held after the next image had loaded, in one run of two.
function releaseMask(mask) {
  if (!mask || mask === state.encoding || !mask.buffer.transfer) return;
  for (const draft of state.drafts.values()) if (draft.mask === mask) return;
  mask.buffer.transfer(0);
}

function hasUnsavedEdits() {
  return state.drafts.size > 0 || (state.item !== null && state.undo.length > 0);
}

async function select(k, { keepDraft = true } = {}) {
  if (!state.batch || k < 0 || k >= state.batch.items.length) return;
  if (keepDraft) saveDraft();
  cancelPolygon();
  const token = ++state.loadToken;
  const it = state.batch.items[k];
  state.context = null;  // a neighbour shown for context belongs to the last image
  state.volume = null;   // (the bar stays in sight until this image's volume replaces it)
  $("stage").classList.remove("context");
  $("context-note").hidden = true;
  if (!it.urls.volume) hideVolume();
  // the size of the image to load: the one for the zoom it will be shown at
  const levels = imageLevels(it);
  const zoom = state.fitted || state.w !== it.width || state.h !== it.height ? fitZoom(it.width, it.height) : state.zoom;
  const level = levelFor(levels, zoom, it.width, it.height);
  state.index = k;
  state.item = it;
  // let the last image's mask and steps go now (a draft keeps them): no 24 MB copy waits for the next one
  releaseMask(state.mask);
  state.mask = null;
  state.undo = []; state.redo = []; state.edit = null;
  state.levels = null;  // the last image's sizes: no size switch while this one loads
  $("stage").removeAttribute("data-loaded-id");
  refreshList();
  const key = draftKey(it.id);
  const draft = keepDraft ? state.drafts.get(key) : null;
  if (!keepDraft) state.drafts.delete(key);
  let mask = null, source = "";
  try {
    $("uncertainty").removeAttribute("src");  // the last image's overlay must not show over this one
    await loadImage($("image"), level.url);
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
  if (token !== state.loadToken) { releaseMask(mask); return; }  // the expert moved on meanwhile
  if (!mask) { mask = new Uint8Array(it.width * it.height); source = "an empty mask (no prediction)"; }
  const resized = state.w !== it.width || state.h !== it.height;
  state.w = it.width; state.h = it.height;
  state.mask = mask;
  state.levels = levels; state.level = level;
  $("image").dataset.side = String(level.side);
  state.undo = draft ? draft.undo : [];
  state.redo = draft ? draft.redo : [];
  state.drafts.delete(key);
  state.view = null;  // laid out afresh for this image by applyZoom
  $("outline").setAttribute("viewBox", `0 0 ${state.w} ${state.h}`);
  $("show-uncertainty").disabled = !it.urls.uncertainty;
  $("stage").hidden = false;
  $("empty-state").hidden = true;
  setActionsDisabled(false);
  applyUncertainty();
  const defaultBrush = Math.max(1, Math.round(Math.min(state.w, state.h) / 30));
  $("brush-size").max = String(Math.max(16, Math.round(Math.min(state.w, state.h) / 3)));
  if (!state.brushSet) setBrush(defaultBrush, false);
  state.source = source;
  updateInfo();
  if (state.fitted || resized) fit(); else applyZoom();
  updateUndoButtons();
  updateTimer();
  refreshList();
  $("image").dataset.shownId = it.id;
  $("stage").dataset.loadedId = it.id;
  await loadVolume(it, token);
}

function updateInfo() {
  const it = state.item;
  if (!it) return;
  let fg = 0;
  for (let i = 0; i < state.mask.length; i++) fg += state.mask[i];
  const parts = [it.id, it.reason, `${it.width}×${it.height} px`];
  if (it.score !== null && it.score !== undefined) parts.push(`uncertainty ${Number(it.score).toPrecision(3)}`);
  parts.push(it.labelled ? `labelled${it.labelled_by ? " by " + it.labelled_by : ""}` : "not labelled yet");
  parts.push(`mask ${fg} px, from ${state.source || "?"}`);
  $("item-info").textContent = parts.join(" · ");
}

// ---------------------------------------------------------------- drawing the overlay
// Which image pixels the overlay canvas covers, and how many per canvas pixel (k, a power of two
// at or below 1/zoom, so the canvas has at least one pixel per screen pixel): the whole image
// while that fits OVERLAY_PX, else the visible part and an eighth of the viewport around it.
function overlayView() {
  const { w, h, zoom } = state;
  let k = 1;
  while (k * 2 * zoom <= 1 && k < 64) k *= 2;
  const whole = Math.ceil(w / k) * Math.ceil(h / k);
  if (whole <= OVERLAY_PX) return { k, x0: 0, y0: 0, x1: w, y1: h };
  const vp = $("viewport");
  const mx = vp.clientWidth / 8, my = vp.clientHeight / 8;
  const align = (v) => Math.floor(v / k) * k;
  const x0 = Math.max(0, align((-state.panX - mx) / zoom)), y0 = Math.max(0, align((-state.panY - my) / zoom));
  const x1 = Math.min(w, Math.ceil((vp.clientWidth - state.panX + mx) / zoom));
  const y1 = Math.min(h, Math.ceil((vp.clientHeight - state.panY + my) / zoom));
  if (x1 <= x0 || y1 <= y0) return state.view || { k, x0: 0, y0: 0, x1: Math.min(w, k), y1: Math.min(h, k) };
  return { k, x0, y0, x1, y1 };
}

// Lay the overlay canvas out again (and redraw it) when the zoom's scale changed or the visible
// part of the image left the part it covers; else CSS moves it with the stage.
function updateOverlay() {
  if (!state.mask) return;
  const want = overlayView();
  const v = state.view;
  const covered = v && v.k === want.k && want.x0 >= v.x0 && want.y0 >= v.y0 && want.x1 <= v.x1 && want.y1 <= v.y1;
  if (covered) return;
  const view = { ...want, cw: Math.ceil((want.x1 - want.x0) / want.k), ch: Math.ceil((want.y1 - want.y0) / want.k) };
  state.view = view;
  const canvas = $("mask");
  canvas.width = view.cw; canvas.height = view.ch;  // also clears it
  const pct = (v, total) => `${(100 * v / total).toFixed(6)}%`;
  canvas.style.left = pct(view.x0, state.w);
  canvas.style.top = pct(view.y0, state.h);
  canvas.style.width = pct(view.x1 - view.x0, state.w);
  canvas.style.height = pct(view.y1 - view.y0, state.h);
  renderAll();
}

function renderAll() { if (state.view) render(0, 0, state.w, state.h); }

// Redraw the overlay over image pixels x0..x1, y0..y1: a canvas pixel shows the mask when any
// image pixel under it is set, in the edge colour when a canvas pixel beside it (or the image's
// border) is not. With one canvas pixel per image pixel this is the mask exactly.
function render(x0, y0, x1, y1) {
  const v = state.view;
  if (!v || !state.mask) return;
  const { w, h, mask } = state;
  const k = v.k;
  const bx0 = Math.max(0, Math.floor((x0 - v.x0) / k) - 1), by0 = Math.max(0, Math.floor((y0 - v.y0) / k) - 1);
  const bx1 = Math.min(v.cw, Math.ceil((x1 - v.x0) / k) + 1), by1 = Math.min(v.ch, Math.ceil((y1 - v.y0) / k) + 1);
  if (bx1 <= bx0 || by1 <= by0) return;
  const ctx = $("mask").getContext("2d");
  const fill = Math.round(state.opacity * 255);
  const edgeAlpha = Math.max(fill, 230);
  const gw = bx1 - bx0 + 2;  // the canvas pixels drawn and one around them: their neighbours
  // whether canvas pixel (bx, by) shows the mask; outside the image it does not
  const covers = (bx, by) => {
    const ix0 = v.x0 + bx * k, iy0 = v.y0 + by * k;
    if (ix0 < 0 || iy0 < 0 || ix0 >= w || iy0 >= h) return 0;
    const ix1 = Math.min(w, ix0 + k), iy1 = Math.min(h, iy0 + k);
    for (let y = iy0; y < iy1; y++) {
      for (let i = y * w + ix0, end = y * w + ix1; i < end; i++) if (mask[i]) return 1;
    }
    return 0;
  };
  const gridRow = (by, out) => { for (let j = 0; j < gw; j++) out[j] = covers(bx0 - 1 + j, by); };
  let above = new Uint8Array(gw), row = new Uint8Array(gw), below = new Uint8Array(gw);
  gridRow(by0 - 1, above);
  gridRow(by0, row);
  // in bands of rows through one ImageData kept with the view (a new one per band would leave MBs
  // of garbage per redraw); it is the canvas's width, so its rows are cleared only where drawn
  const bw = bx1 - bx0, stride = 4 * v.cw;
  const img = bandImage(ctx, v);
  const d = img.data, band = img.height;
  for (let b0 = by0; b0 < by1; b0 += band) {
    const b1 = Math.min(by1, b0 + band);
    for (let by = b0; by < b1; by++) {
      gridRow(by + 1, below);
      let o = (by - b0) * stride;
      d.fill(0, o, o + 4 * bw);
      for (let j = 1; j < gw - 1; j++, o += 4) {
        if (!row[j]) continue;
        const edge = !row[j - 1] || !row[j + 1] || !above[j] || !below[j];
        const c = edge ? EDGE : OVERLAY;
        d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2];
        d[o + 3] = edge ? edgeAlpha : fill;
      }
      [above, row, below] = [row, below, above];
    }
    ctx.putImageData(img, bx0, b0, 0, 0, bw, b1 - b0);  // its top-left bw x rows, at (bx0, b0)
  }
}

// The ImageData render() draws through: the view's width, DRAW_BYTES of rows (or fewer).
function bandImage(ctx, v) {
  const rows = Math.max(1, Math.min(v.ch, Math.floor(DRAW_BYTES / (4 * v.cw))));
  if (!v.band || v.band.width !== v.cw || v.band.height !== rows) v.band = ctx.createImageData(v.cw, rows);
  return v.band;
}

// ---------------------------------------------------------------- editing
function effortOf(id) {
  if (!state.effort.has(id)) state.effort.set(id, { strokes: 0, clicks: 0 });
  return state.effort.get(id);
}

function count(kind) {
  if (state.item) effortOf(state.item.id)[kind] += 1;
}

// The mask can be edited: an image is loaded, no submit is encoding (or sending) it, which reads
// the mask itself, not a copy, and the image shown is the slice itself, not a neighbour.
function editable() { return !!state.mask && !state.busy && !state.drawing && state.context === null; }

// A new undo step, empty until ``cover`` gives it a box: every write of an edit lies inside its box.
function beginEdit() {
  const step = { x0: 0, y0: 0, x1: 0, y1: 0, data: new Uint8Array(0), touched: null };
  state.undo.push(step);
  state.redo = [];
  updateUndoButtons();
  refreshList();
  return step;
}

// The step is complete: its box shrinks to what the edit asked for (a stroke's box grew with margins),
// and the oldest steps go past UNDO_BYTES or UNDO_STEPS.
function endEdit(step) {
  const t = step.touched;
  if (t && (t[0] !== step.x0 || t[1] !== step.y0 || t[2] !== step.x1 || t[3] !== step.y1)) {
    const bw = step.x1 - step.x0, tw = t[2] - t[0];
    const data = new Uint8Array(tw * (t[3] - t[1]));
    for (let y = t[1], o = 0; y < t[3]; y++, o += tw) {
      const from = (y - step.y0) * bw + (t[0] - step.x0);
      data.set(step.data.subarray(from, from + tw), o);
    }
    [step.x0, step.y0, step.x1, step.y1] = t;
    step.data = data;
  }
  step.touched = null;
  let bytes = 0;
  for (const s of state.undo) bytes += s.data.length;
  while (state.undo.length > 1 && (bytes > UNDO_BYTES || state.undo.length > UNDO_STEPS)) bytes -= state.undo.shift().data.length;
  updateUndoButtons();
}

// Grow the step's box to take in image px x0..x1, y0..y1 (ends exclusive; clamped to the image),
// copying the mask's pixels it newly covers: the edit has not written there yet. ``grow`` widens
// the box further on each side it grows to (a stroke's margin, so a long stroke copies little twice).
function cover(step, x0, y0, x1, y1, grow = 0) {
  const { w, h, mask } = state;
  x0 = Math.max(0, Math.floor(x0)); y0 = Math.max(0, Math.floor(y0));
  x1 = Math.min(w, Math.ceil(x1)); y1 = Math.min(h, Math.ceil(y1));
  if (x1 <= x0 || y1 <= y0) return;
  const t = step.touched;
  step.touched = t ? [Math.min(t[0], x0), Math.min(t[1], y0), Math.max(t[2], x1), Math.max(t[3], y1)] : [x0, y0, x1, y1];
  const empty = step.x1 <= step.x0;
  if (!empty && x0 >= step.x0 && y0 >= step.y0 && x1 <= step.x1 && y1 <= step.y1) return;
  const nx0 = empty || x0 < step.x0 ? Math.max(0, x0 - grow) : step.x0;
  const ny0 = empty || y0 < step.y0 ? Math.max(0, y0 - grow) : step.y0;
  const nx1 = empty || x1 > step.x1 ? Math.min(w, x1 + grow) : step.x1;
  const ny1 = empty || y1 > step.y1 ? Math.min(h, y1 + grow) : step.y1;
  const nw = nx1 - nx0, ow = step.x1 - step.x0;
  const data = new Uint8Array(nw * (ny1 - ny0));
  for (let y = ny0, o = 0; y < ny1; y++, o += nw) {
    data.set(mask.subarray(y * w + nx0, y * w + nx1), o);  // the mask as it is: unchanged outside the old box
    if (!empty && y >= step.y0 && y < step.y1) {  // inside the old box: what the step kept from before
      const from = (y - step.y0) * ow;
      data.set(step.data.subarray(from, from + ow), o + step.x0 - nx0);
    }
  }
  step.x0 = nx0; step.y0 = ny0; step.x1 = nx1; step.y1 = ny1;
  step.data = data;
}

// Exchange the step's pixels with the mask's in its box: undoes it, and (once more) redoes it.
function swapStep(step) {
  const { w, mask } = state;
  const bw = step.x1 - step.x0;
  const row = new Uint8Array(bw);
  for (let y = step.y0, o = 0; y < step.y1; y++, o += bw) {
    const now = mask.subarray(y * w + step.x0, y * w + step.x1), kept = step.data.subarray(o, o + bw);
    row.set(now); now.set(kept); kept.set(row);
  }
  render(step.x0, step.y0, step.x1, step.y1);
}

function undo() {
  if (!state.undo.length || !editable()) return;
  const step = state.undo.pop();
  swapStep(step);
  state.redo.push(step);
  updateInfo(); updateUndoButtons(); refreshList();
}

function redo() {
  if (!state.redo.length || !editable()) return;
  const step = state.redo.pop();
  swapStep(step);
  state.undo.push(step);
  updateInfo(); updateUndoButtons(); refreshList();
}

function updateUndoButtons() {
  $("undo").disabled = state.undo.length === 0 || state.context !== null;
  $("redo").disabled = state.redo.length === 0 || state.context !== null;
}

function clearMask() {
  if (!editable()) return;
  const { w, h, mask } = state;
  let x0 = w, y0 = h, x1 = 0, y1 = 0;  // the box of the set pixels: all the clear changes
  for (let y = 0; y < h; y++) {
    const row = mask.subarray(y * w, (y + 1) * w);
    const first = row.indexOf(1);
    if (first < 0) continue;
    if (y < y0) y0 = y;
    y1 = y + 1;
    if (first < x0) x0 = first;
    const last = row.lastIndexOf(1);
    if (last + 1 > x1) x1 = last + 1;
  }
  if (x1 <= x0) return;  // nothing to clear
  const step = beginEdit();
  cover(step, x0, y0, x1, y1);
  for (let y = y0; y < y1; y++) mask.fill(0, y * w + x0, y * w + x1);
  endEdit(step);
  count("clicks");
  render(x0, y0, x1, y1); updateInfo(); refreshList();
}

function dab(cx, cy, value) {
  const { w, h, mask } = state;
  const r = state.brush / 2;
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(w - 1, Math.floor(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(h - 1, Math.floor(cy + r));
  const px = Math.floor(cx), py = Math.floor(cy);  // a 1-px brush still marks the pixel under it
  const step = state.edit;  // the stroke's undo step keeps what this dab is about to change
  if (step) {
    const margin = Math.max(state.brush, 32, (step.x1 - step.x0 + step.y1 - step.y0) >> 3);
    cover(step, Math.min(x0, px), Math.min(y0, py), Math.max(x1, px) + 1, Math.max(y1, py) + 1, margin);
  }
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      if (dx * dx + dy * dy <= r * r) mask[y * w + x] = value;
    }
  }
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

// The 4-connected region of equal pixels at (px, py) takes the other value. It is marked first
// (FILL_MARK), which gives the box the fill changes; that box, with the marks read as the old value,
// is the undo step; then the marks take the new value.
function floodFill(px, py) {
  const { w, h, mask } = state;
  if (px < 0 || py < 0 || px >= w || py >= h) return;
  const start = py * w + px;
  const from = mask[start], to = from ? 0 : 1;
  count("clicks");
  let stack = new Int32Array(1 << 16);  // grows as needed: a small fill on a 24 MP mask needs little
  let top = 0;
  const push = (i) => {
    if (top === stack.length) { const more = new Int32Array(stack.length * 2); more.set(stack); stack = more; }
    mask[i] = FILL_MARK;
    stack[top++] = i;
  };
  let x0 = px, x1 = px, y0 = py, y1 = py;
  push(start);
  while (top > 0) {
    const i = stack[--top];
    const x = i % w, y = (i - x) / w;
    if (x < x0) x0 = x; else if (x > x1) x1 = x;
    if (y < y0) y0 = y; else if (y > y1) y1 = y;
    if (x > 0 && mask[i - 1] === from) push(i - 1);
    if (x < w - 1 && mask[i + 1] === from) push(i + 1);
    if (i >= w && mask[i - w] === from) push(i - w);
    if (i + w < w * h && mask[i + w] === from) push(i + w);
  }
  stack = null;
  const step = beginEdit();
  cover(step, x0, y0, x1 + 1, y1 + 1);
  const kept = step.data;
  for (let i = 0; i < kept.length; i++) if (kept[i] === FILL_MARK) kept[i] = from;
  for (let y = y0; y <= y1; y++) {
    for (let i = y * w + x0, end = y * w + x1 + 1; i < end; i++) if (mask[i] === FILL_MARK) mask[i] = to;
  }
  endEdit(step);
  render(x0, y0, x1 + 1, y1 + 1);
  updateInfo();
}

// The box of image px that fillPolygon(points) may change: [x0, y0, x1, y1], ends exclusive.
function polygonBox(points) {
  let minY = Infinity, maxY = -Infinity, minX = Infinity, maxX = -Infinity;
  for (const [x, y] of points) {
    minY = Math.min(minY, y); maxY = Math.max(maxY, y); minX = Math.min(minX, x); maxX = Math.max(maxX, x);
  }
  return [Math.floor(minX), Math.floor(minY), Math.floor(maxX) + 1, Math.ceil(maxY) + 1];
}

// Every pixel whose centre lies inside the polygon (even-odd rule) takes ``value``.
function fillPolygon(points, value) {
  const { w, h, mask } = state;
  let minY = Infinity, maxY = -Infinity, minX = Infinity, maxX = -Infinity;
  for (const [x, y] of points) {
    minY = Math.min(minY, y); maxY = Math.max(maxY, y); minX = Math.min(minX, x); maxX = Math.max(maxX, x);
  }
  const y0 = Math.max(0, Math.floor(minY)), y1 = Math.min(h - 1, Math.ceil(maxY));
  const n = points.length;
  for (let y = y0; y <= y1; y++) {
    const yc = y + 0.5;
    const xs = [];
    for (let i = 0, j = n - 1; i < n; j = i++) {
      const [xi, yi] = points[i], [xj, yj] = points[j];
      if ((yi > yc) !== (yj > yc)) xs.push(xi + (yc - yi) * (xj - xi) / (yj - yi));
    }
    xs.sort((a, b) => a - b);
    for (let k = 0; k + 1 < xs.length; k += 2) {
      const xa = Math.max(0, Math.ceil(xs[k] - 0.5)), xb = Math.min(w - 1, Math.floor(xs[k + 1] - 0.5));
      for (let x = xa; x <= xb; x++) mask[y * w + x] = value;
    }
  }
  render(minX, minY, maxX + 1, maxY + 1);
}

function drawPolygonPreview() {
  const line = $("outline-line");
  const poly = state.poly;
  line.setAttribute("points", poly ? poly.points.map(([x, y]) => `${x},${y}`).join(" ") : "");
  $("outline").classList.toggle("active", !!poly);
}

function closePolygon() {
  if (state.poly && !editable()) return;  // a submit is reading the mask: the polygon stays open
  const poly = state.poly;
  state.poly = null;
  drawPolygonPreview();
  if (!poly || poly.points.length < 3) return;
  const step = beginEdit();
  cover(step, ...polygonBox(poly.points));
  fillPolygon(poly.points, poly.value);
  endEdit(step);
  count("strokes");
  updateInfo();
  say(`filled a ${poly.lasso ? "lasso" : "polygon"} of ${poly.points.length} points (undo: z)`, "");
}

function cancelPolygon() {
  if (!state.poly) return;
  state.poly = null;
  drawPolygonPreview();
}

function polygonDown(ev, x, y) {
  const poly = state.poly;
  if (poly && poly.points.length >= 3) {
    const [fx, fy] = poly.points[0];
    if (Math.hypot((x - fx) * state.zoom, (y - fy) * state.zoom) <= CLOSE_PX) { count("clicks"); closePolygon(); return; }
  }
  if (!poly) state.poly = { points: [], value: ev.altKey ? 0 : 1, lasso: false };
  state.poly.points.push([x, y]);
  state.poly.down = [ev.clientX, ev.clientY];
  count("clicks");
  $("mask").setPointerCapture(ev.pointerId);
  drawPolygonPreview();
}

function toImage(ev) {
  const rect = $("stage").getBoundingClientRect();  // the whole image; the canvas may cover part of it
  return [(ev.clientX - rect.left) * state.w / rect.width, (ev.clientY - rect.top) * state.h / rect.height];
}

function wantsPan(ev) { return ev.button === 1 || (ev.button === 0 && state.space); }

function onPointerDown(ev) {
  if (!editable() || wantsPan(ev) || ev.button !== 0) return;  // a pan is the viewport's
  ev.preventDefault();
  const [x, y] = toImage(ev);
  if (state.tool === "fill") {
    floodFill(Math.floor(x), Math.floor(y));
    return;
  }
  if (state.tool === "polygon") {
    polygonDown(ev, x, y);
    return;
  }
  state.edit = beginEdit();
  count("strokes");
  state.drawing = { value: state.tool === "eraser" ? 0 : 1, last: [x, y] };
  $("mask").setPointerCapture(ev.pointerId);
  dab(x, y, state.drawing.value);
}

function onPointerMove(ev) {
  moveCursor(ev);
  const poly = state.poly;
  if (poly && poly.down) {  // held down and dragged: a freehand lasso, closed on release
    if (!poly.lasso && Math.hypot(ev.clientX - poly.down[0], ev.clientY - poly.down[1]) > 4) poly.lasso = true;
    if (poly.lasso) {
      const events = ev.getCoalescedEvents ? ev.getCoalescedEvents() : [ev];
      for (const e of (events.length ? events : [ev])) poly.points.push(toImage(e));
      drawPolygonPreview();
    }
    return;
  }
  if (!state.drawing) return;
  const events = ev.getCoalescedEvents ? ev.getCoalescedEvents() : [ev];
  for (const e of (events.length ? events : [ev])) {
    const [x, y] = toImage(e);
    strokeTo(x, y);
  }
}

function onPointerUp(ev) {
  if (state.poly && state.poly.down) {
    state.poly.down = null;
    if (state.poly.lasso) closePolygon();
    return;
  }
  if (!state.drawing) return;
  const [x, y] = toImage(ev);
  strokeTo(x, y);
  state.drawing = null;
  if (state.edit) endEdit(state.edit);
  state.edit = null;
  updateInfo();
}

function moveCursor(ev) {
  const cur = $("cursor");
  if (state.tool === "fill" || state.tool === "polygon" || !state.mask || state.space) { cur.hidden = true; return; }
  const rect = $("viewport").getBoundingClientRect();
  const size = state.brush * state.zoom;
  cur.hidden = false;
  cur.style.width = cur.style.height = `${Math.max(4, size)}px`;
  cur.style.left = `${ev.clientX - rect.left}px`;
  cur.style.top = `${ev.clientY - rect.top}px`;
}

// ---------------------------------------------------------------- tools, zoom, pan, overlays
function setTool(tool) {
  if (tool !== "polygon") cancelPolygon();
  state.tool = tool;
  document.querySelectorAll("button.tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  $("stage").classList.toggle("fill", tool === "fill" || tool === "polygon");
  if (tool === "fill" || tool === "polygon") $("cursor").hidden = true;
}

function setBrush(size, byUser = true) {
  const max = Number($("brush-size").max);
  state.brush = Math.min(max, Math.max(1, Math.round(size)));
  $("brush-size").value = String(state.brush);
  $("brush-size-value").textContent = String(state.brush);
  if (byUser) state.brushSet = true;
}

function fitZoom(w, h) {
  const vp = $("viewport");
  const z = Math.min((vp.clientWidth - 16) / w, (vp.clientHeight - 16) / h);
  return Math.max(0.01, Math.min(32, z));
}

function fit() {
  if (!state.w) return;
  const vp = $("viewport");
  state.zoom = fitZoom(state.w, state.h);
  state.panX = (vp.clientWidth - state.w * state.zoom) / 2;
  state.panY = (vp.clientHeight - state.h * state.zoom) / 2;
  state.fitted = true;
  applyZoom();
}

// Zoom to ``z`` keeping the image point at viewport position (cx, cy) where it is.
function zoomAt(z, cx, cy) {
  if (!state.w) return;
  z = Math.max(0.01, Math.min(32, z));
  const ix = (cx - state.panX) / state.zoom, iy = (cy - state.panY) / state.zoom;
  state.zoom = z;
  state.panX = cx - ix * z;
  state.panY = cy - iy * z;
  state.fitted = false;
  applyZoom();
}

function setZoom(z) {  // keys and buttons: about the viewport's centre
  const vp = $("viewport");
  zoomAt(z, vp.clientWidth / 2, vp.clientHeight / 2);
}

function applyZoom() {
  const stage = $("stage");
  stage.style.width = `${state.w * state.zoom}px`;
  stage.style.height = `${state.h * state.zoom}px`;
  stage.style.left = `${state.panX}px`;
  stage.style.top = `${state.panY}px`;
  stage.classList.toggle("pixelated", state.zoom >= 2);
  $("zoom-value").textContent = `${Math.round(state.zoom * 100)}%`;
  updateOverlay();
  updateImageLevel();
}

function onWheel(ev) {
  if (!state.w) return;
  ev.preventDefault();
  const rect = $("viewport").getBoundingClientRect();
  const unit = ev.deltaMode === 1 ? 33 : ev.deltaMode === 2 ? 400 : 1;
  if (ev.altKey && state.volume) {  // Alt+wheel: through the volume's slices, one per notch (100 px)
    state.wheelSlices += (ev.deltaY || ev.deltaX) * unit;
    const steps = Math.trunc(state.wheelSlices / 100);
    if (steps) { state.wheelSlices -= steps * 100; stepSlice(Math.max(-10, Math.min(10, steps))); }
    return;
  }
  const factor = Math.exp(-Math.max(-300, Math.min(300, ev.deltaY * unit)) * 0.002);
  zoomAt(state.zoom * factor, ev.clientX - rect.left, ev.clientY - rect.top);
}

function onPanDown(ev) {
  if (!wantsPan(ev) || !state.w) return;
  ev.preventDefault();
  state.panning = { x: ev.clientX, y: ev.clientY, panX: state.panX, panY: state.panY };
  $("viewport").setPointerCapture(ev.pointerId);
  $("viewport").classList.add("grabbing");
}

function onPanMove(ev) {
  const p = state.panning;
  if (!p) return;
  state.panX = p.panX + ev.clientX - p.x;
  state.panY = p.panY + ev.clientY - p.y;
  state.fitted = false;
  applyZoom();
}

function onPanUp() {
  state.panning = null;
  $("viewport").classList.remove("grabbing");
}

function applyUncertainty() {
  const it = state.item;
  const on = state.showUncertainty && it && !!it.urls.uncertainty;
  const img = $("uncertainty");
  // fetched only when shown: on a large image the overlay is as big as the image itself
  if (on && img.getAttribute("src") !== it.urls.uncertainty) img.src = it.urls.uncertainty;
  img.hidden = !on;
  $("show-uncertainty").checked = !!on;
  $("uncertainty-scale").hidden = !on;
  if (on) {
    const scale = it.uncertainty_scale;
    $("scale-hi").textContent = scale === null || scale === undefined ? "max" : Number(scale).toPrecision(3);
  }
}

function setOpacity(value) {
  state.opacity = Math.min(1, Math.max(0, value));
  if (state.mask) renderAll();
}

// ---------------------------------------------------------------- window / level and channel
const CHANNEL_ROWS = {
  all: "1 0 0 0 0  0 1 0 0 0  0 0 1 0 0  0 0 0 1 0",
  0: "1 0 0 0 0  1 0 0 0 0  1 0 0 0 0  0 0 0 1 0",
  1: "0 1 0 0 0  0 1 0 0 0  0 1 0 0 0  0 0 0 1 0",
  2: "0 0 1 0 0  0 0 1 0 0  0 0 1 0 0  0 0 0 1 0",
};

function applyDisplay() {
  const { channel, lo, hi } = state.display;
  const slope = 255 / Math.max(1, hi - lo);
  const intercept = -lo / Math.max(1, hi - lo);
  $("channel-matrix").setAttribute("values", CHANNEL_ROWS[channel]);
  for (const id of ["wl-r", "wl-g", "wl-b"]) {
    $(id).setAttribute("slope", String(slope));
    $(id).setAttribute("intercept", String(intercept));
  }
  const plain = channel === "all" && lo === 0 && hi === 255;
  $("image").classList.toggle("filtered", !plain);  // no filter at all when there is nothing to change
  $("win-lo").value = String(lo);
  $("win-hi").value = String(hi);
  $("window-value").textContent = `${lo}–${hi}`;
  $("channel").value = String(channel);
}

function setWindow(lo, hi) {
  lo = Math.max(0, Math.min(254, Math.round(lo)));
  hi = Math.max(lo + 1, Math.min(255, Math.round(hi)));
  state.display.lo = lo; state.display.hi = hi;
  applyDisplay();
}

// The 1st to 99th percentile of the shown channel, from the image drawn small (a few kB, not the image).
function autoWindow() {
  const img = $("image");
  if (!img.naturalWidth) return;
  const side = 256;
  const s = Math.min(1, side / Math.max(img.naturalWidth, img.naturalHeight));
  const c = document.createElement("canvas");
  c.width = Math.max(1, Math.round(img.naturalWidth * s)); c.height = Math.max(1, Math.round(img.naturalHeight * s));
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0, c.width, c.height);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const ch = state.display.channel;
  const hist = new Uint32Array(256);
  for (let i = 0; i < d.length; i += 4) {
    const v = ch === "all" ? Math.round(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]) : d[i + Number(ch)];
    hist[v]++;
  }
  const n = d.length / 4;
  let acc = 0, lo = 0, hi = 255;
  for (let v = 0; v < 256; v++) { acc += hist[v]; if (acc >= 0.01 * n) { lo = v; break; } }
  acc = 0;
  for (let v = 255; v >= 0; v--) { acc += hist[v]; if (acc >= 0.01 * n) { hi = v; break; } }
  setWindow(lo, Math.max(hi, lo + 1));
}

// ---------------------------------------------------------------- time on each image
function noteInput() { state.lastInput = performance.now(); }

function tick() {
  const now = performance.now();
  const dt = Math.min(now - state.lastTick, 2000);  // a sleeping laptop is not expert time
  state.lastTick = now;
  const visible = document.visibilityState === "visible";
  const active = visible && now - state.lastInput < IDLE_MS;
  if (visible && state.item && !state.busy) {
    const id = state.item.id;
    const p = state.pending.get(id) || { wall: 0, active: 0 };
    p.wall += dt;
    if (active) p.active += dt;
    state.pending.set(id, p);
    if (active) state.spent.set(id, (state.spent.get(id) || 0) + dt);
  }
  $("timer").classList.toggle("paused", !active);
  $("timer").title = active ? "Active time on this image (paused while the tab is hidden or after 30 s without input)"
                            : "Paused: the tab is hidden or there was no input for 30 s";
  updateTimer();
}

function updateTimer() {
  const ms = state.item ? (state.spent.get(state.item.id) || 0) : 0;
  const s = Math.floor(ms / 1000);
  $("timer").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

// The time and effort not yet sent for ``id``, as query parameters; taken (reset) by ``sent``.
function effortQuery(id, withCounts = true) {
  const p = state.pending.get(id) || { wall: 0, active: 0 };
  let q = `seconds=${(Math.round(p.wall / 100) / 10)}&active_seconds=${(Math.round(p.active / 100) / 10)}`;
  if (withCounts) {
    const e = effortOf(id);
    q += `&strokes=${e.strokes}&clicks=${e.clicks}`;
  }
  return q;
}

function sent(id, withCounts = true) {
  state.pending.set(id, { wall: 0, active: 0 });
  if (withCounts) state.effort.set(id, { strokes: 0, clicks: 0 });
}

function flushTime() {  // the page is going away: record the time not yet sent
  for (const [id, p] of state.pending) {
    if (p.wall < 500) continue;
    fetch(`/api/time/${enc(id)}?${effortQuery(id, false)}&action=view&${roundQuery()}`,
          { method: "POST", keepalive: true, headers: withToken() });
    sent(id, false);
  }
}

// ---------------------------------------------------------------- submitting
// The mask as a 0/255 8-bit greyscale PNG, encoded row by row: no full-size canvas or RGBA copy.
async function maskBlob(mask, w, h) {
  if (typeof CompressionStream === "undefined") return maskBlobByCanvas(mask, w, h);
  const deflate = new CompressionStream("deflate");  // zlib format: what PNG's IDAT holds
  const writer = deflate.writable.getWriter();
  const compressed = new Response(deflate.readable).arrayBuffer();
  const rows = Math.max(1, Math.floor((1 << 20) / (w + 1)));
  // one buffer for every band of rows: the stream has compressed a band when its write resolves
  const buffer = new Uint8Array(Math.min(rows, h) * (w + 1));  // each row: filter type 0, then its pixels
  for (let y0 = 0; y0 < h; y0 += rows) {
    const n = Math.min(rows, h - y0);
    const raw = buffer.subarray(0, n * (w + 1));
    for (let r = 0; r < n; r++) {
      const src = (y0 + r) * w, o = r * (w + 1);
      raw[o] = 0;
      for (let x = 0; x < w; x++) raw[o + 1 + x] = mask[src + x] ? 255 : 0;
    }
    await writer.write(raw);
  }
  await writer.close();
  const header = new Uint8Array(13);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, w); hv.setUint32(4, h);
  header[8] = 8; header[9] = 0;  // bit depth 8, greyscale; compression, filter, interlace 0
  const parts = [new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]), ...pngChunk("IHDR", header),
                 ...pngChunk("IDAT", new Uint8Array(await compressed)), ...pngChunk("IEND", new Uint8Array(0))];
  return new Blob(parts, { type: "image/png" });
}

let CRC_TABLE = null;
function crc32(bytes, crc) {
  if (!CRC_TABLE) {
    CRC_TABLE = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      CRC_TABLE[n] = c >>> 0;
    }
  }
  for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return crc;
}

function pngChunk(type, data) {  // [length + type, data, crc]
  const head = new Uint8Array(8);
  new DataView(head.buffer).setUint32(0, data.length);
  for (let i = 0; i < 4; i++) head[4 + i] = type.charCodeAt(i);
  const crc = new Uint8Array(4);
  new DataView(crc.buffer).setUint32(0, (crc32(data, crc32(head.subarray(4), 0xffffffff)) ^ 0xffffffff) >>> 0);
  return [head, data, crc];
}

function maskBlobByCanvas(mask, w, h) {  // browsers without CompressionStream
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
  const it = state.item, k = state.index, batch = state.batch;
  state.busy = true;
  setActionsDisabled(true);
  say(`sending ${what} for ${it.id}…`, "");
  try {
    const blob = await getBlob();
    getBlob = null;  // what it read from (the mask) is not needed here any more
    const base = `/api/mask/${enc(it.id)}?round=${batch.round}&${effortQuery(it.id)}` + (allowEmpty ? "&allow_empty=true" : "");
    let res;
    try {
      res = await api("PUT", base, blob, { "Content-Type": "image/png" });
    } catch (e) {
      if (!(e.status === 409 && e.data && e.data.confirm)) throw e;
      // a different mask is stored already: replace it only when the expert says so
      if (!window.confirm(`${it.id}: ${e.message}\n\nReplace the stored mask with ${what}?`)) {
        say(`${it.id}: kept the stored mask; ${what} was not sent.`, "");
        return;
      }
      res = await api("PUT", base + "&replace=1", blob, { "Content-Type": "image/png" });
    }
    sent(it.id);
    it.labelled = true;
    it.labelled_by = batch.annotator || it.labelled_by;
    state.drafts.delete(draftKey(it.id));
    if (state.index === k && state.batch === batch) { state.undo = []; state.redo = []; updateUndoButtons(); }
    updateProgress(res.labelled, res.total);
    batch.labelled = res.labelled;
    batch.complete = res.complete;
    refreshList();
    const outcome = { stored: "stored", replaced: "replaced the earlier mask", unchanged: "unchanged (same mask)",
                      second: "stored as a second reading" }[res.outcome] || res.outcome;
    const done = res.complete && batch.latest ? ` ${completeText()}` : "";
    say(`${it.id}: ${outcome} (${res.labelled} of ${res.total} labelled).${done}`, "ok");
    if (res.job || (res.complete && batch.latest)) {
      showJob(res.job || state.job);
      if (res.job && res.job.state === "running") pollJob();
    }
    if (state.batch !== batch) return;
    if (!res.complete) await goNextUnlabelled(k); else await select(k, { keepDraft: false });
  } catch (e) {
    say(`${it.id}: refused: ${e.message}`, "error");
  } finally {
    state.busy = false;
    setActionsDisabled(false);
  }
}

function setActionsDisabled(disabled) {
  disabled = disabled || state.context !== null;  // the actions are the slice's: not while a neighbour shows
  for (const id of ["submit", "skip", "empty", "upload-file", "clear"]) $(id).disabled = disabled || !state.item;
  $("accept").disabled = disabled || !(state.item && state.item.urls.predicted);
  $("undo-submit").disabled = disabled || !(state.item && state.item.labelled);
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
  if (!state.mask || state.drawing) return;
  // the mask itself, no 24 MB copy: while a submit is busy no edit changes it (editable()), and
  // while it is encoded no one releases it (releaseMask)
  const { mask, w, h } = state;
  return upload("your mask", async () => {
    state.encoding = mask;
    try { return await maskBlob(mask, w, h); } finally { state.encoding = null; }
  });
}

function acceptPrediction() {
  const it = state.item;
  if (!it || !it.urls.predicted) return;
  return upload("the prediction", async () => {  // the predicted PNG itself, byte for byte
    const res = await fetch(it.urls.predicted, { cache: "no-store", headers: withToken() });
    if (!res.ok) throw new Error("could not fetch the predicted mask");
    return res.blob();
  });
}

function nothingHere() {
  const { w, h } = state;
  if (!state.item || !state.mask) return;  // (w, h are the last image's while one loads)
  return upload("an empty mask", () => maskBlob(new Uint8Array(w * h), w, h), true);
}

function uploadFile(file) {
  return upload(`the file ${file.name}`, async () => file);
}

// Withdraw the latest submit of this image: its previous version (or none) becomes current.
async function undoSubmit() {
  const it = state.item, batch = state.batch;
  if (state.busy || !it || !it.labelled) return;
  state.busy = true;
  setActionsDisabled(true);
  try {
    await api("POST", `/api/undo/${enc(it.id)}?round=${batch.round}`);
    const fresh = await api("GET", `/api/batch?round=${batch.round}`);
    const now = fresh.items.find((x) => x.id === it.id);
    it.labelled = now ? now.labelled : false;
    it.labelled_by = now ? now.labelled_by : null;
    batch.rounds = fresh.rounds;
    batch.labelled = fresh.labelled;
    batch.complete = fresh.complete;
    updateProgress(fresh.labelled, fresh.total);
    renderRounds();
    say(it.labelled ? `${it.id}: the previous version of its mask is current again.`
                    : `${it.id}: submit withdrawn; the image is not labelled now.`, "ok");
  } catch (e) {
    say(`${it.id}: could not undo the submit: ${e.message}`, "error");
    return;
  } finally {
    state.busy = false;
    setActionsDisabled(false);
  }
  if (state.batch === batch && state.item === it) await select(state.index, { keepDraft: false });
}

async function skip() {
  if (state.busy || !state.item) return;
  const it = state.item, k = state.index;
  state.busy = true;
  try {
    const q = effortQuery(it.id, false);
    await api("POST", `/api/skip/${enc(it.id)}?${q}&${roundQuery()}`);
    sent(it.id, false);
    say(`${it.id}: skipped (${q.split("&")[0].split("=")[1]} s recorded); it stays in the batch.`, "ok");
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
  noteInput();
  const t = ev.target;
  const tag = t && t.tagName;
  if (tag === "TEXTAREA" || tag === "SELECT" || (tag === "INPUT" && t.type !== "range" && t.type !== "checkbox")) return;
  if (tag === "INPUT" && t.type === "range" && ev.key.startsWith("Arrow")) return;
  const key = ev.key;
  if (key === " ") {  // held: dragging pans
    ev.preventDefault();
    state.space = true;
    $("viewport").classList.add("grab");
    $("cursor").hidden = true;
    return;
  }
  const ctrl = ev.ctrlKey || ev.metaKey;
  if (state.volume && !ctrl && !ev.altKey && (key === "PageUp" || key === "PageDown")) {
    ev.preventDefault();
    const d = key === "PageDown" ? 1 : -1;
    if (ev.shiftKey) jumpBatchSlice(d); else stepSlice(d);
    return;
  }
  if (state.context !== null) {  // a neighbour is shown: Home/Esc, or a key that edits or submits, bring the slice back
    if (key === "Home" || key === "Escape" || ctrl || ["z", "y", "Z", "c", "Enter", "a", "x", "s"].includes(key)) {
      if (key === "Enter" && (tag === "BUTTON" || tag === "A")) return;
      ev.preventDefault();
      backToSlice();
      if (key !== "Home" && key !== "Escape") say("Back on the slice being labelled: the keys act on it (press again).", "");
      return;
    }
  }
  if (ctrl) {
    if (key.toLowerCase() === "z" && ev.shiftKey) { redo(); ev.preventDefault(); }
    else if (key.toLowerCase() === "z") { undo(); ev.preventDefault(); }
    else if (key.toLowerCase() === "y") { redo(); ev.preventDefault(); }
    return;
  }
  if (ev.altKey) return;
  if (key === "Escape" && state.poly) { cancelPolygon(); ev.preventDefault(); return; }
  if (key === "Enter") {
    if (tag === "BUTTON" || tag === "A") return;  // a focused button gets its own Enter
    ev.preventDefault();
    if (state.poly) { closePolygon(); return; }  // Enter closes an open polygon before it submits
    submitCurrent();
    return;
  }
  const actions = {
    b: () => setTool("brush"), e: () => setTool("eraser"), f: () => setTool("fill"), l: () => setTool("polygon"),
    z: undo, y: redo, Z: redo, c: clearMask,
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

function onKeyUp(ev) {
  if (ev.key === " ") {
    state.space = false;
    $("viewport").classList.remove("grab");
  }
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
  $("channel").addEventListener("change", (ev) => {
    state.display.channel = ev.target.value; applyDisplay(); ev.target.blur();
  });
  $("win-lo").addEventListener("input", (ev) => setWindow(Number(ev.target.value), Math.max(state.display.hi, Number(ev.target.value) + 1)));
  $("win-hi").addEventListener("input", (ev) => setWindow(Math.min(state.display.lo, Number(ev.target.value) - 1), Number(ev.target.value)));
  for (const id of ["win-lo", "win-hi"]) $(id).addEventListener("change", (ev) => ev.target.blur());
  $("win-auto").addEventListener("click", autoWindow);
  $("win-reset").addEventListener("click", () => { state.display = { channel: "all", lo: 0, hi: 255 }; applyDisplay(); });
  $("round-select").addEventListener("change", (ev) => { ev.target.blur(); loadBatch(Number(ev.target.value)); });
  $("next-batch").addEventListener("click", startNext);
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", clearMask);
  $("zoom-in").addEventListener("click", () => setZoom(state.zoom * 1.25));
  $("zoom-out").addEventListener("click", () => setZoom(state.zoom / 1.25));
  $("zoom-fit").addEventListener("click", fit);
  $("slice-prev").addEventListener("click", () => stepSlice(-1));
  $("slice-next").addEventListener("click", () => stepSlice(1));
  $("slice-range").addEventListener("input", (ev) => showSlice(Number(ev.target.value)));
  $("slice-range").addEventListener("change", (ev) => ev.target.blur());
  $("slice-back").addEventListener("click", backToSlice);
  $("slice-label").addEventListener("click", () => {
    const vol = state.volume;
    const k = vol && state.context !== null ? batchIndexOf(vol.slices[state.context].id) : -1;
    if (k >= 0) select(k);
  });
  const vp = $("viewport");
  vp.addEventListener("wheel", onWheel, { passive: false });
  vp.addEventListener("pointerdown", onPanDown);
  vp.addEventListener("pointermove", onPanMove);
  vp.addEventListener("pointerup", onPanUp);
  vp.addEventListener("pointercancel", onPanUp);
  vp.addEventListener("auxclick", (ev) => ev.preventDefault());
  $("accept").addEventListener("click", acceptPrediction);
  $("submit").addEventListener("click", submitCurrent);
  $("skip").addEventListener("click", skip);
  $("empty").addEventListener("click", nothingHere);
  $("undo-submit").addEventListener("click", undoSubmit);
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
  canvas.addEventListener("dblclick", (ev) => { ev.preventDefault(); if (state.poly) closePolygon(); });
  document.addEventListener("keydown", onKey);
  document.addEventListener("keyup", onKeyUp);
  for (const kind of ["pointermove", "pointerdown", "wheel"]) document.addEventListener(kind, noteInput, { passive: true });
  new ResizeObserver(() => { if (state.fitted) fit(); }).observe(vp);
  document.addEventListener("visibilitychange", () => {
    state.lastTick = performance.now();
    if (document.visibilityState === "hidden") flushTime();
  });
  window.addEventListener("pagehide", flushTime);
  window.addEventListener("beforeunload", (ev) => {  // unsubmitted edits live only in this page
    if (!hasUnsavedEdits()) return;
    ev.preventDefault();
    ev.returnValue = "";
  });
  setInterval(tick, 250);
  setTool("brush");
  setOpacity(Number($("opacity").value) / 100);
  applyDisplay();
  loadBatch();
}

document.addEventListener("DOMContentLoaded", init);
