// Model cards: what a model is (input, layers, architecture, activation mix, lowering, checks,
// accuracy, the latency export measured) from its V2 metadata, GET /v2/models/NAME ->
// "smartmixed".

// One colour per activation name, fixed whatever the pool (the default pool's six follow the
// tab10 order of train/report.py's plots). Names not listed get a colour from their spelling.
export const ACTIVATION_COLORS = {
  relu: "#1f77b4",
  sigmoid: "#ff7f0e",
  tanh: "#2ca02c",
  leaky_relu: "#d62728",
  elu: "#9467bd",
  selu: "#8c564b",
  gelu: "#e377c2",
  silu: "#7f7f7f",
  softplus: "#bcbd22",
  mish: "#17becf",
  softsign: "#aec7e8",
  identity: "#c5b0d5",
  afu: "#ffbb78",
};

export function activationColor(name) {
  if (name in ACTIVATION_COLORS) return ACTIVATION_COLORS[name];
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${hash}, 55%, 50%)`;
}

// el("p", {class: "x"}, "text", child, ...): an element; text always as text, never as HTML.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const percent = (x, digits = 1) => `${(100 * x).toFixed(digits)}%`;

function row(term, ...description) {
  return [el("dt", {}, term), el("dd", {}, ...description)];
}

// One stacked bar per hidden layer, labelled by its kind (conv: one activation per channel;
// linear: per neuron): each activation's share of the layer's channels or neurons.
function mixBars(mix, types) {
  const bars = el("div", { class: "mix" });
  mix.forEach((counts, layer) => {
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const type = types[layer] || "layer";
    const label = `${type} ${layer + 1}`;
    const units = type === "conv" ? "channels" : "neurons";
    const bar = el("div", { class: "bar" });
    for (const [name, count] of Object.entries(counts)) {
      const part = el("span", {
        class: "part",
        "data-activation": name,
        title: `${label}: ${name} ${count} of ${total} ${units} (${percent(count / total)})`,
      });
      part.style.width = `${(100 * count) / total}%`;
      part.style.background = activationColor(name);
      bar.append(part);
    }
    bars.append(
      el("div", { class: "layer", "data-layer-type": type },
        el("span", { class: "name", title: `${total} ${units}` }, label), bar),
    );
  });
  return bars;
}

// The legend for every activation of `names` (in the order given).
export function legend(names) {
  const box = el("div", { class: "legend" });
  for (const name of names) {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = activationColor(name);
    box.append(el("span", { class: "entry", "data-activation": name }, swatch, name));
  }
  return box;
}

// A layer of the spec in a few words: "conv 6 k5 p2", "maxpool 2", "linear 120".
function layerText(layer) {
  switch (layer.type) {
    case "conv": {
      const stride = layer.stride > 1 ? ` s${layer.stride}` : "";
      const padding = layer.padding > 0 ? ` p${layer.padding}` : "";
      return `conv ${layer.channels} k${layer.kernel}${stride}${padding}`;
    }
    case "maxpool":
    case "avgpool": {
      const stride = layer.stride !== undefined && layer.stride !== layer.kernel ? ` s${layer.stride}` : "";
      return `${layer.type} ${layer.kernel}${stride}`;
    }
    case "linear":
      return `linear ${layer.features}`;
    default:
      return layer.type;
  }
}

// The spec's layers in order, each a span (data-layer: its type), joined by arrows.
function layerList(layers) {
  const list = el("span", { class: "layers" });
  layers.forEach((layer, i) => {
    if (i) list.append(" → ");
    list.append(el("span", { "data-layer": layer.type }, layerText(layer)));
  });
  return list;
}

function inputText(dims) {
  if (dims.length === 3) return `${dims.join("x")} image (channels, height, width)`;
  if (dims.length === 1) return `${dims[0]} features`;
  return dims.join("x");
}

function verificationText(info) {
  const v = info.verification || {};
  const results = v.results || [];
  if (v.passed === undefined || v.passed === null) return "not recorded";
  const worst = Math.max(...results.map((r) => r.max_abs_diff ?? 0));
  const agreement = Math.min(...results.map((r) => r.argmax_agreement ?? 1));
  const samples = results.reduce((a, r) => a + (r.samples || 0), 0);
  const tolerance = v.tolerance ? ` (atol ${v.tolerance.atol}, rtol ${v.tolerance.rtol})` : "";
  const verdict = v.passed ? "passed" : "FAILED";
  let text = `${verdict} against PyTorch: ${results.length} checks, ${samples} inputs, max |diff| ${worst.toExponential(1)}${tolerance}, argmax agreement ${percent(agreement)}`;
  const q = info.quantization;
  if (q && q.agreement !== undefined) {
    text += `; int8: agreement ${percent(q.agreement)} with fp32, accuracy ${percent(q.int8_accuracy)} (drop ${Number(q.accuracy_drop_points).toFixed(2)} points)`;
  }
  return text;
}

function latencyText(latency) {
  if (!latency) return "not measured (the export named its lowering; --lowering auto times them)";
  const times = Object.entries(latency.median_ms)
    .map(([rows, ms]) => `${rows} row${rows === "1" ? "" : "s"}: ${Number(ms).toFixed(3)} ms`)
    .join(", ");
  const threads = latency.threads ? `, ${latency.threads} threads` : "";
  return `${times} (median, ONNX Runtime on ${latency.device || "?"}${threads})`;
}

// The card of a loaded model from its metadata; `note`, when given, is a line shown under its
// title (why the drawing is not offered to it).
export function modelCard(meta, note = null) {
  const info = meta.smartmixed || {};
  const accuracy = info.test_metrics && info.test_metrics.test_accuracy;
  const lowering = info.precision && info.precision !== "fp32"
    ? `${info.lowering}, ${info.precision}`
    : `${info.lowering} (${info.precision || "fp32"})`;
  const layers = Array.isArray(info.layers) ? info.layers : null;
  const details = el(
    "dl",
    {},
    ...row("input", inputText(meta.inputs[0].shape.slice(1))),
    ...(layers ? row("layers", layerList(layers)) : []),
    ...row("architecture", (info.architecture || []).join(" → ")),
    ...row("mode", info.mode ?? "?"),
    ...row("activation mix", mixBars(info.activation_mix || [], info.hidden_layer_types || [])),
    ...row("lowering", lowering),
    ...row("verification", verificationText(info)),
    ...row("test accuracy", typeof accuracy === "number" ? percent(accuracy) : "not recorded"),
    ...row("export latency", latencyText(info.latency)),
    ...row("providers", (info.execution_providers || []).join(", ")),
  );
  return el(
    "article",
    { class: "card ready", "data-card": meta.name },
    el("h3", {}, meta.name, " ", el("span", { class: "badge" }, "ready"), " ", el("small", {}, `version ${meta.versions.at(-1)}`)),
    note ? el("p", { class: "note no-drawing" }, note) : null,
    details,
  );
}

// The card of a model the server lists but cannot serve, or whose metadata could not be read.
export function unavailableCard(name, message) {
  return el(
    "article",
    { class: "card not-ready", "data-card": name },
    el("h3", {}, name, " ", el("span", { class: "badge" }, "not ready")),
    el("p", { class: "problem" }, message),
  );
}
