// sam-jax serve: the page. Plain JavaScript, no build step (see the README's "sam-jax serve").
//
// The server holds the model and the image embeddings; this page keeps the prompt (points, box,
// the last prediction for feedback), draws masks decoded from COCO RLE, and times each click.
// State the tests read: body[data-state] ("empty", "embedding", "ready", "predicting",
// "everything", "error"), body[data-mode] ("prompt", "everything"), #mask[data-prediction-id],
// body[data-latency-ms], and window.samJax (the state and the exports). With --annotate
// (body[data-annotate]), see "annotating" below.
"use strict";

const $ = (id) => document.getElementById(id);
const imageCanvas = $("image"), maskCanvas = $("mask"), promptCanvas = $("prompts"), stage = $("stage");
const acceptedCanvas = $("accepted"), outlineCanvas = $("outlines");
const MASK_RGB = [30, 144, 255], WHITE = [255, 255, 255], PROPOSAL_RGB = [255, 140, 0], OUTLINE_RGB = [255, 214, 0];
const HOVER_DELAY_MS = 60;   // debounce: a preview once the cursor rests this long
const DRAG_PIXELS = 5;       // a press that moves further than this (screen px) draws a box

const state = {
  image: null,        // {image_id, width, height, name, encode_seconds, cached}
  points: [],         // [{x, y, label}] in image pixels; label 1 foreground, 0 background
  box: null,          // [x0, y0, x1, y1]
  prediction: null,   // {prediction_id, masks: [{segmentation, predicted_iou, area, bbox}], selected}
  history: [],        // earlier {points, box, prediction}, for undo
  everything: null,   // {records, seconds, selected}
  mode: "prompt",
  annotate: null,     // with --annotate: see "annotating"
  seq: 0,             // bumped by every committed change: older responses are dropped
  lastLatencyMs: null,
  hover: null,        // the last hover preview's prompt
};

// ------------------------------------------------------------------------------------- utilities

function setState(name) { document.body.dataset.state = name; }

function message(text, isError = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("error", isError);
  if (isError) setState("error");
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  return readResponse(response);
}

async function readResponse(response) {
  let data;
  try { data = await response.json(); } catch (e) { data = {detail: response.statusText}; }
  if (!response.ok) throw new Error(`${response.status}: ${data.detail || response.statusText}`);
  return data;
}

// A record's mask, decoded once (Everything redraws and hit-tests every mask on each click).
const decodedMasks = new WeakMap();
function maskOf(record) {
  let mask = decodedMasks.get(record.segmentation);
  if (!mask) decodedMasks.set(record.segmentation, mask = decodeRle(record.segmentation));
  return mask;
}

