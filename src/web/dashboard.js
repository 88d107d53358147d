"use strict";
// The dashboard: plain JS over the /api answers (docs/ops.md, "HTTP").
// Routes (the URL's hash): #/ (home; #/?q=TEXT searches the supervision tree), #/eval/ID,
// #/build/ID (step tree and the live log of a running step), #/step/ID/N.

const $ = (id) => document.getElementById(id);
const short = (p) => (p || "").replace(/^step:/, "").split("/").pop();
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
async function get(url) { const r = await fetch(url); if (!r.ok) throw new Error(url + ": " + r.status); return r.json(); }
const fmt = (n) => Number(n).toLocaleString("en-US");
const status = (name) => `<span class="status ${esc(name)}">${esc(name)}</span>`;

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?");
  return { parts: (path || "").split("/").filter(Boolean), query: new URLSearchParams(query || "") };
}

// ---------------------------------------------------------------- history graphs
// /api/history: the runner's own samples (every few seconds over the last minutes, so the graph
// is full as soon as the page opens); a runner keeping none falls back to samples taken here.
let samples = [];
let historyInterval = 0, lastHistoryFetch = 0, lastBuilt = null;
const local = [];
const SERIES = [["built", "#2e7d32", "steps built"], ["failed", "#c62828", "failed"],
  ["runnable", "#1565c0", "runnable"], ["running", "#f9a825", "running"], ["builds_queued", "#6a1b9a", "builds queued"]];
const PALETTE = ["#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#c62828", "#00838f", "#5d4037", "#ad1457", "#9e9d24", "#37474f"];

function axes(g, c, t0, t1, maxY) {
  const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * (c.width - 40) + 30;
  const y = (v) => c.height - 15 - (v / maxY) * (c.height - 30);
  g.strokeStyle = "#ccc"; g.lineWidth = 1; g.beginPath(); g.moveTo(30, y(0)); g.lineTo(c.width, y(0)); g.stroke();
  g.fillStyle = "#555"; g.font = "11px system-ui"; g.fillText(String(maxY), 2, y(maxY) + 4); g.fillText("0", 2, y(0) + 4);
  g.fillText(new Date(t0).toLocaleTimeString(), 30, c.height - 2);
  g.fillText(new Date(t1).toLocaleTimeString(), c.width - 60, c.height - 2);
  return [x, y];
}

function drawGraph() {
  const c = $("graph"), g = c.getContext("2d");
  c.dataset.samples = String(samples.length);
  g.clearRect(0, 0, c.width, c.height);
  if (samples.length < 2) return;
  const t0 = samples[0].t_ms, t1 = samples[samples.length - 1].t_ms;
  const maxY = Math.max(1, ...samples.map((s) => Math.max(...SERIES.map(([k]) => s[k] || 0))));
  const [x, y] = axes(g, c, t0, t1, maxY);
  let lx = c.width - 10;
  for (const [key, color, name] of SERIES.slice().reverse()) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    samples.forEach((s, i) => (i ? g.lineTo(x(s.t_ms), y(s[key] || 0)) : g.moveTo(x(s.t_ms), y(s[key] || 0))));
    g.stroke();
    lx -= g.measureText(name).width + 12;
    g.fillStyle = color; g.fillText(name, lx, 12);
  }
}

async function refreshHistory(st) {
  const now = Date.now();
  if (historyInterval === 0 || now - lastHistoryFetch >= historyInterval * 1000) {
    lastHistoryFetch = now;
    const [h, load] = await Promise.all([get("/api/history"), get("/api/machines/history")]);
    historyInterval = h.interval_s || 0;
    if (h.samples && h.samples.length) {
      samples = h.samples;
      $("graphnote").textContent = `(sampled by the runner every ${h.interval_s} s, last ${Math.round(h.window_s / 60)} min; built/failed per sample)`;
    }
    drawLoad(load);
  }
  if (historyInterval === 0) { // no server history: sample here, every second
    local.push({ t_ms: now, builds_queued: st.builds_queued, runnable: st.runnable, running: st.slots_busy,
      built: lastBuilt === null ? 0 : st.steps_built - lastBuilt, failed: 0 });
    lastBuilt = st.steps_built;
    while (local.length > 300) local.shift();
    samples = local;
    $("graphnote").textContent = "(sampled by this page every second since it opened)";
  }
  drawGraph();
}

