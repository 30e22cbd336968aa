// thaw dashboard: one WebSocket (/v1/live) pushes a snapshot about once a second; the
// page renders it without reloading. Charts are uPlot (vendor/, MIT). No build step.
"use strict";

const KEY_STORE = "thaw.key";        // sessionStorage: this tab only
const CLOSE_UNAUTHENTICATED = 4401;  // sync with gateway/dashboard.py
const CLOSE_AUTH_TIMEOUT = 4408;
const RECONNECT_MS = 2000;
const STAGES = ["queue", "fetch", "template", "restore", "fork", "prefault", "launch", "import", "setup", "run"];
const STAGE_COLORS = {queue: "#9aa5b1", fetch: "#f2a541", template: "#8e6cd8",
  restore: "#2f6fde", fork: "#9b7fe0", prefault: "#7fa6ee", launch: "#5bb5c7", import: "#c75bb5", setup: "#d3343d", run: "#1f9d55"};
const PALETTE = ["#2f6fde", "#1f9d55", "#d98a00", "#8e6cd8", "#d3343d", "#0f9aa8",
  "#c75bb5", "#6b7d1a", "#b4532a", "#4456a6"];

const $ = (sel) => document.querySelector(sel);
const state = {
  key: "", tenant: "", operator: false, ws: null, signedIn: false, closing: false,
  snapshot: null, selected: "", charts: {}, chartFor: "", deploying: null,
  features: {logs: false, usage: false}, logs: null, logsFor: "", usageAt: 0, keysAt: 0,
};

// ---- formatting -------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    // Through the CSSOM: the page's CSP allows no style attributes.
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
}
const ms = (v) => v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(v < 10 ? 2 : 1)} ms`;
const pct = (v) => `${(v * 100).toFixed(v && v < 0.01 ? 2 : 1)}%`;
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

function colorOf(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function badge(text, cls = text) { return el("span", {class: `badge ${cls}`, text}); }

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea");
    area.value = text; document.body.append(area); area.select();
    document.execCommand("copy"); area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1200);
}

// In the table the path is shown (the host is the page's own); Copy gives the full URL.
function urlCell(url) {
  const button = el("button", {type: "button", class: "copy", title: "copy the URL"}, "Copy");
  button.addEventListener("click", (e) => { e.stopPropagation(); copy(url, button); });
  let shown = url;
  try { shown = new URL(url).pathname; } catch { /* keep it whole */ }
  return el("div", {class: "url"}, el("code", {text: shown, title: url}), button);
}

// ---- sign-in and the live feed --------------------------------------------------------

function connect(key) {
  state.key = key;
  state.closing = false;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/live`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({key}));  // the key never goes in the URL
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "hello") onHello(msg);
    else if (msg.type === "snapshot") render(msg);
    else if (msg.type === "error") onRefused(msg.error);
    else if (msg.type === "warning") $("#conn").title = msg.error.message;
  };
  ws.onclose = (event) => {
    $("#conn").classList.remove("live");
    if (event.code === CLOSE_UNAUTHENTICATED || event.code === CLOSE_AUTH_TIMEOUT) return;
    if (state.signedIn && !state.closing && state.ws === ws) {
      setTimeout(() => { if (state.signedIn && state.ws === ws) connect(state.key); },
                 RECONNECT_MS);
    }
  };
}

function onHello(msg) {
  sessionStorage.setItem(KEY_STORE, state.key);
  state.signedIn = true;
  state.tenant = msg.tenant;
  state.operator = msg.operator;
  $("#conn").classList.add("live");
  $("#tenant").textContent = msg.tenant;
  $("#signin").hidden = true;
  $("#session").hidden = false;
  $("#tabs").hidden = false;
  $("#tab-admin").hidden = !msg.operator;
  if (!currentView()) show("functions");
  if (state.selected) select(state.selected);
  discoverFeatures();
}

function onRefused(error) {
  sessionStorage.removeItem(KEY_STORE);
  signOut(false);
  $("#signin-error").textContent = `Sign-in failed: ${error.message}`;
}

function signOut(clear = true) {
  if (clear) sessionStorage.removeItem(KEY_STORE);
  state.signedIn = false;
  state.closing = true;
  if (state.ws) state.ws.close();
  state.ws = null;
  stopLogs();
  $("#signin").hidden = false;
  $("#session").hidden = true;
  $("#tabs").hidden = true;
  $("#view-functions").hidden = true;
  $("#view-admin").hidden = true;
}

function currentView() {
  if (!$("#view-functions").hidden) return "functions";
  if (!$("#view-admin").hidden) return "admin";
  return "";
}

function show(view) {
  $("#view-functions").hidden = view !== "functions";
  $("#view-admin").hidden = view !== "admin";
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.view === view);
  }
  if (state.snapshot) render(state.snapshot);
}

function api(path, options = {}) {
  const headers = {Authorization: `Bearer ${state.key}`, ...(options.headers || {})};
  return fetch(path, {...options, headers});
}

// Optional routes other parts of the gateway add: present when the OpenAPI document
// names them.
async function discoverFeatures() {
  try {
    const doc = await (await fetch("/openapi.json")).json();
    state.features.logs = "/v1/functions/{name}/logs" in doc.paths;
    state.features.usage = "/v1/usage" in doc.paths;
    state.features.traces = "/v1/traces" in doc.paths;
    state.features.schedules = "/v1/schedules" in doc.paths;
  } catch { /* keep the defaults */ }
  $("#usage-panel").hidden = !state.features.usage;
  if (!state.features.logs) {
    $("#logs-state").textContent = "";
    $("#logs").textContent =
      "Logs arrive here once the gateway serves GET /v1/functions/{name}/logs?follow=true.";
  }
}

