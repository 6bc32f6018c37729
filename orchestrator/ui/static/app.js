// The dashboard page: renders what the API returns and sends the user's actions to it. No business
// logic lives here: every check and decision is made by the CLI command the server runs.
"use strict";
const CSRF = document.querySelector('meta[name="csrf"]').content;
const view = document.getElementById("view");
let stream = null;  // the one open EventSource, closed when the route changes

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v); else if (v !== null && v !== undefined) el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

async function getJSON(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF}, body: JSON.stringify(body || {})});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function unlisten() {
  if (stream) stream.close();
  stream = null;
  const live = document.getElementById("live");
  live.textContent = ""; live.className = "";
}

function listen(path, handlers) {
  unlisten();
  stream = new EventSource(path);
  const live = document.getElementById("live");
  stream.onopen = () => { live.textContent = "live"; live.className = "on"; };
  stream.onerror = () => { live.textContent = "reconnecting"; live.className = ""; };
  for (const [name, fn] of Object.entries(handlers)) stream.addEventListener(name, e => fn(JSON.parse(e.data)));
}

const duration = s => s === null || s === undefined ? "-" : new Date(s * 1000).toISOString().substr(11, 8);
const num = (v, d) => v === null || v === undefined ? "-" : Number(v).toFixed(d === undefined ? 4 : d);
const statusCell = s => h("span", {class: "status-" + s}, s);
const progress = (step, total) => h("span", {}, h("span", {class: "bar"}, h("span", {style: `width:${total ? Math.min(100, 100 * step / total) : 0}%`})), ` ${step}/${total || "?"}`);

// Run an action button: disable it, show the result or the CLI's error message under the actions.
async function act(button, out, fn) {
  button.disabled = true;
  out.className = "note"; out.textContent = button.textContent + "...";
  try { const r = await fn(); out.className = "note"; out.textContent = r.message || JSON.stringify(r); return r; }
  catch (e) { out.className = "error"; out.textContent = e.message; }
  finally { button.disabled = false; }
}

// --- Jobs ---------------------------------------------------------------------------------------
function jobsPage() {
  view.replaceChildren(h("h2", {}, "Jobs"), h("p", {class: "note"}, "waiting for the first update..."));
  listen("/api/events", {jobs: rows => {
    const table = h("table", {id: "jobs"}, h("tr", {}, ["job", "status", "strategy", "runner", "progress", "loss", "", "tokens/s", "ETA"].map(t => h("th", {}, t))));
    for (const r of rows) table.append(h("tr", {"data-job": r.job_id},
      h("td", {}, h("a", {href: "#/job/" + r.job_id}, r.job_id)), h("td", {}, statusCell(r.status)), h("td", {}, r.strategy),
      h("td", {}, r.runner), h("td", {}, progress(r.step, r.total_steps)), h("td", {}, num(r.loss)),
      h("td", {}, sparkline(r.losses.map(p => p[1]))), h("td", {}, num(r.tokens_per_second, 0)), h("td", {}, duration(r.eta_seconds))));
    view.replaceChildren(h("h2", {}, "Jobs"), rows.length ? table : h("p", {class: "note"}, "No jobs yet: start one under New job, or with `llamafarm finetune start`."));
  }});
}

// --- One job ------------------------------------------------------------------------------------
function jobPage(jobId) {
  const metrics = [];
  const charts = h("div", {class: "cards", id: "charts"});
  const details = h("div", {id: "details"});
  const out = h("div", {id: "action-result"});
  const drawCharts = () => {
    const train = metrics.filter(m => m.loss !== undefined), evals = metrics.filter(m => m.eval_loss !== undefined);
    charts.replaceChildren(
      lineChart([{name: "loss", points: train.map(m => [m.step, m.loss])}, {name: "eval loss", points: evals.map(m => [m.step, m.eval_loss])}], {title: "loss"}),
      lineChart([{name: "learning rate", points: train.filter(m => m.learning_rate !== undefined).map(m => [m.step, m.learning_rate])}], {title: "learning rate"}));
  };
  view.replaceChildren(h("h2", {}, jobId), actionsBar(jobId, out), out, charts, details);
  drawCharts();
  listen(`/api/jobs/${encodeURIComponent(jobId)}/events`, {
    metrics: m => { metrics.length = m.from; metrics.push(...m.records); drawCharts(); },
    job: d => details.replaceChildren(...jobDetails(jobId, d)),
  });
}