// /api/machines/history: busy slots of each machine per sample, kept by the runner.
function drawLoad(load) {
  const c = $("loadgraph"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  c.dataset.samples = String(load.times.length);
  c.dataset.machines = String(load.machines.length);
  if (!load.interval_s) { $("loadnote").textContent = "(the runner keeps no history: [http] history_interval_s = 0)"; return; }
  $("loadnote").textContent = `(busy job slots of each machine, sampled by the runner every ${load.interval_s} s, last ${Math.round(load.window_s / 60)} min)`;
  $("loadlegend").innerHTML = load.machines.map((m, i) => {
    const last = m.points[m.points.length - 1] || [0, 0, 0, 0];
    return `<span data-machine="${esc(m.id)}" data-peak="${m.peak_busy}"><i style="background:${PALETTE[i % PALETTE.length]}"></i>${esc(m.id)}:
      ${last[1]}/${last[2]} busy now · peak ${m.peak_busy} · ${(m.utilisation * 100).toFixed(0)}% of slots over the window · load ${last[3].toFixed(2)}</span>`;
  }).join("");
  if (load.times.length < 2) return;
  const t0 = load.times[0], t1 = load.times[load.times.length - 1];
  const maxY = Math.max(1, ...load.machines.flatMap((m) => m.points.map((p) => Math.max(p[1], p[2]))));
  const [x, y] = axes(g, c, t0, t1, maxY);
  load.machines.forEach((m, i) => {
    g.strokeStyle = PALETTE[i % PALETTE.length]; g.lineWidth = 2; g.beginPath();
    m.points.forEach((p, j) => (j ? g.lineTo(x(p[0]), y(p[1])) : g.moveTo(x(p[0]), y(p[1]))));
    g.stroke();
  });
}

// ---------------------------------------------------------------- supervision tree
// The server folds the live actors into the rows shown (/api/actors/tree): collapsed by default
// past 200 actors, a page of children per open node, and a search that shows the paths to the
// matches. This page keeps what the user opened and closed.
const opened = new Set(), closed = new Set();
let treeQuery = "";

function treeRow(n) {
  const hasKids = n.child_count > 0;
  const toggle = hasKids ? `<span class="toggle" data-id="${esc(n.id)}" data-open="${n.open}">${n.open ? "▾" : "▸"}</span>`
    : `<span class="toggle leaf">·</span>`;
  const rel = n.rel === "resolved" ? '<span class="resolved-link">⤷ resolved</span>' : "";
  const counts = hasKids ? `<span class="muted">${fmt(n.child_count)} ${n.child_count === 1 ? "child" : "children"}${n.descendants > n.child_count ? `, ${fmt(n.descendants)} below` : ""}</span>` : "";
  const also = n.other_parents ? `<span class="muted">(+${fmt(n.other_parents)} other parents)</span>` : "";
  const stats = n.kind === "unattached" ? "" : `<span class="muted">handled ${n.handled} · mailbox ${n.blocked ? "blocked" : "open"}${n.queued_effects ? " +" + n.queued_effects : ""} · restarts ${n.restarts}</span>`;
  const detail = n.detail ? `<span class="${n.detail.startsWith("resolved") ? "resolved-link" : "muted"}">${esc(n.detail)}</span>` : "";
  let html = `<li data-actor="${esc(n.id)}" data-state="${esc(n.state)}"${n.rel === "resolved" ? ' class="resolved-child"' : ""}><div class="row">${toggle}<span class="node${n.match ? " match" : ""}">${rel}<span class="kind">${esc(n.kind)}</span>
    <span class="name" title="${esc(n.id)}">${esc(short(n.id))}</span>${n.state ? `<span class="state ${esc(n.state)}">${esc(n.state)}</span>` : ""}
    ${counts}${also}${stats}${detail}</span></div>`;
  if (n.open && (n.children.length || n.more)) {
    html += "<ul>" + n.children.map(treeRow).join("") +
      (n.more && n.children.length ? `<li class="more">… ${fmt(n.more)} more not shown${treeQuery ? "" : " (search to find one)"}</li>` : "") + "</ul>";
  }
  return html + "</li>";
}

async function refreshTree() {
  const p = new URLSearchParams({ q: treeQuery, open: [...opened].join("\n"), closed: [...closed].join("\n") });
  const t = await get("/api/actors/tree?" + p);
  const kinds = t.by_kind.map(([k, n]) => `${fmt(n)} ${k}`).join(", ");
  const states = t.by_state.slice(0, 6).map(([k, n]) => `${fmt(n)} ${k}`).join(", ");
  $("treenote").innerHTML = `<span id="treetotal" data-total="${t.total}" data-rows="${t.rows}">${fmt(t.total)} live actors</span> (${esc(kinds)}; ${esc(states)})` +
    (t.q ? ` · <span id="treematches" data-matches="${t.matches}">${fmt(t.matches)} match${t.matches === 1 ? "" : "es"}</span>${t.matches > t.shown_matches ? `, first ${t.shown_matches} shown` : ""}` : "") +
    (t.auto_open ? "" : " · collapsed: ▸ opens a node");
  const tree = $("tree");
  tree.dataset.autoOpen = String(t.auto_open);
  tree.innerHTML = t.roots.map(treeRow).join("") || `<li class="muted">${t.q ? "no actor matches" : "no live actors"}</li>`;
}

$("tree").addEventListener("click", (ev) => {
  const tg = ev.target.closest(".toggle[data-id]");
  if (!tg) return;
  const id = tg.dataset.id;
  if (tg.dataset.open === "true") { opened.delete(id); closed.add(id); } else { closed.delete(id); opened.add(id); }
  refreshTree().catch((e) => { $("treenote").textContent = "error: " + e.message; });
});
let searchTimer = 0;
$("treesearch").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    treeQuery = $("treesearch").value.trim();
    history.replaceState(null, "", treeQuery ? "#/?q=" + encodeURIComponent(treeQuery) : "#/");
    refreshTree().catch((e) => { $("treenote").textContent = "error: " + e.message; });
  }, 200);
});

