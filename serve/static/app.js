// The page: ask the server what it serves, show a card per model, and put every model side by
// side on the same input: a drawing for models reading 28x28 pixels (784 features, 28x28, or
// one 1x28x28 channel), a form otherwise. Each model is sent the input shape it declares.
//
// Markup the browser tests rely on (tests/serve/test_page.py, test_conv.py): the drawing is
// canvas#draw, whose data-pixels holds the 784 grey levels last sent; a form's data-features the
// row last sent; each model's result is [data-model=NAME], given data-label (and
// data-probabilities) once it shows a prediction for the current input.

import { ApiError, explain, inferRow, listModels, modelMetadata, saveKey, serverReady } from "./api.js";
import { ACTIVATION_COLORS, el, legend, modelCard, unavailableCard } from "./cards.js";
import { inkOf, mnistPixels, SIDE, softmax, topK } from "./preprocess.js";

const IMAGE_FEATURES = SIDE * SIDE;
// Input shapes (without the batch) the drawing fits: a row of 784 pixels, 28x28 pixels, or
// one 28x28 channel
const DRAWING_SHAPES = [[IMAGE_FEATURES], [SIDE, SIDE], [1, SIDE, SIDE]];
const DRAWING = "drawing"; // the panel key of the drawing's models
const RETRY_MS = 2000; // how often a server that is not ready is asked again
const CANVAS_SIZE = 280; // drawing resolution (10x the 28x28 field)
const STROKE_WIDTH = 20; // about 2 pixels of the 28x28 field after the 20x20 box scaling
const TOP = 3; // probabilities shown per model

const $ = (selector) => document.querySelector(selector);

function showMessage(text) {
  const box = $("#message");
  box.textContent = text;
  box.hidden = !text;
}

// ---- start: readiness, key, model list -------------------------------------------------------

async function start() {
  let ready;
  try {
    ready = await serverReady();
  } catch (e) {
    showMessage(`${explain(e, "readiness check")}; trying again.`);
    setTimeout(start, RETRY_MS);
    return;
  }
  if (!ready) {
    showMessage("The server is not ready (503): it is loading its models or shutting down; trying again.");
    setTimeout(start, RETRY_MS);
    return;
  }
  let index;
  try {
    index = await listModels();
  } catch (e) {
    if (e.status === 401) return askForKey(explain(e, "model list"));
    showMessage(explain(e, "model list"));
    if (e.status === 503 || e.status === 0) setTimeout(start, RETRY_MS);
    return;
  }
  $("#key-form").hidden = true;
  showMessage("");
  const names = [...new Set(index.filter((m) => m.state === "READY").map((m) => m.name))];
  const loaded = await Promise.all(
    names.map(async (name) => {
      try {
        return { name, meta: await modelMetadata(name) };
      } catch (e) {
        return { name, problem: explain(e, `metadata of ${name}`) };
      }
    }),
  );
  // UNAVAILABLE with a reason other than "unloaded" is a load failure; "unloaded" (not asked
  // for, in explicit or poll mode) and UNLOADING (an old version draining) are not problems.
  const failed = index
    .filter((m) => m.state === "UNAVAILABLE" && m.reason !== "unloaded" && !names.includes(m.name))
    .map((m) => ({ name: m.name, problem: `This model failed to load and is not served: ${m.reason}` }));
  render(loaded.filter((m) => m.meta), [...loaded.filter((m) => m.problem), ...failed]);
}

function askForKey(message) {
  const form = $("#key-form");
  $("#key-message").textContent = message;
  form.hidden = false;
  $("#key").focus();
}

function setUpKeyForm() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveKey($("#key").value.trim());
    $("#key").value = "";
    start();
  });
}

// ---- what the page shows ----------------------------------------------------------------------

