// covidcxr web page: upload one file, show the prediction. Plain JS, no build step.
// Everything from the server is written with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { authRequired: false, maxUploadMb: null, busy: false };

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function errorText(response) {
  // FastAPI errors are {"detail": "..."} or, for validation, {"detail": [{msg, loc}, ...]}.
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  } catch (_) { /* not JSON */ }
  return response.statusText || "unknown error";
}

// Extra advice where the server's own message does not say what to do next.
const STATUS_HINT = {
  401: "This server needs an API key: enter it above and try again.",
  503: "Wait a few seconds and try again.",
};

async function loadModelInfo() {
  try {
    const health = await (await fetch("/healthz")).json();
    state.authRequired = !!health.auth_required;
    $("key-row").hidden = !state.authRequired;
    const saved = sessionStorage.getItem("covidcxr-key");
    if (saved) $("api-key").value = saved;
  } catch (_) {
    $("model-info").textContent = "The server could not be reached.";
    return;
  }
  const r = await fetch("/v1/model", { headers: apiHeaders() });
  if (!r.ok) {
    $("model-info").textContent = r.status === 401 ? "Enter the API key to see the model." : "Model information unavailable.";
    return;
  }
  const card = await r.json();
  state.maxUploadMb = card.limits ? card.limits.max_upload_mb : null;
  const thr = card.decision_rule ? `decision rule: ${card.decision_rule.text}`
    : (card.threshold === null ? "argmax" : `COVID-19 threshold ${card.threshold.toFixed(4)}`);
  $("model-info").textContent =
    `Model ${card.name} (${card.arch}, version ${card.version}, ${card.backend}) · classes: ${card.classes.join(", ")} · ${thr}`;
}

function renderBars(probabilities, label, threshold) {
  const box = $("probabilities");
  box.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = "bar-row";
    if (name === label) row.classList.add("top");
    if (name === "COVID-19") row.classList.add("covid");
    row.dataset.class = name;
    const n = document.createElement("span");
    n.className = "bar-name";
    n.textContent = name;
    const track = document.createElement("div");
    track.className = "bar-track";
    track.setAttribute("role", "meter");
    track.setAttribute("aria-label", `${name} probability`);
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "100");
    track.setAttribute("aria-valuenow", (100 * p).toFixed(1));
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.appendChild(fill);
    if (name === "COVID-19" && threshold !== null) {
      const mark = document.createElement("div");
      mark.className = "bar-threshold";
      mark.style.left = `${(100 * threshold).toFixed(1)}%`;
      mark.title = `operating threshold ${threshold.toFixed(2)}`;
      track.appendChild(mark);
    }
    const v = document.createElement("span");
    v.className = "bar-value";
    v.textContent = `${(100 * p).toFixed(1)} %`;
    row.append(n, track, v);
    box.appendChild(row);
  }
}

function renderSeverity(severity, note) {
  const box = $("severity");
  box.replaceChildren();
  if (!severity) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = note || "Not available.";
    box.appendChild(p);
    return;
  }
  const dl = document.createElement("dl");
  const add = (k, v) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  };
  const ranges = severity.ranges || {};
  for (const [k, v] of Object.entries(severity)) {
    if (k === "ranges" || k === "task") continue;
    if (k === "probabilities" && typeof v === "object") {
      for (const [c, p] of Object.entries(v)) add(`P(${c})`, `${(100 * p).toFixed(1)} %`);
    } else if (typeof v === "number") {
      const r = ranges[k];
      add(k.replace(/_/g, " "), r ? `${v.toFixed(2)} (scale ${r[0]}–${r[1]})` : v.toFixed(2));
    } else {
      add(k.replace(/_/g, " "), String(v));
    }
  }
  box.appendChild(dl);
}