// ---------------------------------------------------------------- home
function heartbeat(m) {
  if (m.local) return "now (local)";
  if (!m.last_heartbeat_ms) return "—";
  return `<span title="${esc(new Date(m.last_heartbeat_ms).toISOString())}">${m.heartbeat_age_s.toFixed(1)} s ago</span>`;
}

function showSummary(st) {
  $("summary").textContent = `up ${st.uptime_s}s · ${st.builds_queued} queued · ${st.builds_active} active · ` +
    `${st.runnable} runnable · slots ${st.slots_busy}/${st.slots_total} · built ${st.steps_built} · resolutions ${st.resolutions} · early cutoffs ${st.early_cutoffs}`;
}

async function refreshHome() {
  const q = route().query.get("q") || "";
  if (q !== treeQuery && document.activeElement !== $("treesearch")) { treeQuery = q; $("treesearch").value = q; }
  const [st, ms, bs, ev] = await Promise.all([get("/api/status"), get("/api/machines"), get("/api/builds"), get("/api/evals")]);
  showSummary(st);
  await Promise.all([refreshHistory(st), refreshTree()]);
  $("queue").innerHTML = "<tr><th>system</th><th>runnable</th></tr>" +
    st.runnable_per_system.map((c) => `<tr><td>${esc(c.key)}</td><td>${c.count}</td></tr>`).join("");
  $("machines").innerHTML = "<tr><th>machine</th><th>state</th><th>slots</th><th>load</th><th>heartbeat</th><th>systems</th><th>jobs</th></tr>" +
    ms.machines.map((m) => `<tr data-machine="${esc(m.id)}"><td>${esc(m.id)}</td><td>${esc(m.state)}</td><td>${m.running}/${m.max_jobs}</td>
      <td>${m.load.toFixed(2)}</td><td class="heartbeat">${heartbeat(m)}</td>
      <td>${esc(m.systems.join(", "))}</td><td>${m.jobs.map((j) => esc(short(j))).join("<br>")}</td></tr>`).join("");
  $("evals").innerHTML = "<tr><th>eval</th><th>jobset</th><th>time</th><th>jobs</th><th>new</th><th>reused</th><th>errors</th><th>succeeded</th><th>failed</th><th>queued</th></tr>" +
    ev.evals.map((e) => `<tr data-eval="${e.id}"><td><a href="#/eval/${e.id}">${e.id}</a></td><td>${esc(e.jobset)}</td>
      <td>${esc(new Date(e.timestamp * 1000).toLocaleString())}</td><td>${e.jobs}</td><td>${e.new_builds}</td><td>${e.existing_builds}</td>
      <td>${e.errors}</td><td class="succeeded">${e.succeeded}</td><td class="failed">${e.failed}</td><td class="queued">${e.queued}</td></tr>`).join("");
  $("builds").innerHTML = "<tr><th>id</th><th>status</th><th>prio</th><th>job</th><th>drv</th></tr>" +
    bs.builds.map((b) => `<tr><td><a href="#/build/${b.id}">${b.id}</a></td><td>${status(b.status_name)}</td>
      <td>${b.global_priority}</td><td>${esc(b.job)}</td><td>${esc(short(b.drv_path))}</td></tr>`).join("");
}

