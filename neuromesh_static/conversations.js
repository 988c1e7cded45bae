// The conversations in the sidebar: list, search, rename, lock, delete.

import { openConversation, renderChatHeader, startNewChat } from "./chat.js";
import { $, agoFromIso, api, debounce, h, icon, iconButton, plural } from "./dom.js";
import { renderPeerConversations } from "./mesh.js";
import { myId, setCollapsed, setCurrentPrivate, state, update } from "./state.js";
import { closeSidebar } from "./views.js";

/** A title as words: Markdown marks (headings, emphasis, code, links, quotes, lists) left out. */
export function plainTitle(text) {
  return String(text || "")
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1")
    .replace(/^\s{0,3}(?:#{1,6}|>|[-*+]|\d+[.)])\s+/gm, "")
    .replace(/(\*\*|__|~~|\*|`+)/g, "")
    .replace(/(^|\s)_(\S[^_]*)_(?=\s|$)/g, "$1$2")
    .replace(/\s+/g, " ")
    .trim();
}

export function titleFrom(text) {
  const first = text.trim().split("\n").find((line) => plainTitle(line)) || "";
  const line = plainTitle(first);
  return line.length > 60 ? line.slice(0, 57) + "…" : line || "New chat";
}

export function renderConversationList() {
  if (state.renamingId) return; // redrawn when the rename ends, so the input keeps its focus
  const visible = state.conversations.filter((c) => !c.deleted);
  const own = visible.filter((c) => c.own);
  const shared = visible.filter((c) => !c.own);
  $("#shared-heading").textContent = state.role === "guest" ? "Shared in the room" : "Shared by peers";
  $("#conversation-list").replaceChildren(
    ...(own.length ? own.map(conversationItem) : [h("li", { class: "empty" }, "No conversations yet.")]),
  );
  $("#shared-list").replaceChildren(
    ...(shared.length
      ? sharedGroups(shared)
      : [h("p", { class: "empty" }, state.role === "guest" ? "Nothing shared yet." : "Nothing shared by peers yet.")]),
  );
}

export function machineName(c) {
  if (c.origin === myId()) return (state.health ? state.health.name : "This computer") + " (this computer)";
  const peer = state.peers.get(c.origin);
  return (peer && peer.name) || c.origin_name || c.peer_label || c.origin.slice(0, 8);
}

/** Shared conversations grouped by the machine they come from, each group collapsible (kept). */
export function sharedGroups(shared) {
  const groups = new Map();
  for (const c of shared) {
    const key = c.peer_label ? "label:" + c.peer_label : c.origin;
    if (!groups.has(key)) groups.set(key, { name: c.peer_label || machineName(c), list: [] });
    groups.get(key).list.push(c);
  }
  return [...groups.entries()]
    .sort((a, b) => a[1].name.localeCompare(b[1].name))
    .map(([key, group]) => {
      const details = h(
        "details",
        { class: "machine-group", "data-origin": key },
        h(
          "summary",
          null,
          h("span", { class: "machine-name" }, group.name),
          h("span", { class: "machine-count" }, String(group.list.length)),
        ),
        h("ul", { class: "conversation-list" }, group.list.map(conversationItem)),
      );
      details.open = !state.collapsed.has(key);
      details.addEventListener("toggle", () => {
        setCollapsed(key, !details.open);
      });
      return details;
    });
}

// ---- search --------------------------------------------------------------------------------

export async function runSearch() {
  const query = $("#search-input").value.trim();
  const box = $("#search-results");
  box.hidden = !query;
  $("#conversation-lists").hidden = Boolean(query);
  if (!query) return;
  let found;
  try {
    found = await api("/api/search?q=" + encodeURIComponent(query));
  } catch (error) {
    $("#search-list").replaceChildren(h("li", { class: "empty error-text" }, error.message));
    return;
  }
  if ($("#search-input").value.trim() !== query) return;
  $("#search-list").replaceChildren(
    ...(found.length
      ? found.map((c) => searchItem(c, query))
      : [h("li", { class: "empty" }, "Nothing found for “" + query + "”.")]),
  );
}

/** A search result: the title, the words around the match (for a title match, the first question's),
 * the matches marked, and the computer it comes from. */
export function searchItem(c, query) {
  const item = conversationItem(c);
  const open = item.querySelector(".conversation-open");
  const title = open.querySelector(".conversation-title > span:last-child");
  title.replaceChildren(...marked(title.textContent, query));
  open.append(h("span", { class: "search-snippet" }, marked(String(c.snippet || ""), query)));
  open.querySelector(".conversation-meta").textContent =
    "on " + machineName(c) + " · " + plural(c.message_count, "message") + " · " + agoFromIso(c.updated_at);
  return item;
}

/** ``text`` as text nodes, each occurrence of ``query`` (any case, any spacing) in a <mark>. */
export function marked(text, query) {
  const words = query.split(/\s+/).filter(Boolean).map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  if (!words.length) return [text];
  const parts = text.split(new RegExp("(" + words.join("\\s+") + ")", "i"));
  return parts.map((part, index) => (index % 2 ? h("mark", null, part) : part)).filter((part) => part !== "");
}

export const scheduleSearch = debounce(runSearch, 200);

export function conversationItem(c) {
  const active = c.id === state.currentId;
  const meta =
    (c.own ? "" : "from " + machineName(c) + " · ") +
    plural(c.message_count, "message") +
    " · " +
    agoFromIso(c.updated_at);
  const open = h(
    "button",
    {
      type: "button",
      class: "conversation-open",
      "aria-current": active ? "true" : null,
      onclick: () => openConversation(c.id),
    },
    h(
      "span",
      { class: "conversation-title" },
      c.private ? [icon("lock"), h("span", { class: "sr-only" }, "Private: ")] : null,
      h("span", null, plainTitle(c.title) || "New chat"),
    ),
    h("span", { class: "conversation-meta" }, meta),
  );
  const item = h("li", { class: "conversation" + (active ? " active" : ""), "data-id": c.id });
  if (state.renamingId === c.id) {
    item.append(renameInput(c));
    return item;
  }
  item.append(open);
  if (c.own) {
    const confirming = state.confirmDeleteId === c.id;
    item.append(
      h(
        "div",
        { class: "conversation-actions" },
        iconButton("Rename " + c.title, () => startRename(c.id), icon("edit"), { title: "Rename" }),
        iconButton("Private (keep " + c.title + " on this node)", () => setPrivate(c, !c.private),
          icon(c.private ? "lock" : "unlock"), {
            title: c.private ? "Private: only on this node" : "Shared with the mesh",
            "aria-pressed": c.private ? "true" : "false",
          }),
        confirming
          ? iconButton("Confirm: delete " + c.title + " everywhere", () => deleteConversation(c.id), "Delete?",
              { class: "icon-button confirm" })
          : iconButton("Delete " + c.title, () => askDelete(c.id), icon("trash"), { title: "Delete" }),
      ),
    );
  }
  return item;
}

export function renameInput(c) {
  const input = h("input", {
    class: "rename-input",
    type: "text",
    maxlength: "200",
    "aria-label": "New title for " + c.title,
  });
  input.value = c.title;
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    update({ renamingId: null });
    const title = input.value.trim();
    if (save && title && title !== c.title) {
      try {
        await api("/api/conversations/" + encodeURIComponent(c.id), { method: "PATCH", body: { title } });
      } catch (error) {
        alertInSidebar(error.message);
      }
    }
    await refreshConversations();
    const button = document.querySelector('.conversation[data-id="' + CSS.escape(c.id) + '"] .conversation-open');
    if (button) button.focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    }
    if (event.key === "Escape") {
      event.preventDefault();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  return input;
}

export function startRename(id) {
  update({ renamingId: id });
  const item = document.querySelector('.conversation[data-id="' + CSS.escape(id) + '"]');
  const c = state.conversations.find((x) => x.id === id);
  if (!item || !c) return;
  const input = renameInput(c);
  item.replaceChildren(input);
  input.focus();
  input.select();
}

export function askDelete(id) {
  update({ confirmDeleteId: id });
  renderConversationList();
  const button = document.querySelector('.conversation[data-id="' + CSS.escape(id) + '"] .confirm');
  if (button) button.focus();
  setTimeout(() => {
    if (state.confirmDeleteId === id) {
      update({ confirmDeleteId: null });
      renderConversationList();
    }
  }, 4000);
}

export async function deleteConversation(id) {
  update({ confirmDeleteId: null });
  try {
    await api("/api/conversations/" + encodeURIComponent(id), { method: "DELETE" });
    if (state.currentId === id) location.hash = "#/chat";
  } catch (error) {
    alertInSidebar(error.message);
  }
  refreshConversations();
}

export async function setPrivate(c, value) {
  try {
    await api("/api/conversations/" + encodeURIComponent(c.id), { method: "PATCH", body: { private: value } });
    setCurrentPrivate(c.id, value);
  } catch (error) {
    alertInSidebar(error.message);
  }
  await refreshConversations();
  renderChatHeader();
}

export function alertInSidebar(message) {
  const list = $("#conversation-list");
  list.prepend(h("li", { class: "empty error-text", role: "alert" }, message));
}

export async function refreshConversations() {
  try {
    update({ conversations: await api("/api/conversations") });
  } catch (error) {
    return;
  }
  renderConversationList();
  if (state.view === "mesh") renderPeerConversations();
  const current = state.currentId && state.conversations.find((c) => c.id === state.currentId);
  if (current && state.current) {
    Object.assign(state.current, { title: current.title, private: current.private });
    renderChatHeader();
  }
}

export const scheduleConversationsRefresh = debounce(refreshConversations, 150);

/** The sidebar's search box and its "New chat" button. */
export function bindConversations() {
  $("#search-input").addEventListener("input", scheduleSearch);
  $("#search-input").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && event.currentTarget.value) {
      event.currentTarget.value = "";
      runSearch();
    }
  });
  $("#new-chat").addEventListener("click", () => {
    closeSidebar(false);
    if (location.hash === "#/chat" || location.hash === "") startNewChat();
    else location.hash = "#/chat";
  });
}
