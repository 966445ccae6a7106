// lorakit playground, Train view: data file, preview, estimate, start / stop / resume, live curve (server-sent
// events), the run's config as YAML, and its adapter tried in Compare. Uses app.js's helpers ($, api, showError,
// drawChart, selectTab, refreshModels). Every route is /v1/train* (403 unless `lorakit serve --allow-training`).
"use strict";

const train = { run: null, records: new Map(), events: null, prompts: [], timer: null, enabled: false, log: "" };

function trainSettings() {
  const precision = $("train-precision").value;
  return {
    data: $("train-data").value, method: $("train-method").value,
    r: Number($("train-rank").value), lora_alpha: Number($("train-alpha").value),
    target_modules: $("train-targets").value.split(",").map((t) => t.trim()).filter(Boolean),
    variant: $("train-variant").value, quantize: $("train-4bit").checked,
    max_steps: Number($("train-steps").value), lr: Number($("train-lr").value),
    batch_size: Number($("train-batch").value), max_length: Number($("train-max-length").value),
    bf16: precision === "auto" ? "auto" : precision === "bf16",
    rewards: $("train-rewards").value.split(",").map((t) => t.trim()).filter(Boolean),
  };
}

function formatGb(gb) { return `${gb.toFixed(2)} GB`; }

async function refreshTrain() {
  let info;
  try {
    const response = await fetch("/v1/train");
    info = await response.json();
    if (!response.ok) throw new Error((info.error && info.error.message) || `HTTP ${response.status}`);
  } catch (e) {
    train.enabled = false;
    $("train-note").textContent = e.message;
    for (const control of $("train-form").elements) control.disabled = true;
    return;
  }
  train.enabled = true;
  $("train-note").textContent = `Trains an adapter for ${info.model} (the server's base model) with lorakit train, `
    + `one run at a time. Data files under ${info.data_root}; uploads up to `
    + `${(info.upload_limit_bytes / (1 << 20)).toFixed(0)} MiB.`;
  const previous = $("train-data").value;
  $("train-data").replaceChildren(...info.data_files.map((p) => new Option(p, p)));
  if (info.data_files.includes(previous)) $("train-data").value = previous;
  if (!$("train-name").value) $("train-name").value = `run-${new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "")}`;
  if (!train.run && info.runs.length) followRun(info.runs[0].id);
  if ($("train-data").value) schedulePreview();
}

function schedulePreview() {
  clearTimeout(train.timer);
  train.timer = setTimeout(() => previewAndEstimate().catch(() => {}), 300);
}

async function previewAndEstimate() {
  if (!train.enabled || !$("train-data").value) return;
  showError("");
  const settings = trainSettings();
  const shown = await api("POST", "/v1/train/preview", { settings });
  train.prompts = shown.heldout_prompts;
  $("train-preview-note").textContent = shown.log;
  $("train-preview").replaceChildren(...shown.rows.map((pieces) => {
    const item = document.createElement("li");
    for (const piece of pieces) {
      const part = document.createElement(piece.trained ? "mark" : "span");
      part.className = piece.trained ? "trained" : "masked";
      if (piece.part) part.dataset.part = piece.part;
      part.textContent = piece.text;
      item.append(part);
    }
    return item;
  }));
  const estimate = await api("POST", "/v1/train/estimate", { settings });
  $("estimate-parameters").textContent = estimate.trainable_parameters.toLocaleString("en-US");
  $("estimate-size").textContent = formatBytes(estimate.adapter_bytes);
  $("estimate-memory").textContent = formatGb(estimate.predicted_memory_gb.total);
}

async function probe() {
  showError("");
  $("train-probe").disabled = true;
  $("estimate-step").textContent = "measuring...";
  try {
    const estimate = await api("POST", "/v1/train/estimate", { settings: trainSettings(), measure: true });
    $("estimate-probe-memory").textContent = formatGb(estimate.probe.peak_memory_gb);
    $("estimate-step").textContent = `${estimate.probe.seconds_per_step.toFixed(2)} s `
      + `(${estimate.probe.tokens_per_s.toFixed(0)} tokens/s)`;
  } catch (e) {
    $("estimate-step").textContent = "-";
  } finally {
    $("train-probe").disabled = false;
  }
}

