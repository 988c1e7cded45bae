// NeuroMesh page: chat, mesh view and diagnostics, fed by the node's HTTP API and /api/events.
// This is the entry module: it binds each room's controls and starts the app.
//
// No HTML is ever parsed from data: every element is made with createElement and every text
// goes in as a text node (Markdown goes through markdown.js, which does the same).
//
// The modules: state.js (what the page knows, changed only through its functions), dom.js
// (elements, icons, the JSON API, formats), views.js (views, drawer, status line, names),
// conversations.js (the sidebar), chat.js (a conversation's messages), composer.js (the prompt,
// the streamed answer, the model picker), mesh.js (the graph and tables of the mesh view),
// diagnostics.js, live.js (/api/events and polling), room.js (sign-in, room status, invitation)
// and particles.js (the background).

import { bindChat } from "./chat.js";
import { bindComposer, renderModelPicker } from "./composer.js";
import { bindConversations } from "./conversations.js";
import { bindDiagnostics } from "./diagnostics.js";
import { icon } from "./dom.js";
import { startApp } from "./live.js";
import { startParticles } from "./particles.js";
import { bindRoom, probeAccess } from "./room.js";
import { bindViews, renderStatus, renderWho } from "./views.js";

function fillStaticIcons() {
  for (const slot of document.querySelectorAll("[data-icon]")) slot.prepend(icon(slot.dataset.icon));
}

async function boot() {
  fillStaticIcons();
  bindViews();
  bindConversations();
  bindDiagnostics();
  bindRoom();
  bindComposer();
  bindChat();
  renderStatus();
  renderWho();
  renderModelPicker();
  startParticles();
  if ((await probeAccess()) !== "signin") startApp();
}

boot();
