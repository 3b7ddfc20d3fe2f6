// The wsrelay demo chat: the browser's own WebSocket to the relay's /chat route (mux mode),
// reconnecting with exponential backoff and full jitter as the wsrelay client SDK does, and a
// second WebSocket to the relay's admin tap that shows this connection's frames.
"use strict";

const ROOMS = ["lobby", "rust", "random"];
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const MAX_LINES = 500;
const MAX_FRAMES = 300;

const $ = (id) => document.getElementById(id);
const tabId = Math.random().toString(36).slice(2, 10);
let sent = 0;
let socket = null;
let tap = null;
let attempt = 0;
let retryTimer = null;
let lastSeq = 0;
let backend = null;
let openedAt = null;
let nick = localStorage.getItem("wsrelay-demo-nick") || "guest-" + Math.floor(1000 + Math.random() * 9000);
let room = (location.hash.slice(1) || "lobby").toLowerCase();

// Attempt n waits between min and min + min(max, min * 2^(n-1)), never more than max: the
// same rule as the SDK's Backoff, so a fleet dropped at once does not return at once.
function backoffDelay(n) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(n - 1, 30));
  return Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS + Math.random() * ceiling);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function backendTag(name) {
  return el("span", "tag b-" + name, name);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
}

function addLine(node) {
  const lines = $("lines");
  const atBottom = lines.scrollHeight - lines.scrollTop - lines.clientHeight < 40;
  lines.append(node);
  while (lines.children.length > MAX_LINES) lines.firstChild.remove();
  if (atBottom) lines.scrollTop = lines.scrollHeight;
}

function showLine(line) {
  if (line.seq <= lastSeq) return; // already shown (history after a move, or a replay)
  lastSeq = line.seq;
  const li = el("li");
  li.append(el("span", "time", clock(line.at)));
  li.append(el("span", "nick", line.nick));
  const text = el("span", "text", line.text);
  const via = backendTag(line.via);
  via.classList.add("via");
  via.title = "taken by this backend";
  text.append(via);
  li.append(text);
  addLine(li);
}

function showSystem(text, kind) {
  const li = el("li", "system" + (kind ? " " + kind : ""));
  li.append(el("span", "time", clock(Date.now())));
  li.append(el("span", "text", text));
  addLine(li);
}

function setState(text, ok) {
  const state = $("state");
  state.textContent = text;
  state.className = "pill " + (ok ? "pill-ok" : "pill-wait");
  $("text").disabled = !ok;
  $("send").disabled = !ok;
}

function setBackend(name, moved) {
  backend = name;
  $("served").hidden = false;
  const served = $("served-name");
  served.textContent = name;
  served.className = "b-" + name;
  if (moved) {
    $("served").classList.remove("flash");
    void $("served").offsetWidth; // restart the animation
    $("served").classList.add("flash");
  }
  renderBackendsButtons();
}

let lastBackends = [];
function renderBackends(list) {
  lastBackends = list;
  renderBackendsButtons();
}
function renderBackendsButtons() {
  const ul = $("backends");
  ul.replaceChildren();
  for (const b of lastBackends) {
    const li = el("li");
    li.append(el("span", "dot " + (b.up ? "up" : "down")));
    const name = el("span", "name b-" + b.name, b.name + (b.name === backend ? " (you)" : ""));
    li.append(name);
    li.append(el("span", "count", b.up ? b.clients + (b.clients === 1 ? " client" : " clients") : "down"));
    const kill = el("button", "kill", "kill");
    kill.disabled = !b.up || !socket || socket.readyState !== WebSocket.OPEN;
    kill.title = "crash " + b.name + ": drop its process and every socket it holds";
    kill.onclick = () => send({ type: "kill", backend: b.name });
    li.append(kill);
    ul.append(li);
  }
}

function renderMembers(list) {
  const ul = $("members");
  ul.replaceChildren();
  for (const m of list) {
    const li = el("li");
    li.append(el("span", "dot up"));
    li.append(el("span", "", m.nick));
    li.append(backendTag(m.backend));
    ul.append(li);
  }
}