// ---- rendering ---------------------------------------------------------------------

function render(snap) {
  state.snapshot = snap;
  if (currentView() === "functions") renderFunctions(snap);
  if (currentView() === "admin" && snap.operator) renderAdmin(snap);
  trackDeploy(snap);
}

function renderFunctions(snap) {
  const tbody = $("#functions tbody");
  tbody.textContent = "";
  $("#no-functions").hidden = snap.functions.length > 0;
  const deploying = state.deploying && state.deploying.name === state.selected;
  if (!deploying && snap.functions.length && !snap.functions.some((f) => f.name === state.selected)) {
    state.selected = snap.functions[0].name;
  }
  for (const f of snap.functions) {
    const s = f.stats;
    const tiers = [];
    if (f.snapshot_tiers.pinned.length) tiers.push(`pinned ×${f.snapshot_tiers.pinned.length}`);
    if (f.snapshot_tiers.disk.length) tiers.push(`disk ×${f.snapshot_tiers.disk.length}`);
    const snapshotText = f.start_mode === "fresh" ? "none (fresh starts)"
      : f.snapshot_bytes ? `${bytes(f.snapshot_bytes)}${tiers.length ? " · " + tiers.join(", ") : ""}`
      : "—";
    const stateCell = el("td", {}, badge(f.state));
    if (f.reason) stateCell.append(el("span", {class: "muted small", text: ` ${f.reason}`}));
    const row = el("tr", {"data-name": f.name, class: f.name === state.selected ? "selected" : ""},
      el("td", {}, el("strong", {text: f.name})), stateCell,
      el("td", {text: f.version}), el("td", {text: snapshotText}),
      el("td", {class: "num", text: f.warm_instances}),
      el("td", {class: "num", text: s.rate_per_second.toFixed(2)}),
      el("td", {class: "num", text: s.invocations ? `${ms(s.p50_ms)} / ${ms(s.p99_ms)}` : "—"}),
      el("td", {class: "num", text: s.invocations ? pct(s.error_rate) : "—"}),
      el("td", {class: "num", text: `${s.cold_starts.restore} / ${s.cold_starts.fresh}`}),
      el("td", {}, urlCell(f.url)));
    row.addEventListener("click", () => select(f.name));
    tbody.append(row);
  }
  renderDetail(snap.functions.find((f) => f.name === state.selected));
  renderRecent(snap.recent);
  if (state.features.usage && Date.now() - state.usageAt > 30000) loadUsage();
  if (Date.now() - state.keysAt > 30000) loadKeys();
}

// The server sends chart series for the selected function only.
function select(name) {
  state.selected = name;
  if (state.features.traces) loadTraces(name);
  if (state.ws && state.ws.readyState === WebSocket.OPEN && state.signedIn) {
    state.ws.send(JSON.stringify({select: name}));
  }
  if (state.snapshot) render(state.snapshot);
}

function renderDetail(f) {
  $("#detail").hidden = !f;
  if (!f) { destroyCharts(); stopLogs(); return; }
  $("#detail-name").textContent = f.name;
  $("#detail-note").textContent =
    `version ${f.version} · ${f.start_mode} starts · this gateway's last ${f.stats.window_seconds / 60} min`;
  renderBuildStep(f);
  const s = f.stats;
  const figures = [
    ["calls/s (1 min)", s.rate_per_second.toFixed(2)],
    ["p50", s.invocations ? ms(s.p50_ms) : "—"], ["p99", s.invocations ? ms(s.p99_ms) : "—"],
    ["error rate", pct(s.error_rate)], ["warm instances", f.warm_instances],
    ["restores", s.cold_starts.restore], ["fresh starts", s.cold_starts.fresh],
    ["snapshot", f.snapshot_bytes ? bytes(f.snapshot_bytes) : "—"],
  ];
  const box = $("#figures");
  box.textContent = "";
  for (const [label, value] of figures) box.append(el("div", {}, el("b", {text: value}), el("span", {text: label})));
  updateCharts(f);
  renderInputs(f);
  if (state.features.logs && state.logsFor !== f.name) startLogs(f.name);
  if (state.features.schedules && (state.schedulesFor !== f.name ||
      Date.now() - state.schedulesAt > SCHEDULES_REFRESH_MS)) loadSchedules(f.name);
}

// ---- build steps (docs/environments.md, "Build steps") -------------------------------------

// A running build's current step in words, with its progress where it has one.
function buildStepText(b) {
  if (!b || !b.build_step) return "";
  return b.build_step + (b.build_progress == null ? "" : ` (${pct(b.build_progress)})`);
}

// Under the function's title while one of its versions builds: that version and its step.
function renderBuildStep(f) {
  let line = $("#detail-build");
  if (!line) {
    line = el("p", {id: "detail-build", class: "muted small"});
    $("#detail h2").after(line);
  }
  const b = f.latest_build;
  const text = buildStepText(b);
  line.hidden = !text;
  line.textContent = text ? `building version ${b.version}: ${text}` : "";
}

// ---- typed inputs (docs/function-api.md) ---------------------------------------------------

