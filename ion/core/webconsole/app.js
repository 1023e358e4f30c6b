// The ioncore web console: plain JS, no build step. Reads /api/..., kept live by /api/events (SSE).
// Every value put into HTML goes through esc() or num(): what the views show comes from other processes'
// answers, and the page holds the operator token. No inline style either (the CSP forbids it): widths and
// indents are set through the CSSOM after a table is drawn (see styled()).
"use strict";

const PAGE = 100;
const state = { tab: "processes", offsets: {}, q: "", cacheq: "", loaded: {} };
const $ = (sel) => document.querySelector(sel);

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
// A number as text (escaped by being a number), else `otherwise` (escaped).
function num(value, otherwise = "") {
  return typeof value === "number" && Number.isFinite(value) ? String(value) : esc(otherwise);
}
function isNum(value) { return typeof value === "number" && Number.isFinite(value); }
// Inline styles the CSP forbids in markup: data-indent (em of padding) and data-pct (width in %).
function styled(root) {
  root.querySelectorAll("[data-indent]").forEach((el) => { el.style.paddingLeft = `${Number(el.dataset.indent) || 0}em`; });
  root.querySelectorAll("[data-pct]").forEach((el) => { el.style.width = `${Number(el.dataset.pct) || 0}%`; });
}
function age(seconds) {
  if (!isNum(seconds)) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
function since(epoch) { return isNum(epoch) && epoch ? `${new Date(epoch * 1000).toLocaleTimeString()} (${age(Date.now() / 1000 - epoch)} ago)` : ""; }
function bytes(n) {
  if (!isNum(n)) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
function badge(s) { return `<span class="state ${esc(s)}">${esc(s)}</span>`; }

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(`${response.status} ${body.error || ""}`);
  return body;
}

function message(text, kind) {
  const box = $("#message");
  box.textContent = text;
  box.className = kind || "";
}

function pager(name, result) {
  const box = document.querySelector(`.pager[data-for="${name}"]`);
  if (!box) return;
  if (!isNum(result.total) || !isNum(result.offset) || !isNum(result.limit)) { box.textContent = ""; return; }
  const first = result.total ? result.offset + 1 : 0;
  const last = Math.min(result.offset + result.limit, result.total);
  box.innerHTML = `<button class="prev" ${result.offset > 0 ? "" : "disabled"}>&lsaquo; previous</button>` +
    `<span class="count">${num(first)}&ndash;${num(last)} of ${num(result.total)}</span>` +
    `<button class="next" ${last < result.total ? "" : "disabled"}>next &rsaquo;</button>`;
  box.querySelector(".prev").onclick = () => { state.offsets[name] = Math.max(0, result.offset - result.limit); refresh(); };
  box.querySelector(".next").onclick = () => { state.offsets[name] = result.offset + result.limit; refresh(); };
}
function paged(name) { return `offset=${state.offsets[name] || 0}&limit=${PAGE}`; }

// -- the views ------------------------------------------------------------------------------------
const views = {
  async processes() {
    const data = await getJSON(`api/system?${paged("processes")}&q=${encodeURIComponent(state.q)}`);
    $("#system").textContent = `system ${data.system} · container ${data.container}`;
    const apps = (list) => list.map((a) => a.failed
      ? `<span class="state error" title="${esc(a.failed)}">${esc(a.app)} failed</span>`
      : `<span title="${esc(a.description)}">${esc(a.app)} ${esc(a.version)}</span>`).join("");
    $("#containers tbody").innerHTML = data.containers.map((c) =>
      `<tr data-container="${esc(c.container)}"><td class="mono">${esc(c.container)}${c.local ? ' <span class="muted small">(this one)</span>' : ""}</td>` +
      `<td class="num">${num(c.processes)}</td><td class="chips">${apps(c.apps || [])}</td>` +
      `<td>${since(c.started_at)}</td><td>${c.local ? "" : since(c.last_seen)}</td>` +
      `<td class="small">${c.error ? `<span class="state error">${esc(c.error)}</span>` : ""}</td></tr>`).join("");
    let current = null;
    const rows = [];
    for (const p of data.processes.items) {
      if (p.container !== current) {
        current = p.container;
        rows.push(`<tr class="container"><td colspan="8">${esc(current)}</td></tr>`);
      }
      const queues = (p.queues || []).join(", ");
      rows.push(`<tr data-pid="${esc(p.pid)}" data-state="${esc(p.state)}"><td class="pid">${esc(p.pid)}</td>` +
        `<td data-indent="${num(0.6 + 1.2 * (isNum(p.depth) ? p.depth : 0))}">${p.depth ? "└ " : ""}${esc(p.name)}</td>` +
        `<td class="small" title="${esc(p.module)}">${esc(p.class)}</td><td>${badge(p.state)}</td><td>${esc(p.app)}</td>` +
        `<td class="small mono" title="${esc(queues)}">${esc(queues.length > 60 ? queues.slice(0, 60) + "…" : queues)}</td>` +
        `<td class="num">${num(p.convs)}</td>` +
        `<td>${p.class === "ContainerAgent" || p.class === "ConsoleProcess" ? "" : `<button class="act kill" data-pid="${esc(p.pid)}">kill</button>`}</td></tr>`);
    }
    $("#proctable tbody").innerHTML = rows.join("") || '<tr><td colspan="8" class="muted">no processes</td></tr>';
    styled($("#proctable tbody"));
    pager("processes", data.processes);
  },
  async queues() {
    const data = await getJSON(`api/queues?${paged("queues")}`);
    $("#queuenote").textContent = data.broker === "memory" ? "Every queue of the embedded broker, with the messages waiting in it."
      : "RabbitMQ: the queues this container consumes, with the messages waiting in each as the broker counts them.";
    $("#queuetable tbody").innerHTML = data.items.map((q) =>
      `<tr><td class="mono">${esc(q.queue)}</td><td class="num">${num(q.depth, "?")}</td><td class="num">${num(q.consumers)}</td>` +
      `<td>${q.pid ? `${esc(q.process)} <span class="muted mono">${esc(q.pid)}</span>` : ""}</td><td class="num">${num(q.inflight)}</td>` +
      `<td class="num">${num(q.buffered)}</td><td class="num">${num(q.prefetch)}</td></tr>`).join("");
    pager("queues", data);
  },
  async convs() {
    const data = await getJSON(`api/convs?${paged("convs")}`);
    $("#convtable tbody").innerHTML = data.items.map((c) =>
      `<tr><td class="mono small">${esc(c.container)}</td><td>${esc(c.initiator)}</td><td class="mono">${esc(c.peer)}</td>` +
      `<td>${esc(c.op)}</td><td>${esc(c.protocol)}</td>` +
      `<td class="num">${age(c.age)}</td><td>${badge(c.state)}</td><td class="mono small">${esc(c.conv)}</td>` +
      `<td class="mono small">${esc(c.trace ?? "")}</td></tr>`).join("") ||
      '<tr><td colspan="9" class="muted">none in flight</td></tr>';
    pager("convs", data);
  },
  async jobs() {
    const data = await getJSON("api/jobs");
    $("#jobnote").textContent = data.available ? "Jobs of the Deploy service (its jobs op)." : `No Deploy service answers: ${data.error || ""}`;
    $("#jobtable tbody").innerHTML = data.items.map((j) => {
      const pct = isNum(j.total) && j.total > 0 && isNum(j.done) ? Math.min(100, Math.round((100 * j.done) / j.total))
        : (j.state === "FINISHED" ? 100 : 0);
      const running = j.state === "RUNNING" || j.state === "PARTIAL";
      return `<tr data-job="${esc(j.job)}"><td class="mono">${esc(j.job)}</td><td>${badge(j.state)}</td>` +
        `<td><span class="bar"><i data-pct="${num(pct)}"></i></span> ${num(j.done, "?")}/${num(j.total, "?")}${isNum(j.failed) && j.failed ? ` · ${num(j.failed)} failed` : ""}</td>` +
        `<td>${since(j.created)}</td><td class="small">${esc(j.error)}</td>` +
        `<td>${running ? `<button class="act cancel" data-job="${esc(j.job)}">cancel</button>` : ""}</td></tr>`;
    }).join("") || '<tr><td colspan="6" class="muted">no jobs</td></tr>';
    styled($("#jobtable tbody"));
  },
  async cache() {
    const data = await getJSON(`api/cache?${paged("cache")}&q=${encodeURIComponent(state.cacheq)}`);
    if (!data.available) {
      $("#cachesummary").innerHTML = `<p class="muted">No Cache service answers: ${esc(data.error)}</p>`;
    } else {
      const v = data.verify || {};
      const counts = Object.entries(v.counts || {}).map(([k, n]) => `${badge(k)} ${num(n)}`).join(" ");
      $("#cachesummary").innerHTML = `<p><b>${num(data.total)}</b> entries, <b>${bytes(data.bytes)}</b> in <span class="mono">${esc(data.root)}</span></p>` +
        `<p>Last verification: ${v.started ? `${since(v.finished || v.started)} (${esc(v.trigger)}) ${counts}` : '<span class="muted">none yet</span>'} ` +
        `<button class="act verify">verify now</button></p>`;
    }
    $("#cachetable tbody").innerHTML = data.items.map((e) =>
      `<tr><td>${esc(e.name)}</td><td>${esc(e.version)}</td><td>${esc(e.platform)}</td><td class="num">${bytes(e.size)}</td>` +
      `<td class="num">${num(e.files)}</td><td>${since(e.last_used)}</td></tr>`).join("");
    $("#quarantine tbody").innerHTML = (data.quarantine || []).map((q) =>
      `<tr><td>${esc(q.name)}</td><td>${esc(q.version)}</td><td class="mono small">${esc(q.moved_to)}</td><td class="small">${esc(JSON.stringify(q.problems))}</td></tr>`).join("") ||
      '<tr><td colspan="4" class="muted">empty (as of the last verification)</td></tr>';
    pager("cache", data);
  },
  async observer() {
    const data = await getJSON("api/observer?limit=200");
    $("#observernote").textContent = data.observers.length
      ? `The last lines of ${data.observers.map((o) => `${o.pid}${o.error ? ` (${o.error})` : ""}`).join(", ")}:`
      : "No observer runs in the system (start res/apps/observer.app in one of its containers).";
    $("#observerlines").textContent = data.items.map((l) => `${new Date(l.time * 1000).toLocaleTimeString()} ${l.line}`).join("\n");
  },
  async audit() {
    const data = await getJSON("api/audit?limit=200");
    $("#audittable tbody").innerHTML = data.items.slice().reverse().map((a) =>
      `<tr><td class="small">${esc(a.time)}</td><td class="mono small">${esc(a.broker_user)}</td><td>${esc(a.user)}</td><td>${esc(a.claimed_user)}</td><td>${esc(a.action)}</td>` +
      `<td>${esc(a.target)}</td><td>${badge(a.result)} ${esc(a.code)}</td><td class="mono small">${esc(a.container)}</td></tr>`).join("") ||
      '<tr><td colspan="8" class="muted">no actions seen since the console started</td></tr>';
  },
};

// -- refreshing -----------------------------------------------------------------------------------
let timer = null;
let busy = false;
let again = false;
async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  try {
    await views[state.tab]();
    state.loaded[state.tab] = true;
    document.body.dataset.loaded = state.tab;
  } catch (err) {
    message(`${state.tab}: ${err.message}`, "error");
  } finally {
    busy = false;
    if (again) { again = false; soon(); }
  }
}
function soon(delay = 150) {
  clearTimeout(timer);
  timer = setTimeout(refresh, delay);
}
// What changes without an event: polled while its tab is shown.
const POLL = { convs: 2000, queues: 2000, jobs: 1000, observer: 2000 };
setInterval(() => { if (POLL[state.tab] && !document.hidden) refresh(); }, 1000);

