// The diagnostics view.

import { $, formatClock, formatDuration, formatMiB, h } from "./dom.js";
import { refreshHealth } from "./live.js";
import { roomStatusText } from "./room.js";
import { llmHostCount, state } from "./state.js";

/** A counter's key as a label in the style of the others: "frames_sent" -> "Frames sent". */
export function counterLabel(key) {
  const words = String(key).replace(/[_-]+/g, " ").replace(/([a-z])([A-Z])/g, "$1 $2").trim().toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export function kv(rows) {
  return h(
    "dl",
    { class: "kv" },
    rows.filter(Boolean).map(([key, value]) => [h("dt", null, key), h("dd", null, value)]),
  );
}

export function panel(title, ...content) {
  return h("section", { class: "panel glass" }, h("h2", null, title), ...content);
}

export function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "data-table" },
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          headers.map((text) => h("th", { scope: "col" }, text)),
        ),
      ),
      h(
        "tbody",
        null,
        rows.map((row) =>
          h(
            "tr",
            null,
            row.map((cell) => h("td", null, cell)),
          ),
        ),
      ),
    ),
  );
}

export async function refreshDiagnostics() {
  await refreshHealth();
  renderDiagnostics();
}

export function renderDiagnostics() {
  const d = state.health;
  if (state.view !== "diagnostics") return;
  if (!d) {
    $("#diagnostics").replaceChildren(
      panel("This node", h("p", { class: "error-text" }, "The node does not answer.")),
    );
    return;
  }
  $("#diagnostics").replaceChildren(
    nodePanel(d),
    networkPanel(d),
    portsPanel(d),
    llmPanel(d),
    errorsPanel(d.recent_errors || []),
    healthPanel(d),
  );
}

function nodePanel(d) {
  return panel(
    "This node",
    kv([
      ["Name", d.name],
      ["Node id", d.node_id],
      ["Status", d.status],
      ["Version", d.version + (d.protocol_version ? " (protocol " + d.protocol_version + ")" : "")],
      ["Python", d.python || "—"],
      ["Up for", formatDuration(d.uptime_s)],
      state.role === "owner" ? ["Room", roomStatusText(d)] : null,
    ]),
  );
}

function networkPanel(d) {
  const interfaces = d.interfaces || [];
  return panel(
    "Network",
    table(
      ["Interface", "Address", "Broadcast"],
      interfaces.map((i) => [i.name, i.ip + (i.prefix !== undefined ? "/" + i.prefix : ""), i.broadcast || "—"]),
      "This node does not report its interfaces.",
    ),
    kv([
      ["Discovery", d.discovery ? "on: announces itself by UDP broadcast" : "off (links only to --peer addresses)"],
      ["Broadcasts to", (d.broadcast_addresses || []).join(", ") || "—"],
    ]),
  );
}

function portsPanel(d) {
  return panel(
    "Ports",
    table(
      ["Use", "Protocol", "Port", "State"],
      [
        ["Web page and API", "TCP", String(d.ports.http), "bound (serving this page)"],
        ["Peer links", "TCP", String(d.ports.tcp), d.ports.tcp ? "bound" : "not bound"],
        ["Discovery", "UDP", String(d.ports.udp), d.discovery ? "listening" : "not listening (discovery is off)"],
      ],
      "",
    ),
  );
}

function llmPanel(d) {
  const llm = d.llm || {};
  if (!d.llm) return panel("LLM backend", kv([["Has an LLM", d.has_llm ? "yes" : "no"]]));
  return panel(
    "LLM backend",
    kv([
      ["Available", llm.available ? "yes" : "no"],
      ["Backend", llm.backend || "none"],
      llm.url ? ["URL", llm.url] : null,
      ["Models", (llm.models || []).join(", ") || "none"],
      [
        "Answering",
        (llm.in_flight || 0) + " now, " + (llm.queued || 0) + " queued, " + (llm.parallel || 0) + " at a time",
      ],
      llm.state === "stopped"
        ? ["Problem", h("span", { class: "error-text" }, llm.problem || llm.error)]
        : llm.state === "none" || llm.state === "off"
          ? ["On this computer", h("span", { class: "muted" }, "no LLM: the LLMs of the mesh answer (normal for most computers)")]
          : null,
      ["LLM hosts on the mesh", String(llmHostCount())],
    ]),
  );
}

function errorsPanel(errors) {
  if (!errors.length) return panel("Recent errors", h("p", { class: "muted" }, "None: all quiet."));
  const items = errors
    .slice(-20)
    .reverse()
    .map((e) =>
      h(
        "li",
        null,
        h("time", { datetime: e.time }, formatClock(e.time)),
        h("span", { class: "level" }, e.level || "error"),
        e.message,
      ),
    );
  return panel("Recent errors", h("ul", { class: "error-list" }, items));
}

function healthPanel(d) {
  const counters = Object.entries(d.counters || {}).map(([key, value]) => [counterLabel(key), String(value)]);
  const sync = Object.entries(d.sync || {}).map(([key, value]) => ["Sync: " + counterLabel(key).toLowerCase(), String(value)]);
  return panel(
    "Health",
    kv(
      [
        ["Memory (RSS)", formatMiB(d.memory_rss_bytes)],
        ["Threads", String(d.threads)],
        ["Messages stored", String(d.messages)],
        ["Peers linked", String(d.peer_count)],
        d.event_subscribers !== undefined ? ["Live page connections", String(d.event_subscribers)] : null,
      ].concat(counters, sync),
    ),
  );
}

export function bindDiagnostics() {
  $("#diag-refresh").addEventListener("click", refreshDiagnostics);
}
