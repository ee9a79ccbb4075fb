// dache's web console: plain JavaScript on dache's public HTTP API only.
// The token (when the node has access control) lives in sessionStorage only.
"use strict";

const PAGE = 20; // keys per page
const TICK_MS = 2000; // health + metrics sampling, and polling when there is no watch stream
const HISTORY = 60; // chart samples kept
const $ = (id) => document.getElementById(id);

const state = {
  prefix: "",
  afters: [null], // the `after` of every page seen, for "prev"
  page: 0,
  next: null,
  rows: new Map(), // key -> revision shown, to flash changed rows
  entry: null, // {key, value, expiry, etag} being viewed
  editing: null, // {key, etag|null} the editor started from; etag null: create
  pending: null, // the body the user tried to save when a conflict was shown
  samples: [],
  live: null, // "watch" | "polling"
  watchAbort: null,
  viewSeq: 0, // the latest read of the entry (older answers are dropped)
};

// -- HTTP

function token() {
  return sessionStorage.getItem("dacheToken");
}

async function call(method, path, { body, headers = {} } = {}) {
  const h = { ...headers };
  if (token()) h.Authorization = "Bearer " + token();
  if (body !== undefined) h["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) askForToken();
  return response;
}

async function errorOf(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

const keyPath = (key) => "/dache/" + encodeURIComponent(key);
const etagOf = (response) => response.headers.get("ETag");
const pretty = (value) => JSON.stringify(value, null, 2);

// -- messages and the token

function say(text, kind = "error") {
  const m = $("message");
  m.textContent = text;
  m.className = kind === "info" ? "info" : "";
  m.hidden = !text;
}

function askForToken() {
  $("token-panel").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("dacheToken", $("token").value.trim());
  $("token").value = "";
  $("token-panel").hidden = true;
  $("forget-token").hidden = false;
  start();
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem("dacheToken");
  location.reload();
});

// -- browsing

async function loadPage() {
  const params = new URLSearchParams({ prefix: state.prefix, limit: String(PAGE) });
  const after = state.afters[state.page];
  if (after !== null) params.set("after", after);
  const response = await call("GET", "/dache?" + params);
  if (!response.ok) {
    // Shown beside the list, so it never hides the message of an edit.
    if (response.status !== 401) $("page-info").textContent = "listing failed: " + (await errorOf(response));
    return;
  }
  const doc = await response.json();
  state.next = doc.next;
  renderRows(doc.entries);
  $("prev").disabled = state.page === 0;
  $("next").disabled = doc.next === null;
  $("page-info").textContent = `page ${state.page + 1} · ${doc.entries.length} keys`;
  return doc;
}

function renderRows(entries) {
  const body = $("keys").tBodies[0];
  const before = state.rows;
  state.rows = new Map();
  body.replaceChildren();
  for (const entry of entries) {
    const row = body.insertRow();
    row.dataset.key = entry.key;
    row.insertCell().textContent = entry.key;
    const value = row.insertCell();
    value.className = "value";
    value.textContent = JSON.stringify(entry.value);
    row.insertCell().textContent = entry.revision;
    if (before.size && before.get(entry.key) !== entry.revision) row.classList.add("changed");
    if (state.entry && state.entry.key === entry.key) row.classList.add("selected");
    row.addEventListener("click", () => view(entry.key));
    state.rows.set(entry.key, entry.revision);
  }
}

$("prefix-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.prefix = $("prefix").value;
  state.afters = [null];
  state.page = 0;
  state.rows = new Map();
  watch(); // lists the page, then follows changes from its revision
});

$("next").addEventListener("click", () => {
  if (state.next === null) return;
  state.afters[state.page + 1] = state.next;
  state.page += 1;
  state.rows = new Map();
  loadPage();
});

$("prev").addEventListener("click", () => {
  if (state.page === 0) return;
  state.page -= 1;
  state.rows = new Map();
  loadPage();
});

// -- one entry

function show(panel) {
  for (const id of ["entry", "editor", "conflict"]) $(id).hidden = id !== panel;
}

async function view(key, live = false) {
  // Reads overlap (a click, a live event, our own write's event): only the latest one shows.
  const seq = ++state.viewSeq;
  const response = await call("GET", keyPath(key));
  if (seq !== state.viewSeq) return;
  if (response.status === 404) {
    state.entry = null;
    show(null);
    say(`"${key}" does not exist (any more)`, "info");
    return;
  }
  if (!response.ok) return say("reading failed: " + (await errorOf(response)));
  const doc = await response.json();
  state.entry = { key: doc.key, value: doc.value, expiry: doc.expiry ?? null, etag: etagOf(response) };
  if (!live) say(""); // a live refresh keeps the message of the user's last action
  renderEntry();
  show("entry");
  for (const row of $("keys").tBodies[0].rows) row.classList.toggle("selected", row.dataset.key === key);
}

