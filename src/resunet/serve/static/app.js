// The resunet page: send an image to /predict, draw the palette PNG it answers over the image, and read the class
// of every pixel back from that PNG's colours (each class has its own colour in /classes).
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view");
const maskCanvas = document.createElement("canvas");
const state = {
  classes: [], byColour: new Map(), image: null, mask: null, full: null, maskUrl: null, latest: 0, upload: null,
  maxBytes: null,
};
const HOVER_HINT = "point at the image (or focus it and use the arrow keys) to see the class under the pointer";
const MIN_SHOWN_PX = 256;  // a tiny image is drawn enlarged (pixelated) so it can be seen and pointed at

const colourKey = (r, g, b) => (r << 16) | (g << 8) | b;

// A canvas past these is refused or left blank by some browsers (Safari on a phone: 16.7 million pixels, i.e. a 48 MP
// photo fails; Chromium: 32767 px a side), and reading a 48 MP mask back costs 192 MB: a larger answer is shown
// scaled down to fit, its classes still read at the original's coordinates. (A test lowers them before the page loads.)
const CANVAS_LIMITS = { pixels: 16_777_216, side: 16_384, ...(window.RESUNET_CANVAS_LIMITS || {}) };

function shownSize(width, height) {
  const scale = Math.min(1, Math.sqrt(CANVAS_LIMITS.pixels / (width * height)), CANVAS_LIMITS.side / width,
    CANVAS_LIMITS.side / height);
  return { width: Math.max(1, Math.floor(width * scale)), height: Math.max(1, Math.floor(height * scale)), scale };
}

async function pngSize(blob) {
  // The answer's size from its IHDR chunk (8-byte signature, chunk length, "IHDR", width, height), read before
  // decoding so that a mask too large for a canvas is decoded at the size it is shown at.
  const header = new DataView(await blob.slice(0, 24).arrayBuffer());
  if (header.byteLength < 24 || header.getUint32(12) !== 0x49484452) throw new Error("the answer is not a PNG");
  return { width: header.getUint32(16), height: header.getUint32(20) };
}

// URLs are relative to the page: it works mounted under a path of another app (or behind a proxy's prefix).
// Read at the start and again with each image: a page opened while the service was down (or restarting) had no class
// names for good, nor the size limit, and one restarted with another model was read with the old one's colours.
async function loadModel() {
  try {
    const response = await fetch("classes", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const description = await response.json();
    state.classes = description.classes;
    state.maxBytes = description.limits ? description.limits.max_bytes : null;
    state.byColour = new Map(description.classes.map((c) => [colourKey(...c.color), c]));
    $("model").textContent = `${description.model.file} (${description.model.kind}) · ` +
      `${description.classes.length} classes · working size ${description.working_size} px`;
    return true;
  } catch (error) {
    if (!state.classes.length) $("model").textContent = `could not read /classes: ${error}`;
    return false;
  }
}

// What a status means, for an answer without the service's JSON (a proxy's HTML page; HTTP/2 has no reason phrase).
const STATUS_MEANING = {
  400: "the request was refused", 404: "not found (is the page's address right?)",
  413: "too large for the service or a proxy in front of it", 429: "too many requests",
  500: "the service failed", 502: "bad gateway: the service behind the proxy did not answer",
  503: "the service is busy or not ready", 504: "gateway timeout: the service behind the proxy took too long",
};
// 503s with Retry-After (warming up, a full queue) tried again, then said. (A test lowers it before the page loads.)
const MAX_RETRIES = window.RESUNET_MAX_RETRIES ?? 5;

function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After");
  if (!value) return null;
  const seconds = /^\d+$/.test(value.trim()) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Number.isFinite(seconds) ? Math.min(30, Math.max(1, Math.ceil(seconds))) : null;
}