// COCO compressed RLE (pycocotools' rleFrString) -> (H * W) row-major 0/1 mask.
function decodeRle(rle) {
  const [h, w] = rle.size, s = rle.counts, counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  const mask = new Uint8Array(h * w);
  let index = 0;
  counts.forEach((n, i) => {
    if (i % 2 === 1) {  // runs alternate 0, 1, 0, ... down the columns
      for (let j = index; j < index + n; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    }
    index += n;
  });
  return mask;
}

function distinctColour(i) {  // golden-angle hues
  const hue = (i * 137.508) % 360, s = 0.75, l = 0.5;
  const f = (n) => {
    const k = (n + hue / 30) % 12, a = s * Math.min(l, 1 - l);
    return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

// ------------------------------------------------------------------------------------- opening images

function showProgress(text, fraction) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  const fill = $("progress-fill");
  fill.classList.toggle("indeterminate", fraction === null);
  if (fraction !== null) fill.style.width = `${Math.round(100 * Math.min(fraction, 1))}%`;
}

function hideProgress() { $("progress").hidden = true; }

// POSTs the form to /embed with upload progress, then shows an estimate from the last encoder time.
// Returns whether the image is shown.
async function embed(form, label) {
  setState("embedding");
  message("");
  const info = await fetch("/api/info").then(readResponse).catch(() => ({}));
  const expected = info.last_encode_seconds;
  const started = performance.now();
  let uploaded = false;
  const timer = setInterval(() => {
    if (!uploaded) return;
    const elapsed = (performance.now() - started) / 1000;
    const estimate = expected ? ` (the last image took ${expected.toFixed(1)} s)` : "";
    showProgress(`Computing the image embedding… ${elapsed.toFixed(1)} s${estimate}`,
                 expected ? elapsed / expected : null);
  }, 100);
  showProgress(`Uploading ${label}…`, 0);
  try {
    const data = await new Promise((resolve, reject) => {
      const request = new XMLHttpRequest();
      request.open("POST", "/embed");
      request.responseType = "json";
      request.upload.onprogress = (e) => {
        if (e.lengthComputable) showProgress(`Uploading ${label}…`, e.loaded / e.total);
      };
      request.upload.onload = () => { uploaded = true; };
      request.onload = () => {
        const body = request.response || {};
        if (request.status === 200) resolve(body);
        else reject(new Error(`${request.status}: ${body.detail || request.statusText}`));
      };
      request.onerror = () => reject(new Error("the server cannot be reached"));
      request.send(form);
    });
    await showImage(data);
    const how = data.cached ? "cached" : `${data.encode_seconds.toFixed(2)} s`;
    $("stat-embedding").textContent = how;
    $("stat-image").textContent = `${data.width}×${data.height} ${data.mode}`;
    message(`${data.name}: embedded (${how}). Click on the image.`);
    setState("ready");
    return true;
  } catch (err) {
    message(err.message, true);
    return false;
  } finally {
    clearInterval(timer);
    hideProgress();
  }
}

async function showImage(data) {
  const bitmap = new Image();
  bitmap.src = `/image/${data.image_id}`;
  await bitmap.decode();
  for (const canvas of [imageCanvas, acceptedCanvas, outlineCanvas, maskCanvas, promptCanvas]) {
    canvas.width = data.width;
    canvas.height = data.height;
  }
  imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
  state.image = data;
  $("drop-hint").hidden = true;
  $("layers").hidden = false;
  fitCanvas();
  state.everything = null;
  resetPrompt();
  $("everything").disabled = false;
}

// The image as large as the stage allows, small images scaled up too (the canvases keep the
// image's own resolution; the prompt and mask layers follow the image's displayed size).
function fitCanvas() {
  if (!state.image) return;
  const {width, height} = state.image;
  const scale = Math.min((stage.clientWidth - 16) / width, (window.innerHeight - 110) / height);
  imageCanvas.style.width = `${Math.floor(width * scale)}px`;
  imageCanvas.style.height = `${Math.floor(height * scale)}px`;
  for (const canvas of [imageCanvas, acceptedCanvas, outlineCanvas, maskCanvas]) {
    canvas.style.imageRendering = scale >= 2 ? "pixelated" : "auto";
  }
  drawPrompts();
}
window.addEventListener("resize", fitCanvas);

function openFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  embed(form, file.name);
}

$("file").addEventListener("change", (e) => openFile(e.target.files[0]));
$("folder").addEventListener("change", (e) => {
  if (!e.target.value) return;
  const form = new FormData();
  form.append("name", e.target.value);
  embed(form, e.target.value);
});
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragover"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragover");
  openFile(e.dataTransfer.files[0]);
});

fetch("/api/images").then(readResponse).then(({images}) => {
  const select = $("folder");
  for (const name of images) select.add(new Option(name, name));
  select.hidden = images.length === 0;
}).catch(() => {});

// ------------------------------------------------------------------------------------- prompts

function resetPrompt() {
  if (state.annotate) state.annotate.fixing = null;
  state.points = [];
  state.box = null;
  state.prediction = null;
  state.history = [];
  state.mode = "prompt";
  state.seq++;
  document.body.dataset.mode = "prompt";
  drawPrompts();
  drawMasks();
  updateControls();
}

function promptBody(points, box) {
  const body = {image_id: state.image.image_id, multimask_output: $("multimask").checked};
  if (points.length) {
    body.point_coords = points.map((p) => [p.x, p.y]);
    body.point_labels = points.map((p) => p.label);
  }
  if (box) body.box = box;
  return body;
}

// A committed change of the prompt: remembered for undo, then predicted with feedback.
function commit(change, startedAt) {
  state.history.push({points: state.points.slice(), box: state.box, prediction: state.prediction});
  change();
  state.mode = "prompt";
  document.body.dataset.mode = "prompt";
  drawPrompts();
  predict(startedAt);
}