function inputType(p) {
  if (Array.isArray(p.enum)) return "one of " + p.enum.map((v) => JSON.stringify(v)).join(", ");
  if (Array.isArray(p.anyOf)) return p.anyOf.map(inputType).join(" or ");
  if (p.type === "array") return p.items && p.items.type ? `array of ${p.items.type}` : "array";
  return p.type || "any";
}

const INPUT_LIMITS = [["minimum", "≥ "], ["maximum", "≤ "], ["minLength", "min length "],
                      ["maxLength", "max length "], ["pattern", "matches "]];

// An example body: each input's default, else a value of its type.
function exampleValue(p) {
  if ("default" in p) return p.default;
  if (Array.isArray(p.enum) && p.enum.length) return p.enum[0];
  if (Array.isArray(p.anyOf) && p.anyOf.length) return exampleValue(p.anyOf[0]);
  return {string: "", integer: p.minimum ?? 0, number: p.minimum ?? 0, boolean: false,
          array: [], object: {}}[p.type] ?? null;
}

// The selected function's inputs as a table, and the invoke box prefilled with an
// example body once per function (what the user typed for it is kept).
function renderInputs(f) {
  const table = $("#inputs");
  const tbody = table.querySelector("tbody");
  tbody.textContent = "";
  const schema = f.inputs;
  const props = schema && schema.properties && typeof schema.properties === "object"
    ? schema.properties : null;
  table.hidden = !props;
  if (!props) { renderInputsForm(f); return; }
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  const example = {};
  for (const [name, raw] of Object.entries(props)) {
    const p = raw && typeof raw === "object" ? raw : {};
    const limits = INPUT_LIMITS.filter(([k]) => k in p).map(([k, t]) => t + JSON.stringify(p[k]));
    tbody.append(el("tr", {},
      el("td", {}, el("code", {text: name})), el("td", {text: inputType(p)}),
      el("td", {text: required.has(name) ? "yes" : "no"}),
      el("td", {text: "default" in p ? JSON.stringify(p.default) : ""}),
      el("td", {text: limits.join("; ")}), el("td", {text: p.description || ""})));
    example[name] = exampleValue(p);
  }
  if (state.inputsFor !== f.name) {
    state.inputsFor = f.name;
    $("#invoke-body").value = JSON.stringify(example, null, 2);
  }
  renderInputsForm(f);  // inputs_form.js
}

// Widths are shares of the call's whole time as the gateway measured it: what no stage
// accounts for (the gateway's own work, the network) stays blank.
function stagesBar(stages, totalMs) {
  const total = Math.max(STAGES.reduce((sum, k) => sum + (stages[k] || 0), 0), totalMs) || 1;
  const bar = el("span", {class: "stages"});
  const text = [];
  for (const k of STAGES) {
    if (!(k in stages)) continue;
    bar.append(el("span", {style: `width:${(100 * stages[k] / total).toFixed(2)}%;background:${STAGE_COLORS[k]}`,
                           title: `${k} ${ms(stages[k])}`}));
    text.push(`${k} ${ms(stages[k])}`);
  }
  return el("span", {}, bar, el("span", {class: "stage-text", text: text.join(" · ")}));
}

function renderRecent(recent) {
  const tbody = $("#recent tbody");
  tbody.textContent = "";
  $("#no-recent").hidden = recent.length > 0;
  for (const r of recent) {
    const row = el("tr", {"data-id": r.id, title: "show this call's logs"},
      el("td", {text: clock(r.time), title: r.id}), el("td", {text: r.function.split("/")[1]}),
      el("td", {}, badge(String(r.status), r.status >= 500 ? "err" : r.status >= 400 ? "building" : "ok")),
      el("td", {}, badge(r.start)), el("td", {class: "num", text: ms(r.ms)}),
      el("td", {class: "stages-cell"}, stagesBar(r.stages, r.ms)));
    row.addEventListener("click", () => showCallLogs(r.function.split("/")[1], r.id));
    tbody.append(row);
  }
}

// ---- charts (uPlot) ------------------------------------------------------------------

function chartWidth(id) { return Math.max(280, $(id).clientWidth || 320); }

function destroyCharts() {
  for (const c of Object.values(state.charts)) c.destroy();
  state.charts = {};
  state.chartFor = "";
}

function coldData(f) {
  const colds = f.stats.cold_start_stages;
  const xs = colds.map((_, i) => i + 1);
  const raw = {};
  for (const k of STAGES) raw[k] = colds.map((c) => c.stages[k] || 0);
  // Stacked bars: each series is the running sum up to its stage, drawn largest first
  // so every stage shows as its own band.
  const cumulative = [];
  let running = xs.map(() => 0);
  for (const k of STAGES) {
    running = running.map((v, i) => v + raw[k][i]);
    cumulative.push(running);
  }
  return {xs, raw, cumulative: cumulative.reverse(), colds};
}