// ---------------------------------------------------------------- live log (server-sent events)
// One EventSource at a time, on /api/builds/B/steps/N/log/follow: the tail, then what is
// appended, until an `end` event (then it is closed: an EventSource would reconnect).
let follow = null; // { key, es }
const MAX_LOG_CHARS = 400000;

function stopFollowing() {
  if (follow) { follow.es.close(); follow = null; }
}

function followLog(build, stepnr, title) {
  const key = `${build}/${stepnr}`;
  if (follow && follow.key === key) return;
  if (!follow && $("logtail").dataset.step === key && $("logtail").dataset.ended) return; // it ended
  stopFollowing();
  const pre = $("logtail");
  pre.textContent = ""; pre.dataset.events = "0"; pre.dataset.bytes = "0"; pre.dataset.step = key; pre.dataset.ended = "";
  $("logpanel").style.display = "";
  $("loghead").innerHTML = `${esc(title)} <span class="muted" id="lognote">(connecting…)</span>`;
  const es = new EventSource(`/api/builds/${build}/steps/${stepnr}/log/follow`);
  follow = { key, es };
  es.addEventListener("state", (m) => {
    const s = JSON.parse(m.data);
    $("lognote").textContent = s.file
      ? `(${s.finished ? "finished: " + s.status_name : "live, server-sent events"}${s.exact ? "" : "; not this step's own log: the newest of its drv"})`
      : `(${s.status_name}: waiting for the step to write its log)`;
    $("lognote").dataset.finished = String(s.finished);
  });
  es.addEventListener("log", (m) => {
    const d = JSON.parse(m.data);
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    let text = pre.textContent + (d.truncated ? "…\n" : "") + d.text;
    if (text.length > MAX_LOG_CHARS) text = "…\n" + text.slice(text.length - MAX_LOG_CHARS);
    pre.textContent = text;
    pre.dataset.events = String(Number(pre.dataset.events) + 1);
    pre.dataset.bytes = m.lastEventId;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  });
  es.addEventListener("end", (m) => {
    const d = JSON.parse(m.data);
    pre.dataset.ended = d.reason || "error";
    $("lognote").textContent = d.error ? `(error: ${d.error})` : d.reason === "no log" ? "(no log for this step)" : `(finished${d.status_name ? ": " + d.status_name : ""})`;
    es.close();
    if (follow && follow.es === es) follow = null;
  });
}

// ---------------------------------------------------------------- pages
function stepCells(s, build) {
  return `<td>${status(s.status_name)}</td><td>${esc(s.machine)}</td><td>${esc(short(s.drv_path))}</td>
    <td>${s.resolved_to_step ? `<a class="resolved-link" href="#/step/${build}/${s.resolved_to_step}">→ step ${s.resolved_to_step}</a>` : ""}</td>
    <td>${esc((s.error_msg || "").split("\n")[0])}</td>`;
}

