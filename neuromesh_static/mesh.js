// The mesh view: the graph of computers and the table of peers.

import { openConversation } from "./chat.js";
import { $, agoFromEpoch, agoFromIso, formatDuration, formatRtt, h, linkHealth, narrowScreen, noun, plural, svg } from "./dom.js";
import { connectedPeers, llmHostCount, setGraphIds, state } from "./state.js";

export function renderMesh() {
  if (state.view !== "mesh") return;
  renderMeshOverview();
  renderGraph();
  renderPeerRows();
  renderQueues();
  renderPeerConversations();
}

/** Each LLM host's queue: how many chats it answers and how many wait, by requester (counts only). */
export function renderQueues() {
  const hosts = (state.health && state.health.queues && state.health.queues.hosts) || [];
  if (!hosts.length) {
    $("#queue-rows").replaceChildren(
      h("tr", null, h("td", { colspan: "5", class: "muted" }, "No LLM host on the mesh yet.")),
    );
    return;
  }
  $("#queue-rows").replaceChildren(
    ...hosts.map((host) => {
      const requesters = (host.requesters || []).filter((r) => r.queued || r.running);
      return h(
        "tr",
        { "data-node-id": host.node_id, class: "queue-row" },
        h("th", { scope: "row" }, host.name, host.local ? h("span", { class: "chip this-computer" }, "this computer") : null),
        h("td", null, (host.in_flight || 0) + " of " + (host.parallel || 1)),
        h("td", { class: "queue-waiting" }, String(host.queued || 0)),
        h("td", null, host.tokens_per_second ? host.tokens_per_second.toFixed(1) + " tokens/s" : "—"),
        h(
          "td",
          null,
          requesters.length
            ? h(
                "ul",
                { class: "requesters" },
                ...requesters.map((r) =>
                  h(
                    "li",
                    null,
                    r.name + ": ",
                    h("strong", null, String(r.queued || 0)),
                    " waiting" + (r.running ? ", " + r.running + " answered now" : ""),
                  ),
                ),
              )
            : h("span", { class: "muted" }, "nobody waits"),
        ),
      );
    }),
  );
}

export function card(value, label) {
  return h(
    "div",
    { class: "card glass" },
    h("div", { class: "value gradient-text" }, String(value)),
    h("div", { class: "label" }, label),
  );
}

export function renderMeshOverview() {
  const health = state.health;
  const known = state.peers.size;
  const linked = connectedPeers().length;
  $("#mesh-overview").replaceChildren(
    card(
      linked,
      noun(linked, "peer linked", "peers linked") + (known > linked ? " (" + (known - linked) + " offline)" : ""),
    ),
    card(llmHostCount(), noun(llmHostCount(), "LLM host") + " on the mesh"),
    card(health ? health.messages : "—", (health ? noun(health.messages, "message") : "messages") + " stored here"),
    card(
      health ? (health.status === "ok" ? "OK" : health.status) : "—",
      health ? "health · up " + formatDuration(health.uptime_s) : "health",
    ),
  );
}

/** The graph: this node in the centre, linked peers around it, links coloured by round trip. */
export function renderGraph() {
  const graph = $("#mesh-graph");
  const narrow = narrowScreen.matches; // a square drawing on phones keeps the labels readable
  const width = narrow ? 360 : 640;
  const height = narrow ? 360 : 400;
  graph.setAttribute("viewBox", "0 0 " + width + " " + height);
  const cx = width / 2;
  const cy = height / 2;
  const peers = connectedPeers().sort((a, b) => a.name.localeCompare(b.name));
  const health = state.health;
  const links = svg("g", { class: "links" });
  const nodes = svg("g", { class: "nodes" });
  const radius = narrow ? 125 : peers.length > 8 ? 165 : 145;
  const stretch = narrow ? 1 : 1.35;
  peers.forEach((peer, index) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * index) / peers.length;
    const x = cx + radius * stretch * Math.cos(angle);
    const y = cy + radius * Math.sin(angle);
    links.append(graphLink(peer, health, cx, cy, x, y), linkLabel(peer, cx, cy, x, y));
    const kind = "peer" + (state.graphIds.has(peer.node_id) ? "" : " entering");
    nodes.append(graphNode(peer, x, y, 18, kind, Math.sin(angle) < -0.3));
  });
  const self = health ? { node_id: health.node_id, name: health.name, has_llm: health.has_llm } : { name: "this node" };
  nodes.append(graphNode(self, cx, cy, 28, "self"));
  setGraphIds(peers);
  graph.replaceChildren(
    svg("title", { id: "mesh-graph-title" }, "Network graph"),
    graphDesc(health, peers),
    graphDefs(),
    links,
    nodes,
    peers.length ? null : emptyNote(cx, height),
  );
}

