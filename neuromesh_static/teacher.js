// The teacher's room (issue 24): the room's rules on a student's chat page, "Show my teacher",
// and the teacher's own page (teacher.html). A module of its own beside app.js: it reads only
// /api/room, /api/teacher and the page's hash, and never touches the draft in the composer.

const $ = (selector) => document.querySelector(selector);

function h(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === false || value == null) continue;
    if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child != null && child !== false) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function call(path, options) {
  const response = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, options));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText || "the computer did not answer");
  return body;
}

function post(path, body) {
  return call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
  });
}

function stylesheet() {
  if (!document.querySelector('link[href="/static/teacher.css"]'))
    document.head.append(h("link", { rel: "stylesheet", href: "/static/teacher.css" }));
}

/** Calls ``refresh`` when the room changes (a "room" event), and every ``period`` ms besides. */
function follow(refresh, period) {
  const source = new EventSource("/api/events");
  source.addEventListener("room", () => refresh());
  source.addEventListener("open", () => refresh());
  setInterval(refresh, period);
  refresh();
}

// ==== the student's side: on the chat page ====================================================

const student = {
  room: null,
  current: null, // {id, own, private} of the conversation on screen
  paused: false,
};

function teacherName(room) {
  return room.teacher_name || "the teacher";
}

function renderRules() {
  const room = student.room;
  let box = $("#room-rules");
  if (!box) {
    box = h("div", { id: "room-rules", class: "room-rules", "aria-live": "polite" });
    $("#composer").prepend(box);
  }
  box.replaceChildren();
  const policy = room && room.policy;
  student.paused = Boolean(policy && policy.paused && !room.is_teacher);
  if (!room) return;
  if (!room.teacher) return; // a room without a teacher: nothing to tell above the prompt
  const line = [h("strong", {}, room.is_teacher ? "You are this room's teacher" : "Teacher: " + teacherName(room))];
  if (room.quota_left != null && !room.is_teacher)
    line.push(h("span", { id: "room-quota" }, " · " + room.quota_left + " of " + policy.quota + " chats left this hour"));
  if (room.is_teacher) line.push(" · ", h("a", { href: "/static/teacher.html", id: "teacher-link" }, "Open the teacher's room"));
  box.append(h("p", { class: "room-line", id: "room-teacher" }, line));
  if (student.paused) {
    box.append(h("p", { class: "room-paused", id: "room-paused", role: "alert" },
      h("strong", {}, "Paused by " + teacherName(room) + ": "), policy.reason || "no reason given",
      h("span", { class: "muted" }, " Your draft stays here and your chats stay readable.")));
  }
  if (policy && policy.instructions && !room.is_teacher) {
    box.append(h("details", { class: "room-instructions", id: "room-instructions" },
      h("summary", {}, teacherName(room) + " set instructions for the room's LLMs"),
      h("p", {}, policy.instructions)));
  }
}

async function refreshRoom() {
  try {
    student.room = await call("/api/room");
  } catch (error) {
    return; // a guest before the room code, or the node restarting: the next refresh tells
  }
  renderRules();
  renderShare();
}

