// The page at `/`: send a photo to /query, show its matches (thumbnails from /images/{id}) and an SVG map
// of the database positions (/positions) with the matches and the estimated position. No external resources.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const MAP = { width: 1000, height: 460, pad: 24 };
const ESTIMATE_RADIUS_M = 25;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("vpr-token") || "";
let positions = null;
let objectUrls = [];
let current = null;  // the photo shown: re-sent when k changes

async function api(path, options = {}) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this server needs a token: enter it above");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fmt(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function place(item) {
  if (item.lat !== null && item.lat !== undefined) return `${fmt(item.lat, 6)}, ${fmt(item.lon, 6)}`;
  if (item.utm_east !== null && item.utm_east !== undefined) return `UTM ${fmt(item.utm_east, 1)} E, ${fmt(item.utm_north, 1)} N`;
  return "no position";
}

async function loadIndex() {
  try {
    const info = await (await api("/info")).json();
    const model = `${info.model.backbone} + ${info.model.head}`;
    $("info").textContent = `${info.count.toLocaleString()} database images · ${model}, ${info.dim}-d · ${info.index_kind} index · ${info.device}`;
    $("warning").textContent = info.random_init
      ? "This index was built with a randomly initialised model (no trained checkpoint): its matches are close to chance."
      : "";
    $("warning").hidden = !info.random_init;
    positions = await (await api("/positions")).json();
    drawMap(null);
    showError("");
  } catch (error) {
    $("info").textContent = "index not available";
    showError(error.message);
  }
}

async function query(file) {
  if (!file) return;
  current = file;
  showError("");
  clearResults();
  $("status").textContent = "searching…";
  const form = new FormData();
  form.append("images", file, file.name);
  form.append("k", $("k").value);
  try {
    const started = performance.now();
    const answer = await (await api("/query", { method: "POST", body: form })).json();
    const result = answer.results[0];
    objectUrls = [URL.createObjectURL(file)];
    $("query-image").src = objectUrls[0];
    $("query-name").textContent = file.name;
    renderMatches(result);
    drawMap(result);
    $("results").hidden = false;
    $("status").textContent = `${result.matches.length} matches in ${Math.round(performance.now() - started)} ms`;
  } catch (error) {
    $("status").textContent = "";
    showError(error.message);
  }
}

function clearResults() {  // before a new photo, and what a failed one leaves: no old matches under a new name
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  $("results").hidden = true;
  $("matches").replaceChildren();
  $("query-image").removeAttribute("src");
  $("query-name").textContent = "";
  $("estimate").textContent = "";
  drawMap(null);
}

function renderMatches(result) {
  const list = $("matches");
  list.replaceChildren();
  for (const match of result.matches) {
    const item = $("match-template").content.firstElementChild.cloneNode(true);
    item.dataset.id = match.id;
    item.querySelector(".rank").textContent = `#${match.rank}`;
    item.querySelector(".similarity").textContent = `similarity ${fmt(match.similarity, 3)}`;
    item.querySelector(".distance").textContent = `distance ${fmt(match.distance, 3)}`;
    item.querySelector(".where").textContent = place(match) + (match.heading !== null ? ` · heading ${fmt(match.heading, 0)}°` : "");
    item.querySelector(".file").textContent = match.path.split("/").pop();
    item.querySelector("img").alt = `database image ${match.id}`;
    list.append(item);
    loadThumbnail(item.querySelector("img"), match.id);
  }
  const position = result.position;
  $("estimate").textContent = position
    ? `estimated position: ${place(position)} (confidence ${fmt(position.confidence, 2)}, ${position.support} matches agree)`
    : "no position estimate: the database images have no coordinates";
}

async function loadThumbnail(img, id) {
  try {
    const url = URL.createObjectURL(await (await api(`/images/${id}`)).blob());
    objectUrls.push(url);
    img.src = url;
  } catch (_) {
    img.alt = `database image ${id} unavailable`;
  }
}

function node(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.append(element);
  return element;
}

function niceLength(metres) {
  const power = 10 ** Math.floor(Math.log10(metres));
  return [5, 2, 1].map((f) => f * power).find((v) => v <= metres) || power;
}

function drawMap(result) {
  const svg = $("map");
  svg.replaceChildren();
  if (!positions || positions.points.length === 0) {
    $("map-section").hidden = true;
    return;
  }
  $("map-section").hidden = false;
  svg.setAttribute("viewBox", `0 0 ${MAP.width} ${MAP.height}`);
  const points = positions.points.slice();
  const hits = result ? result.matches.filter((m) => m.utm_east !== null) : [];
  hits.forEach((m) => points.push([m.utm_east, m.utm_north]));
  if (result && result.position) points.push([result.position.utm_east, result.position.utm_north]);
  const east = points.map((p) => p[0]), north = points.map((p) => p[1]);
  const minE = Math.min(...east), maxE = Math.max(...east), minN = Math.min(...north), maxN = Math.max(...north);
  const scale = Math.min((MAP.width - 2 * MAP.pad) / Math.max(maxE - minE, 1), (MAP.height - 2 * MAP.pad) / Math.max(maxN - minN, 1));
  const offsetX = (MAP.width - (maxE - minE) * scale) / 2, offsetY = (MAP.height - (maxN - minN) * scale) / 2;
  const x = (e) => offsetX + (e - minE) * scale;
  const y = (n) => MAP.height - offsetY - (n - minN) * scale;  // north up

  const db = node("g", { class: "db" }, svg);
  for (const [e, n] of positions.points) node("circle", { cx: x(e).toFixed(1), cy: y(n).toFixed(1), r: 2 }, db);

  const bar = niceLength((MAP.width / 5) / scale);
  const scaleBar = node("g", { class: "scale" }, svg);
  node("line", { x1: 16, y1: MAP.height - 14, x2: 16 + bar * scale, y2: MAP.height - 14 }, scaleBar);
  node("text", { x: 16, y: MAP.height - 20 }, scaleBar).textContent = bar >= 1000 ? `${bar / 1000} km` : `${bar} m`;

  const estimate = result && result.position ? result.position : null;
  if (estimate) {  // the 25 m ring under the matches, the cross over them
    const r = Math.max(ESTIMATE_RADIUS_M * scale, 8);
    node("circle", { class: "est-ring", cx: x(estimate.utm_east), cy: y(estimate.utm_north), r }, svg);
  }
  for (const m of hits.slice().reverse()) {  // rank 1 drawn last, on top
    const hit = node("g", { class: "hit", "data-testid": "map-match" }, svg);
    node("circle", { cx: x(m.utm_east), cy: y(m.utm_north), r: 9 }, hit);
    node("text", { x: x(m.utm_east), y: y(m.utm_north) }, hit).textContent = m.rank;
    node("title", {}, hit).textContent = `#${m.rank}: similarity ${fmt(m.similarity, 3)}`;
  }
  if (estimate) {
    const cx = x(estimate.utm_east), cy = y(estimate.utm_north);
    const mark = node("g", { class: "est", "data-testid": "map-estimate" }, svg);
    node("path", { d: `M${cx - 9},${cy - 9}L${cx + 9},${cy + 9}M${cx - 9},${cy + 9}L${cx + 9},${cy - 9}` }, mark);
    node("title", {}, mark).textContent = `estimated position (confidence ${fmt(estimate.confidence, 2)})`;
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => query(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    query(event.dataTransfer.files[0]);
  });
  $("k").addEventListener("change", () => query(current));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("vpr-token", token);
    $("token-form").hidden = true;
    loadIndex();
  });
  loadIndex();
}

document.addEventListener("DOMContentLoaded", setUp);