function stepRows(steps, build) {
  return "<tr><th>step</th><th>status</th><th>machine</th><th>drv</th><th>resolved to</th><th>error</th></tr>" +
    steps.map((s) => `<tr data-step="${s.stepnr}"><td><a href="#/step/${build}/${s.stepnr}">${s.stepnr}</a></td>${stepCells(s, build)}</tr>`).join("");
}

const running = (s) => s.status === -1 && s.busy !== 0;
const EDGE_LABEL = { resolved: "⤷ resolved to", produced: "⤷ produced" };

// /api/builds/ID/tree: rows plus typed edges; each edge nests its target under its source.
function stepTreeRows(t, build, followed) {
  const byNr = new Map(t.steps.map((s) => [s.stepnr, s]));
  const kids = new Map();
  for (const e of t.edges) { if (!kids.has(e.from)) kids.set(e.from, []); kids.get(e.from).push(e); }
  const seen = new Set();
  let html = "<tr><th>step</th><th>status</th><th>machine</th><th>drv</th><th>resolved to</th><th>error</th><th>log</th></tr>";
  const row = (nr, depth, edge) => {
    const s = byNr.get(nr);
    if (!s || seen.has(nr)) return;
    seen.add(nr);
    const dyn = edge ? `<span class="edge" data-rel="${esc(edge.rel)}">${EDGE_LABEL[edge.rel] || "⤷ " + esc(edge.rel)}</span>` : "";
    html += `<tr data-step="${nr}" data-depth="${depth}"${edge ? ` data-parent="${edge.from}" data-rel="${esc(edge.rel)}"` : ""}${followed === `${build}/${nr}` ? ' class="following"' : ""}>
      <td class="tree-cell"><span class="indent" style="width:${depth * 20}px"></span>${dyn}<a href="#/step/${build}/${nr}">${nr}</a></td>${stepCells(s, build)}
      <td>${running(s) ? `<a href="#" class="tail" data-step="${nr}">live log</a>` : `<a href="#/step/${build}/${nr}">log</a>`}</td></tr>`;
    for (const e of kids.get(nr) || []) row(e.to, depth + 1, e);
  };
  for (const r of t.roots) row(r, 0, null);
  return html;
}

let pageKey = "";
let chosenTail = null; // the step whose live log the user picked on a build page