function renderEntry() {
  const entry = state.entry;
  $("entry-key").textContent = entry.key;
  $("entry-etag").textContent = entry.etag;
  $("entry-value").textContent = pretty(entry.value);
  renderExpiry();
}

function renderExpiry() {
  const entry = state.entry;
  if (!entry) return;
  if (entry.expiry === null) {
    $("entry-expiry").textContent = "never";
    return;
  }
  const left = Math.max(0, entry.expiry - Date.now() / 1000);
  const when = new Date(entry.expiry * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  $("entry-expiry").textContent = `${when} (in ${countdown(left)})`;
}

function countdown(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  const parts = d ? [`${d}d`, `${h}h`] : h ? [`${h}h`, `${m}m`] : m ? [`${m}m`, `${s % 60}s`] : [`${s % 60}s`];
  return parts.join(" ");
}

// -- create, edit, delete: If-Match / If-None-Match, so a concurrent change is shown

function openEditor(entry) {
  state.editing = entry ? { key: entry.key, etag: entry.etag } : { key: "", etag: null };
  $("editor-title").textContent = entry ? "edit " + entry.key : "new key";
  $("editor-key").value = entry ? entry.key : state.prefix;
  $("editor-key").readOnly = !!entry;
  $("editor-value").value = entry ? pretty(entry.value) : "";
  $("editor-ttl").value = entry && entry.expiry !== null ? String(Math.max(1, Math.round(entry.expiry - Date.now() / 1000))) : "";
  say("");
  show("editor");
  (entry ? $("editor-value") : $("editor-key")).focus();
}

$("new-key").addEventListener("click", () => openEditor(null));
$("edit").addEventListener("click", () => openEditor(state.entry));
$("editor-cancel").addEventListener("click", () => (state.entry ? show("entry") : show(null)));

$("editor-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("editor-key").value;
  let value;
  try {
    value = JSON.parse($("editor-value").value);
  } catch (e) {
    return say("the value is not JSON: " + e.message);
  }
  const body = { value };
  const ttl = $("editor-ttl").value.trim();
  if (ttl) body.ttl = Number(ttl);
  const condition = state.editing.etag ? { "If-Match": state.editing.etag } : { "If-None-Match": "*" };
  await save(key, body, condition);
});

async function save(key, body, condition) {
  const response = await call("PUT", keyPath(key), { body, headers: condition });
  if (response.status === 412) return conflict(key, body);
  if (!response.ok) return say("saving failed: " + (await errorOf(response)));
  state.pending = null;
  await view(key);
  say(`saved "${key}"`, "info");
  loadPage();
}

async function conflict(key, mine) {
  state.pending = mine ? { key, body: mine } : null;
  const response = await call("GET", keyPath(key));
  const theirs = response.ok ? await response.json() : null;
  state.conflictEtag = response.ok ? etagOf(response) : null;
  $("conflict-etag").textContent = state.conflictEtag || "none: it was deleted";
  $("conflict-value").textContent = theirs ? pretty(theirs.value) : "(deleted)";
  $("conflict-overwrite").hidden = !mine;
  say("");
  show("conflict");
}

$("conflict-reload").addEventListener("click", () => view(state.pending ? state.pending.key : state.entry.key));
$("conflict-overwrite").addEventListener("click", () => {
  const { key, body } = state.pending;
  // Still conditional: overwrite exactly the version just shown, nothing newer.
  const condition = state.conflictEtag ? { "If-Match": state.conflictEtag } : { "If-None-Match": "*" };
  save(key, body, condition);
});

$("delete").addEventListener("click", async () => {
  const { key, etag } = state.entry;
  if (!confirm(`delete "${key}"?`)) return;
  const response = await call("DELETE", keyPath(key), { headers: { "If-Match": etag } });
  if (response.status === 412) return conflict(key, null);
  if (!response.ok) return say("deleting failed: " + (await errorOf(response)));
  state.viewSeq += 1; // a read started by our own delete's event must not report it as someone else's
  state.entry = null;
  show(null);
  say(`deleted "${key}"`, "info");
  loadPage();
});