async function errorText(response) {
  const body = await response.json().catch(() => null);
  const said = body && typeof body.error === "string" && body.error;
  return `${response.status}: ${said || response.statusText || STATUS_MEANING[response.status] || "no reason given"}`;
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// HEIC/HEIF (an iPhone's photos): not read by the service; said before the upload, not after 20 MB were sent.
const isHeif = (file) => /^image\/hei[cf]/.test(file.type) || /\.(heic|heif)$/i.test(file.name || "");

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

// Whether the browser's picture of the file is the one the server segmented, when the file is stored turned (EXIF
// orientation, which the server applies): browsers turn a JPEG, but Chromium draws a WebP as stored. Sides that
// differ from the mask's are caught above; a square photo, or one flipped or turned by 180°, keeps its size.
function turnedAlike(response, full) {
  const orientation = Number(response.headers.get("X-Image-Orientation") || 1);
  if (orientation === 1 || ["JPEG", "MPO"].includes(response.headers.get("X-Image-Format"))) return true;
  return orientation >= 5 && full.width !== full.height;  // turned by 90° and the sides match: the browser turned it
}

// The multipart body FormData would send, made here so that its size (the one --max-bytes limits) is known before
// sending. The file name escaped as browsers do (HTML's form encoding: " CR LF as %22 %0D %0A).
function uploadForm(file, name) {
  const random = Array.from({ length: 24 }, () => Math.floor(Math.random() * 36).toString(36));
  const boundary = "----resunet" + random.join("");
  const escaped = name.replace(/"/g, "%22").replace(/\r/g, "%0D").replace(/\n/g, "%0A");
  const head = `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${escaped}"\r\n` +
    `Content-Type: ${file.type || "application/octet-stream"}\r\n\r\n`;
  return { body: new Blob([head, file, `\r\n--${boundary}--\r\n`]), type: `multipart/form-data; boundary=${boundary}` };
}

function supersede() {
  // Only what the user did last is shown: an earlier upload is cancelled (the server drops an image whose client
  // hung up, so a new one does not wait behind it), and an earlier answer arriving anyway is dropped.
  if (state.upload) state.upload.abort();
  state.upload = null;
  return ++state.latest;
}

async function segment(file, count = 1) {
  if (!file) return;
  const ticket = supersede();
  const isStale = () => ticket !== state.latest;
  state.upload = new AbortController();
  clearResult();
  if (isHeif(file)) {
    setStatus(`${file.name || "the pasted image"}: a HEIC/HEIF photo, which this service does not read; export it as ` +
      "JPEG or PNG (on an iPhone: Settings › Camera › Formats › Most Compatible)", true);
    return;
  }
  if (file.size === 0) {  // said here: the service's 400 named the form, not the file
    setStatus(`${file.name || "the pasted image"}: an empty file (0 bytes): nothing to segment`, true);
    return;
  }
  modelLoaded = loadModel();  // beside the upload; awaited before the answer is read by its colours
  const form = uploadForm(file, file.name || "pasted.png");
  if (!state.maxBytes || form.body.size > state.maxBytes) {
    // The limit as the service has it now: one restarted with a larger --max-bytes was refused by the old one's
    // (twice: the new one came after the check), and one down when the page opened went unchecked.
    await modelLoaded;
    if (isStale()) return;
  }
  if (state.maxBytes && form.body.size > state.maxBytes) {
    // Said here, not sent: past 64 MiB the server does not read the rest of a refused body, and the browser then
    // reported a reset connection ("Failed to fetch") instead of the server's 413. The limit is the whole body's.
    setStatus(`${file.name || "the pasted image"}: ${file.size.toLocaleString("en")} bytes, ` +
      `${form.body.size.toLocaleString("en")} with its upload form: over this service's limit of ` +
      `${state.maxBytes.toLocaleString("en")} bytes (--max-bytes)`, true);
    return;
  }
  const others = count > 1 ? ` (one of ${count} files: one image at a time)` : "";
  setStatus(`segmenting ${file.name || "the pasted image"}${others}…`);
  let started;
  let response;
  let tries = 0;
  for (let attempt = 1; ; attempt++) {
    // The round trip shown is the answered try's: it counted the waits between tries (3 s more after a warm-up)
    started = performance.now();
    tries = attempt;
    try {
      response = await fetch("predict", {
        method: "POST", body: form.body, headers: { "Content-Type": form.type }, signal: state.upload.signal,
      });
    } catch (error) {
      countAnswer();
      if (isStale()) return;
      // No answer: the network, the service gone, or the file unreadable here (moved or changed since it was picked).
      setStatus(`${file.name || "the pasted image"}: no answer (the service unreachable, or the file no longer ` +
        `readable here): ${error}`, true);
      return;
    }
    if (response.ok) break;
    const text = await errorText(response);
    countAnswer();
    if (isStale()) return;
    const wait = response.status === 503 ? retryAfterSeconds(response) : null;
    if (wait === null || attempt > MAX_RETRIES) {
      setStatus(text + (attempt > 1 ? ` (after ${attempt} tries)` : ""), true);
      return;
    }
    // Warming up, or a full queue: the service says when to come back (a failed warm-up sends no Retry-After).
    setStatus(`${text}; trying again in ${wait} s (try ${attempt + 1} of ${MAX_RETRIES + 1})…`);
    await pause(1000 * wait);
    if (isStale()) return;
    setStatus(`segmenting ${file.name || "the pasted image"}${others}…`);
  }
  let mask = null;
  let image = null;
  let counted = false;
  try {
    const blob = await response.blob();
    const roundTrip = performance.now() - started;
    const full = await pngSize(blob);
    const shown = shownSize(full.width, full.height);
    // Nearest-neighbour scaling keeps every pixel a class colour (the readout and legend read classes by colour).
    mask = await createImageBitmap(blob, shown.scale < 1 ?
      { resizeWidth: shown.width, resizeHeight: shown.height, resizeQuality: "pixelated" } : {});
    try {
      image = await createImageBitmap(file);  // EXIF orientation applied, as on the server
    } catch (error) {
      image = null;  // a format the browser cannot draw (16-bit TIFF, …): the mask is still shown
    }
    const named = await modelLoaded;  // the legend and the readout name classes by their colours
    countAnswer();
    counted = true;
    if (isStale()) return;
    let note = image ? "" : " (this browser cannot display the image itself: the mask alone is shown)";
    if (!named && !state.classes.length) note += " (the class names could not be read from /classes: reload the page)";
    if (image && (image.width !== full.width || image.height !== full.height)) {
      // The browser read the file otherwise than the server (an orientation it ignores): no stretched overlay.
      note = ` (this browser shows the image at ${image.width}×${image.height}, the mask is ` +
        `${full.width}×${full.height}: the mask alone is shown)`;
      image.close();
      image = null;
    } else if (image && !turnedAlike(response, full)) {
      note = ` (the file is stored turned (EXIF orientation ${response.headers.get("X-Image-Orientation")}), and ` +
        "this browser may not turn it as the server did: the mask alone is shown)";
      image.close();
      image = null;
    }
    if (shown.scale < 1) {
      note += ` (shown at ${(100 * shown.width / full.width).toFixed(0)}% of its ${full.width}×${full.height} px: ` +
        "larger than a browser canvas; the download is full size)";
    }
    maskCanvas.width = shown.width;
    maskCanvas.height = shown.height;
    const maskContext = maskCanvas.getContext("2d", { willReadFrequently: true });
    maskContext.imageSmoothingEnabled = false;  // a browser that ignored the resize options: still no blended colours
    maskContext.drawImage(mask, 0, 0, shown.width, shown.height);
    state.mask = maskContext.getImageData(0, 0, shown.width, shown.height);
    state.full = full;
    if (state.image) state.image.close();
    state.image = image;
    image = null;
    if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
    state.maskUrl = URL.createObjectURL(blob);
    const download = $("download");
    download.href = state.maskUrl;
    download.download = `${(file.name || "pasted").replace(/\.[^.]*$/, "")}_mask.png`;
    download.removeAttribute("aria-disabled");
    $("latency").textContent = `server ${serverMs(response).toFixed(0)} ms · round trip ${roundTrip.toFixed(0)} ms` +
      `${tries > 1 ? ` (try ${tries})` : ""} · ${full.width}×${full.height} px`;
    $("hover").textContent = HOVER_HINT;
    state.cursor = null;
    $("result").hidden = false;
    drawLegend();
    const described = [...$("legend").children].slice(0, 5).map((item) =>
      `${item.querySelector(".name").textContent} ${item.querySelector(".share").textContent}`);
    view.setAttribute("aria-label", `${file.name || "the pasted image"} segmented: ${described.join(", ") || "no " +
      "known class"}; arrow keys move a cross whose class is read out below`);
    sizeView(shown.width, shown.height);
    render();
    setStatus(`${file.name || "pasted image"}: done${others}${note}`);
    document.body.dataset.segmented = String((Number(document.body.dataset.segmented) || 0) + 1);
  } catch (error) {
    // A body cut off, a PNG the browser cannot decode, a canvas too large for it: said, not left at "segmenting…".
    if (!counted) countAnswer();
    if (isStale()) return;
    clearResult();
    state.mask = null;
    setStatus(`${file.name || "pasted image"}: the answer could not be shown: ${error}`, true);
  } finally {
    if (mask) mask.close();
    if (image) image.close();
  }
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

function sizeView(width, height) {
  // Once per answer: setting a canvas's size reallocates and clears it (the opacity slider only redraws).
  view.width = width;
  view.height = height;
  const enlarge = Math.max(1, MIN_SHOWN_PX / Math.max(width, height));
  view.style.width = enlarge > 1 ? `${Math.round(width * enlarge)}px` : "";
  view.classList.toggle("enlarged", enlarge > 1);
}

function render() {
  if (!state.mask) return;
  // Without the picture (a format the browser cannot draw, or drawn otherwise than the server read it) only the mask
  // can be shown: "image" drew an empty box, and the opacity slider moved nothing.
  const imageMode = document.querySelector("input[name=mode][value=image]");
  imageMode.disabled = !state.image;
  if (!state.image && imageMode.checked) document.querySelector("input[name=mode][value=mask]").checked = true;
  const mode = document.querySelector("input[name=mode]:checked").value;
  $("opacity").disabled = !state.image || mode !== "overlay";
  const opacity = Number($("opacity").value) / 100;
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
  if (state.cursor) {  // the keyboard's cross, in the view's pixels, drawn in both black and white to show anywhere
    const x = (state.cursor.x + 0.5) * view.width / state.full.width;
    const y = (state.cursor.y + 0.5) * view.height / state.full.height;
    const arm = Math.max(4, 0.03 * Math.max(view.width, view.height));
    for (const [colour, width] of [["black", 3], ["white", 1]]) {
      context.strokeStyle = colour;
      context.lineWidth = width * Math.max(1, view.width / view.getBoundingClientRect().width || 1);
      context.beginPath();
      context.moveTo(x - arm, y);
      context.lineTo(x + arm, y);
      context.moveTo(x, y - arm);
      context.lineTo(x, y + arm);
      context.stroke();
    }
  }
}

function showClassAt(event) {
  if (!state.mask) return;
  // Coordinates in the image as sent (the view may be scaled down from it, and is scaled on screen).
  const box = view.getBoundingClientRect();
  const x = Math.floor((event.clientX - box.left) * state.full.width / box.width);
  const y = Math.floor((event.clientY - box.top) * state.full.height / box.height);
  if (x < 0 || y < 0 || x >= state.full.width || y >= state.full.height) return;
  sayClassAt(x, y);
}

function sayClassAt(x, y) {
  const shownX = Math.floor(x * state.mask.width / state.full.width);
  const shownY = Math.floor(y * state.mask.height / state.full.height);
  const i = 4 * (shownY * state.mask.width + shownX);
  const d = state.mask.data;
  const entry = state.byColour.get(colourKey(d[i], d[i + 1], d[i + 2]));
  $("hover").textContent = `(${x}, ${y}): ${entry ? entry.name : "unknown"}`;
}

// The keyboard's way to the class readout (the pointer's alone left it out): with the view focused, the arrow keys
// move a cross by about 2% of the image (Shift: one pixel) and the readout names the class under it.
function moveCursor(event) {
  const steps = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  if (!state.mask || !(event.key in steps)) return;
  event.preventDefault();  // not the page's scroll
  const [dx, dy] = steps[event.key];
  const { width, height } = state.full;
  const step = event.shiftKey ? 1 : Math.max(1, Math.round(0.02 * Math.max(width, height)));
  const at = state.cursor || { x: Math.floor(width / 2), y: Math.floor(height / 2) };
  state.cursor = state.cursor ? {
    x: Math.min(width - 1, Math.max(0, at.x + dx * step)), y: Math.min(height - 1, Math.max(0, at.y + dy * step)),
  } : at;  // the first key puts the cross in the middle
  sayClassAt(state.cursor.x, state.cursor.y);
  render();
}

$("file").addEventListener("change", (event) => {
  segment(event.target.files[0], event.target.files.length);
  event.target.value = "";  // choosing the same file again (a retry after an error) must fire "change" again
});
$("opacity").addEventListener("input", render);
for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", render);
view.addEventListener("pointermove", showClassAt);
view.addEventListener("keydown", moveCursor);
view.addEventListener("blur", () => { if (state.cursor) { state.cursor = null; render(); } });
view.addEventListener("pointerdown", showClassAt);  // a tap on a touch screen moves no pointer
view.addEventListener("pointerleave", (event) => {
  // A finger leaves as it lifts: the class it tapped stays shown.
  if (event.pointerType !== "touch") $("hover").textContent = HOVER_HINT;
});
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
// A file dropped anywhere on the page is segmented: the browser would otherwise open it in place of the page (the
// natural place to drop the next image is the result, below the zone).
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  // A folder arrives as a File the browser cannot read: its upload failed as "the server did not answer".
  const entry = event.dataTransfer.items?.[0]?.webkitGetAsEntry?.();
  if (entry && entry.isDirectory) {
    supersede();  // an image still being segmented must not replace this message when its answer comes
    clearResult();
    setStatus(`${entry.name}: a folder; drop image files (one is segmented at a time)`, true);
    return;
  }
  if (!event.dataTransfer.files.length) {  // a link, selected text, a picture dragged from another tab
    supersede();  // as for a folder: an earlier upload's answer must not replace this message
    clearResult();
    setStatus("nothing to segment in this drop: drag the image file itself (a picture from a web page: save it " +
      "first, then drop or choose the file)", true);
    return;
  }
  // The first picture among the files: a photo copied with its sidecar (IMG_0001.AAE, sorted before IMG_0001.JPG)
  // had the sidecar sent, refused, and the photo beside it left untried.
  const files = [...event.dataTransfer.files];
  segment(files.find((file) => file.type.startsWith("image/") && !isHeif(file)) || files.find(isHeif) || files[0],
    files.length);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((entry) => entry.type.startsWith("image/"));
  if (item) segment(item.getAsFile());
});
$("download").setAttribute("aria-disabled", "true");
let modelLoaded = loadModel();