async function refreshPage(parts) {
  const body = $("pagebody");
  const key = parts.join("/");
  const fresh = key !== pageKey;
  if (fresh) { pageKey = key; chosenTail = null; stopFollowing(); $("logpanel").style.display = "none"; $("attempts").textContent = ""; $("logtail").dataset.step = ""; }
  if (parts[0] === "build") {
    const t = await get(`/api/builds/${parts[1]}/tree`);
    const b = t.build;
    const live = t.steps.filter(running);
    // Follow the step the user picked, else the first running one.
    const target = chosenTail ?? (live[0] && live[0].stepnr);
    if (target) {
      const s = t.steps.find((x) => x.stepnr === target);
      followLog(b.id, target, `Log of step ${target}${s ? " — " + short(s.drv_path) : ""}`);
    }
    body.innerHTML = `<h2>Build ${b.id} — ${esc(b.job)} — ${status(b.status_name)}</h2>
      <p class="muted">${esc(b.drv_path)} · ${t.steps.length} steps · ${live.length} running · ${t.edges.length} dynamic (resolved) children</p>
      <table id="steps" class="steps">${stepTreeRows(t, b.id, follow && follow.key)}</table>`;
  } else if (parts[0] === "eval") {
    const d = await get(`/api/evals/${parts[1]}`);
    const e = d.eval;
    body.innerHTML = `<h2>Evaluation ${e.id} of ${esc(e.jobset)} — ${e.jobs} jobs: ${e.new_builds} new, ${e.existing_builds} reused · ${e.succeeded} succeeded · ${e.failed} failed · ${e.queued} queued · ${e.errors} errors</h2>
      <p class="muted">${esc(e.source)} · ${esc(new Date(e.timestamp * 1000).toLocaleString())}</p>
      <table id="evaljobs"><tr><th>job</th><th>build</th><th>new or reused</th><th>status</th><th>drv</th><th>constituents</th></tr>` +
      d.jobs.map((j) => `<tr data-job="${esc(j.job)}" data-build="${j.build.id}" data-status="${esc(j.build.status_name)}"><td>${esc(j.job)}</td><td><a href="#/build/${j.build.id}">${j.build.id}</a></td>
        <td><span class="reuse ${j.is_new ? "new" : "reused"}">${j.is_new ? "new" : "reused"}</span></td>
        <td>${status(j.build.status_name)}</td><td>${esc(short(j.build.drv_path))}</td>
        <td>${j.constituents.map((c) => `<a href="#/build/${c}">${c}</a>`).join(" ")}</td></tr>`).join("") + `</table>
      ${d.errors.length ? `<h2>Errors</h2><table id="evalerrors"><tr><th>line</th><th>job</th><th>error</th></tr>` +
        d.errors.map((x) => `<tr><td>${x.line}</td><td>${esc(x.job)}</td><td><pre>${esc(x.message)}</pre></td></tr>`).join("") + "</table>" : ""}`;
  } else if (parts[0] === "step") {
    const d = await get(`/api/builds/${parts[1]}/steps/${parts[2]}`);
    body.innerHTML = `<h2>Step ${d.step.stepnr} of build <a href="#/build/${d.step.build}">${d.step.build}</a> — ${status(d.step.status_name)}</h2>
      <p class="muted">${esc(d.step.drv_path)}</p>
      <h2>Resolved chain</h2><table>${stepRows(d.resolved_chain, d.step.build)}</table>
      ${d.resolved_from.length ? `<h2>Resolved from</h2><table>${stepRows(d.resolved_from, d.step.build)}</table>` : ""}
      <ul>${d.outputs.map((o) => `<li>${esc(o.name)} → ${esc(o.path)}</li>`).join("")}</ul>`;
    followLog(d.step.build, d.step.stepnr, `Log of step ${d.step.stepnr}`);
    if (fresh) {
      // The other attempts of this drv (one request: the list does not change while it runs).
      get(`/api/builds/${parts[1]}/steps/${parts[2]}/log`).then((l) => {
        if (l.attempts.length > 1) $("attempts").innerHTML = "Logs of this drv, oldest first: " + l.attempts.map((a) =>
          a.build ? `<a class="attempt" href="#/step/${a.build}/${a.stepnr}">build ${a.build} step ${a.stepnr}</a>` : "(unnamed)").join(" · ");
      }).catch(() => {});
    }
  }
}

$("pagebody").addEventListener("click", (ev) => {
  const a = ev.target.closest("a.tail");
  if (!a) return;
  ev.preventDefault();
  chosenTail = Number(a.dataset.step);
  tick();
});

let busy = false;
async function tick() {
  if (busy) return;
  busy = true;
  const { parts } = route();
  $("home").style.display = parts.length ? "none" : "";
  $("page").style.display = parts.length ? "" : "none";
  if (!parts.length && pageKey) { pageKey = ""; stopFollowing(); }
  try { await (parts.length ? Promise.all([refreshPage(parts), get("/api/status").then(showSummary)]) : refreshHome()); }
  catch (e) { $("summary").textContent = "error: " + e.message; }
  finally { busy = false; }
}

const es = new EventSource("/api/events");
es.addEventListener("sched", (m) => {
  const e = JSON.parse(m.data);
  const li = document.createElement("li");
  li.textContent = `${new Date(e.time * 1000).toLocaleTimeString()} ${e.kind}` +
    (e.build ? ` build ${e.build}` : "") + (e.drv_path ? ` ${short(e.drv_path)}` : "") +
    (e.machine ? ` on ${e.machine}` : "") + (e.resolved ? ` → ${short(e.resolved)}` : "") +
    (e.kind.endsWith("finished") ? ` status ${e.status}` : "");
  li.dataset.kind = e.kind;
  const ol = $("events"); ol.insertBefore(li, ol.firstChild);
  while (ol.children.length > 200) ol.removeChild(ol.lastChild);
});
window.addEventListener("hashchange", tick);
tick(); setInterval(tick, 1000);
