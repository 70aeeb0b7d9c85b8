// rlhfkit label: the ranking page. Plain JS, no build step.
//
// The page knows completions only by position (A = 0, B = 1, ...) in this annotator's blind order;
// the server maps positions back to completion ids. Model text is untrusted: it only ever reaches
// the page through textContent, never through innerHTML.
//
// State of the shown task, per mode:
//   rank       marks[i] = rank of completion i (1 = best; equal ranks tie; 0 = not ranked yet)
//   scores     marks[i] = Likert score 1..scale (0 = not scored yet)
//   best-of-k, pairwise: best = position of the best completion (null = none yet)
"use strict";

const settings = JSON.parse(document.getElementById("settings").textContent);
const mode = settings.mode;
const group = mode === "rank" ? "rank" : mode === "scores" ? "scores" : "best";
const $ = (id) => document.getElementById(id);

let annotator = "";
let view = null; // the server's answer: {task, progress, can_undo, previous, scale}
let marks = [];
let best = null;
let focused = 0;
let flagging = false;
let busy = false;

// --- helpers ----------------------------------------------------------------------------------

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria") || key === "role" || key === "tabindex") node.setAttribute(key.replace(/^aria([A-Z])/, (m, c) => "aria-" + c.toLowerCase()), value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function letter(i) {
  return i < 26 ? String.fromCharCode(65 + i) : "#" + (i + 1);
}

