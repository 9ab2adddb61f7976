// vaepipe latent explorer: decodes z ~ N(0, I) with onnxruntime-web (WebGPU when the browser
// has it, WASM otherwise) and keeps what it decoded on window.vaepipe, so a test can compare the
// page with onnxruntime in Python. model.json (written by `vaepipe site`) says what to load.

import { priorSample, slerp } from "./sampling.js";

const GRID = 16; // samples in the 4 x 4 grid
const STEPS = 8; // images in the interpolation strip
const SLIDER_MAX = 3; // sliders span [-3, 3]: 99.7% of N(0, 1)

const $ = (id) => document.getElementById(id);
const page = (window.vaepipe = {
  state: "loading", // loading | ready | error
  error: null,
  backend: null, // "wasm" or "webgpu": the execution provider that runs the decoder
  backendReason: "",
  precision: null,
  grid: null, // {seed, temperature, shape, z, x}: z [16, D] and x_mean [16, C, H, W], flat
  focus: null, // {index, z, x}: the sample the sliders edit
  interpolation: null, // {a, b, z, x}
  timings: [], // per slider move: {run, total} in ms (session.run; run + drawing)
  decodes: 0,
  whenIdle: () => Promise.resolve(),
});

function fail(message) {
  page.state = "error";
  page.error = message;
  const status = $("status");
  status.textContent = message;
  status.classList.add("error");
  $("app").hidden = true;
}

window.addEventListener("error", (e) => fail(`The page stopped: ${e.message}`));
window.addEventListener("unhandledrejection", (e) =>
  fail(`The page stopped: ${e.reason?.message ?? e.reason}`),
);

// --- loading --------------------------------------------------------------------------------

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`${what} (${url}) could not be fetched: ${e.message}`);
  }
  if (!response.ok) {
    throw new Error(
      `${what} (${url}) is missing: HTTP ${response.status}. Rebuild the site with ` +
        "`vaepipe site --out DIR` and serve that whole folder.",
    );
  }
  return response;
}

// WebGPU when the browser has an adapter and the session builds on it, else WASM; says why.
async function openSession(ort, config) {
  const forced = new URLSearchParams(location.search).get("backend");
  let adapter = null;
  let reason = "";
  if (forced === "wasm") reason = "?backend=wasm";
  else if (!("gpu" in navigator)) reason = "this browser has no WebGPU";
  else {
    adapter = await navigator.gpu.requestAdapter().catch(() => null);
    if (!adapter) reason = "WebGPU has no adapter here";
  }
  if (adapter) {
    const fp16 = config.models.fp16 && adapter.features.has("shader-f16");
    const file = fp16 ? config.models.fp16 : config.models.fp32;
    try {
      const bytes = await (await fetchOk(file, "The model file")).arrayBuffer();
      const session = await ort.InferenceSession.create(bytes, { executionProviders: ["webgpu"] });
      return { session, backend: "webgpu", precision: fp16 ? "fp16" : "fp32", reason: "" };
    } catch (e) {
      if (e.message.includes("is missing")) throw e;
      reason = `WebGPU failed: ${e.message}`;
    }
  }
  const bytes = await (await fetchOk(config.models.fp32, "The model file")).arrayBuffer();
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  return { session, backend: "wasm", precision: "fp32", reason };
}

// --- decoding and drawing -------------------------------------------------------------------

let ort, session, config;
let queue = Promise.resolve();
let inFlight = 0;
let idleWaiters = [];

// One session.run at a time, in order; whenIdle() resolves once everything queued has drawn.
function enqueue(task) {
  inFlight++;
  queue = queue
    .then(task)
    .catch((e) => fail(`Decoding failed: ${e.message}`))
    .finally(() => {
      if (--inFlight === 0) idleWaiters.splice(0).forEach((resolve) => resolve());
    });
}
page.whenIdle = () =>
  inFlight === 0 ? Promise.resolve() : new Promise((resolve) => idleWaiters.push(resolve));

// Input events come faster than decodes: a job already queued under `name` is not queued
// again, and it reads the controls when it runs, so it decodes the latest state.
const scheduled = new Set();
function schedule(name, job) {
  if (scheduled.has(name)) return;
  scheduled.add(name);
  enqueue(async () => {
    scheduled.delete(name);
    await job();
  });
}

