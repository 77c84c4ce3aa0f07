// prodcat web page: pick or drop up to N photos of one product, POST them to v1/classify, show the categories.
"use strict";

const state = { files: [], maxImages: 4, busy: false, requestId: 0 };
const $ = (selector) => document.querySelector(selector);

function percent(probability) {
  return (100 * probability).toFixed(probability >= 0.995 || probability < 0.001 ? 0 : 1) + "%";
}

// A threshold is a rule on the top probability, not an accuracy claim: whole percents ("76%"), one decimal only
// where whole percents would make a probability and the threshold look equal.
function thresholdPercent(threshold, probability) {
  const whole = Math.round(100 * threshold) + "%";
  if (probability !== undefined && Math.round(100 * probability) + "%" === whole) {
    return (100 * threshold).toFixed(1) + "%";
  }
  return whole;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- model info ----------------------------------------------------------------------------------------------------
async function loadHealth() {
  try {
    const response = await fetch("health");
    const health = await response.json();
    state.maxImages = health.limits.max_images;
    $("#max-images").textContent = state.maxImages;
    $("#top-k").value = health.limits.default_top_k;
    renderModelInfo(health.model);
  } catch (error) {
    $("#model-info").textContent = "server unreachable";
  }
}

function renderModelInfo(model) {
  const info = $("#model-info");
  info.replaceChildren();
  if (model.run) {
    const run = element("span", "run", "model ");
    run.append(element("strong", "run-name", model.run));
    info.append(run);
  }
  const evaluation = model.evaluation;
  if (evaluation && evaluation.product_top1 != null) {
    const n = evaluation.products == null ? "" : `, n = ${evaluation.products.toLocaleString()} products`;
    const split = evaluation.split || "held-out";
    info.append(element("span", "accuracy", `${percent(evaluation.product_top1)} right on ${split}${n}`));
  } else if (model.run) {
    info.append(element("span", "accuracy", "not evaluated yet"));
  }
  info.append(element("span", "classes", `${model.num_classes.toLocaleString()} categories`));
  info.append(element("span", "threshold", model.accept_threshold == null ? "no auto-accept threshold"
    : `auto-accept when the top probability ≥ ${thresholdPercent(model.accept_threshold)}`));
}

// -- photos --------------------------------------------------------------------------------------------------------
function addFiles(fileList) {
  const incoming = Array.from(fileList);
  const room = state.maxImages - state.files.length;
  const kept = incoming.slice(0, Math.max(room, 0));
  const notice = $("#notice");
  if (incoming.length > kept.length) {
    notice.textContent = `Only ${state.maxImages} photos per product: ${incoming.length - kept.length} ignored.`;
    notice.hidden = false;
  } else {
    notice.hidden = true;
  }
  if (!kept.length) return;
  for (const file of kept) state.files.push({ file, url: URL.createObjectURL(file) });
  renderThumbnails();
  classify();
}

function removeFile(index) {
  URL.revokeObjectURL(state.files[index].url);
  state.files.splice(index, 1);
  $("#notice").hidden = true;
  renderThumbnails();
  if (state.files.length) classify(); else resetResults();
}

function clearAll() {
  for (const entry of state.files) URL.revokeObjectURL(entry.url);
  state.files = [];
  $("#notice").hidden = true;
  renderThumbnails();
  resetResults();
}

function renderThumbnails() {
  const list = $("#thumbnails");
  const template = $("#thumb-template").content.firstElementChild;
  list.replaceChildren();
  state.files.forEach((entry, index) => {
    const item = template.cloneNode(true);
    item.dataset.index = index;
    const image = item.querySelector("img");
    image.src = entry.url;
    image.alt = entry.file.name;
    image.addEventListener("error", () => item.classList.add("broken"));
    const remove = item.querySelector(".remove");
    remove.title = `Remove ${entry.file.name}`;
    remove.setAttribute("aria-label", remove.title);
    remove.addEventListener("click", () => removeFile(index));
    item.querySelector(".thumb-name").textContent = entry.file.name;
    list.append(item);
  });
  const empty = state.files.length === 0;
  $("#clear").disabled = empty;
  $("#dropzone").classList.toggle("compact", !empty);
}

// -- request -------------------------------------------------------------------------------------------------------
async function classify() {
  if (!state.files.length) return;
  const requestId = ++state.requestId;  // a newer selection wins over a slower, older answer
  const form = new FormData();
  for (const entry of state.files) form.append("images", entry.file, entry.file.name);
  const topK = parseInt($("#top-k").value, 10) || 5;
  setBusy(true);
  $("#status").textContent = `Categorising ${state.files.length} photo${state.files.length > 1 ? "s" : ""}…`;
  try {
    const response = await fetch(`v1/classify?top_k=${encodeURIComponent(topK)}`, { method: "POST", body: form });
    const body = await response.json().catch(() => null);
    if (requestId !== state.requestId) return;
    if (!response.ok) {
      const error = (body && body.error) || { code: `http_${response.status}`, message: response.statusText };
      showError(error.code, error.message);
      return;
    }
    renderResults(body);
  } catch (error) {
    if (requestId === state.requestId) showError("network_error", "Could not reach the server: " + error.message);
  } finally {
    if (requestId === state.requestId) setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("#result-card").classList.toggle("busy", busy);
}

// -- results -------------------------------------------------------------------------------------------------------
function resetResults() {
  $("#results").hidden = true;
  $("#error").hidden = true;
  $("#predictions").replaceChildren();
  $("#status").textContent = "Add photos to see the most likely categories.";
}

function showError(code, message) {
  $("#results").hidden = true;
  // The server names the photo it could not use ("images[1] 'back.jpg': not an image"): mark its thumbnail.
  const match = /images\[(\d+)\]/.exec(message);
  if (match) {
    const thumb = document.querySelector(`#thumbnails .thumb[data-index="${match[1]}"]`);
    if (thumb) thumb.classList.add("invalid");
  }
  const box = $("#error");
  box.querySelector(".error-message").textContent = message;
  box.querySelector(".error-code").textContent = code;
  box.hidden = false;
  $("#status").textContent = "";
}

function predictionItem(score, rank) {
  const item = element("li", "prediction");
  item.dataset.label = score.label;
  item.dataset.categoryId = score.category_id;
  item.dataset.probability = score.probability;
  const crumbs = element("div", "breadcrumb");
  crumbs.append(element("span", "level1", score.level1), element("span", "sep", "›"),
    element("span", "level2", score.level2), element("span", "sep", "›"), element("span", "leaf", score.level3));
  const bar = element("div", "bar");
  const fill = element("div", "fill");
  fill.style.width = Math.max(0.5, 100 * score.probability).toFixed(1) + "%";
  bar.append(fill);
  const meta = element("div", "meta");
  meta.append(element("span", "probability", percent(score.probability)),
    element("span", "category-id", "#" + score.category_id));
  item.append(element("span", "rank", String(rank)), crumbs, bar, meta);
  return item;
}

function renderVerdict(result) {
  const badge = $("#accept-badge");
  const top = result.top[0];
  badge.className = "badge " + (result.accepted ? "accept" : "review");
  badge.textContent = result.accepted ? "✓ auto-accept" : "needs review";
  $("#verdict-text").textContent = result.threshold == null
    ? "no auto-accept threshold: the model has not been evaluated"
    : `top probability ${percent(top.probability)} ${result.accepted ? "≥" : "<"} auto-accept level `
      + thresholdPercent(result.threshold, top.probability);
}

// Photos byte-identical to training pictures: their training products' labels are evidence (chosen on val).
function renderMatches(result) {
  const box = $("#training-matches");
  const matches = result.training_matches;
  box.hidden = !matches;
  if (!matches) return;
  const photos = matches.pictures_matched === 1 ? "1 photo is" : `${matches.pictures_matched} photos are`;
  const products = matches.products === 1 ? "1 training product" : `${matches.products} training products`;
  const used = matches.applied === "none" ? "" : ` · their categories were used (${matches.applied})`;
  box.textContent = `${photos} identical to pictures of ${products}${used}`;
}

// The words OCR read on one photo, each as text (textContent: a word is never markup); null: the run has no text
// model, so nothing was read and the place stays hidden.
function renderWords(place, words) {
  place.hidden = words == null;
  if (words == null) return;
  const list = place.querySelector(".words");
  place.classList.toggle("empty", words.length === 0);
  if (!words.length) {
    list.replaceChildren(element("span", "no-words", "none"));
    place.title = "OCR found no words on this photo (or skipped it: no text likely)";
    return;
  }
  list.replaceChildren(...words.map((word) => element("span", "word", word)));
  place.title = `words OCR read on this photo: ${words.join(" ")}`;
}

function renderResults(result) {
  $("#error").hidden = true;
  renderVerdict(result);
  renderMatches(result);
  $("#predictions").replaceChildren(...result.top.map((score, index) => predictionItem(score, index + 1)));
  result.images.forEach((image, index) => {
    const thumb = document.querySelector(`#thumbnails .thumb[data-index="${index}"]`);
    if (!thumb) return;
    renderWords(thumb.querySelector(".thumb-words"), result.ocr_words ? result.ocr_words[index] : null);
    const caption = thumb.querySelector(".thumb-top");
    if (image.top.length) {
      const best = image.top[0];
      caption.replaceChildren(element("span", "thumb-leaf", best.level3),
        element("span", "thumb-prob", percent(best.probability)));
      caption.title = `this photo alone: ${best.level1} › ${best.level2} › ${best.level3}`;
    }
  });
  const timing = result.timing_ms;
  const others = result.batch.products - 1;
  const shared = others > 0 ? ` (shared with ${others} other request${others > 1 ? "s" : ""})` : "";
  $("#status").textContent = `Done in ${Math.round(timing.total)} ms · model ${Math.round(timing.model)} ms${shared}`;
  $("#results").hidden = false;
}

// -- wiring --------------------------------------------------------------------------------------------------------
function wire() {
  const dropzone = $("#dropzone");
  const input = $("#file-input");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  dropzone.addEventListener("click", (event) => { if (event.target.tagName !== "LABEL") input.click(); });
  dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  for (const name of ["dragenter", "dragover"]) {
    dropzone.addEventListener(name, (event) => { event.preventDefault(); dropzone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    dropzone.addEventListener(name, () => dropzone.classList.remove("over"));
  }
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });
  $("#clear").addEventListener("click", clearAll);
  $("#top-k").addEventListener("change", () => { if (state.files.length) classify(); });
  loadHealth();
}

document.addEventListener("DOMContentLoaded", wire);
