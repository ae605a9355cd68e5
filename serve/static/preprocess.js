// From a drawing to the 784 grey levels an MNIST model reads, and from logits to probabilities.
//
// MNIST's own recipe (LeCun et al.): each digit's bounding box is scaled, aspect ratio kept,
// to fit a 20x20 box (anti-aliased: here, by area averaging), then placed in a 28x28 field so
// that its centre of mass sits at the field's centre. Grey levels 0 (background) to 255 (ink).

export const SIDE = 28; // the field
export const BOX = 20; // the box the digit's longer side is scaled to

// Ink of an RGBA image (white strokes on black): the red channel, (h, w) row-major.
export function inkOf(imageData) {
  const { data, width, height } = imageData;
  const ink = new Float64Array(width * height);
  for (let i = 0; i < ink.length; i++) ink[i] = data[4 * i];
  return ink;
}

// Smallest box holding every pixel with ink, or null for an empty drawing.
function boundingBox(ink, width, height) {
  let top = height, bottom = -1, left = width, right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (ink[y * width + x] > 0) {
        top = Math.min(top, y); bottom = Math.max(bottom, y);
        left = Math.min(left, x); right = Math.max(right, x);
      }
    }
  }
  return bottom < 0 ? null : { top, left, height: bottom - top + 1, width: right - left + 1 };
}

// Weights of an area-averaging resampling of n source cells onto m target cells:
// target cell j covers source interval [j*n/m, (j+1)*n/m); weights[j] = [[index, share], ...]
// (shares sum to 1). Works for shrinking and for enlarging.
function areaWeights(n, m) {
  const step = n / m;
  const weights = [];
  for (let j = 0; j < m; j++) {
    const start = j * step, end = (j + 1) * step;
    const row = [];
    for (let k = Math.floor(start); k < Math.min(Math.ceil(end), n); k++) {
      const overlap = Math.min(end, k + 1) - Math.max(start, k);
      if (overlap > 0) row.push([k, overlap / step]);
    }
    weights.push(row);
  }
  return weights;
}

// The box (h, w) of ink resampled to (outH, outW), separably: rows, then columns.
function resample(ink, width, box, outH, outW) {
  const across = areaWeights(box.width, outW), down = areaWeights(box.height, outH);
  const rows = new Float64Array(box.height * outW); // (box.height, outW)
  for (let y = 0; y < box.height; y++) {
    const src = (box.top + y) * width + box.left;
    for (let x = 0; x < outW; x++) {
      let sum = 0;
      for (const [k, share] of across[x]) sum += share * ink[src + k];
      rows[y * outW + x] = sum;
    }
  }
  const out = new Float64Array(outH * outW); // (outH, outW)
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      let sum = 0;
      for (const [k, share] of down[y]) sum += share * rows[k * outW + x];
      out[y * outW + x] = sum;
    }
  }
  return out;
}

// 784 integers 0-255 (row-major 28x28) from the ink of a (height, width) drawing; null if empty.
export function mnistPixels(ink, width, height) {
  const box = boundingBox(ink, width, height);
  if (box === null) return null;
  // the longer side becomes 20 pixels, the shorter keeps the aspect ratio (at least 1 pixel)
  const scale = BOX / Math.max(box.width, box.height);
  const outW = Math.max(1, Math.round(box.width * scale));
  const outH = Math.max(1, Math.round(box.height * scale));
  const small = resample(ink, width, box, outH, outW);
  // centre of mass of the scaled digit, in its own pixel coordinates (pixel centres at i + 0.5)
  let mass = 0, cy = 0, cx = 0;
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const v = small[y * outW + x];
      mass += v; cy += v * (y + 0.5); cx += v * (x + 0.5);
    }
  }
  // integer offsets that bring it to the field's centre (14, 14), the box kept inside the field
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  const top = clamp(Math.round(SIDE / 2 - cy / mass), SIDE - outH);
  const left = clamp(Math.round(SIDE / 2 - cx / mass), SIDE - outW);
  // grey levels: the densest pixel is full ink (255), as in MNIST where strokes are several
  // pixels wide; a thin stroke averaged down would otherwise look faint
  let peak = 0;
  for (const v of small) peak = Math.max(peak, v);
  const pixels = new Array(SIDE * SIDE).fill(0);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      pixels[(top + y) * SIDE + left + x] = Math.round((255 * small[y * outW + x]) / peak);
    }
  }
  return pixels;
}

// softmax(logits), computed stably (the largest logit subtracted first).
export function softmax(logits) {
  const top = Math.max(...logits);
  const exps = logits.map((z) => Math.exp(z - top));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / total);
}

// Indices of the k largest values, largest first.
export function topK(values, k) {
  return values
    .map((v, i) => [v, i])
    .sort((a, b) => b[0] - a[0])
    .slice(0, k)
    .map(([, i]) => i);
}