async function uploadData() {
  const file = $("train-upload").files[0];
  if (!file) return;
  showError("");
  const response = await fetch(`/v1/train/uploads?filename=${encodeURIComponent(file.name)}`,
    { method: "POST", body: file });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    showError((data.error && data.error.message) || `upload: HTTP ${response.status}`);
    return;
  }
  await refreshTrain();
  $("train-data").value = data.path;
  schedulePreview();
}

async function startRun(event) {
  event.preventDefault();
  showError("");
  $("train-start").disabled = true;
  try {
    const run = await api("POST", "/v1/train/runs", { name: $("train-name").value, settings: trainSettings() });
    followRun(run.id);
  } catch (e) {
    // the error is shown in the page's alert; no run started
  } finally {
    $("train-start").disabled = false;
  }
}

function showStatus(status) {
  const total = status.max_steps ? ` of ${status.max_steps}` : "";
  const rate = status.tokens_per_s ? ` · ${status.tokens_per_s.toFixed(0)} tokens/s` : "";
  const eta = status.status === "running" && status.eta_s !== undefined ? ` · ETA ${status.eta_s.toFixed(0)} s` : "";
  $("train-progress").textContent = `${status.status}: step ${status.step}${total}${rate}${eta}`;
  $("train-progress").dataset.status = status.status;
  $("train-stop").disabled = !["queued", "running"].includes(status.status);
  $("train-resume").disabled = !status.resumable;
  $("train-try").hidden = status.status !== "finished";
}

function followRun(name) {
  if (train.events) train.events.close();
  if (train.run !== name) train.records = new Map();  // a resumed run keeps its points (the stream resends them)
  train.run = name;
  $("train-run-title").textContent = `Run ${name}`;
  $("train-config").href = `/v1/train/runs/${encodeURIComponent(name)}/config.yaml`;
  $("train-config").hidden = false;
  train.log = "";
  const events = new EventSource(`/v1/train/runs/${encodeURIComponent(name)}/events`);
  train.events = events;
  events.addEventListener("metrics", (event) => {
    const record = JSON.parse(event.data);
    train.records.set(record.step, { ...(train.records.get(record.step) || {}), ...record });
    const records = [...train.records.values()].sort((a, b) => a.step - b.step);
    drawChart($("train-chart"), records, "train_loss", "eval_loss");
  });
  events.addEventListener("log", (event) => {
    train.log += JSON.parse(event.data);
    $("train-log").textContent = train.log;
  });
  events.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
  events.addEventListener("end", () => { events.close(); });
  events.onerror = () => { if (events.readyState === EventSource.CLOSED) train.events = null; };
}

async function stopRun() {
  showError("");
  showStatus(await api("POST", `/v1/train/runs/${encodeURIComponent(train.run)}/stop`));
}

async function resumeRun() {
  showError("");
  await api("POST", `/v1/train/runs/${encodeURIComponent(train.run)}/resume`);
  followRun(train.run);
}

// Loads the finished run's adapter and compares it with the base on the first held-out prompt.
async function tryAdapter() {
  showError("");
  const loaded = await api("POST", `/v1/runs/${encodeURIComponent(train.run)}/adapter`);
  await refreshModels();
  const base = (await api("GET", "/v1/adapters")).base;
  $("compare-left").value = base;
  $("compare-right").value = loaded.id;
  $("compare-input").value = train.prompts[0] || "";
  selectTab($("tab-compare"));
  $("compare-form").requestSubmit();
}

window.addEventListener("DOMContentLoaded", () => {
  $("train-form").addEventListener("submit", startRun);
  $("train-form").addEventListener("change", (event) => { if (event.target.id !== "train-upload") schedulePreview(); });
  $("train-upload").addEventListener("change", () => uploadData().catch(() => {}));
  $("train-probe").addEventListener("click", () => probe().catch(() => {}));
  $("train-stop").addEventListener("click", () => stopRun().catch(() => {}));
  $("train-resume").addEventListener("click", () => resumeRun().catch(() => {}));
  $("train-try").addEventListener("click", () => tryAdapter().catch(() => {}));
});