async function predict(startedAt) {
  const seq = ++state.seq;
  if (!state.points.length && !state.box) {
    state.prediction = null;
    drawMasks();
    updateControls();
    return;
  }
  const body = promptBody(state.points, state.box);
  const previous = state.prediction;
  if ($("feedback").checked && previous && previous.prediction_id) {
    body.mask_input = {prediction_id: previous.prediction_id, index: previous.selected};
  }
  setState("predicting");
  try {
    const result = await postJson("/predict", body);
    if (seq !== state.seq) return;  // a newer change is on its way
    result.selected = fixesProposal(body) && body.point_coords.length === 1 && !body.box
      ? closestIndex(result.masks, proposalByKey(state.annotate.fixing)) : bestIndex(result.masks);
    result.prompt = body;
    state.prediction = result;
    drawMasks();
    state.lastLatencyMs = performance.now() - startedAt;
    document.body.dataset.latencyMs = state.lastLatencyMs.toFixed(1);
    $("stat-latency").textContent = `${state.lastLatencyMs.toFixed(0)} ms`;
    $("stat-decoder").textContent = `${result.decode_ms.toFixed(0)} ms`;
    message("");
    setState("ready");
  } catch (err) {
    if (seq === state.seq) message(err.message, true);
  }
  updateControls();
}

function bestIndex(masks) {
  let best = 0;
  masks.forEach((m, i) => { if (m.predicted_iou > masks[best].predicted_iou) best = i; });
  return best;
}

// Hover: the mask the prompt would give with one more foreground point here; latest wins.
let hoverTimer = null, hoverInFlight = false, hoverPending = null;
function scheduleHover(point) {
  clearTimeout(hoverTimer);
  hoverTimer = setTimeout(() => { hoverPending = point; runHover(); }, HOVER_DELAY_MS);
}

async function runHover() {
  if (hoverInFlight || !hoverPending || !state.image || state.mode !== "prompt") return;
  const point = hoverPending, seq = state.seq;
  hoverPending = null;
  hoverInFlight = true;
  try {
    const body = promptBody([...state.points, {...point, label: 1}], state.box);
    body.store_logits = false;
    const result = await postJson("/predict", body);
    if (seq === state.seq && hovering && state.mode === "prompt") {
      drawMaskRecords([result.masks[bestIndex(result.masks)]], true);
      state.hover = body;
    }
  } catch (err) { /* a preview that fails is not worth a message */ }
  hoverInFlight = false;
  if (hoverPending) runHover();
}

function cancelHover() {
  clearTimeout(hoverTimer);
  hoverPending = null;
}

// ------------------------------------------------------------------------------------- pointer

function imagePoint(e) {
  const rect = promptCanvas.getBoundingClientRect();
  const x = (e.clientX - rect.left) * (promptCanvas.width / rect.width);
  const y = (e.clientY - rect.top) * (promptCanvas.height / rect.height);
  return {x: Math.min(Math.max(x, 0), promptCanvas.width), y: Math.min(Math.max(y, 0), promptCanvas.height)};
}

let press = null, hovering = false;
promptCanvas.addEventListener("contextmenu", (e) => e.preventDefault());
promptCanvas.addEventListener("mousedown", (e) => {
  if (!state.image) return;
  press = {start: imagePoint(e), screenX: e.clientX, screenY: e.clientY, dragging: false,
           background: e.button === 2 || e.shiftKey, alt: e.altKey};
});
promptCanvas.addEventListener("mousemove", (e) => {
  if (!state.image) return;
  hovering = true;
  if (press) {
    const moved = Math.hypot(e.clientX - press.screenX, e.clientY - press.screenY);
    if (moved > DRAG_PIXELS && state.mode === "prompt") press.dragging = true;
    if (press.dragging) {
      cancelHover();
      drawPrompts(boxFrom(press.start, imagePoint(e)));
    }
    return;
  }
  if (state.mode === "prompt") scheduleHover(imagePoint(e));
});
promptCanvas.addEventListener("mouseleave", () => {
  hovering = false;
  cancelHover();
  if (state.mode === "prompt") drawMasks();
});
window.addEventListener("mouseup", (e) => {
  if (!press) return;
  const p = press, startedAt = performance.now();
  press = null;
  cancelHover();
  if (p.dragging) {
    const box = boxFrom(p.start, imagePoint(e));
    deselectProposal();
    commit(() => { state.box = box; }, startedAt);
  } else if (e.target === promptCanvas) {
    const point = imagePoint(e);
    if (state.mode === "everything") selectEverything(point);
    else if (state.annotate && p.alt) selectProposalAt(point);
    else {
      deselectProposal();
      commit(() => { state.points.push({x: point.x, y: point.y, label: p.background ? 0 : 1}); }, startedAt);
    }
  }
});

function boxFrom(a, b) {
  return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
}

window.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
  if (e.key === "Escape") clearAll();
  if (state.annotate && !e.ctrlKey && !e.metaKey && !e.altKey && !["INPUT", "SELECT"].includes(e.target.tagName)) {
    const action = ANNOTATE_KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
    if (action) { e.preventDefault(); action(); }
  }
});

