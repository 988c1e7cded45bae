// Refreshing and live events: /api/events and the 5-second poll.

import { renderChat, scheduleCurrentSync, syncCurrentConversation } from "./chat.js";
import { localLlmProblem, refreshModels, scheduleModelsRefresh, updateComposer } from "./composer.js";
import { refreshConversations, scheduleConversationsRefresh } from "./conversations.js";
import { renderDiagnostics } from "./diagnostics.js";
import { $, api, debounce, ui } from "./dom.js";
import { renderMesh } from "./mesh.js";
import { probeAccess } from "./room.js";
import { mergePeer, replacePeers, state, update } from "./state.js";
import { renderStatus, route, setLive } from "./views.js";

export async function refreshHealth() {
  const first = !state.health;
  try {
    update({ health: await api("/api/health") });
  } catch (error) {
    return;
  }
  if (first && state.current) renderChat(); // "You" needs this node's id
  renderStatus();
  if (localLlmProblem() || ui.notice.dataset.kind) updateComposer();
}

export async function refreshPeers() {
  let peers;
  try {
    peers = await api("/api/peers");
  } catch (error) {
    return;
  }
  replacePeers(peers);
  renderStatus();
  renderMesh();
}

export async function refreshAll() {
  await Promise.all([refreshHealth(), refreshPeers(), refreshConversations(), refreshModels()]);
  renderMesh();
  renderDiagnostics();
  if (state.currentId && state.current) syncCurrentConversation();
}

export function onPeerEvent(peer) {
  if (!peer || !peer.node_id) return;
  mergePeer(peer);
  renderStatus();
  renderMesh();
  scheduleModelsRefresh();
  schedulePeersRefresh(); // the round trip of a new link is measured a moment later
}

export const schedulePeersRefresh = debounce(refreshPeers, 1500);

export function connectEvents() {
  if (state.events) state.events.close();
  const source = new EventSource("/api/events");
  update({ events: source });
  source.addEventListener("open", () => {
    setLive(true);
    if (state.eventsOpened) refreshAll(); // back after a break: catch up on what was missed
    update({ eventsOpened: true });
  });
  source.addEventListener("error", () => {
    setLive(false);
    // EventSource reconnects by itself after a network break, but not after a refusal (a guest's
    // session ended, say): then try again in a moment, or once the room code is entered.
    if (source.readyState === EventSource.CLOSED && state.events === source) {
      update({ events: null });
      setTimeout(() => {
        if (!state.events && $("#signin").hidden) connectEvents();
      }, 2000);
    }
  });
  const on = (type, handler) =>
    source.addEventListener(type, (event) => {
      let payload;
      try {
        payload = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      handler(payload && payload.data ? payload.data : {});
    });
  on("hello", (data) => {
    if (state.health && data.node_id && data.node_id !== state.health.node_id) refreshAll();
  });
  on("peer_up", onPeerEvent);
  on("peer_down", onPeerEvent);
  on("peer_update", (peer) => {
    if (!peer || !peer.node_id) return;
    mergePeer(peer);
    renderStatus();
    renderMesh();
  });
  on("message", (data) => {
    scheduleConversationsRefresh();
    if (data.conversation_id === state.currentId) scheduleCurrentSync();
  });
  on("conversation", (data) => {
    scheduleConversationsRefresh();
    if (data.conversation_id === state.currentId && data.deleted) {
      location.hash = "#/chat";
    }
  });
  on("llm", () => {
    scheduleModelsRefresh();
    refreshHealth().then(updateComposer);
  });
  on("node", () => refreshHealth());
}

export function poll() {
  if (document.hidden || !$("#signin").hidden) return;
  if (state.role === null) probeAccess();
  refreshHealth().then(() => {
    if (state.view === "diagnostics") renderDiagnostics();
  });
  refreshPeers();
}

/** The app proper: views, live events and polling (for a guest, once the room code is in). */
export function startApp() {
  if (state.started) return;
  update({ started: true });
  route();
  connectEvents();
  refreshAll();
  setInterval(poll, 5000);
}
