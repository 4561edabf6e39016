// The grape-select status page: polls the gateway's JSON API and draws what it says. No build step.
//
// GET /healthz                      version and Redis reachability
// GET /v1/datasets                  every dataset with its counters (progress, throughput, ETA, workers)
// GET /v1/datasets/{id}/summary     wins per source and score histograms of the selected dataset
// GET /v1/datasets/{id}/teachers    sources ranked by mean local (LALP) and GRAPE score, when local is requested
// GET /v1/workers                   live workers: backend, scoring path, dtype, progress
// GET /v1/training-jobs             training jobs, when the gateway has that API (404: the section stays hidden)
// GET /v1/experiments               experiments: per arm its progress; when results exist, a grouped bar chart
//                                   of each task's metric per arm with error bars and the base model as a line
//
// When the gateway has API keys, /v1 answers 401 until a key is given: the page asks for one and keeps
// it in this browser's localStorage, sending it as `Authorization: Bearer <key>`.
"use strict";

(() => {
  const KEY_STORE = "grape-api-key";
  const POLL_MS = 2000;
  const JOBS_MS = 5000;
  const JOBS_RETRY_MS = 30000;
  const EXPERIMENTS_MS = 3000;
  const ARM_COLORS = ["#6f42c1", "#2da44e", "#d4a72c", "#0969da", "#cf222e", "#8c959f", "#bf3989", "#1b7c83"];
  const ACCENT = "#6f42c1";
  const GREY = "rgba(106, 115, 125, 0.35)";

  const state = {
    selected: decodeURIComponent(location.hash.slice(1)) || null,
    summaryKey: null,
    selectedJob: null,
    jobsNextPoll: 0,
    selectedExperiment: null,
    experimentsNextPoll: 0,
    charts: {},
  };

  class Unauthorized extends Error {}

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  async function api(path, { text = false } = {}) {
    const headers = { Accept: text ? "application/x-ndjson" : "application/json" };
    const key = localStorage.getItem(KEY_STORE);
    if (key) headers.Authorization = `Bearer ${key}`;
    const r = await fetch(path, { headers, cache: "no-store" });
    if (r.status === 401) throw new Unauthorized(path);
    if (r.status === 404) return null;
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return text ? r.text() : r.json();
  }

  // formatting ------------------------------------------------------------------------------------
  const int = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
  const pct = (a, b) => (b ? `${((100 * a) / b).toFixed(1)}%` : "–");
  function duration(s) {
    if (s == null || !isFinite(s)) return "–";
    s = Math.round(s);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function progressBar(done, total, unit) {
    const bar = el("progress", { max: String(Math.max(total, 1)), value: String(Math.min(done, total)) });
    return el("div", { class: "bar" }, bar, el("span", {}, `${int(done)} / ${int(total)} ${unit} (${pct(done, total)})`));
  }

  // charts ------------------------------------------------------------------------------------------
  function chart(id, config) {
    const existing = state.charts[id];
    if (existing) {
      existing.data = config.data;
      existing.options = config.options;
      existing.update("none");
      return existing;
    }
    state.charts[id] = new Chart($(id), config);
    return state.charts[id];
  }

  const baseOptions = () => ({
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    plugins: { legend: { display: false } },
  });

  // key form ----------------------------------------------------------------------------------------
  function askForKey(message) {
    $("key-message").textContent = message;
    $("key-form").hidden = false;
  }

  function setupKeyForm() {
    $("key-button").addEventListener("click", () => {
      $("key-form").hidden = !$("key-form").hidden;
    });
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key-input").value.trim();
      if (key) localStorage.setItem(KEY_STORE, key);
      $("key-input").value = "";
      $("key-form").hidden = true;
      state.summaryKey = null;
      state.jobsNextPoll = 0;
      state.experimentsNextPoll = 0;
      tick();
    });
    $("key-forget").addEventListener("click", () => {
      localStorage.removeItem(KEY_STORE);
      askForKey("Key forgotten. Enter one to see this gateway's datasets.");
    });
  }

  // datasets ----------------------------------------------------------------------------------------
  function pickSelected(datasets) {
    if (state.selected && datasets.some((d) => d.id === state.selected)) return state.selected;
    const scoring = datasets.filter((d) => d.state === "scoring");
    const pool = scoring.length ? scoring : datasets;
    return pool.length ? pool[pool.length - 1].id : null;
  }

  function renderDatasets(datasets) {
    const tbody = $("datasets").querySelector("tbody");
    const rows = datasets.map((d) => {
      const done = d.scored_candidates + d.failed_candidates;
      const row = el(
        "tr",
        { dataset: { dataset: d.id, done: String(done), total: String(d.candidates) } },
        el("td", {}, d.name, el("span", { class: "id" }, d.id)),
        el("td", {}, d.target_model),
        el("td", {}, el("span", { class: `state ${d.state}` }, d.state)),
        el("td", {}, progressBar(done, d.candidates, "pairs")),
        el("td", { class: "num", title: `${int(d.failed_items)} items` }, int(d.failed_candidates)),
        el("td", { class: "num" }, int(d.tokens_scored)),
        el("td", { class: "num" }, d.throughput_tokens_per_s == null ? "–" : int(d.throughput_tokens_per_s)),
        el("td", { class: "num" }, d.state === "done" ? "done" : duration(d.eta_seconds)),
        el("td", { class: "num" }, int(d.workers)),
      );
      if (d.id === state.selected) row.classList.add("selected");
      row.addEventListener("click", () => {
        state.selected = d.id;
        location.hash = encodeURIComponent(d.id);
        state.summaryKey = null;
        tick();
      });
      return row;
    });
    tbody.replaceChildren(...rows);
    $("datasets-empty").hidden = datasets.length > 0;
    $("datasets").hidden = datasets.length === 0;
  }

  function renderWorkers(workers) {
    const rows = workers.map((w) => {
      const path = (w.path || "–") + (w.prefix_reuse ? " + prefix cache" : "");
      return el(
        "tr",
        { dataset: { worker: w.name } },
        el("td", {}, w.name),
        el("td", {}, w.model),
        el("td", {}, w.task),
        el("td", {}, w.backend || "–"),
        el("td", { title: w.path_reason || "" }, path),
        el("td", {}, w.dtype || "–"),
        el("td", { class: "num" }, int(w.items)),
        el("td", { class: "num" }, int(w.tokens)),
        el("td", { class: "num" }, duration(w.uptime_s)),
      );
    });
    $("workers").querySelector("tbody").replaceChildren(...rows);
    $("workers-section").hidden = workers.length === 0;
  }

  async function refreshSummary(ds) {
    const scored = Boolean(ds && ds.scored_items > 0);
    $("detail").hidden = !ds;
    $("detail-charts").hidden = !scored;
    $("sources").hidden = !scored;
    if (!scored) {
      state.summaryKey = null;
      if (ds) {
        $("detail-title").textContent = `${ds.name} (${ds.id})`;
        $("detail-note").textContent = "Nothing scored yet: the charts appear with the first scores.";
      }
      return;
    }
    const local = (ds.tasks || {}).local || {};
    const key = `${ds.id}:${ds.scored_items}:${ds.failed_items}:${local.scored_items}:${local.failed_items}`;
    if (key === state.summaryKey) return;
    const s = await api(`/v1/datasets/${encodeURIComponent(ds.id)}/summary`);
    if (!s) return;
    state.summaryKey = key;
    $("detail-title").textContent = `${ds.name} (${ds.id})`;
    const wins = s.sources.reduce((a, x) => a + x.wins, 0);
    $("detail-note").textContent =
      `${int(s.scored_items)} scored instructions, ${int(wins)} selected responses` +
      (ds.state === "done" ? "." : " so far (updates as scoring goes on).");

    const winsCanvas = $("wins-chart");
    chart("wins-chart", {
      type: "bar",
      data: {
        labels: s.sources.map((x) => `${x.source} (${pct(x.wins, wins)})`),
        datasets: [{ label: "wins", data: s.sources.map((x) => x.wins), backgroundColor: ACCENT }],
      },
      options: { ...baseOptions(), indexAxis: "y", scales: { x: { beginAtZero: true, ticks: { precision: 0 } } } },
    });
    winsCanvas.dataset.sources = String(s.sources.length);
    winsCanvas.dataset.wins = String(wins);

    const h = s.histogram;
    const centers = h.all.map((_, i) => ((h.edges[i] + h.edges[i + 1]) / 2).toFixed(2));
    $("score-kind").textContent = s.reduce === "sum" ? "sum of log-probs" : "mean log-prob per response token";
    chart("hist-chart", {
      type: "bar",
      data: {
        labels: centers,
        datasets: [
          { label: "selected", data: h.selected, backgroundColor: ACCENT },
          { label: "all candidates", data: h.all, backgroundColor: GREY },
        ],
      },
      options: {
        ...baseOptions(),
        plugins: { legend: { display: true, position: "bottom" } },
        datasets: { bar: { grouped: false, categoryPercentage: 1.0, barPercentage: 0.95 } },
        scales: { y: { beginAtZero: true, ticks: { precision: 0 } } },
      },
    });

    const tbody = $("sources").querySelector("tbody");
    tbody.replaceChildren(
      ...s.sources.map((x) =>
        el(
          "tr",
          {},
          el("td", {}, x.source),
          el("td", { class: "num" }, int(x.wins)),
          el("td", { class: "num" }, pct(x.wins, x.items)),
          el("td", { class: "num" }, int(x.candidates)),
          el("td", { class: "num" }, x.mean_score.toFixed(3)),
        ),
      ),
    );
    await refreshTeachers(ds);
  }

  async function refreshTeachers(ds) {
    const wanted = (ds.scores || []).includes("local");
    $("teachers-box").hidden = !wanted;
    if (!wanted) return;
    const t = await api(`/v1/datasets/${encodeURIComponent(ds.id)}/teachers`);
    if (!t) return;
    const rho = t.rank_correlation == null ? "n/a" : t.rank_correlation.toFixed(2);
    $("teachers-note").textContent =
      `${int(t.scored_items)} instructions with both scores; rank correlation of the two rankings ${rho}` +
      (t.sources_total > t.sources.length ? ` (${t.sources.length} of ${t.sources_total} sources shown).` : ".");
    $("teachers").querySelector("tbody").replaceChildren(
      ...t.sources.map((x) =>
        el(
          "tr",
          {},
          el("td", {}, x.source),
          el("td", { class: "num" }, int(x.instructions)),
          el("td", { class: "num" }, x.local_mean.toFixed(3)),
          el("td", { class: "num" }, int(x.local_rank)),
          el("td", { class: "num" }, x.grape_mean.toFixed(3)),
          el("td", { class: "num" }, int(x.grape_rank)),
        ),
      ),
    );
  }

  // training jobs -------------------------------------------------------------------------------------
  // The loss curve comes from the job's log records (GET /v1/training-jobs/{id}/logs, NDJSON), whose
  // `data` carries `step` and `loss` at each logging step; they are read incrementally (`after`).
  const lossLogs = {};

  function jobList(r) {
    if (Array.isArray(r)) return r;
    return r.jobs || r.training_jobs || r.items || [];
  }

  const jobId = (j) => j.id || j.job_id || j.name || "?";

  async function lossPoints(job) {
    const inline = job.losses || job.loss_history || job.history;
    if (Array.isArray(inline)) {
      return inline
        .map((p, i) => (typeof p === "number" ? { x: i + 1, y: p } : { x: p.step ?? i + 1, y: p.loss }))
        .filter((p) => typeof p.y === "number" && isFinite(p.y));
    }
    const id = jobId(job);
    const cache = lossLogs[id] || (lossLogs[id] = { after: "0-0", points: [] });
    const body = await api(`/v1/training-jobs/${encodeURIComponent(id)}/logs?after=${cache.after}`, { text: true });
    for (const line of (body || "").split("\n")) {
      if (!line.trim()) continue;
      const rec = JSON.parse(line);
      if (rec.id) cache.after = rec.id;
      const d = rec.data || {};
      if (typeof d.loss === "number" && isFinite(d.loss)) cache.points.push({ x: d.step ?? cache.points.length + 1, y: d.loss });
    }
    return cache.points;
  }

  function jobToShow(jobs) {
    const chosen = jobs.find((j) => jobId(j) === state.selectedJob);
    if (chosen) return chosen;
    const running = jobs.filter((j) => (j.state || j.status) === "running");
    if (running.length) return running[running.length - 1];
    const trained = jobs.filter((j) => j.loss != null || (j.step || 0) > 0);
    return trained[trained.length - 1] || null;
  }

  async function refreshJobs() {
    if (Date.now() < state.jobsNextPoll) return;
    const r = await api("/v1/training-jobs");
    if (!r) {
      $("jobs-section").hidden = true;
      state.jobsNextPoll = Date.now() + JOBS_RETRY_MS;
      return;
    }
    state.jobsNextPoll = Date.now() + JOBS_MS;
    const jobs = jobList(r);
    $("jobs-section").hidden = false;
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs").hidden = jobs.length === 0;
    const shown = jobToShow(jobs);
    const tbody = $("jobs").querySelector("tbody");
    tbody.replaceChildren(
      ...jobs.map((j) => {
        const st = j.state || j.status || "?";
        const row = el(
          "tr",
          { dataset: { job: jobId(j) } },
          el("td", {}, jobId(j), el("span", { class: "id" }, [j.dataset_id, j.base_model].filter(Boolean).join(" · "))),
          el("td", { title: j.error || "" }, el("span", { class: `state ${st}` }, st)),
          el("td", {}, j.max_steps ? progressBar(j.step || 0, j.max_steps, "steps") : `step ${int(j.step || 0)}`),
          el("td", { class: "num" }, j.loss == null ? "–" : Number(j.loss).toFixed(4)),
          el("td", { class: "num" }, st === "running" ? duration(j.eta_seconds) : "–"),
        );
        if (shown && jobId(j) === jobId(shown)) row.classList.add("selected");
        row.addEventListener("click", () => {
          state.selectedJob = jobId(j);
          state.jobsNextPoll = 0;
          tick();
        });
        return row;
      }),
    );
    const points = shown ? await lossPoints(shown) : [];
    $("loss-figure").hidden = points.length === 0;
    if (points.length) {
      $("loss-title").textContent = jobId(shown);
      const canvas = $("loss-chart");
      chart("loss-chart", {
        type: "line",
        data: { datasets: [{ label: "loss", data: points.slice(), borderColor: ACCENT, pointRadius: 2 }] },
        options: {
          ...baseOptions(),
          scales: {
            x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
            y: { title: { display: true, text: "loss" } },
          },
        },
      });
      canvas.dataset.points = String(points.length);
    }
  }

  // experiments ---------------------------------------------------------------------------------------
  // Chart.js has no error bars: this plugin draws each bar's ± stderr whisker from `dataset.errors`, and the
  // base model's value per task (options.plugins.errorBars.base) as a dashed line across the task's group.
  const errorBarsPlugin = {
    id: "errorBars",
    afterDatasetsDraw(c, _args, opts) {
      const { ctx, scales } = c;
      const x = scales.x;
      const y = scales.y;
      let whiskers = 0;
      let lines = 0;
      ctx.save();
      c.data.datasets.forEach((ds, di) => {
        const meta = c.getDatasetMeta(di);
        if (meta.hidden || !ds.errors) return;
        meta.data.forEach((bar, i) => {
          const v = ds.data[i];
          const e = ds.errors[i];
          if (v == null || e == null || !isFinite(e)) return;
          const top = y.getPixelForValue(v + e);
          const bottom = y.getPixelForValue(v - e);
          const w = Math.max(2, Math.min(7, bar.width / 3));
          ctx.strokeStyle = "#1d2126";
          ctx.lineWidth = 1.4;
          ctx.beginPath();
          ctx.moveTo(bar.x, top);
          ctx.lineTo(bar.x, bottom);
          ctx.moveTo(bar.x - w, top);
          ctx.lineTo(bar.x + w, top);
          ctx.moveTo(bar.x - w, bottom);
          ctx.lineTo(bar.x + w, bottom);
          ctx.stroke();
          whiskers += 1;
        });
      });
      const base = (opts && opts.base) || [];
      const half = (0.45 * x.width) / Math.max(1, c.data.labels.length);
      ctx.setLineDash([6, 4]);
      ctx.strokeStyle = "#6a737d";
      ctx.lineWidth = 2;
      base.forEach((v, i) => {
        if (v == null) return;
        const px = x.getPixelForValue(i);
        const py = y.getPixelForValue(v);
        ctx.beginPath();
        ctx.moveTo(px - half, py);
        ctx.lineTo(px + half, py);
        ctx.stroke();
        lines += 1;
      });
      ctx.restore();
      c.canvas.dataset.errorBars = String(whiskers);
      c.canvas.dataset.baseLines = String(lines);
    },
  };

  const ARM_DONE = ["succeeded", "failed", "cancelled"];

  function experimentStages(x) {
    let done = 0;
    for (const a of x.arms) done += ARM_DONE.includes(a.state) ? 2 : a.state === "evaluating" ? 1 : 0;
    if (x.base && ARM_DONE.includes(x.base.eval_state)) done += 1;
    return [done, 2 * x.arms.length + (x.base ? 1 : 0)];
  }

  function fmtMetric(m) {
    if (!m) return "–";
    const se = m.stderr == null ? "" : ` ± ${m.stderr.toFixed(3)}`;
    const d = m.delta_base == null ? "" : ` (${m.delta_base >= 0 ? "+" : ""}${m.delta_base.toFixed(3)})`;
    return `${m.value.toFixed(3)}${se}${d}`;
  }

  function armResults(x, results, armIndex) {
    const cell = el("td", { class: "results" });
    x.evaluation.tasks.forEach((t, i) => {
      const b = x.best[t] || {};
      const m = b.metric ? (results[t] || {})[b.metric] : null;
      if (i) cell.append(" · ");
      cell.append(el("span", { class: armIndex != null && b.arm === armIndex ? "best" : "" }, `${t} ${b.metric || ""}: ${fmtMetric(m)}`));
    });
    return cell;
  }

  function renderExperimentDetail(x) {
    $("experiment-detail").hidden = false;
    $("experiment-title").textContent = `${x.id} (${x.dataset_id}, ${x.budget.pairs} pairs per arm, ${x.base_model})`;
    const rows = [];
    if (x.base) {
      rows.push(
        el(
          "tr",
          { dataset: { arm: "base" } },
          el("td", {}, `base (${x.base.model})`),
          el("td", { title: x.base.error || "" }, el("span", { class: `state ${x.base.eval_state || "queued"}` }, x.base.eval_state || "queued")),
          el("td", {}, "–"),
          el("td", { class: "num" }, "–"),
          el("td", { class: "num" }, "–"),
          el("td", { class: "num" }, "–"),
          el("td", {}, x.base.eval_state || "–"),
          armResults(x, x.base.results || {}, null),
        ),
      );
    }
    for (const a of x.arms) {
      const training = a.max_steps ? progressBar(a.step || 0, a.max_steps, "steps") : a.job_state || "queued";
      rows.push(
        el(
          "tr",
          { dataset: { arm: String(a.index), state: a.state } },
          el("td", {}, a.label, el("span", { class: "id" }, a.job_id)),
          el("td", { title: a.error || a.note || "" }, el("span", { class: `state ${a.state}` }, a.state)),
          el("td", {}, training),
          el("td", { class: "num" }, int(a.pairs_trained ?? a.selected_pairs)),
          el("td", { class: "num" }, int(a.tokens_trained)),
          el("td", { class: "num" }, a.final_loss == null ? "–" : Number(a.final_loss).toFixed(4)),
          el("td", {}, a.eval_state || "–"),
          armResults(x, a.results || {}, a.index),
        ),
      );
    }
    $("experiment-arms").querySelector("tbody").replaceChildren(...rows);

    const tasks = x.evaluation.tasks.filter((t) => x.best[t]);
    const withResults = x.arms.filter((a) => tasks.some((t) => (a.results || {})[t]));
    $("experiment-figure").hidden = withResults.length === 0;
    if (!withResults.length) return;
    const metricOf = (t) => x.best[t].metric;
    const value = (res, t) => ((res || {})[t] || {})[metricOf(t)];
    const canvas = $("experiment-chart");
    chart("experiment-chart", {
      type: "bar",
      data: {
        labels: tasks.map((t) => `${t} (${metricOf(t)})`),
        datasets: x.arms.map((a) => ({
          label: a.label,
          data: tasks.map((t) => (value(a.results, t) || {}).value ?? null),
          errors: tasks.map((t) => (value(a.results, t) || {}).stderr ?? null),
          backgroundColor: ARM_COLORS[a.index % ARM_COLORS.length],
        })),
      },
      options: {
        ...baseOptions(),
        plugins: {
          legend: { display: true, position: "bottom" },
          errorBars: { base: tasks.map((t) => (value((x.base || {}).results, t) || {}).value ?? null) },
        },
        scales: { y: { beginAtZero: true, suggestedMax: 1 } },
      },
      plugins: [errorBarsPlugin],
    });
    canvas.dataset.experiment = x.id;
    canvas.dataset.arms = String(x.arms.length);
  }

  async function refreshExperiments() {
    if (Date.now() < state.experimentsNextPoll) return;
    const r = await api("/v1/experiments");
    if (!r) {
      $("experiments-section").hidden = true;
      state.experimentsNextPoll = Date.now() + JOBS_RETRY_MS;
      return;
    }
    state.experimentsNextPoll = Date.now() + EXPERIMENTS_MS;
    const list = r.experiments || [];
    $("experiments-section").hidden = false;
    $("experiments-empty").hidden = list.length > 0;
    $("experiments").hidden = list.length === 0;
    const shown = list.find((x) => x.id === state.selectedExperiment) || list[0] || null;
    $("experiments").querySelector("tbody").replaceChildren(
      ...list.map((x) => {
        const [done, total] = experimentStages(x);
        const best = Object.entries(x.best || {})
          .filter(([, b]) => b.arm != null)
          .map(([t, b]) => `${t}: ${b.label} ${b.value.toFixed(3)}`)
          .join(" · ");
        const row = el(
          "tr",
          { dataset: { experiment: x.id } },
          el("td", {}, x.id, el("span", { class: "id" }, `${x.dataset_id} · ${x.arms.map((a) => a.label).join(", ")}`)),
          el("td", { title: x.error || "" }, el("span", { class: `state ${x.state}` }, x.state)),
          el("td", {}, progressBar(done, total, "stages")),
          el("td", {}, best || "–"),
        );
        if (shown && x.id === shown.id) row.classList.add("selected");
        row.addEventListener("click", () => {
          state.selectedExperiment = x.id;
          state.experimentsNextPoll = 0;
          tick();
        });
        return row;
      }),
    );
    if (shown) renderExperimentDetail(shown);
    else $("experiment-detail").hidden = true;
  }

  // the loop ------------------------------------------------------------------------------------------
  async function refreshHealth() {
    const h = $("health");
    try {
      const r = await fetch("/healthz", { cache: "no-store" });
      const body = await r.json();
      h.textContent = `v${body.version} · Redis ${body.redis ? "reachable" : "unreachable"}`;
      h.className = body.redis ? "ok" : "bad";
    } catch (e) {
      h.textContent = "gateway unreachable";
      h.className = "bad";
    }
  }

  let running = false;
  async function tick() {
    if (running) return;
    running = true;
    try {
      await refreshHealth();
      const r = await api("/v1/datasets");
      const datasets = (r && r.datasets) || [];
      state.selected = pickSelected(datasets);
      renderDatasets(datasets);
      renderWorkers(((await api("/v1/workers")) || {}).workers || []);
      await refreshSummary(datasets.find((d) => d.id === state.selected));
      await refreshJobs();
      await refreshExperiments();
      $("updated").textContent = `Last update ${new Date().toLocaleTimeString()}.`;
    } catch (e) {
      if (e instanceof Unauthorized) {
        askForKey(
          localStorage.getItem(KEY_STORE)
            ? "The stored API key was refused. Enter a valid key."
            : "This gateway needs an API key. It is kept in this browser only (localStorage).",
        );
      } else {
        $("updated").textContent = `Update failed: ${e.message}`;
      }
    } finally {
      running = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (window.Chart) Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    setupKeyForm();
    tick();
    setInterval(tick, POLL_MS);
  });
})();