function makeCharts(f) {
  destroyCharts();
  const time = () => ({x: {time: true}});
  const base = (id) => ({width: chartWidth(id), height: 190, legend: {live: true},
                         cursor: {drag: {x: false, y: false}}});
  state.charts.rate = new uPlot({
    ...base("#chart-rate"), scales: time(),
    series: [{}, {label: "calls/s", stroke: "#2f6fde", fill: "rgba(47,111,222,.12)", width: 2},
             {label: "errors/s", stroke: "#d3343d", width: 1.5}],
    axes: [{}, {size: 50}],
  }, [[], [], []], $("#chart-rate"));
  state.charts.latency = new uPlot({
    ...base("#chart-latency"), scales: time(),
    series: [{}, {label: "p50", stroke: "#1f9d55", width: 2, points: {show: true, size: 5},
                  value: (u, v) => v == null ? "—" : ms(v)},
             {label: "p99", stroke: "#d98a00", width: 2, points: {show: true, size: 5},
              value: (u, v) => v == null ? "—" : ms(v)}],
    axes: [{}, {size: 72, values: (u, vals) => vals.map((v) => ms(v))}],
  }, [[], [], []], $("#chart-latency"));
  const bars = uPlot.paths.bars({size: [0.6, 48]});
  const stagesDrawn = [...STAGES].reverse();
  state.charts.cold = new uPlot({
    ...base("#chart-cold"), scales: {x: {time: false}},
    series: [{label: "cold start", value: (u, v) => {
      const c = state.coldColds && state.coldColds[v - 1];
      return c ? `#${v} ${c.start} ${clock(c.time)}` : "—";
    }}, ...stagesDrawn.map((k) => ({
      label: k, fill: STAGE_COLORS[k], stroke: STAGE_COLORS[k], width: 0, paths: bars,
      points: {show: false},
      value: (u, v, si, di) => di == null || !state.coldRaw ? "—" : ms(state.coldRaw[k][di] || 0),
    }))],
    axes: [{values: (u, vals) => vals.map((v) => Number.isInteger(v) ? `#${v}` : "")},
           {size: 72, values: (u, vals) => vals.map((v) => ms(v))}],
  }, [[], ...stagesDrawn.map(() => [])], $("#chart-cold"));
  state.chartFor = f.name;
}

function updateCharts(f) {
  if (typeof uPlot === "undefined" || !f.stats.series) return;  // series on their way
  if (state.chartFor !== f.name) makeCharts(f);
  const s = f.stats.series;
  state.charts.rate.setData([s.time, s.rate, s.errors]);
  state.charts.latency.setData([s.time, s.p50_ms.map((v, i) => s.rate[i] ? v : null),
                                s.p99_ms.map((v, i) => s.rate[i] ? v : null)]);
  const cold = coldData(f);
  state.coldRaw = cold.raw;
  state.coldColds = cold.colds;
  state.charts.cold.setData([cold.xs, ...cold.cumulative]);
}

window.addEventListener("resize", () => {
  for (const [name, chart] of Object.entries(state.charts)) {
    chart.setSize({width: chartWidth(`#chart-${name}`), height: 190});
  }
});

// ---- deploy ----------------------------------------------------------------------------

function step(text, cls = "") {
  const li = el("li", {class: cls, text});
  $("#deploy-steps").append(li);
  return li;
}

function deploy(file) {
  const steps = $("#deploy-steps");
  steps.textContent = "";
  $("#deploy-url").hidden = true;
  const progress = $("#upload-progress");
  progress.hidden = false;
  progress.value = 0;
  const uploading = step(`Uploading ${file.name} (${bytes(file.size)})…`);
  const form = new FormData();
  form.append("bundle", file);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/functions?wait=false");
  xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = 100 * e.loaded / e.total; };
  xhr.onerror = () => { uploading.className = "failed"; uploading.textContent = "Upload failed: network error"; };
  xhr.onload = () => {
    progress.value = 100;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status === 200 && body.unchanged) {
      // The bundle it serves already: nothing was built.
      uploading.className = "done";
      uploading.textContent = `${body.name} unchanged, version ${body.version} kept`;
      select(body.name);
      return;
    }
    if (xhr.status !== 201) {
      uploading.className = "failed";
      uploading.textContent = `Rejected: ${body.error ? body.error.message : xhr.status}`;
      return;
    }
    uploading.className = "done";
    // With versions, the upload is the function's latest build (the active version
    // keeps serving until it is ready); without, the function's own version.
    const version = String(body.latest_build ? body.latest_build.version : body.version);
    uploading.textContent = `Uploaded ${file.name} → ${body.name}, version ${version}`;
    state.deploying = {name: body.name, version, url: body.url,
                       since: Date.now(), line: step("Building the snapshot…")};
    select(body.name);
    if (state.snapshot) trackDeploy(state.snapshot);
  };
  xhr.send(form);
}

function trackDeploy(snap) {
  const d = state.deploying;
  if (!d) return;
  const f = snap.functions.find((x) => x.name === d.name);
  const seconds = Math.round((Date.now() - d.since) / 1000);
  const build = f && f.latest_build && String(f.latest_build.version) === d.version
    ? f.latest_build : null;
  const failed = build ? build.state === "failed" : f && f.state === "failed";
  const serving = f && f.state === "ready" && String(f.version) === d.version;
  if (!failed && !serving) {
    const now = build ? buildStepText(build) : "";
    d.line.textContent = `Building the snapshot… ${seconds}s${now ? ": " + now : ""}`;
    return;
  }
  state.deploying = null;
  $("#upload-progress").hidden = true;
  if (failed) {
    d.line.className = "failed";
    d.line.textContent = `Failed: ${(build && build.reason) || f.reason || "build failed"}`;
  } else {
    d.line.className = "done";
    d.line.textContent = `Ready in ${seconds}s: ${f.start_mode === "restore"
      ? `snapshot ${bytes(f.snapshot_bytes)}` : `fresh starts${f.reason ? " (" + f.reason + ")" : ""}`}`;
    const box = $("#deploy-url");
    box.querySelector("code").textContent = f.url;
    box.hidden = false;
  }
}

