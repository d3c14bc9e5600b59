// snakenode dashboard: polls this node's read-only API once a second and renders it.
// Everything shown comes from other peers' gossip too, so text goes through textContent, never innerHTML.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const state = { jobId: null, records: [], total: 0, status: null, peers: [], jobs: [], progress: {} };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
const short = (pid) => (pid ? pid.slice(-8) : "-");
const fmtNum = (x, d = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(d) : "-");
function fmtBytes(n) {
  if (typeof n !== "number") return "-";
  const u = ["B", "KB", "MB", "GB"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
function fmtMetric(m) {
  if (!m) return "-";
  if ("accuracy" in m) return `acc ${fmtNum(m.accuracy)}`;
  if ("perplexity" in m) return `ppl ${fmtNum(m.perplexity, 2)}`;
  return `loss ${fmtNum(m.loss)}`;
}
function metricValue(m) {
  if (!m) return null;
  if ("accuracy" in m) return m.accuracy;
  if ("perplexity" in m) return m.perplexity;
  return typeof m.loss === "number" ? m.loss : null;
}
// A stable colour per peer, so one node's hops look alike across laps.
function colour(pid) {
  let h = 0;
  for (const c of pid || "") h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${h % 360} 55% 38%)`;
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// ---------------------------------------------------------------------------------------------- data
async function poll() {
  const [status, peers, jobs, progress, lag] = await Promise.all([
    getJSON("/api/status"), getJSON("/api/peers"), getJSON("/api/jobs"), getJSON("/api/progress"), getJSON("/api/lag"),
  ]);
  Object.assign(state, { status, peers, jobs, progress, lag });
  const chosen = $("job-select").value;
  const running = jobs.filter((j) => j.status === "running");
  const want = jobs.some((j) => j.job_id === chosen) ? chosen
    : (running.length ? running[running.length - 1] : jobs[jobs.length - 1] || {}).job_id || null;
  if (want !== state.jobId) { state.jobId = want; state.records = []; state.total = 0; }
  if (state.jobId) {
    const d = await getJSON(`/api/jobs/${state.jobId}?since=${state.total}`);
    state.records.push(...d.records);
    state.total = d.total;
    state.detail = d;
  }
}

// One row per hop of the surviving run: the latest attempt's trained record, and its received record.
function hops(records) {
  const trained = new Map(), received = new Map();
  for (const r of records) {
    const map = r.event === "trained" ? trained : r.event === "received" ? received : null;
    if (!map) continue;
    const prev = map.get(r.hop);
    if (!prev || r.attempt >= prev.attempt) map.set(r.hop, r);
  }
  const out = [];
  // The hop in progress: received (gossiped at once) but not trained yet.
  const lastTrained = trained.size ? Math.max(...trained.keys()) : -1;
  const pending = [...received.values()].filter((r) => r.hop > lastTrained).sort((a, b) => b.hop - a.hop)[0];
  for (const hop of [...trained.keys()].sort((a, b) => a - b)) {
    const t = trained.get(hop), rec = received.get(hop), before = trained.get(hop - 1);
    out.push({
      hop, lap: t.lap, holder: t.holder, window: t.window, metric: metricValue(t.metrics_after),
      metrics: t.metrics_after, bytes: rec ? rec.bytes.bundle_in : null,
      handoff: rec && before && rec.t_recv && before.t_train_end ? Math.max(0, rec.t_recv - before.t_train_end) : null,
    });
  }
  if (pending) {
    out.push({ hop: pending.hop, lap: pending.lap, holder: pending.holder, window: pending.window, metric: null,
      metrics: null, bytes: pending.bytes.bundle_in, handoff: null, pending: true });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------- render
function renderHeader() {
  const s = state.status;
  $("node-id").textContent = `${s.role} ${short(s.peer_id)}`;
  $("node-id").title = s.peer_id;
  const kind = (s.state && s.state.kind) || "idle";
  $("node-state").textContent = kind + (s.state && s.state.hop != null ? ` hop ${s.state.hop}` : "");
  $("node-state").className = `pill ${kind}`;
  const lag = state.lag || {};
  $("lag").textContent = lag.p99_s == null ? "" : `loop lag p50 ${(lag.p50_s * 1000).toFixed(1)} ms · p99 ${(lag.p99_s * 1000).toFixed(1)} ms`;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("updated").classList.remove("stale");
}

function renderJobSelect() {
  const sel = $("job-select");
  const ids = state.jobs.map((j) => j.job_id).join(",");
  if (sel.dataset.ids !== ids) {
    sel.replaceChildren(...state.jobs.map((j) => el("option", { value: j.job_id, text: `${j.name || "job"} ${j.job_id.slice(0, 8)} (${j.status})` })));
    sel.dataset.ids = ids;
  }
  if (state.jobId) sel.value = state.jobId;
}

function renderJob() {
  const job = state.jobs.find((j) => j.job_id === state.jobId);
  $("no-job").hidden = !!job;
  $("job-body").hidden = !job;
  if (!job) return null;
  const rows = hops(state.records);
  const trainedRows = rows.filter((r) => !r.pending);
  const done = job.completed;
  $("job-status").textContent = job.status + (job.joined ? "" : " (not joined)");
  $("hop-count").textContent = String(trainedRows.length);
  $("hop-count").dataset.hops = String(trainedRows.length);
  // The current holder: the final one, else whoever holds the newest hop (in training or just trained).
  const newest = rows[rows.length - 1];
  const holder = done ? done.holder : newest ? newest.holder : job.holder;
  $("job-lap").textContent = `${done ? done.lap : (newest ? newest.lap : 0) + 1} / ${job.laps}`;
  $("job-holder").textContent = short(holder);
  $("job-holder").title = holder || "";
  const win = newest && !done ? newest.window : job.window;
  $("job-window").textContent = win ? `blocks [${win.start}, ${win.end}) of ${job.blocks}` : "-";
  $("job-metric").textContent = fmtMetric(job.metrics);
  $("job-test").textContent = done ? fmtMetric(done.test) : "pending";
  $("job-model").textContent = `${job.model} · ${job.dataset} · ${job.mode}`;
  renderProgress(job);
  renderSnake(rows, holder, !!done);
  const metricName = job.metrics && "accuracy" in job.metrics ? "accuracy" : "";
  lineChart($("chart-metric"), trainedRows.map((r) => r.metric), done ? metricValue(done.test) : null, metricName);
  barChart($("chart-bytes"), trainedRows.map((r) => r.bytes), fmtBytes);
  barChart($("chart-handoff"), trainedRows.map((r) => r.handoff), (x) => x.toFixed(2));
  return holder;
}

function renderProgress(job) {
  const s = state.status.state || {};
  const p = s.kind === "training" && s.job === job.job_id ? state.progress[job.job_id] : null;
  $("progress").hidden = !p;
  if (!p) return;
  $("prog-epoch").textContent = p.epoch == null ? "-" : String(p.epoch);
  $("prog-step").textContent = p.step == null ? "-" : String(p.step);
  $("prog-loss").textContent = fmtNum(p.loss);
  $("prog-rate").textContent = p.samples_per_s == null ? "-" : p.samples_per_s.toFixed(0);
}

function renderSnake(rows, holder, done) {
  const laps = new Map();
  for (const r of rows) { if (!laps.has(r.lap)) laps.set(r.lap, []); laps.get(r.lap).push(r); }
  const last = rows[rows.length - 1];
  const children = [];
  for (const [lap, list] of [...laps.entries()].sort((a, b) => a[0] - b[0])) {
    const cells = list.map((r) => {
      const cell = el("div", { class: r.pending ? "hop pending" : "hop", "data-hop": String(r.hop), "data-holder": r.holder, title: `hop ${r.hop} on ${r.holder}\n${fmtMetric(r.metrics)}` },
        el("div", { text: `#${r.hop} ${short(r.holder)}` }),
        el("div", { class: "w", text: (r.window ? `[${r.window.start},${r.window.end})` : "") + (r.pending ? " training" : "") }));
      cell.style.background = colour(r.holder);
      if (r === last && r.holder === holder && !done) cell.classList.add("current");
      return cell;
    });
    children.push(el("div", { class: "lap" }, el("span", { class: "lapno", text: `lap ${lap + 1}` }), ...cells));
  }
  $("snake").replaceChildren(...children);
}