function graphLink(peer, health, cx, cy, x, y) {
  return svg(
    "line",
    { class: "link " + linkHealth(peer), x1: cx, y1: cy, x2: x, y2: y },
    svg("title", null, (health ? health.name : "this node") + " ↔ " + peer.name + ": " + formatRtt(peer.rtt_ms) +
      (peer.tls ? ", private (" + peer.tls.version + " " + peer.tls.cipher + ")" : "")),
  );
}

/** The label beside its line, not on it: moved off the middle, across the line's direction. */
function linkLabel(peer, cx, cy, x, y) {
  const length = Math.hypot(x - cx, y - cy) || 1;
  const [nx, ny] = [-(y - cy) / length, (x - cx) / length];
  const side = ny > 0 ? -1 : 1;
  const [ox, oy] = [side * nx, side * ny];
  return svg(
    "text",
    {
      class: "link-label",
      x: (cx * 0.45 + x * 0.55 + ox * 8).toFixed(1),
      y: (cy * 0.45 + y * 0.55 + oy * 10 + 4).toFixed(1),
      "text-anchor": Math.abs(ox) > 0.5 ? (ox > 0 ? "start" : "end") : "middle",
    },
    (peer.tls ? "🔒 " : "") + formatRtt(peer.rtt_ms),
  );
}

function graphDesc(health, peers) {
  return svg(
    "desc",
    { id: "mesh-graph-desc" },
    (health ? health.name : "This node") +
      " is linked to " +
      plural(peers.length, "peer") +
      (peers.length
        ? ": " + peers.map((p) => p.name + (p.has_llm ? " (LLM)" : "") + " " + formatRtt(p.rtt_ms)).join(", ")
        : "") +
      ".",
  );
}

function graphDefs() {
  return svg(
    "defs",
    null,
    svg(
      "linearGradient",
      { id: "graph-gradient", x1: "0", y1: "0", x2: "1", y2: "1" },
      ["#22d3ee", "#3b82f6", "#8b5cf6", "#ec4899"].map((color, i) =>
        svg("stop", { offset: String(i / 3), "stop-color": color }),
      ),
    ),
  );
}

function emptyNote(cx, height) {
  return svg(
    "text",
    { class: "empty-note", x: cx, y: height - 48 },
    svg("tspan", { x: cx }, "No peers linked yet: nodes on the same"),
    svg("tspan", { x: cx, dy: "1.3em" }, "network appear here by themselves."),
  );
}

export function graphNode(peer, x, y, r, kind, labelAbove) {
  const group = svg(
    "g",
    {
      class: "node " + kind + (peer.has_llm ? " llm" : ""),
      transform: "translate(" + x.toFixed(1) + " " + y.toFixed(1) + ")",
      "data-node-id": peer.node_id || null,
    },
    svg(
      "title",
      null,
      peer.name +
        (peer.has_llm
          ? " (has an LLM" + (peer.models && peer.models.length ? ": " + peer.models.join(", ") : "") + ")"
          : ""),
    ),
  );
  if (peer.has_llm) group.append(svg("circle", { class: "ring", r: r + 7 }));
  group.append(svg("circle", { class: "body", r }));
  if (peer.has_llm) group.append(svg("text", { class: "badge", y: 3 }, "LLM"));
  group.append(svg("text", { y: labelAbove ? -r - (peer.has_llm ? 14 : 8) : r + 18 }, peer.name));
  if (kind === "self") group.append(svg("text", { class: "self-label", y: r + 34 }, "this computer"));
  return group;
}