// -- live updates: the watch stream (fetch, so the token can go in a header), else polling

async function watch() {
  if (state.watchAbort) state.watchAbort.abort();
  const abort = new AbortController();
  state.watchAbort = abort;
  const listed = await loadPage();
  const params = new URLSearchParams({ watch: "true", prefix: state.prefix });
  if (listed) params.set("since", String(listed.revision));
  const headers = { Accept: "text/event-stream" };
  if (token()) headers.Authorization = "Bearer " + token();
  try {
    const response = await fetch("/dache?" + params, { headers, signal: abort.signal });
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok || !type.startsWith("text/event-stream")) throw new Error("no watch stream");
    setLive("watch");
    await readEvents(response.body, onEvent);
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (state.watchAbort === abort) setLive("polling"); // ended or absent: poll on the tick
}

async function readEvents(stream, handle) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { type: "message", data: "" };
      for (const line of block.split("\n")) {
        const [field, ...rest] = line.split(":");
        const text = rest.join(":").replace(/^ /, "");
        if (field === "event") event.type = text;
        else if (field === "data") event.data += text;
      }
      if (event.data) handle(event);
    }
  }
}

let refreshSoon = null;
function onEvent(event) {
  let data = {};
  try {
    data = JSON.parse(event.data);
  } catch (e) {}
  if (event.type === "reset") return watch(); // re-list, then watch from there
  if (state.entry && data.key === state.entry.key && !$("entry").hidden) view(data.key, true);
  clearTimeout(refreshSoon);
  refreshSoon = setTimeout(loadPage, 100);
}

function setLive(mode) {
  state.live = mode;
  $("live").textContent = "live: " + mode;
  $("live").className = "badge on";
}

async function poll() {
  if (state.live !== "polling") return;
  await loadPage();
  if (state.entry && $("entry").hidden === false) {
    const response = await call("GET", keyPath(state.entry.key));
    if (response.status === 404 || (response.ok && etagOf(response) !== state.entry.etag)) view(state.entry.key, true);
  }
}

// -- health and metrics

function metric(text, name) {
  const match = text.match(new RegExp("^" + name + "(?:\\{[^}]*\\})? ([0-9.e+-]+)$", "m"));
  return match ? Number(match[1]) : null;
}

async function sample() {
  const health = await call("GET", "/health").then((r) => r.json()).catch(() => ({ status: "fail" }));
  $("health").textContent = "health: " + health.status;
  $("health").className = "badge " + health.status;
  const response = await call("GET", "/metrics").catch(() => null);
  if (!response || !response.ok) return;
  const text = await response.text();
  const now = Date.now() / 1000;
  const point = {
    t: now,
    entries: metric(text, "dache_entries") ?? 0,
    // dache_memory_*: the memory bound's accounting; a node without it: dache_bytes, no limit
    bytes: metric(text, "dache_memory_used_bytes") ?? metric(text, "dache_bytes") ?? 0,
    limit: metric(text, "dache_memory_limit_bytes"), // absent or 0: no limit
    written: metric(text, "dache_commit_batch_size_sum") ?? 0,
  };
  const last = state.samples[state.samples.length - 1];
  point.writes = last ? Math.max(0, (point.written - last.written) / (now - last.t)) : 0;
  state.samples.push(point);
  if (state.samples.length > HISTORY) state.samples.shift();
  $("metrics-text").textContent = `${point.entries} entries · ${memoryText(point)} · ${point.writes.toFixed(1)} writes/s`;
  drawChart();
}

const mib = (bytes) => (bytes / 1048576).toFixed(2);
const memoryText = ({ bytes, limit }) => (limit ? `${mib(bytes)} of ${mib(limit)} MiB` : `${mib(bytes)} MiB (no limit)`);

function drawChart() {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const line = (field, color) => {
    const top = Math.max(1, ...state.samples.map((s) => s[field]));
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    state.samples.forEach((s, i) => {
      const x = (i / (HISTORY - 1)) * canvas.width;
      const y = canvas.height - 4 - (s[field] / top) * (canvas.height - 8);
      i ? g.lineTo(x, y) : g.moveTo(x, y);
    });
    g.stroke();
  };
  line("entries", "#1f6feb");
  line("writes", "#b26a00");
}

// -- start

function start() {
  $("forget-token").hidden = !token();
  watch();
  sample();
}

setInterval(() => {
  renderExpiry();
}, 1000);
setInterval(() => {
  sample();
  poll();
}, TICK_MS);
start();