// ---- invoke ------------------------------------------------------------------------------

// Posts `body` to the selected function and shows the answer; returns its status and its
// JSON (null when it is not JSON), or null when there was no answer.
async function invokeSelected(body) {
  const f = state.snapshot && state.snapshot.functions.find((x) => x.name === state.selected);
  if (!f) return null;
  const meta = $("#invoke-meta");
  const out = $("#invoke-result");
  meta.textContent = "";
  out.textContent = "…";
  const started = performance.now();
  try {
    const resp = await api(`/fn/${encodeURIComponent(f.tenant)}/${encodeURIComponent(f.name)}`, {
      method: "POST", headers: {"Content-Type": "application/json"}, body});
    const text = await resp.text();
    const rows = [["status", resp.status], ["X-Thaw-Start", resp.headers.get("X-Thaw-Start") || "—"],
                  ["Server-Timing", resp.headers.get("Server-Timing") || "—"],
                  ["round trip", ms(performance.now() - started)]];
    const traceparent = resp.headers.get("traceparent");
    if (traceparent) rows.push(["trace", traceparent.split("-")[1]]);
    for (const [k, v] of rows) meta.append(el("dt", {text: k}), el("dd", {text: v}));
    if (state.features.traces && traceparent) {
      showTrace(traceparent.split("-")[1]).then(() => loadTraces(f.name));
    }
    showCallLogs(f.name, resp.headers.get("X-Request-ID"));
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    out.textContent = json === null ? text : JSON.stringify(json, null, 2);
    // The call is metered: GET /v1/usage sends this gateway's waiting records first.
    if (state.features.usage) loadUsage();
    return {status: resp.status, json};
  } catch (err) {
    out.textContent = `request failed: ${err}`;
    return null;
  }
}

// ---- traces: an invocation's spans as a waterfall (GET /v1/traces, docs/tracing.md) ---------

const COMPONENT_COLORS = {gateway: "#3b7dd8", scheduler: "#9aa5b1", agent: "#f2a541",
                          instance: "#3aa675"};

async function loadTraces(name) {
  $("#trace-panel").hidden = false;
  const tbody = $("#traces tbody");
  try {
    const resp = await api(`/v1/traces?function=${encodeURIComponent(name)}&limit=10`);
    if (!resp.ok) return;
    const {traces} = await resp.json();
    if (state.selected !== name) return;
    tbody.textContent = "";
    for (const t of traces) {
      const row = el("tr", {"data-trace": t.trace_id},
        el("td", {}, el("code", {text: t.trace_id.slice(0, 12)})),
        el("td", {}, badge(t.start || "—", t.error ? "err" : t.start || "")),
        el("td", {class: "num", text: ms(t.duration_ms)}), el("td", {class: "num", text: t.spans}));
      row.addEventListener("click", () => showTrace(t.trace_id));
      tbody.append(row);
    }
  } catch { /* the list stays as it was */ }
}

// Each span a row under its parent, its bar placed on the trace's time axis.
async function showTrace(traceId) {
  const box = $("#waterfall");
  const resp = await api(`/v1/traces/${traceId}`);
  if (!resp.ok) return;
  const trace = await resp.json();
  $("#trace-panel").hidden = false;
  box.hidden = false;
  box.dataset.trace = traceId;
  box.textContent = "";
  const t0 = Math.min(...trace.spans.map((s) => s.start_ns));
  const total = Math.max(...trace.spans.map((s) => s.end_ns)) - t0 || 1;
  const children = {};
  const ids = new Set(trace.spans.map((s) => s.span_id));
  for (const s of trace.spans) {
    const parent = ids.has(s.parent_id) ? s.parent_id : "";
    (children[parent] = children[parent] || []).push(s);
  }
  box.append(el("p", {class: "muted small",
                      text: `trace ${traceId} · ${trace.function} · ${ms(total / 1e6)}`}));
  const rows = [];
  const walk = (parent, depth) => {
    for (const s of (children[parent] || []).sort((a, b) => a.start_ns - b.start_ns)) {
      rows.push([s, depth]);
      walk(s.span_id, depth + 1);
    }
  };
  walk("", 0);
  for (const [s, depth] of rows) {
    const left = (100 * (s.start_ns - t0) / total).toFixed(2);
    const width = (100 * (s.end_ns - s.start_ns) / total).toFixed(2);
    const bar = el("span", {class: `span-bar${s.error ? " err" : ""}`,
                            style: `left:${left}%;width:${width}%;background:${COMPONENT_COLORS[s.component] || "#888"}`,
                            title: `${s.name} (${s.component}) ${ms(s.duration_ms)}${s.error ? ` · ${s.error}` : ""}`});
    box.append(el("div", {class: "span-row", "data-span": s.name},
      el("span", {class: "span-name", style: `padding-left:${depth}rem`, text: s.name}),
      el("span", {class: "span-track"}, bar),
      el("span", {class: "span-ms", text: ms(s.duration_ms)})));
  }
  const legend = el("div", {class: "legend"});
  for (const [k, c] of Object.entries(COMPONENT_COLORS)) {
    legend.append(el("span", {}, el("i", {style: `background:${c}`}), k));
  }
  box.append(legend);
}