function connect() {
  const events = new EventSource("api/events");
  const live = $("#live");
  events.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  events.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
  events.addEventListener("process", () => { if (["processes", "queues", "convs"].includes(state.tab)) soon(); });
  events.addEventListener("container", () => { if (state.tab === "processes") soon(); });
  events.addEventListener("audit", () => { if (state.tab === "audit") soon(); });
  events.addEventListener("cache", () => { if (state.tab === "cache") soon(); });
}

// -- actions (need the operator token) --------------------------------------------------------------
async function act(name, body, what) {
  const token = $("#token").value.trim();
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  message(`${what}…`, "");
  try {
    const response = await fetch(`api/${name}`, { method: "POST", headers, body: JSON.stringify(body) });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) message(`${what}: done`, "ok");
    else message(`${what}: ${response.status} ${answer.error || ""}`, "error");
  } catch (err) {
    message(`${what}: ${err.message}`, "error");
  }
  soon();
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.dataset.tab) {
    state.tab = button.dataset.tab;
    document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("on", b === button));
    document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("on", s.id === state.tab));
    refresh();
  } else if (button.classList.contains("kill")) {
    act("kill", { pid: button.dataset.pid }, `kill ${button.dataset.pid}`);
  } else if (button.classList.contains("cancel")) {
    act("job_cancel", { job: button.dataset.job }, `cancel job ${button.dataset.job}`);
  } else if (button.classList.contains("verify")) {
    act("verify", {}, "cache verify");
  }
});
$("#token").value = sessionStorage.getItem("ion-console-token") || "";
$("#token").addEventListener("change", () => sessionStorage.setItem("ion-console-token", $("#token").value.trim()));
$("#filter").addEventListener("input", () => { state.q = $("#filter").value; state.offsets.processes = 0; soon(300); });
$("#cachefilter").addEventListener("input", () => { state.cacheq = $("#cachefilter").value; state.offsets.cache = 0; soon(300); });

connect();
refresh();
