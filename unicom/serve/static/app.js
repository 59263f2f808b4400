// The page of `unicom serve`: plain JavaScript over the JSON API, no build step.
// Views follow the address's hash, so the back button works: "" search, "#id=N" a search from
// item N, "#duplicates" the duplicate clusters.
"use strict";

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(node, text, isError = false) {
  node.textContent = text;
  node.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: reported below */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function basename(path) {
  const parts = String(path).split(/[\\/]/);
  return parts[parts.length - 1];
}

function size(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MB`;
  return `${Math.max(1, Math.round(bytes / 1024))} KB`;
}

// One image of the collection: thumbnail, score and file name; clicking it searches from it.
function card(item, extra = {}) {
  const img = el("img", { src: `/thumb/${item.id}`, alt: basename(item.image_path), loading: "lazy" });
  const open = el("a", { href: `/image/${item.id}`, target: "_blank", rel: "noopener", class: "name",
                         title: item.image_path, text: basename(item.image_path) });
  open.addEventListener("click", (event) => event.stopPropagation());
  const meta = el("div", { class: "meta" }, [el("span", { class: "score", text: extra.scoreText }), open]);
  if (item.width > 0) meta.append(el("span", { class: "name", text: `${item.width}\u00d7${item.height} \u00b7 ${size(item.size)}` }));
  const node = el("div", { class: `card result ${extra.class || ""}`, "data-id": item.id,
                           title: `${item.image_path}\nclick to search from this image` }, [img, meta]);
  if (extra.label) node.append(el("span", { class: extra.labelClass, text: extra.label }));
  node.addEventListener("click", () => { location.hash = `#id=${item.id}`; });
  return node;
}

function searchOptions() {
  const k = parseInt($("#k").value, 10);
  const minScore = $("#min-score").value.trim();
  return { k: Number.isFinite(k) ? k : 20, min_score: minScore === "" ? null : Number(minScore) };
}

function showResults(body) {
  const grid = $("#results");
  grid.replaceChildren(...body.results.map((item, i) =>
    card(item, { scoreText: item.score.toFixed(3), label: `#${i + 1}`, labelClass: "rank" })));
  const n = body.results.length;
  setStatus($("#status"), `${n} result${n === 1 ? "" : "s"} in ${body.took_ms.toFixed(0)} ms; scores are cosine similarities`);
  if (n === 0) grid.append(el("p", { class: "empty", text: "Nothing above the minimum score." }));
}

async function runSearch(request, preview) {
  const query = $("#query-image");
  query.src = preview;
  query.classList.add("shown");
  $("#drop-text").textContent = "Drop, choose or paste another image";
  setStatus($("#status"), "searching...");
  try {
    showResults(await api("/search", request));
  } catch (error) {
    $("#results").replaceChildren();
    setStatus($("#status"), error.message, true);
  }
}

function searchImage(file) {
  if (!file) return;
  const { k, min_score } = searchOptions();
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(k));
  if (min_score !== null) form.append("min_score", String(min_score));
  if (location.hash) history.pushState(null, "", location.pathname);  // back to the search view
  showView("search");
  runSearch({ method: "POST", body: form }, URL.createObjectURL(file));
}

function searchId(id) {
  const { k, min_score } = searchOptions();
  const body = JSON.stringify({ id: Number(id), k, ...(min_score === null ? {} : { min_score }) });
  runSearch({ method: "POST", headers: { "Content-Type": "application/json" }, body }, `/thumb/${id}`);
}

async function showDuplicates() {
  const list = $("#duplicates");
  setStatus($("#dup-status"), "loading...");
  try {
    const body = await api("/duplicates");
    const items = body.clusters.reduce((n, c) => n + c.items.length, 0);
    setStatus($("#dup-status"), `${body.count} clusters, ${items} images; the kept image of each is marked`);
    list.replaceChildren(...body.clusters.map((cluster) => el("div", { class: "cluster" }, [
      el("h2", { text: `Cluster ${cluster.cluster} \u00b7 ${cluster.items.length} images` }),
      el("div", { class: "row" }, cluster.items.map((item) => card(item, item.keep
        ? { class: "keep", scoreText: "kept", label: "keep", labelClass: "badge" }
        : { scoreText: item.score.toFixed(3) }))),
    ])));
    if (body.count === 0) list.append(el("p", { class: "empty", text: "No duplicates were found." }));
  } catch (error) {
    list.replaceChildren();
    setStatus($("#dup-status"), error.message, true);
  }
}

function showView(name) {
  $("#search-view").hidden = name !== "search";
  $("#duplicates-view").hidden = name !== "duplicates";
  $("#tab-search").classList.toggle("active", name === "search");
  $("#tab-duplicates").classList.toggle("active", name === "duplicates");
}

function route() {
  const hash = location.hash;
  const id = /^#id=(\d+)$/.exec(hash);
  if (hash === "#duplicates") {
    showView("duplicates");
    showDuplicates();
  } else {
    showView("search");
    if (id) searchId(id[1]);
  }
}

async function showInfo() {
  try {
    const info = await api("/info");
    const parts = [basename(info.model), `${info.count.toLocaleString()} images`];
    if (info.index && info.index.in_use) {
      const recall = info.index.recall_at_k != null ? ` (recall@${info.index.k} ${info.index.recall_at_k.toFixed(3)})` : "";
      parts.push(`${info.index.kind} index${recall}`);
    } else {
      parts.push("exact search");
    }
    $("#info").textContent = parts.join(" \u00b7 ");
    $("#info").title = `${info.collection}\nmodel ${info.model}`;
    $("#k").max = info.service.max_k;
  } catch (error) {
    setStatus($("#info"), error.message, true);
  }
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function setup() {
  const drop = $("#drop");
  $("#file-input").addEventListener("change", (event) => {
    searchImage(event.target.files[0]);
    event.target.value = "";  // choosing the same file again searches again
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchImage(firstImage(event.dataTransfer.items) || event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData && event.clipboardData.items);
    if (file) searchImage(file);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("#file-input").click(); }
  });
  window.addEventListener("hashchange", route);
  showInfo();
  route();
}

setup();