export function renderPeerRows() {
  const peers = [...state.peers.values()].sort((a, b) => b.connected - a.connected || a.name.localeCompare(b.name));
  if (!peers.length) {
    $("#peer-rows").replaceChildren(
      h(
        "tr",
        null,
        h(
          "td",
          { colspan: "6", class: "muted" },
          "No peers yet. Start NeuroMesh on another computer of this network; it appears here within seconds.",
        ),
      ),
    );
    return;
  }
  const self = state.health ? selfRow(state.health) : null;
  $("#peer-rows").replaceChildren(...(self ? [self] : []), ...peers.map(peerRow));
}

/** This computer's row, first in the table of peers. */
function selfRow(health) {
  return h(
    "tr",
    { "data-node-id": health.node_id, class: "online this-computer" },
    h("th", { scope: "row" }, health.name, health.has_llm ? h("span", { class: "chip llm" }, "LLM") : null,
      h("span", { class: "chip this-computer" }, "this computer")),
    h("td", null, "127.0.0.1:" + health.ports.http),
    h("td", null, (health.llm && health.llm.models && health.llm.models.length) ? health.llm.models.join(", ") : h("span", { class: "muted" }, "none")),
    h("td", null, "—"),
    h("td", null, "—"),
    h("td", null, "now"),
  );
}

function peerRow(peer) {
  const pageUrl = "http://" + peer.address + ":" + peer.http_port + "/";
  return h(
    "tr",
    { "data-node-id": peer.node_id, class: peer.connected ? "online" : "offline" },
    h(
      "th",
      { scope: "row" },
      peer.name,
      peer.has_llm ? h("span", { class: "chip llm" }, "LLM") : null,
      h(
        "span",
        { class: "chip " + (peer.connected ? "online" : "offline") },
        peer.connected ? "linked" : peer.outdated ? "outdated: upgrade it" : "offline",
      ),
    ),
    h(
      "td",
      null,
      peer.http_port
        ? h("a", { href: pageUrl, target: "_blank", rel: "noopener noreferrer" }, peer.address + ":" + peer.http_port)
        : peer.address,
    ),
    h(
      "td",
      null,
      peer.models && peer.models.length ? peer.models.join(", ") : h("span", { class: "muted" }, "none"),
    ),
    h("td", null, loadText(peer)),
    h(
      "td",
      null,
      h("span", { class: "chip " + (peer.connected ? linkHealth(peer) : "") }, formatRtt(peer.rtt_ms)),
    ),
    h("td", null, peer.last_seen ? agoFromEpoch(peer.last_seen) : "never"),
  );
}

/** An LLM host's load: "1/2 busy, 3 queued"; "—" for the others. */
function loadText(peer) {
  const load = peer.load || {};
  if (!(peer.has_llm && load.parallel)) return "—";
  return (load.in_flight || 0) + "/" + load.parallel + " busy" + (load.queued ? ", " + load.queued + " queued" : "");
}

export function renderPeerConversations() {
  const byOrigin = new Map();
  for (const c of state.conversations) {
    if (c.own || c.deleted) continue;
    if (!byOrigin.has(c.origin)) byOrigin.set(c.origin, []);
    byOrigin.get(c.origin).push(c);
  }
  const box = $("#peer-conversations");
  box.className = "peer-conversations";
  if (!byOrigin.size) {
    box.replaceChildren(
      h(
        "p",
        { class: "muted" },
        "No conversations from peers yet. What peers write appears here as it happens (private ones never leave their node).",
      ),
    );
    return;
  }
  box.replaceChildren(
    ...[...byOrigin.entries()].map(([origin, list]) => {
      const peer = state.peers.get(origin);
      const name = (peer && peer.name) || list[0].origin_name || origin.slice(0, 8);
      return h(
        "section",
        { "data-origin": origin },
        h("h3", null, "From " + name),
        h(
          "ul",
          null,
          list.map((c) =>
            h(
              "li",
              null,
              h(
                "button",
                { type: "button", onclick: () => openConversation(c.id) },
                c.title + " · " + plural(c.message_count, "message") + " · " + agoFromIso(c.updated_at),
              ),
            ),
          ),
        ),
      );
    }),
  );
}
