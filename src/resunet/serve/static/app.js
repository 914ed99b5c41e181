// The resunet page: send an image to /predict, draw the palette PNG it answers over the image, and read the class
// of every pixel back from that PNG's colours (each class has its own colour in /classes).
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view");
const maskCanvas = document.createElement("canvas");
const state = { classes: [], byColour: new Map(), image: null, mask: null, maskUrl: null, latest: 0 };
const HOVER_HINT = "point at the image to see the class under the pointer";
const MIN_SHOWN_PX = 256;  // a tiny image is drawn enlarged (pixelated) so it can be seen and pointed at

const colourKey = (r, g, b) => (r << 16) | (g << 8) | b;

async function loadModel() {
  try {
    const response = await fetch("/classes");
    const description = await response.json();
    state.classes = description.classes;
    for (const c of description.classes) state.byColour.set(colourKey(...c.color), c);
    $("model").textContent = `${description.model.file} (${description.model.kind}) · ` +
      `${description.classes.length} classes · working size ${description.working_size} px`;
  } catch (error) {
    $("model").textContent = `could not read /classes: ${error}`;
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function serverMs(response) {
  // Server-Timing: receive;dur=…, decode;dur=…, …, total;dur=…
  const header = response.headers.get("Server-Timing") || "";
  const total = header.split(",").map((part) => part.trim()).find((part) => part.startsWith("total;"));
  return total ? parseFloat(total.split("dur=")[1]) : NaN;
}

function clearResult() {
  // A failed request must not leave the previous image's mask, legend and download link beside its error.
  $("result").hidden = true;
  $("legend").replaceChildren();
  const download = $("download");
  download.removeAttribute("href");
  download.setAttribute("aria-disabled", "true");
}

function countAnswer() {
  // Every answer, the latest or not: lets a test wait for an earlier request's late answer.
  document.body.dataset.answered = String((Number(document.body.dataset.answered) || 0) + 1);
}

async function segment(file, count = 1) {
  if (!file) return;
  // Only the last image asked for is shown: an earlier, slower answer arriving later is dropped.
  const ticket = ++state.latest;
  const isStale = () => ticket !== state.latest;
  clearResult();
  const others = count > 1 ? ` (the first of ${count} files: one image at a time)` : "";
  setStatus(`segmenting ${file.name || "the pasted image"}${others}…`);
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  const started = performance.now();
  let response;
  try {
    response = await fetch("/predict", { method: "POST", body: form });
  } catch (error) {
    countAnswer();
    if (isStale()) return;
    setStatus(`the server did not answer: ${error}`, true);
    return;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({ error: response.statusText }));
    countAnswer();
    if (isStale()) return;
    setStatus(`${response.status}: ${body.error}`, true);
    return;
  }
  const blob = await response.blob();
  const roundTrip = performance.now() - started;
  const mask = await createImageBitmap(blob);
  let image = null;
  try {
    image = await createImageBitmap(file);  // EXIF orientation applied, as on the server
  } catch (error) {
    image = null;  // a format the browser cannot draw (16-bit TIFF, …): the mask is still shown
  }
  countAnswer();
  if (isStale()) return;
  maskCanvas.width = mask.width;
  maskCanvas.height = mask.height;
  const maskContext = maskCanvas.getContext("2d", { willReadFrequently: true });
  maskContext.drawImage(mask, 0, 0);
  state.mask = maskContext.getImageData(0, 0, mask.width, mask.height);
  state.image = image;
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = URL.createObjectURL(blob);
  const download = $("download");
  download.href = state.maskUrl;
  download.download = `${(file.name || "pasted").replace(/\.[^.]*$/, "")}_mask.png`;
  download.removeAttribute("aria-disabled");
  $("latency").textContent = `server ${serverMs(response).toFixed(0)} ms · round trip ${roundTrip.toFixed(0)} ms · ` +
    `${mask.width}×${mask.height} px`;
  $("hover").textContent = HOVER_HINT;
  $("result").hidden = false;
  drawLegend();
  render();
  setStatus(`${file.name || "pasted image"}: done${others}` +
    (image ? "" : " (this browser cannot display the image itself: the mask alone is shown)"));
  document.body.dataset.segmented = String((Number(document.body.dataset.segmented) || 0) + 1);
}

function drawLegend() {
  const data = state.mask.data;
  const counts = new Map();
  for (let i = 0; i < data.length; i += 4) {
    const key = colourKey(data[i], data[i + 1], data[i + 2]);
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  const total = data.length / 4;
  const found = [...counts].map(([key, pixels]) => ({ entry: state.byColour.get(key), pixels }))
    .filter((item) => item.entry)
    .sort((a, b) => b.pixels - a.pixels);
  const legend = $("legend");
  legend.replaceChildren(...found.map(({ entry, pixels }) => {
    const item = document.createElement("li");
    item.dataset.classId = entry.id;
    item.dataset.fraction = String(pixels / total);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${entry.color.join(",")})`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.name;
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = `${(100 * pixels / total).toFixed(1)}%`;
    item.append(swatch, name, share);
    return item;
  }));
}

function render() {
  if (!state.mask) return;
  const mode = document.querySelector("input[name=mode]:checked").value;
  const opacity = Number($("opacity").value) / 100;
  view.width = state.mask.width;
  view.height = state.mask.height;
  const enlarge = Math.max(1, MIN_SHOWN_PX / Math.max(view.width, view.height));
  view.style.width = enlarge > 1 ? `${Math.round(view.width * enlarge)}px` : "";
  view.classList.toggle("enlarged", enlarge > 1);
  const context = view.getContext("2d");
  context.clearRect(0, 0, view.width, view.height);
  if (mode !== "mask" && state.image) context.drawImage(state.image, 0, 0, view.width, view.height);
  if (mode === "mask" || (mode === "overlay" && !state.image)) {
    context.drawImage(maskCanvas, 0, 0);
  } else if (mode === "overlay") {
    context.globalAlpha = opacity;
    context.drawImage(maskCanvas, 0, 0);
    context.globalAlpha = 1;
  }
}

function showClassAt(event) {
  if (!state.mask) return;
  const box = view.getBoundingClientRect();
  const x = Math.floor((event.clientX - box.left) * view.width / box.width);
  const y = Math.floor((event.clientY - box.top) * view.height / box.height);
  if (x < 0 || y < 0 || x >= view.width || y >= view.height) return;
  const i = 4 * (y * state.mask.width + x);
  const d = state.mask.data;
  const entry = state.byColour.get(colourKey(d[i], d[i + 1], d[i + 2]));
  $("hover").textContent = `(${x}, ${y}): ${entry ? entry.name : "unknown"}`;
}

$("file").addEventListener("change", (event) => {
  segment(event.target.files[0], event.target.files.length);
  event.target.value = "";  // choosing the same file again (a retry after an error) must fire "change" again
});
$("opacity").addEventListener("input", render);
for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", render);
view.addEventListener("pointermove", showClassAt);
view.addEventListener("pointerleave", () => { $("hover").textContent = HOVER_HINT; });
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("dragging"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  segment(event.dataTransfer.files[0], event.dataTransfer.files.length);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((entry) => entry.type.startsWith("image/"));
  if (item) segment(item.getAsFile());
});
$("download").setAttribute("aria-disabled", "true");
loadModel();
