// Views and the sidebar drawer, the live status line, and the names (this computer's, this person's).

import { loadConversation, startNewChat } from "./chat.js";
import { refreshDiagnostics } from "./diagnostics.js";
import { $, api, formatDuration, h, narrowScreen, noun, plural, ui } from "./dom.js";
import { refreshHealth } from "./live.js";
import { renderMesh } from "./mesh.js";
import { renderRoom } from "./room.js";
import { connectedPeers, llmHostCount, state, update } from "./state.js";

export function route() {
  if (!state.started) return;
  const match = /^#\/(chat|mesh|diagnostics)(?:\/(.+))?$/.exec(location.hash) || [];
  const view = match[1] || "chat";
  showView(view);
  if (view === "chat") {
    const id = match[2] ? decodeURIComponent(match[2]) : null;
    if (id !== state.currentId) {
      if (id) loadConversation(id);
      else startNewChat();
    }
  }
}

export function showView(view) {
  update({ view });
  for (const name of ["chat", "mesh", "diagnostics"]) $("#view-" + name).hidden = name !== view;
  for (const link of document.querySelectorAll(".nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view === "mesh") renderMesh();
  if (view === "diagnostics") refreshDiagnostics();
  closeSidebar(false);
}

export function openSidebar() {
  ui.sidebar.classList.add("open");
  ui.scrim.hidden = false;
  ui.menuToggle.setAttribute("aria-expanded", "true");
  ui.menuToggle.setAttribute("aria-label", "Close the sidebar");
  const first = ui.sidebar.querySelector(".nav a");
  if (first) first.focus();
}

export function closeSidebar(returnFocus) {
  if (!ui.sidebar.classList.contains("open")) return;
  ui.sidebar.classList.remove("open");
  ui.scrim.hidden = true;
  ui.menuToggle.setAttribute("aria-expanded", "false");
  ui.menuToggle.setAttribute("aria-label", "Open the sidebar");
  if (returnFocus) ui.menuToggle.focus();
}

// ==== live status ==========================================================================

export function renderStatus() {
  const health = state.health;
  const peers = connectedPeers().length;
  const llm = llmHostCount();
  $("#node-name").textContent = health ? health.name : "Connecting…";
  const owner = Boolean(health && state.role === "owner");
  $("#rename-node").hidden = !owner;
  $("#name-hint").hidden = !(owner && health.name_is_generic && $("#rename-node-form").hidden);
  $("#stat-peers").textContent = String(peers);
  $("#stat-peers-word").textContent = noun(peers, "peer linked", "peers linked");
  $("#stat-llm").textContent = String(llm);
  $("#stat-llm-word").textContent = noun(llm, "LLM host");
  renderSharing(owner);
  $("#live-dot").className = "dot " + (state.live ? "live" : "down");
  $("#topbar-status").textContent = health
    ? health.name + " · " + plural(peers, "peer") + " · " + plural(llm, "LLM host")
    : "";
  if (health) document.title = health.name + " · NeuroMesh";
  const footer = $("#sidebar-footer");
  const lines = [
    h(
      "div",
      null,
      h("span", { class: state.live ? "live-label" : "down-label" }, state.live ? "● live" : "● reconnecting…"),
      health ? " · v" + health.version + " · up " + formatDuration(health.uptime_s) : "",
    ),
    health ? h("div", null, "HTTP :" + health.ports.http + " · id " + health.node_id.slice(0, 8)) : null,
    state.role === "guest" ? h("div", { class: "guest-label" }, "Signed in as a guest of this computer") : null,
    h(
      "div",
      null,
      h("span", { id: "you-are" }, displayName() ? "You are " + displayName() : "You have no name yet"),
      " · ",
      h(
        "button",
        {
          type: "button",
          class: "link-button",
          onclick: () => {
            try {
              localStorage.removeItem(DISPLAY_NAME);
            } catch (error) {
              /* nothing kept */
            }
            renderWho();
            $("#who-input").value = displayName();
            $("#who-input").focus();
          },
        },
        displayName() ? "change" : "set your name",
      ),
    ),
  ];
  footer.replaceChildren(...lines.filter(Boolean));
  renderRoom();
}

/** The owner's view of sharing this computer's LLM: "Sharing with 7 students" and the pause switch. */
export function renderSharing(owner) {
  const llm = state.health && state.health.llm;
  const box = $("#sharing");
  box.hidden = !(owner && llm && llm.state === "running" && llm.sharing);
  if (box.hidden) return;
  const paused = Boolean(llm.sharing_paused);
  const count = llm.sharing_with || 0;
  $("#sharing-text").textContent = paused
    ? "Sharing paused: only you use this LLM"
    : count
      ? "Sharing with " + plural(count, "student")
      : "Sharing with the room";
  const toggle = $("#sharing-switch");
  toggle.setAttribute("aria-checked", paused ? "false" : "true");
  toggle.title = paused ? "Share this computer's LLM again" : "Pause sharing: other people's chats go to other hosts";
}

export async function toggleSharing() {
  const llm = state.health && state.health.llm;
  if (!llm) return;
  $("#sharing-error").textContent = "";
  try {
    const reply = await api("/api/node", { method: "PATCH", body: { sharing_paused: !llm.sharing_paused } });
    llm.sharing_paused = reply.sharing_paused;
    renderSharing(true);
  } catch (error) {
    $("#sharing-error").textContent = error.message;
  }
  refreshHealth();
}

// ==== names: this computer's (the owner's choice), and the person's at this browser ===========

export function openRenameNode() {
  const form = $("#rename-node-form");
  form.hidden = false;
  $("#name-hint").hidden = true;
  $("#rename-node-error").textContent = "";
  const input = $("#rename-node-input");
  input.value = state.health && !state.health.name_is_generic ? state.health.name : "";
  input.focus();
}

export function closeRenameNode() {
  $("#rename-node-form").hidden = true;
  renderStatus();
  $("#rename-node").focus();
}

export async function submitRenameNode(event) {
  event.preventDefault();
  const name = $("#rename-node-input").value.trim();
  if (!name) {
    $("#rename-node-error").textContent = "Type a name first.";
    return;
  }
  try {
    const reply = await api("/api/node", { method: "PATCH", body: { name } });
    if (state.health) Object.assign(state.health, { name: reply.name, name_is_generic: false });
    closeRenameNode();
    refreshHealth();
  } catch (error) {
    $("#rename-node-error").textContent = error.message;
  }
}

export const DISPLAY_NAME = "neuromesh.displayName";

export function displayName() {
  try {
    return localStorage.getItem(DISPLAY_NAME) || "";
  } catch (error) {
    return "";
  }
}

/** The person's name is asked once, in the composer, and kept in this browser. */
export function renderWho() {
  let asked = null;
  try {
    asked = localStorage.getItem(DISPLAY_NAME);
  } catch (error) {
    asked = "";
  }
  $("#who").hidden = asked !== null;
  const you = $("#you-are");
  if (you) you.textContent = displayName() ? "You are " + displayName() : "You have no name yet";
}

export function saveWho(name) {
  try {
    localStorage.setItem(DISPLAY_NAME, name.trim().slice(0, 40));
  } catch (error) {
    /* private mode: asked again next time */
  }
  renderWho();
  renderStatus();
  ui.prompt.focus();
}

export function setLive(live) {
  update({ live }); // the composer listens (composer.js)
  renderStatus();
}

export function renderOfflineNotice() {
  const notice = $("#offline-notice");
  const down = state.started && !state.live && state.eventsOpened;
  notice.hidden = !down;
  if (down && !notice.childElementCount)
    notice.replaceChildren(
      h("strong", null, "Not connected: "),
      "this computer's NeuroMesh is not answering (stopped or restarting). Your draft is kept; " +
        "Send works again as soon as the page reconnects, by itself.",
    );
  if (!down) notice.replaceChildren();
}

/** The views' controls: the address, the sidebar drawer, this computer's name and the person's. */
export function bindViews() {
  window.addEventListener("hashchange", route);
  ui.menuToggle.addEventListener("click", () =>
    ui.sidebar.classList.contains("open") ? closeSidebar(true) : openSidebar(),
  );
  ui.scrim.addEventListener("click", () => closeSidebar(true));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && ui.sidebar.classList.contains("open")) closeSidebar(true);
  });
  narrowScreen.addEventListener("change", () => {
    closeSidebar(false);
    renderMesh();
  });
  $("#rename-node").addEventListener("click", openRenameNode);
  $("#sharing-switch").addEventListener("click", toggleSharing);
  $("#name-hint-button").addEventListener("click", openRenameNode);
  $("#rename-node-cancel").addEventListener("click", closeRenameNode);
  $("#rename-node-form").addEventListener("submit", submitRenameNode);
  $("#rename-node-input").addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeRenameNode();
  });
  $("#who-save").addEventListener("click", () => saveWho($("#who-input").value));
  $("#who-skip").addEventListener("click", () => saveWho(""));
  $("#who-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      saveWho($("#who-input").value);
    }
  });
}
