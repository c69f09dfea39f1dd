// The analysis page's logic: forms -> /v1/compare and /v1/rescue, results -> colored tokens and charts.
// Every number shown comes from the API (the share of KL before L included); nothing is recomputed here.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tokens: [], kl: null, setMarker: null, tasks: [] };

// -- talking to the server -----------------------------------------------------------------------------------
function showError(text) {
  const box = $("error");
  box.textContent = text || "";
  box.hidden = !text;
}

// A teacher started with --auth-tokens needs a token on every API call: typed once, kept for this tab only.
function authHeaders() {
  const token = sessionStorage.getItem("prefix-distill-token");
  return token ? { authorization: `Bearer ${token}` } : {};
}

async function api(path, body) {
  let res;
  try {
    res = await fetch(path, body === undefined ? { headers: authHeaders() } : {
      method: "POST", headers: { "content-type": "application/json", ...authHeaders() }, body: JSON.stringify(body),
    });
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message}).`);
  }
  const text = await res.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: reported below */ }
  if (!res.ok) {
    const e = data && data.error;
    const where = e && e.param ? `${e.param}: ` : "";
    throw new Error(`${where}${e ? e.message : text.slice(0, 300)} (HTTP ${res.status})`);
  }
  return data;
}

async function run(button, what, work) {
  showError("");
  button.disabled = true;
  $("status").textContent = `${what}…`;
  const t0 = performance.now();
  try {
    await work();
    $("status").textContent = `${what}: done in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  } catch (err) {
    showError(err.message);
    $("status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

const num = (id) => Number($(id).value);
const fmt = (v, d = 3) => (Number.isFinite(v) ? v.toFixed(d) : String(v));
const visible = (s) => (s === "" ? "∅" : s.replace(/\n/g, "↵\n"));

// -- single prompt -------------------------------------------------------------------------------------------
function singleBody() {
  const body = { student: $("student").value || null, prompt: $("prompt").value, top_k: num("top-k") };
  if (document.querySelector("input[name=mode]:checked").value === "given") {
    body.completion = $("completion").value;
  } else {
    body.generate = { max_tokens: num("gen-tokens"), temperature: num("gen-temp"), seed: num("gen-seed") };
  }
  return body;
}

// Log scale up to the largest value: a few tokens usually carry most of the KL, and the rest stay visible.
function colorOf(value, max, hue) {
  const t = max > 0 ? Math.min(1, Math.log1p(Math.max(0, value)) / Math.log1p(max)) : 0;
  return `hsl(${hue}, 85%, ${Math.round(97 - 45 * t)}%)`;
}

function measure(tok, by) {
  return by === "teacher_logprob" ? -tok.teacher_logprob : tok[by];
}

function paintTokens() {
  const by = $("color-by").value;
  const values = state.tokens.map((t) => measure(t, by));
  const max = Math.max(...values, 1e-6);
  const hue = by === "teacher_logprob" ? 215 : 8;
  document.querySelectorAll("#tokens .tok").forEach((span, i) => {
    span.style.background = colorOf(values[i], max, hue);
  });
  $("legend").innerHTML = "";
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.background = `linear-gradient(to right, ${colorOf(0, 1, hue)}, ${colorOf(1, 1, hue)})`;
  $("legend").append("0", bar, `${fmt(max)} nats (log scale)`);
}

function renderComparison(data) {
  state.tokens = data.tokens;
  const box = $("tokens");
  box.replaceChildren();
  const prompt = document.createElement("span");
  prompt.className = "prompt-text";
  prompt.textContent = $("prompt").value;
  box.append(prompt);
  data.tokens.forEach((tok, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.dataset.index = String(i);
    span.textContent = visible(tok.token);
    box.append(span);
  });
  const n = data.tokens.length;
  $("summary").textContent = `${n} tokens${data.generated ? " written by the student" : ""} · total reverse KL ` +
    `${fmt(data.total.reverse_kl)} (mean ${fmt(data.total.reverse_kl / Math.max(n, 1))}) · total forward KL ` +
    `${fmt(data.total.forward_kl)} · teacher ${data.model} · student ${data.student}`;
  paintTokens();
}

function tipHtml(tok, i) {
  const rows = tok.top.map((alt) => `<tr class="${alt.token_id === tok.token_id ? "chosen" : ""}">` +
    `<td>${escapeHtml(visible(alt.token))}</td><td>${fmt(alt.teacher_logprob)}</td><td>${fmt(alt.student_logprob)}</td></tr>`);
  return `<div><b>#${i + 1}</b> <code>${escapeHtml(visible(tok.token))}</code> (id ${tok.token_id})</div>` +
    `<div>teacher log p <b>${fmt(tok.teacher_logprob)}</b> · student log p <b>${fmt(tok.student_logprob)}</b></div>` +
    `<div>reverse KL ${fmt(tok.reverse_kl, 4)} · forward KL ${fmt(tok.forward_kl, 4)}</div>` +
    (rows.length ? `<table class="alts"><tr><th>teacher's top ${rows.length}</th><th>teacher</th><th>student</th></tr>` +
      `${rows.join("")}</table>` : "<div class=dim>no alternatives asked (top-k 0)</div>");
}

function escapeHtml(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function onHover(ev) {
  const span = ev.target.closest(".tok");
  const tip = $("tip");
  if (!span) { tip.hidden = true; return; }
  const i = Number(span.dataset.index);
  tip.innerHTML = tipHtml(state.tokens[i], i);
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.min(box.left, window.innerWidth - tip.offsetWidth - 8);
  const below = box.bottom + 6 + tip.offsetHeight < window.innerHeight;
  tip.style.left = `${Math.max(4, left)}px`;
  tip.style.top = `${below ? box.bottom + 6 : box.top - tip.offsetHeight - 6}px`;
}

// -- batch: KL by position and rescue ------------------------------------------------------------------------
function sourceBody(rescue) {
  const body = { student: $("student").value || null };
  if ($("source").value === "own") {
    const lines = $("own-prompts").value.split("\n").filter((l) => l.trim() !== "");
    body.prompts = rescue
      ? lines.map((l) => { const [prompt, answer] = l.split("\t"); return { prompt, answer: answer ?? "" }; })
      : lines;
  } else {
    body.task = $("source").value;
    body.count = num("count");
  }
  return body;
}

function showShare(L) {
  const kl = state.kl;
  const share = kl.share_within[L - 1];
  $("L-slider").value = String(L);
  $("share").textContent = `first ${L} of ${kl.share_within.length} positions hold ${(share * 100).toFixed(1)}% of the KL`;
}

async function runBatch() {
  const body = { ...sourceBody(false), max_new_tokens: num("max-new"), temperature: num("batch-temp"), seed: num("batch-seed") };
  const data = await api("/v1/compare", body);
  state.kl = data;
  const T = data.mean_kl_by_position.length;
  const slider = $("L-slider");
  slider.max = String(Math.max(T, 1));
  slider.disabled = T === 0;
  const L = Math.min(Number(slider.value) || 16, Math.max(T, 1));
  state.setMarker = Charts.klChart($("kl-chart"), data.mean_kl_by_position, L, showShare);
}

async function runRescue() {
  const lengths = $("lengths").value.split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
  const body = { ...sourceBody(true), lengths, max_new_tokens: num("max-new") };
  const data = await api("/v1/rescue", body);
  Charts.rescueChart($("rescue-chart"), data.curve.map((c) => c.length), data.curve.map((c) => c.accuracy));
  const box = $("rescue-examples");
  box.replaceChildren();
  for (const point of data.curve) {
    for (const ex of point.examples.slice(0, 2)) {
      const div = document.createElement("div");
      div.className = "ex";
      const mark = ex.correct ? "✓" : "✗";
      div.innerHTML = `<span class="${ex.correct ? "ok" : "bad"}">${mark}</span> L=${point.length} ` +
        `${escapeHtml(ex.prompt)} <span class="teacher" title="teacher prefix">${escapeHtml(ex.teacher_prefix)}</span>` +
        `${escapeHtml(ex.student)}`;
      box.append(div);
    }
  }
}

// -- wiring --------------------------------------------------------------------------------------------------
function switchView(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.view === name));
  $("view-single").hidden = name !== "single";
  $("view-batch").hidden = name !== "batch";
  $("tip").hidden = true;
}

async function init() {
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => switchView(b.dataset.view)));
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", () => {
    const given = document.querySelector("input[name=mode]:checked").value === "given";
    $("completion").disabled = !given;
    $("gen-options").hidden = given;
  }));
  $("single-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    run($("compare-btn"), "comparing", async () => renderComparison(await api("/v1/compare", singleBody())));
  });
  $("batch-form").addEventListener("submit", (ev) => { ev.preventDefault(); run($("batch-btn"), "KL by position", runBatch); });
  $("rescue-btn").addEventListener("click", () => run($("rescue-btn"), "rescue curve", runRescue));
  $("color-by").addEventListener("change", paintTokens);
  $("tokens").addEventListener("mouseover", onHover);
  $("tokens").addEventListener("mouseleave", () => { $("tip").hidden = true; });
  $("L-slider").addEventListener("input", () => { if (state.setMarker) showShare(state.setMarker(num("L-slider"))); });
  $("source").addEventListener("change", () => {
    const own = $("source").value === "own";
    $("own-prompts-label").hidden = !own;
    $("count").disabled = own;
  });
  $("token").value = sessionStorage.getItem("prefix-distill-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("prefix-distill-token", $("token").value.trim());
    loadModels();
  });
  await loadModels();
}

// The teacher, the students and the tasks (GET /v1/analysis); again once a token is typed.
async function loadModels() {
  try {
    const info = await api("/v1/analysis");
    showError("");
    $("teacher-name").textContent = info.teacher.model || "unreachable";
    if (info.teacher.error) showError(`teacher: ${info.teacher.error}`);
    $("student").replaceChildren(...info.students.map((s) => new Option(`${s.name} (${(s.parameters / 1e6).toFixed(1)}M)`, s.name)));
    $("source").replaceChildren(...info.tasks.map((t) => new Option(t, t)), new Option("my prompts", "own"));
  } catch (err) {
    showError(err.message);
  }
}

init();