function undo() {
  const last = state.history.pop();
  if (!last) return;
  state.points = last.points;
  state.box = last.box;
  state.prediction = last.prediction;
  state.seq++;
  drawPrompts();
  drawMasks();
  updateControls();
  setState("ready");
}

function clearAll() {
  if (!state.image) return;
  resetPrompt();
  setState("ready");
}

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearAll);

// ------------------------------------------------------------------------------------- drawing

function drawPrompts(rubberBand = null) {
  const ctx = promptCanvas.getContext("2d");
  ctx.clearRect(0, 0, promptCanvas.width, promptCanvas.height);
  // markers of a fixed size on screen: `scale` image pixels per CSS pixel
  const scale = promptCanvas.width / (promptCanvas.getBoundingClientRect().width || promptCanvas.width);
  for (const box of [state.box, rubberBand]) {
    if (!box) continue;
    ctx.lineWidth = 2 * scale;
    ctx.strokeStyle = box === rubberBand ? "rgba(255, 255, 255, .9)" : "rgb(30, 144, 255)";
    ctx.setLineDash(box === rubberBand ? [6 * scale, 4 * scale] : []);
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
  ctx.setLineDash([]);
  for (const p of state.points) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, 6 * scale, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === 1 ? "rgb(40, 200, 80)" : "rgb(230, 50, 50)";
    ctx.fill();
    ctx.lineWidth = 1.5 * scale;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

// Draws records' masks on a canvas, alpha 255 inside and 0 outside: the page's opacity tints
// them; tests read the canvas's alpha. The inside in its colour (`colours[i]`, else one colour)
// and the mask's own edge pixels (a 4-neighbour outside it) in white, or with `edgesOnly` just
// the edges, in the colour.
function paintMasks(canvas, records, colours = null, edgesOnly = false) {
  const {width, height} = canvas;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(width, height);
  records.forEach((record, i) => {
    const mask = maskOf(record), rgb = colours ? colours[i] : MASK_RGB;
    for (let j = 0; j < mask.length; j++) {
      if (!mask[j]) continue;
      const x = j % width, edge = x === 0 || x === width - 1 || j < width || j >= mask.length - width ||
        !mask[j - 1] || !mask[j + 1] || !mask[j - width] || !mask[j + width];
      if (edgesOnly && !edge) continue;
      const colour = edge && !edgesOnly ? WHITE : rgb;
      pixels.data[4 * j] = colour[0];
      pixels.data[4 * j + 1] = colour[1];
      pixels.data[4 * j + 2] = colour[2];
      pixels.data[4 * j + 3] = 255;
    }
  });
  ctx.putImageData(pixels, 0, 0);
}

// The mask layer: one colour in prompt mode, distinct ones in Everything.
function drawMaskRecords(records, preview = false, colours = null) {
  paintMasks(maskCanvas, records, colours);
  maskCanvas.classList.toggle("preview", preview);
}

function drawMasks() {
  if (state.mode === "everything" && state.everything) {
    const records = state.everything.records, selected = state.everything.selected;
    const order = records.map((r, i) => i).sort((a, b) => records[b].area - records[a].area);
    if (selected !== null) order.push(selected);  // drawn last: on top, in white
    const colours = order.map((i, k) => (k === order.length - 1 && selected !== null) ? WHITE
                                                                                        : distinctColour(i));
    drawMaskRecords(order.map((i) => records[i]), false, colours);
    maskCanvas.dataset.predictionId = "";
    maskCanvas.dataset.count = String(records.length);
  } else {
    const prediction = state.prediction, proposal = prediction ? null : selectedProposal();
    if (proposal) drawMaskRecords([proposal], false, [PROPOSAL_RGB]);
    else drawMaskRecords(prediction ? [prediction.masks[prediction.selected]] : []);
    maskCanvas.dataset.predictionId = prediction ? prediction.prediction_id : "";
    maskCanvas.dataset.selected = prediction ? String(prediction.selected) : "";
    maskCanvas.dataset.proposal = proposal ? proposal.key : "";
  }
  showCandidates();
  showStats();
}

function showCandidates() {
  const list = $("candidates");
  list.replaceChildren();
  const prediction = state.mode === "prompt" ? state.prediction : null;
  if (!prediction) return;
  prediction.masks.forEach((m, i) => {
    const item = document.createElement("li");
    item.dataset.index = String(i);
    item.classList.toggle("selected", i === prediction.selected);
    item.innerHTML = `<span>mask ${i + 1}</span><span>IoU ${m.predicted_iou.toFixed(3)} · ${m.area} px</span>`;
    item.addEventListener("click", () => {
      prediction.selected = i;
      drawMasks();
    });
    list.append(item);
  });
}

function selectedRecord() {
  if (state.mode === "everything" && state.everything && state.everything.selected !== null) {
    return state.everything.records[state.everything.selected];
  }
  if (state.mode === "prompt" && state.prediction) return state.prediction.masks[state.prediction.selected];
  return selectedProposal();
}

function showStats() {
  const record = selectedRecord();
  const total = state.image ? state.image.width * state.image.height : 1;
  $("stat-iou").textContent = record ? record.predicted_iou.toFixed(3) : "–";
  $("stat-area").textContent = record ? `${record.area} px (${(100 * record.area / total).toFixed(1)}%)` : "–";
  updateControls();
}

function updateControls() {
  $("undo").disabled = state.history.length === 0;
  $("clear").disabled = !state.image;
  $("save-mask").disabled = $("save-cutout").disabled = !selectedRecord();
  $("save-json").disabled = !(state.everything && state.everything.records.length);
  $("accept").disabled = !(state.annotate && state.annotate.image && selectedRecord() && !state.annotate.busy);
}

// ------------------------------------------------------------------------------------- everything

$("everything").addEventListener("click", runEverything);

async function runEverything() {
  if (!state.image) return;
  const number = (id) => Number($(id).value);
  const body = {image_id: state.image.image_id, points_per_side: number("points-per-side"),
                pred_iou_thresh: number("pred-iou-thresh"),
                stability_score_thresh: number("stability-score-thresh"),
                box_nms_thresh: number("box-nms-thresh")};
  state.seq++;
  setState("predicting");
  const started = performance.now();
  const timer = setInterval(() => showProgress(
    `Everything: ${body.points_per_side ** 2} point prompts… ${((performance.now() - started) / 1000).toFixed(1)} s`,
    null), 100);
  try {
    const result = await postJson("/everything", body);
    state.everything = {records: result.records, seconds: result.seconds, selected: null};
    state.mode = "everything";
    document.body.dataset.mode = "everything";
    drawPrompts();
    drawMasks();
    $("everything-count").textContent = `${result.records.length} masks in ${result.seconds.toFixed(1)} s`;
    message("Everything: click a mask to select it; Clear returns to prompting.");
    setState("everything");
  } catch (err) {
    message(err.message, true);
  } finally {
    clearInterval(timer);
    hideProgress();
  }
}

// The index of the smallest of `records` under the point (null: none).
function smallestUnder(records, point) {
  const index = Math.floor(point.y) * state.image.width + Math.floor(point.x);
  let best = null;
  records.forEach((r, i) => {
    if (maskOf(r)[index] && (best === null || r.area < records[best].area)) best = i;
  });
  return best;
}

function selectEverything(point) {
  const best = smallestUnder(state.everything.records, point);
  state.everything.selected = best;
  maskCanvas.dataset.everythingSelected = best === null ? "" : String(best);
  drawMasks();
}

// ------------------------------------------------------------------------------------- exports

function maskCanvasOf(record, cutout) {
  const {width, height} = imageCanvas;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const mask = maskOf(record);
  const ctx = canvas.getContext("2d");
  let pixels;
  if (cutout) {
    pixels = imageCanvas.getContext("2d").getImageData(0, 0, width, height);
    for (let j = 0; j < mask.length; j++) pixels.data[4 * j + 3] = mask[j] ? 255 : 0;
  } else {
    pixels = ctx.createImageData(width, height);
    for (let j = 0; j < mask.length; j++) {
      const v = mask[j] ? 255 : 0;
      pixels.data[4 * j] = pixels.data[4 * j + 1] = pixels.data[4 * j + 2] = v;
      pixels.data[4 * j + 3] = 255;
    }
  }
  ctx.putImageData(pixels, 0, 0);
  return canvas;
}

function stem() { return (state.image ? state.image.name : "image").replace(/\.[^.]*$/, ""); }

function download(url, name) {
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
}

const exports = {
  maskPng: () => maskCanvasOf(selectedRecord(), false).toDataURL("image/png"),
  cutoutPng: () => maskCanvasOf(selectedRecord(), true).toDataURL("image/png"),
  masksJson: () => JSON.stringify(state.everything.records),
};
$("save-mask").addEventListener("click", () => download(exports.maskPng(), `${stem()}_mask.png`));
$("save-cutout").addEventListener("click", () => download(exports.cutoutPng(), `${stem()}_cutout.png`));
$("save-json").addEventListener("click", () => {
  const url = URL.createObjectURL(new Blob([exports.masksJson()], {type: "application/json"}));
  download(url, `${stem()}_masks.json`);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
});

// ------------------------------------------------------------------------------------- annotating

// `sam-jax serve --annotate`: the page steps through the --images folder. A mask made with
// prompts, or a proposal of the automatic mask generator (as it is, or fixed: its point becomes
// the first click), is accepted into the server's SA-1B files; proposals can be rejected.
// #accepted draws the saved masks, #outlines the open proposals' edges, #mask what Enter saves
// (a selected proposal in orange, its key in #mask[data-proposal]). state.annotate holds:
//   summary    GET /annotate/state (the images, done or not, and the totals)
//   index      the image shown; image: GET /annotate/image (its annotations, proposal marks)
//   proposals  the generator's records with their key; selected: {kind: "proposal", key} or
//              {kind: "accepted", id}; fixing: the key of the proposal the prompt started from
//   loading, busy: an image opening, a change on its way (keys wait); token: the image's

async function getJson(path) { return readResponse(await fetch(path)); }

async function startAnnotating() {
  document.body.dataset.annotate = "on";
  try {
    const summary = await getJson("/annotate/state");
    state.annotate = {summary, index: 0, image: null, proposals: [], selected: null, fixing: null,
                      loading: false, busy: false, token: 0};
    await openAt(summary.first_open === null ? 0 : summary.first_open);
    if (summary.first_open === null) message("Every image is done; N / P step through them.");
  } catch (err) {
    message(err.message, true);
  }
}

async function openAt(index) {
  const a = state.annotate, name = a.summary.images[index].name, token = ++a.token;
  Object.assign(a, {index, image: null, proposals: [], selected: null, loading: true});
  showAnnotation();
  const form = new FormData();
  form.append("name", name);
  try {
    if (!await embed(form, name)) return;
    setImageState(await getJson(`/annotate/image?image=${encodeURIComponent(name)}`));
  } catch (err) {
    message(err.message, true);
    return;
  } finally {
    a.loading = false;
    showAnnotation();
  }
  if ($("show-proposals").checked) loadProposals(token);
}

async function loadProposals(token) {
  const a = state.annotate;
  $("proposal-count").textContent = "(generating…)";
  try {
    const result = await getJson(`/annotate/proposals?image=${encodeURIComponent(currentName())}`);
    if (token !== a.token) return;
    a.proposals = result.proposals;
    showAnnotation();
  } catch (err) {
    if (token === a.token) message(err.message, true);
  }
}

// The server's answer to a change: the image's state and the totals.
function setImageState(image) {
  const a = state.annotate, entry = a.summary.images[image.index];
  entry.done = image.done;
  entry.masks = image.annotations.length;
  a.summary.progress = image.progress;
  a.image = image;
  showAnnotation();
}

function currentName() { return state.annotate.summary.images[state.annotate.index].name; }
function proposalByKey(key) { return state.annotate.proposals.find((p) => p.key === key) || null; }
function markOf(key) { return (state.annotate.image && state.annotate.image.proposal_marks[key]) || "open"; }
function openProposals() { return state.annotate.proposals.filter((p) => markOf(p.key) === "open"); }
function isSelected(kind, value) {
  const selected = state.annotate.selected;
  return Boolean(selected && selected.kind === kind && (kind === "proposal" ? selected.key : selected.id) === value);
}

function selectedProposal() {
  const a = state.annotate;
  return a && a.selected && a.selected.kind === "proposal" ? proposalByKey(a.selected.key) : null;
}

function showAnnotation() {
  const a = state.annotate, {images, progress} = a.summary, entry = images[a.index];
  const annotations = a.image ? a.image.annotations : [], open = openProposals();
  document.body.dataset.annotateImage = a.image ? entry.name : "";
  $("image-counter").textContent = `image ${a.index + 1} of ${images.length} · ${entry.name}${entry.done ? " · ✓ done" : ""}`;
  $("annotate-totals").textContent =
    `${progress.masks_saved} masks saved · ${progress.images_done} of ${progress.images} images done`;
  $("previous").disabled = a.index === 0;
  $("next").disabled = a.index === images.length - 1;
  $("done").disabled = !a.image;
  $("done").textContent = entry.done ? "Reopen" : "Done → next";
  paintMasks(acceptedCanvas, annotations,
             annotations.map((r) => isSelected("accepted", r.id) ? WHITE : distinctColour(r.id)));
  paintMasks(outlineCanvas, open, open.map(() => OUTLINE_RGB), true);
  acceptedCanvas.dataset.count = String(annotations.length);
  outlineCanvas.dataset.count = String(open.length);
  $("accepted-count").textContent = `(${annotations.length})`;
  $("accepted-list").replaceChildren(...annotations.map((r) => listItem(
    {id: String(r.id)}, distinctColour(r.id), `#${r.id} ${r.source || ""} · ${r.area} px`,
    isSelected("accepted", r.id), () => select({kind: "accepted", id: r.id}),
    [["×", "Delete (Delete key)", () => deleteAnnotation(r.id)]])));
  $("proposal-count").textContent = a.proposals.length ? `(${open.length} open of ${a.proposals.length})` : "";
  $("proposal-list").replaceChildren(...a.proposals.map((p, i) => {
    const mark = markOf(p.key);
    const buttons = mark === "open" ? [["✓", "Accept (Enter)", () => acceptProposal(p.key)],
                                       ["✎", "Fix: its point becomes the first click (F)", () => fixProposal(p.key)],
                                       ["✗", "Reject (R)", () => rejectProposal(p.key)]]
      : mark === "rejected" ? [["↺", "Take the rejection back (R)", () => rejectProposal(p.key)]] : [];
    const item = listItem({key: p.key}, OUTLINE_RGB,
                          `${i + 1}. IoU ${p.predicted_iou.toFixed(2)} · ${p.area} px${mark === "open" ? "" : ` · ${mark}`}`,
                          isSelected("proposal", p.key), () => select({kind: "proposal", key: p.key}), buttons);
    item.classList.add(mark);
    return item;
  }));
  drawMasks();
}

function listItem(data, rgb, text, selected, onSelect, buttons) {
  const item = document.createElement("li"), swatch = document.createElement("span");
  const what = document.createElement("span");
  Object.assign(item.dataset, data);
  swatch.className = "swatch";
  swatch.style.background = `rgb(${rgb.join(",")})`;
  what.className = "what";
  what.textContent = text;
  item.append(swatch, what);
  for (const [label, title, action] of buttons) {
    const button = document.createElement("button");
    button.textContent = label;
    button.title = title;
    button.addEventListener("click", (e) => { e.stopPropagation(); action(); });
    item.append(button);
  }
  item.classList.toggle("selected", selected);
  item.addEventListener("click", onSelect);
  return item;
}

// A selected proposal replaces the prompt: it is what Enter saves.
function select(selection) {
  if (selection.kind === "proposal") resetPrompt();
  state.annotate.selected = selection;
  showAnnotation();
}

// A click or a box starts a prompt of its own: no proposal is selected then.
function deselectProposal() {
  if (!selectedProposal()) return;
  state.annotate.selected = null;
  showAnnotation();
}

function selectProposalAt(point) {
  const open = openProposals(), i = smallestUnder(open, point);
  if (i === null) message("No open proposal there.");
  else select({kind: "proposal", key: open[i].key});
}

// The next (delta 1) or previous (-1) open proposal after the selected one, round the list.
function stepProposal(delta) {
  const a = state.annotate, list = a.proposals, n = list.length;
  const selected = selectedProposal(), from = selected ? list.indexOf(selected) : (delta > 0 ? -1 : n);
  for (let k = 1; k <= n; k++) {
    const i = (((from + delta * k) % n) + n) % n;
    if (markOf(list[i].key) === "open") return select({kind: "proposal", key: list[i].key});
  }
  a.selected = null;
  showAnnotation();
  if (n) message("No open proposals left on this image.");
}

// Whether a prompt starts from the point of the proposal being fixed.
function fixesProposal(body) {
  const a = state.annotate, proposal = a && a.fixing ? proposalByKey(a.fixing) : null;
  if (!proposal || !body.point_coords || body.point_labels[0] !== 1) return false;
  const [x, y] = proposal.point_coords[0], [px, py] = body.point_coords[0];
  return Math.abs(x - px) < 1e-3 && Math.abs(y - py) < 1e-3;
}

// The first prompt of a fix picks, of its candidates, the one closest (IoU) to the proposal.
function closestIndex(masks, record) {
  const target = maskOf(record);
  let best = 0, bestIou = -1;
  masks.forEach((m, i) => {
    const mask = maskOf(m);
    let inter = 0, union = 0;
    for (let j = 0; j < mask.length; j++) {
      inter += mask[j] & target[j];
      union += mask[j] | target[j];
    }
    const iou = union ? inter / union : 0;
    if (iou > bestIou) [best, bestIou] = [i, iou];
  });
  return best;
}

function fixProposal(key) {
  const proposal = proposalByKey(key);
  if (!proposal) return;
  const [x, y] = proposal.point_coords[0];
  resetPrompt();
  state.annotate.selected = null;
  state.annotate.fixing = key;
  commit(() => { state.points.push({x, y, label: 1}); }, performance.now());
  message("Fixing the proposal: its point is the first click; add clicks, then Enter.");
}

// POSTs a change; the answer is the image's new state.
async function change(path, body, then = null) {
  const a = state.annotate;
  a.busy = true;
  updateControls();
  try {
    const result = await postJson(path, body);
    setImageState(result);
    if (then) then(result);
  } catch (err) {
    message(err.message, true);
  } finally {
    a.busy = false;
    updateControls();
  }
}

function acceptShown() {
  const a = state.annotate, prediction = state.mode === "prompt" ? state.prediction : null;
  if (!a.image || a.busy) return;
  if (!prediction) {
    if (selectedProposal()) acceptProposal(a.selected.key);
    else message("Nothing to accept: click on the image, or pick a proposal ( ] ).");
    return;
  }
  const body = {image: currentName(), prediction_id: prediction.prediction_id, index: prediction.selected};
  if (fixesProposal(prediction.prompt)) body.proposal = a.fixing;
  change("/annotate/accept", body, ({annotation}) => {
    resetPrompt();
    message(`Saved mask #${annotation.id} (${annotation.source}).`);
  });
}

function acceptProposal(key) {
  change("/annotate/accept", {image: currentName(), proposal: key}, ({annotation}) => {
    message(`Saved mask #${annotation.id} (proposal).`);
    if (isSelected("proposal", key)) stepProposal(1);
  });
}

function rejectProposal(key) {
  const rejected = markOf(key) !== "rejected";
  change("/annotate/reject", {image: currentName(), proposal: key, rejected}, () => {
    if (rejected && isSelected("proposal", key)) stepProposal(1);
  });
}

function deleteAnnotation(id) {
  change("/annotate/delete", {image: currentName(), id}, () => {
    if (isSelected("accepted", id)) state.annotate.selected = null;
    message(`Deleted mask #${id}.`);
  });
}

// Done: the next image not done opens (Reopen takes the mark back).
function toggleDone() {
  const a = state.annotate, done = !a.summary.images[a.index].done;
  if (!a.image || a.busy) return;
  change("/annotate/done", {image: currentName(), done}, () => {
    if (!done) return;
    const images = a.summary.images, n = images.length;
    const next = [...Array(n).keys()].map((k) => (a.index + 1 + k) % n).find((i) => !images[i].done);
    if (next === undefined) message("Every image is done.");
    else openAt(next);
  });
}

function stepImage(delta) {
  const a = state.annotate, index = a.index + delta;
  if (!a.loading && !a.busy && index >= 0 && index < a.summary.images.length) openAt(index);
}

const withSelection = (kind, action) => () => {
  const selected = state.annotate.selected;
  if (selected && selected.kind === kind) action(kind === "proposal" ? selected.key : selected.id);
};
const ANNOTATE_KEYS = {
  Enter: acceptShown, n: () => stepImage(1), p: () => stepImage(-1), ArrowRight: () => stepImage(1),
  ArrowLeft: () => stepImage(-1), d: toggleDone, "]": () => stepProposal(1),
  "[": () => stepProposal(-1), f: withSelection("proposal", fixProposal), r: withSelection("proposal", rejectProposal),
  Delete: withSelection("accepted", deleteAnnotation), Backspace: withSelection("accepted", deleteAnnotation),
};

$("previous").addEventListener("click", () => stepImage(-1));
$("next").addEventListener("click", () => stepImage(1));
$("accept").addEventListener("click", acceptShown);
$("done").addEventListener("click", toggleDone);
$("show-proposals").addEventListener("change", (e) => {
  const a = state.annotate;
  if (!a || !a.image) return;
  if (e.target.checked) loadProposals(a.token);
  else {
    a.proposals = [];
    deselectProposal();
    showAnnotation();
  }
});

fetch("/api/info").then(readResponse).then((info) => { if (info.annotate) startAnnotating(); }).catch(() => {});

window.samJax = {state, exports, decodeRle};