// ---- schedules: the function's cron schedules and their recent runs (docs/schedules.md) -----

const SCHEDULES_REFRESH_MS = 10000;
const OUTCOME_BADGES = {succeeded: "ok", failed: "err", refused: "err", cancelled: "err",
  expired: "err", skipped: "building", queued: "building", running: "building"};
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
const seconds = (v) => (v === null || v === undefined ? "—" : `${v.toFixed(2)} s`);

function outcomeBadge(outcome) {
  return outcome ? badge(outcome, OUTCOME_BADGES[outcome] || "") : el("span", {class: "muted", text: "—"});
}

// GET /v1/schedules for the function, and its runs: GET /v1/invocations?source=schedule.
async function loadSchedules(name) {
  if (state.schedulesFor !== name) $("#schedule-panel").hidden = true;
  state.schedulesFor = name;
  state.schedulesAt = Date.now();
  const q = encodeURIComponent(name);
  try {
    const [listed, runs] = await Promise.all([api(`/v1/schedules?function=${q}`),
      api(`/v1/invocations?function=${q}&source=schedule&limit=10`)]);
    if (!listed.ok || state.selected !== name) return;
    const {schedules} = await listed.json();
    const tbody = $("#schedules tbody");
    tbody.textContent = "";
    for (const s of schedules) {
      const last = el("td", {text: when(s.last_run_at)});
      if (s.last_invocation_id) last.title = s.last_invocation_id;
      tbody.append(el("tr", {"data-schedule": s.id},
        el("td", {}, el("code", {text: s.cron})), el("td", {text: s.timezone}),
        el("td", {text: s.enabled ? "yes" : "no"}), el("td", {text: when(s.next_run_at)}),
        last, el("td", {class: "outcome"}, outcomeBadge(s.last_outcome)),
        el("td", {}, el("code", {text: JSON.stringify(s.input)}))));
    }
    $("#schedule-panel").hidden = schedules.length === 0;
    if (!runs.ok) return;
    const {invocations} = await runs.json();
    if (state.selected !== name) return;
    const body = $("#scheduled-runs tbody");
    body.textContent = "";
    $("#no-scheduled-runs").hidden = invocations.length > 0;
    for (const r of invocations) {
      const status = outcomeBadge(r.status);
      if (r.error) status.title = `${r.error.code}: ${r.error.message}`;
      body.append(el("tr", {"data-id": r.id},
        el("td", {text: when(r.created_at)}), el("td", {}, status),
        el("td", {}, r.start ? badge(r.start) : el("span", {class: "muted", text: "—"})),
        el("td", {class: "num", text: seconds(r.timings.queued_seconds)}),
        el("td", {class: "num", text: seconds(r.timings.run_seconds)}),
        el("td", {}, el("code", {text: r.id}))));
    }
  } catch { /* the panel stays as it was */ }
}

// ---- logs (live tail) ----------------------------------------------------------------------

function stopLogs() {
  if (state.logs) state.logs.abort();
  state.logs = null;
  state.logsFor = "";
}

function logLine(raw) {
  try {
    const r = JSON.parse(raw);
    const who = r.instance ? ` ${String(r.instance).slice(-6)}` : "";
    return `${r.time ? clock(r.time) : ""}${who} ${r.stream || ""}: ${r.line ?? raw}\n`;
  } catch {
    return `${raw}\n`;
  }
}

async function startLogs(name) {
  stopLogs();
  const controller = new AbortController();
  state.logs = controller;
  state.logsFor = name;
  const pre = $("#logs");
  pre.textContent = "";
  $("#logs-state").textContent = "following…";
  try {
    const resp = await api(`/v1/functions/${encodeURIComponent(name)}/logs?follow=true`,
                           {signal: controller.signal});
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      pre.textContent = body.error ? body.error.message : `HTTP ${resp.status}`;
      $("#logs-state").textContent = "";
      return;
    }
    // NDJSON (gateway/logs.py): {"time", "instance", "stream", "line"} per line.
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let partial = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      const lines = (partial + decoder.decode(value, {stream: true})).split("\n");
      partial = lines.pop();
      pre.textContent += lines.filter((l) => l.trim()).map(logLine).join("");
      if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-100000);
      pre.scrollTop = pre.scrollHeight;
    }
    $("#logs-state").textContent = "ended";
  } catch (err) {
    if (err.name !== "AbortError") $("#logs-state").textContent = `stopped: ${err.message}`;
  }
}

// ---- one call's logs ------------------------------------------------------------------------

// What the handler printed during one call (GET /v1/functions/{name}/logs?request=ID). The
// node reads an instance's output a few times a second: asked again while none has come.
const CALL_LOGS_TRIES = 12;
const CALL_LOGS_RETRY_MS = 400;