function actionsBar(jobId, out) {
  const fmt = h("select", {id: "export-format"}, ["gguf", "ollama", "merged", "adapter-gguf"].map(f => h("option", {value: f}, f)));
  const quant = h("select", {id: "export-quantization"}, h("option", {value: ""}, "(strategy default)"), ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"].map(q => h("option", {value: q}, q)));
  const evalData = h("input", {id: "eval-dataset", size: 40, placeholder: "held-out dataset path"});
  const button = (id, label, fn) => { const b = h("button", {id, onclick: () => act(b, out, fn)}, label); return b; };
  const base = `/api/jobs/${encodeURIComponent(jobId)}/`;
  return h("div", {class: "actions"},
    button("stop", "Stop", () => post(base + "stop")), button("resume", "Resume", () => post(base + "resume")),
    "|", evalData, button("evaluate", "Evaluate", () => post(base + "evaluate", {dataset: evalData.value})),
    "|", fmt, quant, button("export", "Export", () => post(base + "export", {format: fmt.value, quantization: quant.value})),
    "|", h("a", {href: "#/chat/" + jobId}, "Chat"));
}

function jobDetails(jobId, d) {
  const s = d.summary, job = d.job, parts = [];
  parts.push(h("p", {id: "summary"}, statusCell(s.status), "  ", progress(s.step, s.total_steps), `  loss ${num(s.loss)} (first ${num(s.first_loss)})  eval ${num(s.eval_loss)}  ${num(s.tokens_per_second, 0)} tok/s  elapsed ${duration(s.elapsed)}  ETA ${duration(s.eta_seconds)}`));
  if (job.error) parts.push(h("p", {class: "error"}, job.error));
  const decisions = Object.entries(job.decisions || {});
  if (decisions.length) parts.push(h("h3", {}, "Decisions"), h("table", {id: "decisions"}, decisions.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, String(v.value)), h("td", {class: "note"}, v.reason)))));
  const est = job.estimate || {}, meas = job.measured || {};
  parts.push(h("h3", {}, "Estimate and measured"), h("table", {}, h("tr", {}, h("th", {}), h("th", {}, "estimate"), h("th", {}, "measured")),
    h("tr", {}, h("th", {}, "peak memory MB"), h("td", {}, num(est.peak_memory_mb, 0)), h("td", {}, num(meas.peak_rss_mb, 0))),
    h("tr", {}, h("th", {}, "seconds"), h("td", {}, num(est.seconds, 1)), h("td", {}, num(meas.train_seconds, 1)))));
  parts.push(h("h3", {}, "Checkpoints"), h("p", {id: "checkpoints"}, d.checkpoints.join(", ") || "none yet"));
  if (d.evaluation) {
    const e = d.evaluation;
    parts.push(h("h3", {}, "Evaluation"), h("p", {}, `base loss ${num(e.base.loss)} (perplexity ${num(e.base.perplexity, 2)}), fine-tuned ${num(e.fine_tuned.loss)} (perplexity ${num(e.fine_tuned.perplexity, 2)})`),
      h("table", {id: "evaluation"}, h("tr", {}, ["prompt", "base", "fine-tuned", "reference"].map(t => h("th", {}, t))),
        e.samples.map(x => h("tr", {}, h("td", {}, x.prompt), h("td", {}, x.base), h("td", {}, x.fine_tuned), h("td", {}, x.reference)))));
  }
  parts.push(h("h3", {}, "Exports"), d.exports.length ? h("table", {id: "exports"}, d.exports.map(x => h("tr", {}, h("th", {}, x.name), h("td", {}, h("pre", {}, JSON.stringify(x.report, null, 1).slice(0, 1500)))))) : h("p", {class: "note"}, "none yet"));
  parts.push(h("h3", {}, "train.log (tail)"), h("pre", {id: "log"}, d.log_tail));
  return parts;
}

// --- New job ------------------------------------------------------------------------------------
function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj)) {
    const path = prefix ? prefix + "." + k : k;
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) flatten(v, path, out); else out.push([path, v]);
  }
  return out;
}

async function newJobPage() {
  const out = h("div", {id: "action-result"});
  const strategy = h("select", {id: "strategy"});
  const dataset = h("input", {id: "dataset", size: 60, value: "demos/datasets/medical_qa.jsonl"});
  const values = h("table", {id: "values"});
  const report = h("div", {id: "dataset-report"});
  const overrides = () => [...values.querySelectorAll("input.changed")].map(i => `${i.name}=${i.value}`);
  const body = () => ({strategy: strategy.value, dataset: dataset.value, overrides: overrides()});
  const button = (id, label, fn) => { const b = h("button", {id, onclick: () => act(b, out, fn)}, label); return b; };
  view.replaceChildren(h("h2", {}, "New job"),
    h("div", {class: "actions"}, "strategy ", strategy, " dataset ", dataset),
    h("div", {class: "actions"},
      button("validate", "Validate dataset", async () => { const r = await post("/api/dataset", {path: dataset.value, strategy: strategy.value}); showDataset(report, r); return {message: `${r.report.rows} rows, ${r.report.format} format`}; }),
      button("estimate", "Estimate", async () => { const e = await post("/api/estimate", body()); return {message: `peak about ${num(e.peak_memory_mb, 0)} MB, about ${duration(e.seconds)} for ${e.steps} steps` + (e.fits === false ? " (does not fit)" : "")}; }),
      button("start", "Start", async () => { const r = await post("/api/jobs", body()); location.hash = "#/job/" + r.job_id; return r; })),
    out, report, h("h3", {}, "Values (defaults shown; edit to override, as --set does)"), values);
  const list = await getJSON("/api/strategies");
  strategy.replaceChildren(...list.map(s => h("option", {value: s.name}, `${s.name}: ${s.description || ""}`)));
  strategy.value = list.some(s => s.name === "tiny_demo") ? "tiny_demo" : strategy.value;
  const load = async () => {
    const shown = await getJSON("/api/strategies/" + encodeURIComponent(strategy.value));
    values.replaceChildren(...flatten(shown.strategy.fine_tuner.config, "", []).map(([path, v]) => {
      const text = v === null ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v);
      const input = h("input", {name: path, value: text, size: 40, "data-default": text});
      input.addEventListener("input", () => input.classList.toggle("changed", input.value !== text));
      return h("tr", {}, h("th", {}, path), h("td", {}, input));
    }));
  };
  strategy.addEventListener("change", load);
  await load();
}

