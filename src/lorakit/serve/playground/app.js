// lorakit playground: plain JavaScript over the server's public API (no framework, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], run: null, runTimer: null };

// --- API --------------------------------------------------------------------------------------------
function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || `${method} ${path}: HTTP ${response.status}`;
    showError(message);
    throw new Error(message);
  }
  return data;
}

// Streams a chat completion (server-sent events); calls onText with each new piece; returns the whole text.
async function streamChat(model, messages, temperature, maxTokens, onText) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, messages, temperature, max_tokens: maxTokens, stream: true }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    const message = (data.error && data.error.message) || `HTTP ${response.status}`;
    showError(message);
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) { text += piece; onText(text); }
      }
    }
  }
  return text;
}

function numberFrom(id, fallback) {
  const value = Number($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

// --- tabs -------------------------------------------------------------------------------------------
function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (tab.id === "tab-runs") refreshRuns();
  if (tab.id === "tab-adapters") refreshAdapters();
  if (tab.id === "tab-train") refreshTrain();  // train.js
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  });
}

// --- models and adapters ----------------------------------------------------------------------------
async function refreshModels() {
  const models = (await api("GET", "/v1/models")).data.map((m) => m.id);
  for (const select of document.querySelectorAll(".model-select")) {
    const previous = select.value;
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(previous)) select.value = previous;
  }
  if ($("compare-right").selectedIndex === 0 && models.length > 1) $("compare-right").selectedIndex = 1;
}

function formatBytes(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`;
}

async function refreshAdapters() {
  const listing = await api("GET", "/v1/adapters");
  $("base-name").textContent = listing.base;
  const rows = listing.data.map((a) => {
    const row = document.createElement("tr");
    row.dataset.adapter = a.id;
    // module names (q_proj, ...), not each layer's full path
    const targets = Array.isArray(a.target_modules)
      ? [...new Set(a.target_modules.map((t) => t.split(".").pop()))].join(", ") : String(a.target_modules);
    for (const value of [a.id, a.peft_type, a.r, a.lora_alpha, targets, a.parameters.toLocaleString(),
      formatBytes(a.bytes)]) {
      const cell = document.createElement("td");
      cell.textContent = value === null || value === undefined ? "" : String(value);
      row.append(cell);
    }
    const action = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Unload";
    button.setAttribute("aria-label", `Unload adapter ${a.id}`);
    button.addEventListener("click", () => unload(a.id));
    action.append(button);
    row.append(action);
    return row;
  });
  $("adapters-table").tBodies[0].replaceChildren(...rows);
  const available = await api("GET", "/v1/adapters/available");
  $("load-paths").replaceChildren(...available.data.map((p) => new Option(p, p)));
  $("load-note").textContent = available.root_enabled
    ? `${available.data.length} adapter directories under the server's adapter root.`
    : "Loading is disabled: start the server with --adapter-root DIR.";
}

async function unload(name) {
  showError("");
  await api("DELETE", `/v1/adapters/${encodeURIComponent(name)}`);
  await Promise.all([refreshModels(), refreshAdapters()]);
}

async function load(event) {
  event.preventDefault();
  showError("");
  await api("POST", "/v1/adapters", { name: $("load-name").value, path: $("load-path").value });
  await Promise.all([refreshModels(), refreshAdapters()]);
}

// --- chat and compare -------------------------------------------------------------------------------
function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : $("chat-model").value;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  $("chat-log").append(item);
  return body;
}

async function sendChat(event) {
  event.preventDefault();
  showError("");
  const content = $("chat-input").value.trim();
  if (!content) return;
  $("chat-input").value = "";
  state.history.push({ role: "user", content });
  addMessage("user", content);
  const target = addMessage("assistant", "");
  target.parentElement.setAttribute("aria-busy", "true");
  $("chat-send").disabled = true;
  try {
    const text = await streamChat($("chat-model").value, state.history, numberFrom("chat-temperature", 0),
      numberFrom("chat-max-tokens", 128), (t) => { target.textContent = t; });
    state.history.push({ role: "assistant", content: text });
  } catch (e) {
    state.history.pop();
  } finally {
    target.parentElement.setAttribute("aria-busy", "false");
    target.parentElement.dataset.done = "true";
    $("chat-send").disabled = false;
  }
}

async function sendCompare(event) {
  event.preventDefault();
  showError("");
  const messages = [{ role: "user", content: $("compare-input").value }];
  const temperature = numberFrom("compare-temperature", 0), maxTokens = numberFrom("compare-max-tokens", 128);
  $("compare-send").disabled = true;
  const sides = ["left", "right"].map((side) => {
    const model = $(`compare-${side}`).value, out = $(`compare-${side}-answer`);
    $(`compare-${side}-name`).textContent = model;
    out.textContent = "";
    delete out.dataset.done;
    return streamChat(model, messages, temperature, maxTokens, (t) => { out.textContent = t; })
      .finally(() => { out.dataset.done = "true"; });
  });
  await Promise.allSettled(sides);  // sent together: the server decodes both in one batch
  $("compare-send").disabled = false;
}