function currentId() {
  const match = location.hash.match(/^#\/chat\/(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

async function followConversation() {
  const id = currentId();
  student.current = null;
  renderShare();
  if (!id) return;
  try {
    const conversation = await call("/api/conversations/" + encodeURIComponent(id) + "?limit=1");
    if (currentId() === id) student.current = { id, own: conversation.own, private: conversation.private };
  } catch (error) {
    student.current = null;
  }
  renderShare();
}

function renderShare() {
  let button = $("#show-teacher");
  const room = student.room;
  const c = student.current;
  const usable = room && room.teacher && !room.is_teacher && c && c.own && !c.private;
  if (!usable) {
    if (button) button.hidden = true;
    return;
  }
  if (!button) {
    button = h("button", { type: "button", id: "show-teacher", class: "small-button show-teacher" });
    button.addEventListener("click", toggleShare);
    $("#view-chat .view-header").append(button);
  }
  const shown = room.shown.includes(c.id);
  button.hidden = false;
  button.setAttribute("aria-pressed", String(shown));
  button.textContent = shown ? "Shown to " + teacherName(room) + " · take back" : "Show my teacher";
}

async function toggleShare() {
  const c = student.current;
  const shown = !student.room.shown.includes(c.id);
  try {
    const reply = await post("/api/room/share", { conversation_id: c.id, shown });
    student.room.shown = reply.shown;
  } catch (error) {
    alert(error.message);
  }
  renderShare();
}

/** While the room is paused, sending keeps the draft where it is and says why. */
function holdDrafts() {
  const refuse = (event) => {
    if (!student.paused) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    const paused = $("#room-paused");
    if (paused) paused.classList.add("flash");
    setTimeout(() => paused && paused.classList.remove("flash"), 600);
  };
  document.addEventListener("submit", (event) => event.target.id === "composer" && refuse(event), true);
  document.addEventListener("keydown", (event) => {
    if (event.target.id === "prompt" && event.key === "Enter" && !event.shiftKey && !event.isComposing) refuse(event);
  }, true);
}

// ==== the teacher's page: teacher.html ========================================================

const teacher = { view: null, editing: false };

function policyForm(policy, models) {
  const form = $("#policy-form");
  if (teacher.editing) return; // never overwrite what the teacher is typing
  form.reason.value = (policy && policy.reason) || "";
  form.instructions.value = (policy && policy.instructions) || "";
  form.guests.checked = !policy || policy.guests !== false;
  form.quota.value = (policy && policy.quota) || "";
  form.models.value = ((policy && policy.models) || []).join(", ");
  form.models.placeholder = models.length ? "all: " + models.join(", ") : "all models";
}

function cell(text, attributes) {
  return h("td", attributes || {}, text);
}

function renderDashboard() {
  const view = teacher.view;
  const policy = view.policy;
  const state = $("#room-state");
  state.className = "room-state " + (policy && policy.paused ? "is-paused" : "is-open");
  state.textContent = policy && policy.paused ? "Paused: " + (policy.reason || "no reason given") : "Open: students can chat";
  const online = view.students.filter((s) => s.online).length;
  $("#count-online").textContent = online;
  $("#count-hosts").textContent = view.hosts.filter((host) => host.up).length;
  $("#count-chats").textContent = view.students.reduce((sum, s) => sum + s.chats_last_hour, 0);
  $("#waited-longest").textContent = view.waited_longest ? "Waited longest: " + view.waited_longest : "No one waited yet";
  $("#student-rows").replaceChildren(...view.students.map((s) => h("tr", {},
    h("th", { scope: "row" }, s.name), cell(s.online ? "online" : "away", { class: s.online ? "good" : "muted" }),
    cell(s.chats_last_hour), cell(s.longest_wait_s ? s.longest_wait_s.toFixed(1) + " s" : "–"))));
  if (!view.students.length) $("#student-rows").append(h("tr", {}, h("td", { colspan: 4 }, "No student computer has joined yet.")));
  $("#host-rows").replaceChildren(...view.hosts.map((host) => h("tr", {},
    h("th", { scope: "row" }, host.name), cell(host.up ? "up" : "down", { class: host.up ? "good" : "poor" }),
    cell((host.models || []).join(", ")), cell((host.load && host.load.in_flight) || 0), cell((host.load && host.load.queued) || 0))));
  if (!view.hosts.length) $("#host-rows").append(h("tr", {}, h("td", { colspan: 5 }, "No computer of the room shares an LLM.")));
  $("#shared-list").replaceChildren(...view.shared.map((s) => h("li", {},
    h("button", { type: "button", class: "link-button", "data-id": s.id }, s.title), h("span", { class: "muted" }, " shared by " + s.shared_by))));
  if (!view.shared.length) $("#shared-list").append(h("li", { class: "muted" }, "No student has shown you a chat."));
  const models = [...new Set(view.hosts.flatMap((host) => host.models || []))];
  policyForm(policy, models);
}

async function refreshDashboard() {
  try {
    teacher.view = await call("/api/teacher");
  } catch (error) {
    $("#teacher-error").textContent = error.message;
    return;
  }
  $("#teacher-error").textContent = "";
  $("#fingerprint").textContent = teacher.view.teacher;
  renderDashboard();
}

async function savePolicy(changes) {
  const form = $("#policy-form");
  const quota = parseInt(form.quota.value, 10);
  const models = form.models.value.split(",").map((m) => m.trim()).filter(Boolean);
  const body = Object.assign({
    paused: Boolean(teacher.view && teacher.view.policy && teacher.view.policy.paused), reason: form.reason.value.trim(), instructions: form.instructions.value.trim(),
    guests: form.guests.checked, quota: quota > 0 ? quota : null, models: models.length ? models : null,
  }, changes || {});
  try {
    await post("/api/teacher/policy", body);
    teacher.editing = false;
    $("#policy-status").textContent = "Saved and signed: every computer of the room has it within a second.";
  } catch (error) {
    $("#policy-status").textContent = error.message;
  }
  refreshDashboard();
}

async function showShared(id) {
  const box = $("#shared-chat");
  try {
    const c = await call("/api/teacher/shared/" + encodeURIComponent(id));
    box.replaceChildren(h("h3", {}, c.title, h("span", { class: "muted" }, " · shared by " + c.shared_by)),
      ...c.messages.map((m) => h("div", { class: "shared-message " + m.role },
        h("strong", {}, m.role === "user" ? m.sender || "student" : m.answered_by_name || "LLM"), h("p", {}, m.content))));
  } catch (error) {
    box.replaceChildren(h("p", { class: "muted" }, error.message));
  }
  box.hidden = false;
}

function askToClearGuests() {
  const count = teacher.view ? teacher.view.guest_chats : 0;
  const confirm = $("#clear-confirm");
  if (!count) {
    $("#clear-status").textContent = "No guest has written a chat in this room.";
    return;
  }
  $("#clear-question").textContent = "Delete the " + count + (count === 1 ? " chat" : " chats") +
    " guests wrote, on every computer of the room?";
  confirm.dataset.count = String(count);
  confirm.hidden = false;
  $("#clear-no").focus();
}

async function clearGuests() {
  const confirm = $("#clear-confirm");
  confirm.hidden = true;
  try {
    const reply = await post("/api/teacher/clear-guests", { count: Number(confirm.dataset.count) });
    $("#clear-status").textContent = "Clearing " + reply.clearing + " guests' chats on every computer.";
  } catch (error) {
    $("#clear-status").textContent = error.message;
  }
  refreshDashboard();
}

function startTeacherPage() {
  $("#clear-guests").addEventListener("click", askToClearGuests);
  $("#clear-yes").addEventListener("click", clearGuests);
  $("#clear-no").addEventListener("click", () => { $("#clear-confirm").hidden = true; });
  const form = $("#policy-form");
  form.addEventListener("input", () => { teacher.editing = true; });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    savePolicy();
  });
  $("#pause-now").addEventListener("click", () => savePolicy({ paused: true }));
  $("#resume-now").addEventListener("click", () => savePolicy({ paused: false }));
  $("#shared-list").addEventListener("click", (event) => {
    const id = event.target.getAttribute && event.target.getAttribute("data-id");
    if (id) showShared(id);
  });
  follow(refreshDashboard, 3000);
}

// ==== start ===================================================================================

stylesheet();
if (document.body.dataset.page === "teacher") {
  startTeacherPage();
} else {
  holdDrafts();
  // Start once app.js is live (its /api/events is open): a guest has entered the room code by then.
  const waiting = setInterval(() => {
    if (!document.querySelector("#live-dot.live")) return;
    clearInterval(waiting);
    window.addEventListener("hashchange", followConversation);
    followConversation();
    follow(refreshRoom, 10000);
  }, 200);
}