async function showCallLogs(name, requestId) {
  const pre = $("#call-logs");
  const stateEl = $("#call-logs-state");
  if (!requestId) return;
  pre.dataset.request = requestId;
  pre.textContent = "";
  stateEl.textContent = `request ${requestId}…`;
  const url = `/v1/functions/${encodeURIComponent(name)}/logs?request=${encodeURIComponent(requestId)}`;
  let lines = [];
  for (let i = 0; i < CALL_LOGS_TRIES; i++) {
    if (i) await new Promise((done) => setTimeout(done, CALL_LOGS_RETRY_MS));
    if (pre.dataset.request !== requestId) return;  // another call was chosen meanwhile
    let resp;
    try { resp = await api(url); } catch (err) { stateEl.textContent = `unavailable: ${err.message}`; return; }
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      stateEl.textContent = body.error ? body.error.message : `HTTP ${resp.status}`;
      return;
    }
    const found = (await resp.text()).split("\n").filter((l) => l.trim());
    // Once lines have come, one more read picks up the ones the node had not yet read.
    if (found.length && found.length === lines.length) break;
    lines = found;
  }
  if (pre.dataset.request !== requestId) return;
  pre.textContent = lines.map(logLine).join("");
  stateEl.textContent = `request ${requestId}: ${lines.length} line${lines.length === 1 ? "" : "s"}`;
}

// ---- usage -----------------------------------------------------------------------------------

async function loadUsage() {
  state.usageAt = Date.now();
  const box = $("#usage");
  try {
    const resp = await api("/v1/usage");
    const body = await resp.json();
    if (!resp.ok) { box.textContent = body.error ? body.error.message : `HTTP ${resp.status}`; return; }
    // GET /v1/usage (gateway/usage.py): rows per function over the last day.
    const rows = body.rows || [];
    box.textContent = "";
    box.append(el("p", {class: "muted small", text: `last 24 h, per function (metered)`}));
    if (!rows.length) { box.append(el("p", {class: "muted", text: "No usage recorded yet."})); return; }
    // Cost (an exact decimal string) shows once calls are priced (docs/usage.md).
    const priced = body.priced || (body.totals && body.totals.cost_nanos > 0);
    const cost = priced ? [["cost", `cost ${body.currency}`, costText]] : [];
    const cols = [["key", "function", (v) => v], ["invocations", "calls", (v) => v],
                  ["cold_starts", "cold", (v) => v], ["wall_seconds", "wall s", (v) => v.toFixed(2)],
                  ["gib_seconds", "GiB·s", (v) => v.toFixed(2)], ...cost];
    box.append(usageTable(cols, [...rows, {...body.totals, key: "total"}], "usage-by-function"));
    if (!priced) return;
    // Cost per UTC day over the last week.
    const week = await api(`/v1/usage?group_by=day&from=${Math.floor(Date.now() / 1000) - 6 * 86400}`);
    if (!week.ok) return;
    const days = await week.json();
    box.append(el("p", {class: "muted small", text: "per day (UTC)"}));
    box.append(usageTable([["key", "day", (v) => v.slice(0, 10)], ["invocations", "calls", (v) => v],
                           ["cost", `cost ${days.currency}`, costText]],
                          days.rows || [], "usage-by-day"));
  } catch (err) {
    box.textContent = `usage unavailable: ${err.message}`;
  }
}