function svgEl(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
const W = 320, H = 120, PAD = 22;

function axisLabels(svg, lo, hi, fmt) {
  const top = svgEl("text", { x: 2, y: 10, class: "axis" }); top.textContent = fmt(hi);
  const bottom = svgEl("text", { x: 2, y: H - 4, class: "axis" }); bottom.textContent = fmt(lo);
  svg.append(top, bottom);
}

function lineChart(svg, values, final, name) {
  svg.replaceChildren();
  const pts = values.map((v, i) => [i, v]).filter(([, v]) => typeof v === "number");
  const all = pts.map(([, v]) => v).concat(final == null ? [] : [final]);
  if (!all.length) return;
  let lo = Math.min(...all), hi = Math.max(...all);
  if (name === "accuracy") { lo = Math.min(lo, 0); hi = Math.max(hi, 1); }
  if (hi === lo) hi = lo + 1;
  const n = Math.max(values.length - 1, 1);
  const x = (i) => PAD + (i / n) * (W - PAD - 6), y = (v) => H - 12 - ((v - lo) / (hi - lo)) * (H - 24);
  svg.append(svgEl("polyline", { class: "line", points: pts.map(([i, v]) => `${x(i)},${y(v)}`).join(" ") }));
  for (const [i, v] of pts) svg.append(svgEl("circle", { class: "dot", cx: x(i), cy: y(v), r: 2.2 }));
  if (final != null) {
    svg.append(svgEl("rect", { class: "final", x: W - 10, y: y(final) - 3, width: 6, height: 6 }));
  }
  axisLabels(svg, lo, hi, (v) => v.toFixed(2));
}

function barChart(svg, values, fmt) {
  svg.replaceChildren();
  const nums = values.map((v) => (typeof v === "number" ? v : 0));
  const hi = Math.max(0, ...nums);
  if (!nums.length || hi <= 0) return;
  const bw = (W - PAD - 4) / nums.length;
  nums.forEach((v, i) => {
    const h = (v / hi) * (H - 16);
    svg.append(svgEl("rect", { class: "bar", x: PAD + i * bw + 1, y: H - 4 - h, width: Math.max(bw - 2, 1), height: h }));
  });
  axisLabels(svg, 0, hi, fmt);
}

function histogram(hist) {
  const span = el("span", { class: "hist", title: `label counts: ${hist.join(", ")}` });
  const hi = Math.max(1, ...hist);
  for (const v of hist) { const b = el("span"); b.style.height = `${Math.max(1, (v / hi) * 18)}px`; span.append(b); }
  return span;
}

function peerRow(pid, role, prof, rtt, isSelf, holder) {
  const p = prof || {}, d = p.data || {}, st = p.state || {};
  const tr = el("tr", { class: "peer", "data-peer": pid },
    el("td", { class: "mono", title: pid, text: short(pid) }),
    el("td", { text: role || p.role || "-" }),
    el("td", { text: st.kind ? st.kind + (st.hop != null ? ` ${st.hop}` : "") : "-" }),
    el("td", { text: p.compute && p.compute.samples_per_s ? p.compute.samples_per_s.toFixed(0) : "-" }),
    el("td", { text: p.memory_mb ? `${p.memory_mb} MB` : "-" }),
    el("td", { text: d.dataset ? `${d.dataset} · ${d.samples}` : "-" }),
    el("td", {}, d.label_hist ? histogram(d.label_hist) : "-"),
    el("td", { text: isSelf ? "-" : rtt == null ? "-" : `${rtt.toFixed(1)} ms` }));
  if (isSelf) tr.classList.add("self");
  if (holder && pid === holder) tr.classList.add("holder");
  return tr;
}

function renderPeers(holder) {
  const s = state.status;
  const rows = [peerRow(s.peer_id, s.role, s.profile, null, true, holder)];
  for (const r of state.peers) rows.push(peerRow(r.peer_id, r.role, r.profile, r.rtt_ms, false, holder));
  $("peers").tBodies[0].replaceChildren(...rows);
  $("peer-count").textContent = `(${state.peers.length} live + this node)`;
}

function renderCounters() {
  const c = state.status.counters || {};
  $("counters").tBodies[0].replaceChildren(...Object.keys(c).sort().map((k) =>
    el("tr", {}, el("td", { class: "mono", text: k }), el("td", { text: k.startsWith("bytes.") ? fmtBytes(c[k]) : String(c[k]) }))));
}

async function tick() {
  try {
    await poll();
    renderHeader();
    renderJobSelect();
    const holder = renderJob();
    renderPeers(holder);
    renderCounters();
    document.body.dataset.ready = "true";
  } catch (err) {
    $("updated").textContent = `no answer from the node (${err.message}); retrying`;
    $("updated").classList.add("stale");
  }
  setTimeout(tick, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("job-select").addEventListener("change", () => { state.jobId = null; });
  tick();
});