function renderResult(res, fileName) {
  $("result").hidden = false;
  const label = $("label");
  const implausible = res.flag === "not_a_frontal_cxr";
  label.textContent = implausible && res.label === "not_a_frontal_cxr" ? "not a frontal chest X-ray" : res.label;
  // a site-calibrated model's conformal set of several classes (or none) is a referral, not a diagnosis
  if (res.referral) {
    const set = (res.prediction_set || []).join(", ") || "no class";
    label.textContent = `${res.referral} (${set}); model label: ${label.textContent}`;
  }
  label.classList.toggle("uncertain", Boolean(res.referral));
  label.classList.toggle("covid", res.label === "COVID-19");
  label.classList.toggle("implausible", implausible);
  // the same rule and threshold as evaluate, predict and the model card, with its value
  const rule = res.decision_rule || (res.threshold === null ? "argmax: the most probable class"
    : `COVID-19 if p(COVID-19) >= ${res.threshold.toFixed(4)}, else the most probable other class`);
  const plaus = res.plausibility
    ? (implausible ? ` Flagged: ${res.plausibility.reason}; no disease label is given.`
       : (res.plausibility.verdict === "unchecked" ? ` Plausibility: ${res.plausibility.reason}.` : ""))
    : "";
  $("threshold").textContent = `Decision rule: ${rule}${res.threshold === null ? "" : " (black mark)"}.${plaus}`;
  renderBars(res.probabilities, res.label, res.threshold);
  renderSeverity(res.severity, res.severity_note);
  if (res.image_png) $("xray").src = `data:image/png;base64,${res.image_png}`;
  const heat = $("heatmap");
  if (res.heatmap_png) {
    heat.src = `data:image/png;base64,${res.heatmap_png}`;
    heat.hidden = !$("show-heatmap").checked;
    $("show-heatmap").disabled = false;
    $("heatmap-note").textContent = "Grad-CAM: regions that raised the predicted class.";
  } else {
    heat.removeAttribute("src");
    heat.hidden = true;
    $("show-heatmap").disabled = true;
    $("heatmap-note").textContent = res.heatmap_note || "No heatmap.";
  }
  const i = res.input;
  $("input-info").textContent =
    `${fileName}: ${i.format.toUpperCase()}, ${i.width} × ${i.height} px, ${(i.bytes / 1024).toFixed(0)} KiB · ` +
    `analysed in ${res.elapsed_ms.toFixed(0)} ms by ${res.model.name} (${res.model.version})`;
  $("status").textContent = `Done: ${fileName}`;
}

async function analyse(file) {
  if (!file || state.busy) return;
  clearError();
  if (state.maxUploadMb && file.size > state.maxUploadMb * 1e6) {
    showError(`"${file.name}" is ${(file.size / 1e6).toFixed(1)} MB; this server accepts up to ${state.maxUploadMb} MB.`);
    return;
  }
  state.busy = true;
  $("status").textContent = `Analysing ${file.name}…`;
  // hide the previous result so it cannot be mistaken for this file's
  $("result").hidden = true;
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem("covidcxr-key", key);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch("/v1/predict?heatmap=true&image=true", { method: "POST", body: form, headers: apiHeaders() });
    if (!r.ok) {
      const detail = await errorText(r);
      const hint = STATUS_HINT[r.status] ? ` ${STATUS_HINT[r.status]}` : "";
      showError(`Could not analyse "${file.name}" (HTTP ${r.status}): ${detail.replace(/\.$/, "")}.${hint}`);
      return;
    }
    renderResult(await r.json(), file.name);
  } catch (err) {
    showError(`Could not reach the server: ${err.message}`);
  } finally {
    state.busy = false;
  }
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => analyse(e.target.files[0]));
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    $("file").value = "";  // the chooser must not keep showing an older file's name
    analyse(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  $("show-heatmap").addEventListener("change", (e) => {
    const heat = $("heatmap");
    if (heat.getAttribute("src")) heat.hidden = !e.target.checked;
  });
  $("heat-opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = String(e.target.value / 100); });
  $("api-key").addEventListener("change", loadModelInfo);
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", setup);