// A model's input shape without the batch, from its V2 metadata: [D], or [C, H, W].
const dimsOf = (meta) => meta.inputs[0].shape.slice(1);
const shapeText = (dims) => dims.join("x");
const takesDrawing = (dims) => DRAWING_SHAPES.some((shape) => shapeText(shape) === shapeText(dims));

// The line a card shows when a model reads images the drawing cannot give it.
function drawingNote(meta) {
  const dims = dimsOf(meta);
  if (dims.length < 2 || takesDrawing(dims)) return null;
  return `Not offered the drawing: this model reads ${shapeText(dims)} images, the drawing gives 1x28x28 pixels. Try it with the form of its input shape below.`;
}

function render(models, unavailable) {
  const cards = $("#cards");
  cards.replaceChildren(
    ...models.map((m) => modelCard(m.meta, drawingNote(m.meta))),
    ...unavailable.map((m) => unavailableCard(m.name, m.problem)),
  );
  const used = new Set(
    models.flatMap((m) => (m.meta.smartmixed.activation_mix || []).flatMap((c) => Object.keys(c))),
  );
  const known = Object.keys(ACTIVATION_COLORS).filter((n) => used.has(n));
  $("#legend").replaceChildren(legend([...known, ...[...used].filter((n) => !known.includes(n))]));
  if (!models.length) showMessage("No model is ready: see the cards below.");

  // one panel per input shape, every model of that shape side by side; the drawing's panel
  // holds every model it fits, whichever of its shapes each declares
  const byShape = new Map();
  for (const m of models) {
    const dims = dimsOf(m.meta);
    const key = takesDrawing(dims) ? DRAWING : shapeText(dims);
    byShape.set(key, { dims, metas: [...(byShape.get(key)?.metas || []), m.meta] });
  }
  const size = (dims) => dims.reduce((a, b) => a * b, 1);
  const drawingFirst = ([a, x], [b, y]) =>
    (b === DRAWING) - (a === DRAWING) || size(x.dims) - size(y.dims) || x.dims.length - y.dims.length;
  const panels = [...byShape].sort(drawingFirst).map(([key, { dims, metas }]) =>
    key === DRAWING ? drawingPanel(metas) : formPanel(dims, metas),
  );
  $("#try").replaceChildren(...panels);
}

// ---- results ----------------------------------------------------------------------------------

// Side-by-side result boxes and the function that runs one input through all of them.
function resultsFor(metas) {
  const boxes = new Map(metas.map((meta) => [meta.name, el("div", { class: "result", "data-model": meta.name })]));
  let sequence = 0; // answers to an older input are dropped

  function reset() {
    sequence++;
    for (const [name, box] of boxes) {
      delete box.dataset.label;
      delete box.dataset.probabilities;
      box.className = "result";
      box.replaceChildren(el("h3", {}, name), el("p", { class: "hint" }, "waiting for an input"));
    }
  }

  async function predict(features) {
    const mine = ++sequence;
    await Promise.all(
      metas.map(async (meta) => {
        const box = boxes.get(meta.name);
        delete box.dataset.label;
        box.classList.add("pending");
        const output = meta.outputs.some((o) => o.name === "logits") ? "logits" : meta.outputs[0].name;
        const started = performance.now();
        try {
          const values = await inferRow(meta.name, features, output, dimsOf(meta));
          const ms = performance.now() - started;
          if (mine === sequence) showPrediction(box, meta, output === "logits" ? softmax(values) : values, ms);
        } catch (e) {
          if (mine !== sequence) return;
          box.className = "result failed";
          box.replaceChildren(el("h3", {}, meta.name), el("p", { class: "problem" }, explain(e, `model ${meta.name}`)));
          if (e instanceof ApiError && e.status === 401) askForKey(explain(e, `model ${meta.name}`));
        }
      }),
    );
  }

  reset();
  return { element: el("div", { class: "results" }, ...boxes.values()), predict, reset };
}

