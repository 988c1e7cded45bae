// The room's models in the sidebar (issue 26): which computers have each model and its size, and a
// "Get this model on this computer" button that pulls it from the room through this node's
// Ollama API (POST /api/pull), with its progress. app.js tells when the models changed.

const list = document.getElementById("room-models-list");
const section = document.getElementById("room-models");
const pulls = new Map(); // model -> {text, done, total, error}
let lastReply = null; // the last /api/room-models

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function gigabytes(bytes) {
  if (typeof bytes !== "number") return "";
  return bytes >= 1e9 ? (bytes / 1e9).toFixed(1) + " GB" : Math.max(1, Math.round(bytes / 1e6)) + " MB";
}

function progressOf(name) {
  const pull = pulls.get(name);
  if (!pull) return null;
  if (pull.error) return el("p", { class: "error-text", role: "alert" }, pull.error);
  const bar = el("progress", { max: pull.total || 1, value: pull.done || 0, "aria-label": "Getting " + name });
  return el("div", { class: "room-model-progress", role: "status" }, bar, el("span", null, pull.text));
}

function render(reply) {
  const models = (reply && reply.models) || [];
  section.hidden = models.length === 0;
  list.replaceChildren(
    ...models.map((model) => {
      const where = model.hosts.length ? model.hosts.join(", ") : "no computer answers with it yet";
      const button =
        reply.may_pull && model.can_get && !pulls.has(model.name)
          ? el("button", { type: "button", class: "small-button", "data-model": model.name }, "Get this model on this computer")
          : null;
      return el(
        "li",
        { class: "room-model" },
        el("strong", null, model.name),
        el("span", { class: "muted" }, " " + gigabytes(model.size)),
        el("div", { class: "room-model-hosts" }, model.here ? "On this computer. " : "", "Has it: " + where),
        button,
        progressOf(model.name),
      );
    }),
  );
}

async function refresh() {
  try {
    const response = await fetch("/api/room-models", { headers: { Accept: "application/json" } });
    if (response.ok) {
      lastReply = await response.json();
      render(lastReply);
    }
  } catch (error) {
    /* the node is restarting: the next change refreshes */
  }
}

async function pull(name) {
  const state = { text: "starting…", done: 0, total: 0, error: null };
  pulls.set(name, state);
  refresh();
  try {
    const response = await fetch("/api/pull", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
      body: JSON.stringify({ model: name, stream: true }),
    });
    if (!response.ok) throw new Error(((await response.json().catch(() => ({}))).error) || "the node answered " + response.status);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines.filter((text) => text.trim())) {
        const record = JSON.parse(line);
        if (record.error) throw new Error(record.error);
        state.text = record.total ? Math.floor((100 * (record.completed || 0)) / record.total) + "% of " + gigabytes(record.total) : record.status;
        state.done = record.completed || state.done;
        state.total = record.total || state.total;
      }
      if (lastReply) render(lastReply);
    }
    pulls.delete(name);
  } catch (error) {
    state.error = "Could not get " + name + ": " + error.message;
  }
  refresh();
}

list.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-model]");
  if (button) pull(button.getAttribute("data-model"));
});
window.addEventListener("neuromesh:models", refresh);
refresh();
setInterval(refresh, 15000);