function status(message, isError = false) {
  const box = $("status");
  box.textContent = message;
  box.classList.toggle("error", isError);
}

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, {credentials: "same-origin", ...options});
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = {error: `the server answered ${response.status}`};
  }
  if (!response.ok) {
    const error = new Error(data && data.error ? data.error : `the server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// --- loading a task ----------------------------------------------------------------------------

async function start(name) {
  annotator = name;
  const url = new URL(window.location.href);
  url.searchParams.set("annotator", name);
  url.searchParams.delete("token"); // the cookie carries it from here on
  history.replaceState(null, "", url);
  try {
    show(await api("/api/task?annotator=" + encodeURIComponent(name)));
  } catch (e) {
    login(e.message);
  }
}

function login(error = "") {
  $("work").hidden = true;
  $("finished").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = error;
  $("name").value = annotator;
  $("name").focus();
}

function show(data) {
  view = data;
  $("login").hidden = true;
  $("who").textContent = data.annotator;
  const {done, total} = data.progress;
  $("progress").setAttribute("aria-valuemax", String(total));
  $("progress").setAttribute("aria-valuenow", String(done));
  $("progress-fill").style.width = total ? `${(100 * done) / total}%` : "0";
  $("progress-text").textContent = `${done} / ${total}`;
  $("undo").disabled = !data.can_undo;
  const task = data.task;
  $("finished").hidden = task !== null;
  $("work").hidden = task === null;
  if (task === null) {
    status("");
    return;
  }
  const k = task.completions.length;
  const previous = data.previous || {};
  marks = (previous.ranks || previous.scores || new Array(k).fill(0)).slice();
  best = previous.best === undefined ? null : previous.best;
  $("comment").value = previous.comment || "";
  setFlagging(Boolean(previous.flag), previous.flag || "");
  $("hint").textContent = hint(k, data.scale);
  renderPrompt(task.prompt);
  renderCompletions(task.completions);
  focused = 0;
  update();
  focusCard(0);
  if (flagging) $("flag-reason").focus();
  status(data.previous ? "Your last submission is back: change it and submit again." : "");
}

function hint(k, scale) {
  if (group === "rank") return `Drag the letters into places, or select a response (↑ ↓) and press its rank (1–${k}). Same rank = tie.`;
  if (group === "scores") return `Score every response from 1 to ${scale}: select it (↑ ↓) and press the number.`;
  return `Pick the ${mode === "pairwise" ? "better" : "best"} response: click it, or press its number (1 = A).`;
}

function renderPrompt(turns) {
  const box = $("prompt");
  box.replaceChildren();
  for (const turn of turns) {
    const node = el("div", {className: `turn role-${turn.role}`});
    if (turn.role !== "prompt") node.append(el("div", {className: "role", text: turn.role}));
    node.append(el("div", {className: "content", text: turn.content}));
    box.append(node);
  }
}

function renderCompletions(completions) {
  const list = $("completions");
  list.replaceChildren();
  const k = completions.length;
  completions.forEach((c, i) => {
    const pills = el("div", {className: "pills", role: "group", ariaLabel: `${group === "scores" ? "Score" : "Rank"} of ${c.label}`});
    if (group === "best") {
      pills.append(el("button", {type: "button", className: "pill best-pill", text: mode === "pairwise" ? "Better" : "Best", dataset: {pos: i}}));
    } else {
      const top = group === "rank" ? k : view.scale;
      for (let r = 1; r <= top; r++) pills.append(el("button", {type: "button", className: "pill", text: String(r), dataset: {pos: i, mark: r}}));
    }
    const handle = el("span", {className: "handle", text: c.label, title: "Drag onto a place in the ranking", dataset: {pos: i}});
    const head = el("div", {className: "card-head"}, [handle, pills]);
    if (c.cut_off) head.append(el("span", {className: "badge", text: "cut off", title: "This response hit the length limit"}));
    const body = el("div", {className: "text", text: c.text});
    const card = el("li", {className: "card", tabindex: "0", ariaLabel: `Response ${c.label}`, dataset: {pos: i}}, [head, body]);
    card.addEventListener("focus", () => {
      focused = i;
      update();
    });
    list.append(card);
  });
  list.querySelectorAll(".pill").forEach((pill) =>
    pill.addEventListener("click", (event) => {
      const pos = Number(pill.dataset.pos);
      if (group === "best") choose(pos);
      else setMark(pos, Number(pill.dataset.mark) === marks[pos] ? 0 : Number(pill.dataset.mark));
      focusCard(pos);
      event.stopPropagation();
    }),
  );
  list.querySelectorAll(".handle").forEach(enableDrag);
}

// --- the ranking strip: places 1..K, drag-and-drop with pointer events ----------------------------

function renderStrip() {
  const strip = $("strip");
  strip.hidden = group !== "rank" || !view || !view.task;
  if (strip.hidden) return;
  const k = marks.length;
  strip.replaceChildren();
  for (let r = 0; r <= k; r++) {
    const title = r === 0 ? "not ranked" : r === 1 ? "1 · best" : r === k ? `${r} · worst` : String(r);
    const slot = el("div", {className: r === 0 ? "slot tray" : "slot", dataset: {rank: r}}, [el("div", {className: "slot-title", text: title})]);
    marks.forEach((m, i) => {
      if (m === r) slot.append(el("span", {className: "chip", text: letter(i), dataset: {pos: i}, title: "Drag to a place"}));
    });
    strip.append(slot);
  }
  strip.querySelectorAll(".chip").forEach(enableDrag);
}

let drag = null;

function enableDrag(node) {
  node.addEventListener("pointerdown", (event) => {
    if (group !== "rank" || event.button !== 0) return;
    event.preventDefault();
    const ghost = el("span", {className: "chip ghost", text: letter(Number(node.dataset.pos))});
    document.body.append(ghost);
    drag = {pos: Number(node.dataset.pos), ghost, node};
    node.setPointerCapture(event.pointerId);
    moveGhost(event);
  });
  node.addEventListener("pointermove", (event) => {
    if (drag && drag.node === node) moveGhost(event);
  });
  node.addEventListener("pointerup", (event) => {
    if (!drag || drag.node !== node) return;
    const target = slotAt(event.clientX, event.clientY);
    const pos = drag.pos;
    endDrag();
    if (target) setMark(pos, Number(target.dataset.rank));
    focusCard(pos);
  });
  node.addEventListener("pointercancel", endDrag);
}

function slotAt(x, y) {
  const under = document.elementFromPoint(x, y);
  return under ? under.closest(".slot") : null;
}

function moveGhost(event) {
  drag.ghost.style.left = `${event.clientX}px`;
  drag.ghost.style.top = `${event.clientY}px`;
  document.querySelectorAll(".slot.over").forEach((s) => s.classList.remove("over"));
  const target = slotAt(event.clientX, event.clientY);
  if (target) target.classList.add("over");
}

function endDrag() {
  if (!drag) return;
  drag.ghost.remove();
  document.querySelectorAll(".slot.over").forEach((s) => s.classList.remove("over"));
  drag = null;
}

// --- changing the judgement ------------------------------------------------------------------------

function setMark(pos, value) {
  const top = group === "rank" ? marks.length : view.scale;
  marks[pos] = Math.max(0, Math.min(top, value));
  update();
}

function choose(pos) {
  best = best === pos ? null : pos;
  update();
}

function setFlagging(on, reason = "") {
  flagging = on;
  $("flag").setAttribute("aria-pressed", String(on));
  $("flag-box").hidden = !on;
  $("flag-reason").value = reason;
  document.body.classList.toggle("flagging", on);
  if (on) $("flag-reason").focus();
  update();
}

function complete() {
  if (!view || !view.task) return false;
  if (flagging) return $("flag-reason").value.trim() !== "";
  if (group === "best") return best !== null;
  return marks.every((m) => m > 0);
}

function update() {
  document.querySelectorAll(".card").forEach((card) => {
    const pos = Number(card.dataset.pos);
    card.classList.toggle("focused", pos === focused);
    card.classList.toggle("chosen", group === "best" && best === pos);
    card.querySelectorAll(".pill").forEach((pill) => {
      const on = group === "best" ? best === pos : Number(pill.dataset.mark) === marks[pos];
      pill.setAttribute("aria-pressed", String(on));
    });
    const tied = group === "rank" && marks[pos] > 0 && marks.filter((m) => m === marks[pos]).length > 1;
    card.classList.toggle("tied", tied);
  });
  renderStrip();
  $("submit").disabled = !complete() || busy;
}

function focusCard(pos) {
  const cards = document.querySelectorAll(".card");
  if (!cards.length) return;
  focused = Math.max(0, Math.min(cards.length - 1, pos));
  cards[focused].focus({preventScroll: false});
  update();
}

// --- submit and undo ---------------------------------------------------------------------------

async function submit() {
  if (!complete() || busy) return;
  const body = {annotator, index: view.task.index, prompt_id: view.task.prompt_id, comment: $("comment").value};
  if (flagging) body.flag = $("flag-reason").value.trim();
  else if (group === "rank") body.ranks = marks;
  else if (group === "scores") body.scores = marks;
  else body.best = best;
  busy = true;
  update();
  status("Saving…");
  try {
    show(await api("/api/submit", body));
    status("Saved.");
  } catch (e) {
    if (e.status === 409) {
      // judged meanwhile (another tab) or the page is out of date: show what is really next
      try {
        show(await api("/api/task?annotator=" + encodeURIComponent(annotator)));
      } catch (ignored) {
        // keep the page as it is; the message below says what happened
      }
    }
    status(`Not saved: ${e.message}`, true);
  } finally {
    busy = false;
    update();
  }
}

async function undo() {
  if (busy || !view || !view.can_undo) return;
  busy = true;
  try {
    show(await api("/api/undo", {annotator}));
  } catch (e) {
    status(`Undo failed: ${e.message}`, true);
  } finally {
    busy = false;
    update();
  }
}

// --- keys ----------------------------------------------------------------------------------------

function onKey(event) {
  if (!view || event.altKey || event.metaKey) return;
  const inText = event.target instanceof HTMLElement && event.target.matches("textarea, input");
  if (inText) {
    if (event.key === "Escape") {
      if (event.target.id === "flag-reason") setFlagging(false);
      focusCard(focused);
      event.preventDefault();
    } else if (event.key === "Enter" && (event.ctrlKey || event.target.id === "flag-reason")) {
      event.preventDefault();
      submit();
    }
    return;
  }
  if (event.ctrlKey && event.key !== "Enter") return;
  const task = view.task;
  const key = event.key;
  let handled = true;
  if (key === "?") toggleGuide();
  else if (key === "u" || key === "U") undo();
  else if (!task) handled = false;
  else if (key === "ArrowDown" || key === "j") focusCard(focused + 1);
  else if (key === "ArrowUp" || key === "k") focusCard(focused - 1);
  else if (key === "Enter") submit();
  else if (key === "f" || key === "F") setFlagging(!flagging);
  else if (key === "c" || key === "C") $("comment").focus();
  else if (/^[0-9]$/.test(key)) {
    const n = Number(key);
    if (group === "best") {
      if (n >= 1 && n <= task.completions.length) {
        choose(n - 1);
        focusCard(n - 1);
      }
    } else setMark(focused, n);
  } else if ((key === "Backspace" || key === "Delete") && group !== "best") setMark(focused, 0);
  else if (key === "ArrowLeft" && group !== "best") setMark(focused, group === "rank" ? Math.max(1, marks[focused] - 1) : marks[focused] - 1);
  else if (key === "ArrowRight" && group !== "best") setMark(focused, marks[focused] + 1);
  else handled = false;
  if (handled) event.preventDefault();
}

function toggleGuide() {
  const hidden = !$("guide").hidden;
  $("guide").hidden = hidden;
  $("toggle-guide").setAttribute("aria-expanded", String(!hidden));
  document.body.classList.toggle("no-guide", hidden);
}

// --- start -----------------------------------------------------------------------------------------

document.querySelectorAll(".for-rank, .for-scores, .for-best").forEach((node) => {
  node.hidden = !node.classList.contains("for-" + group);
});
$("submit").addEventListener("click", submit);
$("undo").addEventListener("click", undo);
$("toggle-guide").addEventListener("click", toggleGuide);
$("flag").addEventListener("click", () => setFlagging(!flagging));
$("flag-reason").addEventListener("input", update);
$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  start($("name").value.trim());
});
document.addEventListener("keydown", onKey);
if (settings.annotators.length) {
  const names = el("datalist", {id: "names"}, settings.annotators.map((name) => el("option", {value: name})));
  document.body.append(names);
  $("name").setAttribute("list", "names");
}
document.addEventListener("pointerup", endDrag);

const given = new URL(window.location.href).searchParams.get("annotator") || settings.default_annotator;
if (given) start(given);
else login();