// --- runs -------------------------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

// Draws records[trainKey] as a line and records[evalKey] as dots against step, with min/max labels.
function drawChart(svg, records, trainKey, evalKey) {
  const train = records.filter((r) => typeof r[trainKey] === "number").map((r) => [r.step, r[trainKey]]);
  const held = records.filter((r) => typeof r[evalKey] === "number").map((r) => [r.step, r[evalKey]]);
  const all = train.concat(held);
  svg.replaceChildren();
  if (!all.length) return;
  const [w, h, left, bottom, pad] = [640, 260, 48, 28, 12];
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const x = (v) => left + ((v - x0) / ((x1 - x0) || 1)) * (w - left - pad);
  const y = (v) => h - bottom - ((v - y0) / ((y1 - y0) || 1)) * (h - bottom - pad);
  svg.append(svgElement("line", { class: "axis", x1: left, y1: h - bottom, x2: w - pad, y2: h - bottom }),
    svgElement("line", { class: "axis", x1: left, y1: pad, x2: left, y2: h - bottom }));
  const labels = [[left - 4, y(y1) + 4, y1.toFixed(3), "end"], [left - 4, y(y0), y0.toFixed(3), "end"],
    [left, h - 8, `step ${x0}`, "start"], [w - pad, h - 8, `step ${x1}`, "end"]];
  for (const [lx, ly, text, anchor] of labels) {
    const label = svgElement("text", { x: lx, y: ly, "text-anchor": anchor });
    label.textContent = text;
    svg.append(label);
  }
  svg.append(svgElement("polyline", { class: "train", "data-points": train.length,
    points: train.map(([a, b]) => `${x(a).toFixed(1)},${y(b).toFixed(1)}`).join(" ") }));
  for (const [a, b] of held) svg.append(svgElement("circle", { class: "eval", cx: x(a), cy: y(b), r: 3.5 }));
}

async function refreshRuns() {
  const runs = (await api("GET", "/v1/runs")).data;
  $("runs-note").textContent = runs.length ? "" : "No runs: start the server with --runs DIR (default runs/).";
  $("runs-list").replaceChildren(...runs.map((run) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.run = run.id;
    button.textContent = `${run.id} (${run.method}, ${run.status})`;
    button.setAttribute("aria-current", String(state.run === run.id));
    button.addEventListener("click", () => showRun(run.id));
    item.append(button);
    return item;
  }));
}

async function showRun(name) {
  state.run = name;
  clearTimeout(state.runTimer);
  const run = await api("GET", `/v1/runs/${encodeURIComponent(name)}`);
  if (state.run !== name) return;
  $("run-title").textContent = run.id;
  const total = run.max_steps ? ` of ${run.max_steps}` : "";
  $("run-status").textContent = `${run.method}, ${run.status}: step ${run.step}${total}`;
  $("run-load").hidden = !run.has_adapter;
  drawChart($("loss-chart"), run.metrics, "train_loss", "eval_loss");
  const preference = run.metrics.some((r) => "rewards/margins" in r);
  const grpo = run.metrics.some((r) => "reward_std" in r);  // method grpo: the reward itself
  $("reward-figure").hidden = !(preference || grpo);
  $("reward-chart").setAttribute("aria-label", grpo ? "Reward against step" : "Reward margin against step");
  $("reward-caption").textContent = grpo ? "Reward: sampled rollouts (line) and held-out prompts, greedy (dots)"
    : "Reward margin: train (line) and held-out (dots)";
  if (preference) drawChart($("reward-chart"), run.metrics, "rewards/margins", "eval_rewards/margins");
  else if (grpo) drawChart($("reward-chart"), run.metrics, "reward", "eval_reward");
  $("run-config").textContent = JSON.stringify(run.config, null, 2);
  for (const b of document.querySelectorAll("#runs-list button")) {
    b.setAttribute("aria-current", String(b.dataset.run === name));
  }
  if (run.status === "training") state.runTimer = setTimeout(() => showRun(name), 2000);  // live progress
}

async function loadRunAdapter() {
  showError("");
  const loaded = await api("POST", `/v1/runs/${encodeURIComponent(state.run)}/adapter`);
  await refreshModels();
  $("chat-model").value = loaded.id;
  selectTab($("tab-chat"));
}

// --- start ------------------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", () => {
  setUpTabs();
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-clear").addEventListener("click", () => { state.history = []; $("chat-log").replaceChildren(); });
  $("compare-form").addEventListener("submit", sendCompare);
  $("load-form").addEventListener("submit", (event) => load(event).catch(() => {}));
  $("run-load").addEventListener("click", () => loadRunAdapter().catch(() => {}));
  refreshModels().catch(() => {});
});