function costText(v) {
  // "0.001234500" -> "0.0012345": the exact figure, without trailing zeros.
  return String(v ?? "0").replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

function usageTable(cols, rows, id) {
  const table = el("table", {id}, el("thead", {}, el("tr", {}, ...cols.map(([, h]) => el("th", {text: h})))));
  const tbody = el("tbody");
  for (const r of rows) {
    tbody.append(el("tr", {}, ...cols.map(([k, , f]) => el("td", {class: k === "key" ? "" : "num", text: f(r[k] ?? 0)}))));
  }
  table.append(tbody);
  return table;
}

// ---- keys: the tenant's API keys and their budgets (an admin key only) -----------------------

function budgetText(b) {
  const set = Object.entries(b || {}).filter(([, v]) => v).map(([k, v]) => `${k}=${v}`);
  return set.length ? set.join(" ") : "—";
}

async function loadKeys() {
  state.keysAt = Date.now();
  const panel = $("#keys-panel");
  const box = $("#keys");
  try {
    const resp = await api("/v1/keys");
    // Only a tenant's admin keys may list keys: the panel stays hidden for the others.
    if (resp.status === 403) { panel.hidden = true; return; }
    const body = await resp.json();
    panel.hidden = false;
    box.textContent = "";
    if (!resp.ok) { box.textContent = body.error ? body.error.message : `HTTP ${resp.status}`; return; }
    const live = (body.keys || []).filter((k) => !k.revoked_at);
    if (!live.length) { box.append(el("p", {class: "muted", text: "No live keys."})); return; }
    const table = el("table", {}, el("thead", {}, el("tr", {},
      ...["key", "scopes", "budgets"].map((h) => el("th", {text: h})))));
    const tbody = el("tbody");
    for (const k of live) {
      tbody.append(el("tr", {"data-key": k.id},
        el("td", {text: k.name ? `${k.name} (${k.id})` : k.id}),
        el("td", {text: k.scopes.join(",")}),
        el("td", {class: "budgets", text: budgetText(k.budgets)})));
    }
    table.append(tbody);
    box.append(el("p", {class: "muted small", text: "budgets: r = requests, t = tokens, per minute / day"}), table);
  } catch (err) {
    box.textContent = `keys unavailable: ${err.message}`;
  }
}

// ---- admin: nodes, packing map, pinned tier, alerts ---------------------------------------

function renderAdmin(snap) {
  const box = $("#nodes");
  box.textContent = "";
  if (!snap.nodes.length) box.append(el("p", {class: "muted", text: "No nodes registered."}));
  for (const n of snap.nodes) box.append(nodeCard(n));
  renderAlerts(snap.alerts);
  const events = $("#events");
  events.textContent = "";
  if (!snap.events.length) events.append(el("li", {class: "muted", text: "No events yet."}));
  for (const e of snap.events) {
    events.append(el("li", {}, el("span", {class: "muted small", text: `${clock(e.time)} `}),
      badge(e.kind, /lost|critical|emergency|failed/.test(e.kind) ? "err" : "normal"), " ", e.message));
  }
}

function alertItem(a, time) {
  const cls = a.state === "resolved" ? "ok" : a.state === "pending" ? "building" : "err";
  return el("li", {"data-alert": a.alert},
    el("span", {class: "muted small", text: `${time ? clock(time) : ""} `}),
    badge(a.state, cls), " ", badge(a.severity, a.severity === "critical" ? "err" : "building"),
    " ", el("strong", {text: a.alert}), " ", el("span", {class: "muted", text: a.subject}),
    el("div", {class: "small", text: a.message}));
}

function renderAlerts(alerts) {
  const box = $("#alerts");
  box.textContent = "";
  if (!alerts) {
    box.append(el("li", {class: "muted", text: "Alerting is not running on this gateway."}));
    return;
  }
  if (!alerts.active.length) box.append(el("li", {class: "muted", text: "No alerts active."}));
  for (const a of alerts.active) box.append(alertItem(a, a.started_at || a.since));
  if (alerts.recent.length) {
    box.append(el("li", {class: "muted small", text: "Latest transitions"}));
    for (const a of alerts.recent) box.append(alertItem(a, a.time));
  }
}

function nodeCard(n) {
  const card = el("div", {class: "node", "data-node": n.id});
  card.append(el("header", {},
    el("h3", {text: n.id}), badge(n.state), badge(`pressure: ${n.pressure}`, n.pressure),
    el("span", {class: "muted small", text:
      `${n.instances} instances · CPU ${n.telemetry.cpu_percent.toFixed(0)}% · RAM ` +
      `${bytes(n.telemetry.memory_used_bytes)} / ${bytes(n.telemetry.memory_total_bytes)} · ` +
      `heartbeat ${n.last_heartbeat_age_seconds.toFixed(1)}s ago · disk ${bytes(n.disk_bytes)}`})));
  const seen = new Map();
  for (const d of n.devices) {
    const bar = el("div", {class: "bar", title: `${d.id}: ${bytes(d.used_bytes)} of ${bytes(d.capacity_bytes)}`});
    for (const s of n.slices.filter((x) => x.device_id === d.id)) {
      const name = s.function.split("/").pop();
      seen.set(s.function, colorOf(s.function));
      bar.append(el("span", {class: "slice", "data-function": s.function,
        style: `width:${(100 * s.size_bytes / d.capacity_bytes).toFixed(3)}%;background:${colorOf(s.function)}`,
        title: `${s.function} · ${s.instance_id} · ${bytes(s.size_bytes)}`, text: `${name} ${bytes(s.size_bytes)}`}));
    }
    const level = (n.pressures.find((p) => p.resource === `device:${d.id}`) || {}).level;
    card.append(el("div", {class: "device"},
      el("span", {}, el("strong", {text: d.id}), " ", el("span", {class: "muted small", text: d.kind})),
      bar, el("span", {class: "free", text: `${bytes(d.capacity_bytes - d.used_bytes)} free of ${bytes(d.capacity_bytes)}${level && level !== "normal" ? " · " + level : ""}`})));
  }
  const pinned = n.pinned;
  const pinnedLevel = (n.pressures.find((p) => p.resource === "pinned") || {}).level || "normal";
  const fill = pinned.capacity_bytes ? 100 * pinned.used_bytes / pinned.capacity_bytes : 0;
  card.append(el("div", {class: "device"},
    el("span", {}, el("strong", {text: "pinned"}), " ", el("span", {class: "muted small", text: "host RAM"})),
    el("div", {class: "bar", title: `${pinned.snapshots} snapshots, ${pinned.chunks} chunks`},
      el("span", {style: `width:${fill.toFixed(2)}%;background:${pinnedLevel === "normal" ? "#4456a6" : "#d98a00"}`,
                  text: fill > 12 ? `${pinned.snapshots} snapshots` : ""})),
    el("span", {class: "free", text: `${bytes(pinned.used_bytes)} / ${bytes(pinned.capacity_bytes)} · ${pinned.snapshots} snapshots · ${pinnedLevel}`})));
  if (seen.size) {
    const legend = el("div", {class: "legend"});
    for (const [fn, color] of seen) legend.append(el("span", {}, el("i", {style: `background:${color}`}), fn));
    card.append(legend);
  }
  return card;
}

// ---- wiring ----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("#signin-error").textContent = "";
    connect($("#key").value.trim());
  });
  $("#signout").addEventListener("click", () => signOut());
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => show(b.dataset.view));
  }
  $("#deploy-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("#bundle").files[0];
    if (file) deploy(file);
  });
  $("#deploy-url .copy").addEventListener("click", (e) =>
    copy($("#deploy-url code").textContent, e.currentTarget));
  $("#invoke-form").addEventListener("submit", (e) => {
    e.preventDefault();
    invokeSelected($("#invoke-body").value);
  });
  const saved = sessionStorage.getItem(KEY_STORE);
  if (saved) connect(saved);
});