function renderRooms() {
  const box = $("rooms");
  box.replaceChildren();
  for (const name of new Set([...ROOMS, room])) {
    const b = el("button", name === room ? "current" : "", "#" + name);
    b.type = "button";
    b.onclick = () => join(nick, name);
    box.append(b);
  }
  $("room-name").textContent = "#" + room;
  document.title = "#" + room + " · wsrelay demo";
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function onMessage(event) {
  let m;
  try { m = JSON.parse(event.data); } catch { return; }
  switch (m.type) {
    case "welcome": {
      const moved = backend !== null && socket.welcomed && m.backend !== backend;
      if (moved) {
        showSystem(`${backend} went away: the relay moved you to ${m.backend}. ` +
          `Same WebSocket, open for ${age()}; nothing to reconnect.`, "move");
      } else if (!socket.welcomed) {
        showSystem(`joined #${m.room} as ${m.nick}, served by ${m.backend} (connection ${m.conn})`);
      }
      socket.welcomed = true;
      setBackend(m.backend, moved);
      for (const line of m.history) showLine(line);
      $("conn").textContent = "#" + m.conn;
      if (m.tap) openTap(m.tap);
      break;
    }
    case "line": showLine(m); break;
    case "members": renderMembers(m.members); break;
    case "backends": renderBackends(m.backends); break;
    case "system": showSystem(m.text); break;
  }
}

function age() {
  if (!openedAt) return "0 s";
  const s = Math.round((Date.now() - openedAt) / 1000);
  return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
}
setInterval(() => {
  $("socket-age").textContent = openedAt ? "socket open " + age() : "";
}, 1000);

function connect() {
  clearTimeout(retryTimer);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/chat?room=${encodeURIComponent(room)}&user=${encodeURIComponent(nick)}`;
  const ws = new WebSocket(url);
  socket = ws;
  ws.welcomed = false;
  setState(attempt ? `reconnecting (attempt ${attempt + 1})…` : "connecting…", false);
  ws.onopen = () => {
    if (ws !== socket) return;
    attempt = 0;
    openedAt = Date.now();
    setState("connected", true);
    renderBackendsButtons();
    $("text").focus();
  };
  ws.onmessage = (event) => { if (ws === socket) onMessage(event); };
  ws.onclose = (event) => {
    if (ws !== socket) return; // replaced on purpose (room or nick change)
    openedAt = null;
    closeTap();
    attempt += 1;
    const delay = backoffDelay(attempt);
    const why = event.code === 1006 ? "connection lost" : `closed ${event.code}${event.reason ? " " + event.reason : ""}`;
    setState(`${why}: retry in ${(delay / 1000).toFixed(1)} s`, false);
    showSystem(`${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
    renderBackendsButtons();
    retryTimer = setTimeout(connect, delay);
  };
}

function join(newNick, newRoom) {
  nick = newNick.trim().slice(0, 24) || nick;
  room = (newRoom.trim().toLowerCase().replace(/[^a-z0-9_-]/g, "") || "lobby").slice(0, 32);
  localStorage.setItem("wsrelay-demo-nick", nick);
  history.replaceState(null, "", "#" + room);
  $("nick").value = nick;
  $("room").value = room;
  renderRooms();
  const old = socket;
  socket = null;
  if (old) old.close(1000, "changing room");
  closeTap();
  $("lines").replaceChildren();
  lastSeq = 0;
  backend = null;
  attempt = 0;
  connect();
}

function openTap(url) {
  if (tap && tap.url === url && tap.readyState <= WebSocket.OPEN) return;
  if (location.protocol === "https:" && url.startsWith("ws:")) {
    // The tap is on the admin listener, plain ws://, which an https page may not open.
    $("frames").replaceChildren(el("li", "ctl empty",
      "the tap is on the admin listener (plain ws://), which this https page may not open: " +
      "run `wsrelay tap --admin ADDR --route /chat` instead"));
    return;
  }
  closeTap();
  $("frames").replaceChildren(el("li", "ctl empty", "waiting for frames: say something"));
  tap = new WebSocket(url);
  tap.onmessage = (event) => {
    let r;
    try { r = JSON.parse(event.data); } catch { return; }
    if (r.conn === undefined) return; // the tap's own notices (records lost)
    const li = el("li");
    const time = new Date(r.time_ms);
    li.append(el("span", "ctl", time.toLocaleTimeString([], { hour12: false }) + "." + String(time.getMilliseconds()).padStart(3, "0")));
    li.append(el("span", r.direction === "in" ? "in" : "out", r.direction === "in" ? "→ in" : "← out"));
    li.append(el("span", r.opcode === "text" || r.opcode === "binary" ? "" : "ctl", r.opcode));
    li.append(el("span", "ctl", r.len + " B"));
    li.append(el("span", "preview", r.preview));
    const frames = $("frames");
    frames.querySelector(".empty")?.remove();
    frames.prepend(li);
    while (frames.children.length > MAX_FRAMES) frames.lastChild.remove();
  };
}

function closeTap() {
  if (tap) { tap.onmessage = null; tap.close(); tap = null; }
}

$("who").onsubmit = (event) => { event.preventDefault(); join($("nick").value, $("room").value); };
$("say").onsubmit = (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  sent += 1;
  send({ type: "say", id: `${tabId}-${sent}`, text });
  $("text").value = "";
};
window.addEventListener("hashchange", () => {
  const wanted = location.hash.slice(1).toLowerCase();
  if (wanted && wanted !== room) join(nick, wanted);
});

join(nick, room);