async function decode(z, n) {
  const feeds = { [config.input]: new ort.Tensor("float32", z, [n, config.latent_dim]) };
  const out = (await session.run(feeds))[config.output];
  return out.location === "cpu" ? out.data : await out.getData();
}

const byte = (v) => Math.min(255, Math.max(0, Math.floor(v * 255 + 0.5)));

// x_mean[index] onto the canvas at its own size (CSS scales it up, pixelated).
function draw(canvas, x, index) {
  const [c, h, w] = config.image_shape;
  const plane = h * w;
  if (canvas.width !== w || canvas.height !== h) Object.assign(canvas, { width: w, height: h });
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const base = index * c * plane;
  // 3 channels are RGB planes; otherwise the first channel is drawn in grey
  const planes = c === 3 ? [0, plane, 2 * plane] : [0, 0, 0];
  for (let p = 0; p < plane; p++) {
    for (let k = 0; k < 3; k++) img.data[4 * p + k] = byte(x[base + planes[k] + p]);
    img.data[4 * p + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

const row = (flat, i, width) => flat.slice(i * width, (i + 1) * width);

function decodeGrid() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  schedule("grid", async () => {
    const seed = Number($("seed").value) >>> 0;
    const temperature = Number($("temperature").value);
    const z = priorSample(seed, GRID, config.latent_dim, temperature);
    const x = await decode(z, GRID);
    const canvases = $("grid").querySelectorAll("canvas");
    canvases.forEach((canvas, i) => draw(canvas, x, i));
    page.grid = {
      seed,
      temperature,
      shape: [GRID, ...config.image_shape],
      z: Array.from(z),
      x: Array.from(x),
    };
    select(page.focus?.index ?? 0, x);
    decodeInterpolation();
  });
}

function select(index, gridX) {
  if (!page.grid) return; // a click before the first grid is drawn
  const d = config.latent_dim;
  const size = config.image_shape.reduce((a, b) => a * b, 1);
  const x = row(gridX ?? page.grid.x, index, size);
  page.focus = { index, z: Array.from(row(page.grid.z, index, d)), x: Array.from(x) };
  $("grid")
    .querySelectorAll("button")
    .forEach((b, i) => b.classList.toggle("selected", i === index));
  $("focus-index").textContent = index;
  draw($("focus"), x, 0);
  for (const input of document.querySelectorAll("input[data-dim]")) setSlider(input);
}

function setSlider(input) {
  const v = page.focus.z[Number(input.dataset.dim)];
  input.value = v;
  input.nextElementSibling.textContent = v.toFixed(2);
}

function decodeFocus() {
  schedule("focus", async () => {
    const t0 = performance.now();
    const x = await decode(Float32Array.from(page.focus.z), 1);
    const run = performance.now() - t0;
    draw($("focus"), x, 0);
    page.focus.x = Array.from(x);
    page.timings.push({ run, total: performance.now() - t0 });
    page.decodes++;
    const runs = page.timings.map((t) => t.run).sort((a, b) => a - b);
    const median = runs[Math.floor(runs.length / 2)];
    $("decode-ms").textContent =
      `${run.toFixed(2)} ms (median ${median.toFixed(2)} ms over ${runs.length} moves, ` +
      `${page.backend})`;
  });
}

function decodeInterpolation() {
  schedule("interpolation", async () => {
    const d = config.latent_dim;
    const a = Number($("interp-a").value);
    const b = Number($("interp-b").value);
    const z = slerp(row(page.grid.z, a, d), row(page.grid.z, b, d), STEPS);
    const x = await decode(z, STEPS);
    $("strip")
      .querySelectorAll("canvas")
      .forEach((canvas, i) => draw(canvas, x, i));
    page.interpolation = { a, b, z: Array.from(z), x: Array.from(x) };
  });
}

// --- building the page ----------------------------------------------------------------------

function sliderRow(dim) {
  const label = document.createElement("label");
  label.className = "slider";
  const kl = dim.kl === null ? "" : ` (KL ${dim.kl.toFixed(2)})`;
  label.append(`z${dim.dim}${kl}`);
  const input = Object.assign(document.createElement("input"), {
    type: "range",
    min: -SLIDER_MAX,
    max: SLIDER_MAX,
    step: 0.01,
  });
  input.dataset.dim = dim.dim;
  input.addEventListener("input", () => {
    page.focus.z[dim.dim] = Number(input.value);
    input.nextElementSibling.textContent = Number(input.value).toFixed(2);
    decodeFocus();
  });
  label.append(input, document.createElement("output"));
  return label;
}

function buildControls() {
  const grid = $("grid");
  for (let i = 0; i < GRID; i++) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `sample ${i}`;
    button.append(Object.assign(document.createElement("canvas"), { className: "image" }));
    button.addEventListener("click", () => select(i));
    grid.append(button);
  }
  for (let s = 0; s < STEPS; s++) {
    $("strip").append(Object.assign(document.createElement("canvas"), { className: "image" }));
  }
  for (const [id, start] of [
    ["interp-a", 0],
    ["interp-b", 1],
  ]) {
    const select = $(id);
    for (let i = 0; i < GRID; i++) select.add(new Option(String(i), String(i)));
    select.value = String(start);
    select.addEventListener("change", decodeInterpolation);
  }
  const dims = config.dims;
  $("dims-note").textContent = dims.note;
  const inactive = dims.rows.filter((r) => dims.hide_inactive && !r.active);
  for (const r of dims.rows) {
    if (!inactive.includes(r)) $("sliders").append(sliderRow(r));
  }
  inactive.forEach((r) => $("inactive-sliders").append(sliderRow(r)));
  $("inactive-count").textContent = inactive.length;
  $("inactive-toggle").hidden = inactive.length === 0;
  $("seed").addEventListener("change", decodeGrid);
  $("temperature").addEventListener("input", decodeGrid);
  $("reseed").addEventListener("click", () => {
    $("seed").value = (Number($("seed").value) + 1) >>> 0;
    decodeGrid();
  });
}

function fillCard() {
  const c = config.card;
  const rows = [
    ["dataset", c.dataset],
    ["likelihood", c.likelihood],
    ["test NLL", c.nll],
    ["latent dims", String(config.latent_dim)],
    ["image shape", config.image_shape.join(" x ")],
    ["MLflow run", c.run_id],
    ["git commit", c.git_commit],
    ["ONNX opset", c.opset],
    ["runs on", `${page.backend} (${page.precision})`],
  ];
  for (const [k, v] of rows) {
    $("card-rows").append(
      Object.assign(document.createElement("dt"), { textContent: k }),
      Object.assign(document.createElement("dd"), { textContent: v }),
    );
  }
  $("footer").textContent =
    `onnxruntime-web ${config.runtime.version}, served with the page (no CDN). z: ` +
    "mulberry32(seed) uniforms, Box-Muller normals (vaepipe.site.prior_sample in Python).";
}

async function main() {
  if (typeof WebAssembly !== "object" || typeof WebAssembly.instantiate !== "function") {
    fail(
      "This browser has no WebAssembly, which onnxruntime-web needs to run the decoder. " +
        "Use a current Chrome, Edge, Firefox or Safari, with WebAssembly enabled.",
    );
    return;
  }
  config = await (await fetchOk("model.json", "The site description")).json();
  try {
    ort = await import(`./${config.runtime.module}`);
  } catch (e) {
    throw new Error(`onnxruntime-web (${config.runtime.module}) could not be loaded: ${e.message}`);
  }
  ort.env.logLevel = "error";
  // Threads need SharedArrayBuffer, i.e. cross-origin isolation, which a plain static server
  // (python -m http.server) does not give; one thread then, without ORT's warning.
  if (!self.crossOriginIsolated) ort.env.wasm.numThreads = 1;
  const opened = await openSession(ort, config);
  ({ session } = opened);
  Object.assign(page, {
    backend: opened.backend,
    precision: opened.precision,
    backendReason: opened.reason,
  });
  buildControls();
  fillCard();
  const why = opened.reason ? ` (${opened.reason})` : "";
  $("status").textContent = `Decoder running on ${opened.backend}${why}, ${opened.precision}.`;
  $("app").hidden = false;
  decodeGrid();
  await page.whenIdle();
  if (page.state !== "error") page.state = "ready";
}

main().catch((e) => fail(e.message));