function showDataset(el, r) {
  const rep = r.report;
  el.replaceChildren(h("p", {}, `${rep.rows} rows, ${rep.format} format; blank lines ${rep.blank_lines}, duplicates ${rep.duplicates}, multi-turn ${rep.multi_turn_rows}` +
    (rep.tokens_p50 !== undefined ? `; tokens p50 ${rep.tokens_p50}, p95 ${rep.tokens_p95}, max ${rep.tokens_max}; over max_seq_length ${rep.over_max_seq_length}` : "")),
    h("table", {id: "preview"}, r.preview.map((msgs, i) => h("tr", {}, h("th", {}, "row " + (i + 1)), h("td", {}, msgs.map(m => h("div", {}, h("b", {}, m.role + ": "), m.content)))))));
}

// --- Chat ---------------------------------------------------------------------------------------
async function chatPage(jobId) {
  unlisten();
  const job = h("select", {id: "chat-job"}), model = h("select", {id: "chat-model"});
  const prompt = h("textarea", {id: "prompt", rows: 3, cols: 80});
  const answer = h("div", {id: "answer"});
  const send = h("button", {id: "send"}, "Send");
  view.replaceChildren(h("h2", {}, "Chat"), h("div", {class: "actions"}, "job ", job, " model ", model), prompt, h("div", {class: "actions"}, send), answer,
    h("p", {class: "note"}, "Each message is answered on its own with the training chat template (greedy), as `llamafarm generate` does."));
  const rows = (await getJSON("/api/jobs")).filter(r => r.status === "completed");
  job.replaceChildren(...rows.map(r => h("option", {value: r.job_id}, r.job_id)));
  if (jobId) job.value = jobId;
  const loadModels = async () => {
    const d = job.value ? await getJSON("/api/jobs/" + encodeURIComponent(job.value)) : {exports: []};
    model.replaceChildren(h("option", {value: ""}, "fine-tuned weights (PyTorch)"), ...d.exports.filter(x => x.gguf).map(x => h("option", {value: x.name}, `${x.name}/${x.gguf} (llama.cpp)`)));
  };
  job.addEventListener("change", loadModels);
  await loadModels();
  send.addEventListener("click", async () => {
    send.disabled = true;
    const turn = h("div", {class: "turn"}, h("b", {}, "you: "), prompt.value, h("br"), h("b", {}, "model: "));
    const reply = h("span", {class: "reply"});
    turn.append(reply); answer.append(turn);
    try {
      const r = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF},
        body: JSON.stringify({job_id: job.value, export: model.value, prompt: prompt.value})});
      if (!r.ok) throw new Error((await r.json()).error);
      const reader = r.body.getReader(), decoder = new TextDecoder();
      for (let c = await reader.read(); !c.done; c = await reader.read()) reply.textContent += decoder.decode(c.value, {stream: true});
    } catch (e) { reply.className = "error"; reply.textContent = e.message; }
    finally { send.disabled = false; turn.dataset.done = "1"; }
  });
}

// --- Compare ------------------------------------------------------------------------------------
async function comparePage() {
  const picked = new Set();
  const chart = h("div", {id: "compare-chart"});
  listen("/api/events", {jobs: rows => {
    const draw = () => chart.replaceChildren(lineChart(rows.filter(r => picked.has(r.job_id)).map(r => ({name: r.job_id, points: r.losses})), {title: "loss", width: 760, height: 320}));
    const boxes = rows.map(r => h("label", {}, h("input", {type: "checkbox", value: r.job_id, ...(picked.has(r.job_id) ? {checked: ""} : {}),
      onchange: e => { e.target.checked ? picked.add(r.job_id) : picked.delete(r.job_id); draw(); }}), " " + r.job_id, h("br")));
    view.replaceChildren(h("h2", {}, "Compare loss curves"), h("div", {id: "compare-jobs"}, boxes), chart);
    draw();
  }});
}

function route() {
  const [, page, arg] = location.hash.split("/");
  if (page === "job" && arg) return jobPage(decodeURIComponent(arg));
  if (page === "new" || page === "chat") unlisten();
  if (page === "new") return newJobPage().catch(e => view.append(h("p", {class: "error"}, e.message)));
  if (page === "chat") return chatPage(arg && decodeURIComponent(arg)).catch(e => view.append(h("p", {class: "error"}, e.message)));
  if (page === "compare") return comparePage();
  return jobsPage();
}
window.addEventListener("hashchange", route);
route();