function showPrediction(box, meta, probabilities, ms) {
  const labels = meta.smartmixed.labels || probabilities.map((_, i) => String(i));
  const best = topK(probabilities, TOP);
  const bars = el("ol", { class: "top" });
  for (const i of best) {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${(100 * probabilities[i]).toFixed(2)}%`;
    bars.append(
      el("li", {}, el("span", { class: "class" }, labels[i]), el("span", { class: "bar" }, fill),
        el("span", { class: "p" }, `${(100 * probabilities[i]).toFixed(1)}%`)),
    );
  }
  box.className = "result done";
  box.replaceChildren(
    el("h3", {}, meta.name),
    el("p", { class: "label" }, labels[best[0]]),
    bars,
    el("p", { class: "rtt" }, `round trip ${ms.toFixed(1)} ms`),
  );
  box.dataset.probabilities = JSON.stringify(probabilities);
  box.dataset.label = labels[best[0]];
}

// ---- the drawing (models reading 28x28 images) ----------------------------------------------

function drawingPanel(metas) {
  const canvas = el("canvas", { id: "draw", width: CANVAS_SIZE, height: CANVAS_SIZE, "aria-label": "draw a digit here" });
  const seen = el("canvas", { id: "seen", width: SIDE, height: SIDE, title: "what the models read (28x28)" });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const results = resultsFor(metas);

  function clear() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, CANVAS_SIZE, CANVAS_SIZE);
    seen.getContext("2d").clearRect(0, 0, SIDE, SIDE);
    delete canvas.dataset.pixels;
    results.reset();
  }

  // pointer position in canvas pixels (the canvas may be drawn at another size)
  function at(event) {
    const box = canvas.getBoundingClientRect();
    return [((event.clientX - box.left) * CANVAS_SIZE) / box.width, ((event.clientY - box.top) * CANVAS_SIZE) / box.height];
  }

  let pointer = null; // the pointer drawing now: one stroke at a time
  let last = null;
  function line(to) {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = STROKE_WIDTH;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...to);
    ctx.stroke();
    last = to;
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (pointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    pointer = event.pointerId;
    canvas.setPointerCapture(pointer);
    last = at(event);
    line(last); // a dot for a tap
  });
  canvas.addEventListener("pointermove", (event) => {
    if (event.pointerId !== pointer) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) line(at(e));
  });
  const end = (event) => {
    if (event.pointerId !== pointer) return;
    pointer = null;
    strokeEnded();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  function strokeEnded() {
    const pixels = mnistPixels(inkOf(ctx.getImageData(0, 0, CANVAS_SIZE, CANVAS_SIZE)), CANVAS_SIZE, CANVAS_SIZE);
    if (pixels === null) return;
    const preview = seen.getContext("2d").createImageData(SIDE, SIDE);
    pixels.forEach((v, i) => preview.data.set([v, v, v, 255], 4 * i));
    seen.getContext("2d").putImageData(preview, 0, 0);
    canvas.dataset.pixels = JSON.stringify(pixels);
    results.predict(pixels);
  }

  const clearButton = el("button", { type: "button", id: "clear" }, "Clear");
  clearButton.addEventListener("click", clear);
  clear();
  return el(
    "section",
    { class: "panel", "data-features": IMAGE_FEATURES },
    el("h2", {}, "Draw a digit"),
    el("p", { class: "hint" }, "Mouse, finger or pen. Each stroke is sent, MNIST-style (scaled into 20x20, centred by mass in 28x28), to every model below, in the shape each model declares (784, 28x28 or 1x28x28)."),
    el("div", { class: "try" },
      el("div", { class: "input" }, canvas, el("div", { class: "tools" }, clearButton, el("span", { class: "hint" }, "models read:"), seen)),
      results.element),
  );
}

// ---- a form (any other input width) -----------------------------------------------------------

// An example row for a model whose repository holds none, derived from its own metadata; see
// the README (Serve: the page). `dims`: the model's input shape, [D] or [C, H, W].
function exampleRow(meta, dims) {
  const n = dims.reduce((a, b) => a * b, 1);
  const prep = meta.smartmixed.preprocessing || {};
  if (Array.isArray(prep.offset) && prep.offset.length === n) {
    return { values: prep.offset, note: "the mean training row (the model's standardisation offsets)" };
  }
  const offset = typeof prep.offset === "number" ? prep.offset : 0;
  const span = typeof prep.scale === "number" && prep.scale > 0 ? 1 / prep.scale : 1; // raw range
  const round = (v) => Math.round(v * 100) / 100;
  // a picture: [C, H, W] images, or a row whose width is a square (8x8 pixels in 64 features)
  const side = Math.round(Math.sqrt(n));
  const [channels, height, width] = dims.length === 3 ? dims : [1, side, side];
  if (channels * height * width !== n) {
    return { values: new Array(n).fill(round(offset + span / 2)), note: "the middle of the raw range" };
  }
  // a "0": an elliptic ring (half-axes 0.26 and 0.38 of the side), a pixel's ink falling off
  // with its distance from the ring, the darkest pixel full ink; the same in every channel
  const ink = [];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const dx = (x + 0.5 - width / 2) / (0.26 * width), dy = (y + 0.5 - height / 2) / (0.38 * height);
      ink.push(Math.max(0, 1 - 2.5 * Math.abs(Math.hypot(dx, dy) - 1)));
    }
  }
  const peak = Math.max(...ink);
  const plane = ink.map((v) => round(offset + (span * v) / peak));
  const values = Array.from({ length: channels }, () => plane).flat();
  const picture = channels > 1 ? `${channels}x${height}x${width}` : `${height}x${width}`;
  return { values, note: `a drawn "0" (${picture}, raw values ${offset} to ${round(offset + span)})` };
}

// A form with one field per input value, sent to every model of input shape `dims` ([D], or
// [C, H, W]: the fields laid out W to a line, channel after channel).
function formPanel(dims, metas) {
  const n = dims.reduce((a, b) => a * b, 1);
  const side = Math.round(Math.sqrt(n));
  const image = dims.length > 1;
  const columns = image ? dims.at(-1) : side * side === n ? side : Math.min(n, 8);
  const grid = el("div", { class: "grid" });
  grid.style.gridTemplateColumns = `repeat(${columns}, auto)`;
  const inputs = [];
  for (let i = 0; i < n; i++) {
    const input = el("input", { type: "number", step: "any", required: "", value: "0", "aria-label": `feature ${i}`, name: `f${i}` });
    inputs.push(input);
    grid.append(input);
  }
  const note = el("span", { class: "hint" });
  const fill = el("button", { type: "button", class: "example" }, "Fill with an example");
  fill.addEventListener("click", () => {
    const example = exampleRow(metas[0], dims);
    example.values.forEach((v, i) => { inputs[i].value = String(v); });
    note.textContent = `example: ${example.note}`;
  });
  const results = resultsFor(metas);
  const form = el("form", { class: "features", "data-width": n, "data-shape": shapeText(dims) }, grid,
    el("div", { class: "tools" }, fill, el("button", { type: "submit" }, "Predict"), note));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const row = inputs.map((input) => Number(input.value));
    form.dataset.features = JSON.stringify(row);
    results.predict(row);
  });
  const title = image ? `${shapeText(dims)} images` : `${n} features`;
  const hint = image
    ? `One raw value per field, row-major (channel, row, column), sent as one V2 infer request of shape [1, ${dims.join(", ")}] to every model below.`
    : "One raw feature per field, sent as one V2 infer request to every model below.";
  return el(
    "section",
    { class: "panel", "data-features": n, "data-shape": shapeText(dims) },
    el("h2", {}, title),
    el("p", { class: "hint" }, hint),
    el("div", { class: "try" }, form, results.element),
  );
}

setUpKeyForm();
start();
