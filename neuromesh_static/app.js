// NeuroMesh page: chat, mesh view and diagnostics, fed by the node's HTTP API and /api/events.
//
// No HTML is ever parsed from data: every element is made with createElement and every text
// goes in as a text node (Markdown goes through markdown.js, which does the same).
"use strict";

(function () {
  // ==== helpers ==============================================================================

  const $ = (selector) => document.querySelector(selector);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_BYTES = 262144; // a message's limit in bytes of UTF-8: the node's MAX_CONTENT_BYTES (256 KiB)
  const UTF8 = new TextEncoder();

  /** An element: h("a", {href: "#", class: "x", onclick: fn}, "text", child, ...). */
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    setProps(node, props);
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  function svg(tag, props, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setProps(node, props);
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  function setProps(node, props) {
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.setAttribute("class", value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  const ICONS = {
    plus: "M12 5v14M5 12h14",
    edit: "M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4",
    lock: "M6 11h12v9H6zM8.5 11V8a3.5 3.5 0 0 1 7 0v3",
    unlock: "M6 11h12v9H6zM8.5 11V8a3.5 3.5 0 0 1 6.8-1.2",
    trash: "M4 7h16M9.5 7V4.5h5V7M6.5 7l1 13h9l1-13",
    copy: "M9 9h11v11H9zM5 15H4V4h11v1",
    refresh: "M20 12a8 8 0 1 1-2.4-5.7M20 4v5h-5",
    send: "M12 19V5M5.5 11.5 12 5l6.5 6.5",
    stop: "M7 7h10v10H7z",
    menu: "M4 6h16M4 12h16M4 18h16",
    chat: "M4 5h16v11H10l-5 4v-4H4z",
    mesh: "M12 6 6 17M12 6l6 11M7.5 18.5h9M12 3.5a2.5 2.5 0 1 0 0 5 2.5 2.5 0 1 0 0-5zM5 15.5a2.5 2.5 0 1 0 0 5 2.5 2.5 0 1 0 0-5zM19 15.5a2.5 2.5 0 1 0 0 5 2.5 2.5 0 1 0 0-5z",
    pulse: "M3 12h4l3-8 4 16 3-8h4",
    close: "M6 6l12 12M18 6 6 18",
    search: "M10.5 4a6.5 6.5 0 1 0 0 13 6.5 6.5 0 0 0 0-13zM15.5 15.5 20 20",
    settings: "M4 7h9M17 7h3M15 5v4M4 17h3M11 17h9M9 15v4",
    invite: "M9 11a3.5 3.5 0 1 0 0-7 3.5 3.5 0 0 0 0 7zM3 20c0-3.3 2.7-6 6-6s6 2.7 6 6M19 8v6M16 11h6",
  };

  // A small sidebar button: ``label`` for screen readers, ``extra`` for more attributes.
  function iconButton(label, onclick, content, extra) {
    return h(
      "button",
      Object.assign({ type: "button", class: "icon-button", "aria-label": label, onclick: onclick }, extra),
      content,
    );
  }

  function icon(name) {
    return svg(
      "svg",
      {
        class: name === "stop" ? "icon filled" : "icon",
        viewBox: "0 0 24 24",
        "aria-hidden": "true",
        focusable: "false",
      },
      svg("path", { d: ICONS[name] }),
    );
  }

  class ApiError extends Error {
    constructor(message, status, body) {
      super(message);
      this.status = status;
      this.body = body || {};
      // 401 {"error", "guest_login": true}: a guest of this node must enter the guest code first.
      this.signIn = status === 401;
    }
  }

  const SIGNED_OUT = "Your sign-in has ended: enter the guest code again.";

  /** The ApiError of a non-2xx reply, with the node's sentence; a 401 also asks for the room code. */
  async function apiError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      /* not JSON */
    }
    const error = new ApiError(
      response.status === 401
        ? SIGNED_OUT
        : body && body.error
          ? String(typeof body.error === "object" ? body.error.message : body.error)
          : "The node answered " + response.status + " " + response.statusText + ".",
      response.status,
      body,
    );
    if (error.signIn) showSignIn(true);
    return error;
  }

  /** JSON in, JSON out; a non-2xx answer throws an ApiError carrying the node's message. */
  async function api(path, options) {
    const init = { method: (options && options.method) || "GET", headers: { Accept: "application/json" } };
    if (options && options.body !== undefined) {
      init.headers["Content-Type"] = "application/json"; // the node refuses state changes sent as forms
      init.body = JSON.stringify(options.body);
    }
    const response = await fetchOrExplain(path, init);
    if (!response.ok) throw await apiError(response);
    return response.status === 204 ? null : response.json();
  }

  const NODE_DOWN = "This computer's NeuroMesh is not answering: it may be stopped or restarting.";

  /** fetch(), but a network failure says in words that the node is down (never "Failed to fetch"). */
  async function fetchOrExplain(path, init) {
    try {
      return await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      const down = new Error(NODE_DOWN);
      down.nodeDown = true;
      setLive(false);
      throw down;
    }
  }

  function debounce(fn, ms) {
    let timer = null;
    return function () {
      clearTimeout(timer);
      timer = setTimeout(fn, ms);
    };
  }

  /** "1 peer", "2 peers"; ``many`` for a plural that is not word + "s" ("peers linked"). */
  function plural(n, word, many) {
    return n + " " + noun(n, word, many);
  }

  function noun(n, word, many) {
    return n === 1 ? word : many || word + "s";
  }

  function formatClock(iso) {
    const date = new Date(iso);
    return isNaN(date) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function formatAgo(seconds) {
    if (!isFinite(seconds)) return "never";
    if (seconds < 5) return "just now";
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
  }

  const agoFromEpoch = (epoch) => formatAgo(Date.now() / 1000 - epoch);
  const agoFromIso = (iso) => formatAgo((Date.now() - new Date(iso).getTime()) / 1000);

  function formatDuration(seconds) {
    seconds = Math.max(0, Math.round(seconds || 0));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    const hours = Math.floor(seconds / 3600);
    return hours < 48 ? hours + " h " + Math.floor((seconds % 3600) / 60) + " min" : Math.floor(hours / 24) + " d";
  }

  const formatMiB = (bytes) => (bytes ? (bytes / 1048576).toFixed(1) + " MiB" : "—");
  const formatRtt = (ms) =>
    ms === null || ms === undefined ? "—" : ms < 10 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms";

  function linkHealth(peer) {
    if (peer.rtt_ms === null || peer.rtt_ms === undefined) return "unknown";
    return peer.rtt_ms < 50 ? "good" : peer.rtt_ms < 200 ? "fair" : "poor";
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (error) {
      const area = h("textarea", { class: "sr-only", "aria-hidden": "true" });
      area.value = text;
      document.body.append(area);
      area.select();
      let copied = false;
      try {
        copied = document.execCommand("copy");
      } catch (ignored) {
        /* nothing else to try */
      }
      area.remove();
      return copied;
    }
  }

  /** Copies, then says so on the button for a moment. */
  async function copyWithFeedback(button, text) {
    const label = button.querySelector(".label") || button;
    const before = label.textContent;
    label.textContent = (await copyText(text)) ? "Copied" : "Copy failed";
    setTimeout(() => {
      label.textContent = before;
    }, 1500);
  }

  // ==== state ================================================================================

  const state = {
    health: null,
    peers: new Map(), // node_id -> peer record
    conversations: [],
    models: null, // /api/models, or null when unknown
    view: "chat",
    currentId: null,
    current: null, // the open conversation, with messages
    stream: null, // {controller, conversationId, answer}
    live: false,
    renamingId: null,
    confirmDeleteId: null,
    graphIds: new Set(),
    started: false, // the app runs (after the room code, for a guest)
    role: null, // "owner" (this computer), "guest" (signed in with the room code) or null (not known yet)
    invite: null, // GET /api/guests (owner only): {guests, urls, code, code_is_mesh_key}
    events: null, // the EventSource of /api/events
    eventsOpened: false,
  };

  const ui = {
    sidebar: $("#sidebar"),
    scrim: $("#scrim"),
    menuToggle: $("#menu-toggle"),
    messages: $("#messages"),
    chatScroll: $("#chat-scroll"),
    welcome: $("#welcome"),
    prompt: $("#prompt"),
    composer: $("#composer"),
    send: $("#send-button"),
    stop: $("#stop-button"),
    picker: $("#model-picker"),
    charCount: $("#char-count"),
    notice: $("#composer-notice"),
    newPrivate: $("#new-private"),
  };

  const narrowScreen = window.matchMedia("(max-width: 767.98px)");
  const myId = () => (state.health ? state.health.node_id : null);
  const connectedPeers = () => [...state.peers.values()].filter((peer) => peer.connected);

  function llmHostCount() {
    if (state.models && typeof state.models.llm_hosts === "number") return state.models.llm_hosts;
    if (state.health && typeof state.health.llm_hosts === "number") return state.health.llm_hosts;
    return connectedPeers().filter((peer) => peer.has_llm).length + (state.health && state.health.has_llm ? 1 : 0);
  }

  // ==== views and the sidebar drawer =========================================================

  function route() {
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

  function showView(view) {
    state.view = view;
    for (const name of ["chat", "mesh", "diagnostics"]) $("#view-" + name).hidden = name !== view;
    for (const link of document.querySelectorAll(".nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (view === "mesh") renderMesh();
    if (view === "diagnostics") refreshDiagnostics();
    closeSidebar(false);
  }

  function openSidebar() {
    ui.sidebar.classList.add("open");
    ui.scrim.hidden = false;
    ui.menuToggle.setAttribute("aria-expanded", "true");
    ui.menuToggle.setAttribute("aria-label", "Close the sidebar");
    const first = ui.sidebar.querySelector(".nav a");
    if (first) first.focus();
  }

  function closeSidebar(returnFocus) {
    if (!ui.sidebar.classList.contains("open")) return;
    ui.sidebar.classList.remove("open");
    ui.scrim.hidden = true;
    ui.menuToggle.setAttribute("aria-expanded", "false");
    ui.menuToggle.setAttribute("aria-label", "Open the sidebar");
    if (returnFocus) ui.menuToggle.focus();
  }

  // ==== live status ==========================================================================

  function renderStatus() {
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
  function renderSharing(owner) {
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

  async function toggleSharing() {
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

  function openRenameNode() {
    const form = $("#rename-node-form");
    form.hidden = false;
    $("#name-hint").hidden = true;
    $("#rename-node-error").textContent = "";
    const input = $("#rename-node-input");
    input.value = state.health && !state.health.name_is_generic ? state.health.name : "";
    input.focus();
  }

  function closeRenameNode() {
    $("#rename-node-form").hidden = true;
    renderStatus();
    $("#rename-node").focus();
  }

  async function submitRenameNode(event) {
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

  const DISPLAY_NAME = "neuromesh.displayName";

  function displayName() {
    try {
      return localStorage.getItem(DISPLAY_NAME) || "";
    } catch (error) {
      return "";
    }
  }

  /** The person's name is asked once, in the composer, and kept in this browser. */
  function renderWho() {
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

  function saveWho(name) {
    try {
      localStorage.setItem(DISPLAY_NAME, name.trim().slice(0, 40));
    } catch (error) {
      /* private mode: asked again next time */
    }
    renderWho();
    renderStatus();
    ui.prompt.focus();
  }

  function setLive(live) {
    const changed = state.live !== live;
    state.live = live;
    renderStatus();
    if (changed) updateComposer();
  }

  function renderOfflineNotice() {
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

  // ==== conversations in the sidebar =========================================================

  /** A title as words: Markdown marks (headings, emphasis, code, links, quotes, lists) left out. */
  function plainTitle(text) {
    return String(text || "")
      .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1")
      .replace(/^\s{0,3}(?:#{1,6}|>|[-*+]|\d+[.)])\s+/gm, "")
      .replace(/(\*\*|__|~~|\*|`+)/g, "")
      .replace(/(^|\s)_(\S[^_]*)_(?=\s|$)/g, "$1$2")
      .replace(/\s+/g, " ")
      .trim();
  }

  function titleFrom(text) {
    const first = text.trim().split("\n").find((line) => plainTitle(line)) || "";
    const line = plainTitle(first);
    return line.length > 60 ? line.slice(0, 57) + "…" : line || "New chat";
  }

  function renderConversationList() {
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

  function machineName(c) {
    if (c.origin === myId()) return (state.health ? state.health.name : "This computer") + " (this computer)";
    const peer = state.peers.get(c.origin);
    return (peer && peer.name) || c.origin_name || c.peer_label || c.origin.slice(0, 8);
  }

  /** Shared conversations grouped by the machine they come from, each group collapsible (kept). */
  function sharedGroups(shared) {
    const groups = new Map();
    for (const c of shared) {
      const key = c.peer_label ? "label:" + c.peer_label : c.origin;
      if (!groups.has(key)) groups.set(key, { name: c.peer_label || machineName(c), list: [] });
      groups.get(key).list.push(c);
    }
    state.collapsed = state.collapsed || new Set();
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
          if (details.open) state.collapsed.delete(key);
          else state.collapsed.add(key);
        });
        return details;
      });
  }

  // ---- search --------------------------------------------------------------------------------

  async function runSearch() {
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
  function searchItem(c, query) {
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
  function marked(text, query) {
    const words = query.split(/\s+/).filter(Boolean).map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
    if (!words.length) return [text];
    const parts = text.split(new RegExp("(" + words.join("\\s+") + ")", "i"));
    return parts.map((part, index) => (index % 2 ? h("mark", null, part) : part)).filter((part) => part !== "");
  }

  const scheduleSearch = debounce(runSearch, 200);

  function conversationItem(c) {
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

  function renameInput(c) {
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
      state.renamingId = null;
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

  function startRename(id) {
    state.renamingId = id;
    const item = document.querySelector('.conversation[data-id="' + CSS.escape(id) + '"]');
    const c = state.conversations.find((x) => x.id === id);
    if (!item || !c) return;
    const input = renameInput(c);
    item.replaceChildren(input);
    input.focus();
    input.select();
  }

  function askDelete(id) {
    state.confirmDeleteId = id;
    renderConversationList();
    const button = document.querySelector('.conversation[data-id="' + CSS.escape(id) + '"] .confirm');
    if (button) button.focus();
    setTimeout(() => {
      if (state.confirmDeleteId === id) {
        state.confirmDeleteId = null;
        renderConversationList();
      }
    }, 4000);
  }

  async function deleteConversation(id) {
    state.confirmDeleteId = null;
    try {
      await api("/api/conversations/" + encodeURIComponent(id), { method: "DELETE" });
      if (state.currentId === id) location.hash = "#/chat";
    } catch (error) {
      alertInSidebar(error.message);
    }
    refreshConversations();
  }

  async function setPrivate(c, value) {
    try {
      await api("/api/conversations/" + encodeURIComponent(c.id), { method: "PATCH", body: { private: value } });
      if (state.current && state.current.id === c.id) state.current.private = value;
    } catch (error) {
      alertInSidebar(error.message);
    }
    await refreshConversations();
    renderChatHeader();
  }

  function alertInSidebar(message) {
    const list = $("#conversation-list");
    list.prepend(h("li", { class: "empty error-text", role: "alert" }, message));
  }

  async function refreshConversations() {
    try {
      state.conversations = await api("/api/conversations");
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

  const scheduleConversationsRefresh = debounce(refreshConversations, 150);

  // ==== chat: opening and drawing a conversation =============================================

  function openConversation(id) {
    closeSidebar(false);
    location.hash = "#/chat/" + encodeURIComponent(id);
  }

  function startNewChat() {
    state.currentId = null;
    state.current = null;
    ui.newPrivate.checked = false;
    renderChat();
    renderConversationList();
    ui.prompt.focus();
  }

  async function loadConversation(id) {
    state.currentId = id;
    state.current = null;
    renderChat();
    renderConversationList();
    let conversation;
    try {
      conversation = await api(conversationPath(id));
    } catch (error) {
      if (state.currentId !== id) return;
      ui.messages.replaceChildren(
        h(
          "div",
          { class: "inline-error", role: "alert" },
          "This conversation could not be opened: " + error.message,
          h("button", { type: "button", class: "small-button", onclick: () => loadConversation(id) }, "Retry"),
        ),
      );
      ui.welcome.hidden = true;
      return;
    }
    if (state.currentId !== id) return; // another one was opened meanwhile
    state.current = conversation;
    renderChat();
    if (state.stream && state.stream.conversationId === id) ui.messages.append(state.stream.answer.element);
    scrollToBottom(true);
  }

  const PAGE = 100; // messages fetched at once: a long conversation loads its newest, older ones on scroll-up

  function conversationPath(id, before) {
    return (
      "/api/conversations/" +
      encodeURIComponent(id) +
      "?limit=" +
      PAGE +
      (before ? "&before=" + encodeURIComponent(before) : "")
    );
  }

  /** Scrolled to the top of a long conversation: the page before the oldest shown, kept in place. */
  async function loadOlder() {
    const c = state.current;
    if (!c || !c.has_more || state.loadingOlder || !c.messages.length) return;
    state.loadingOlder = true;
    const id = c.id;
    let page;
    try {
      page = await api(conversationPath(id, c.messages[0].id));
    } catch (error) {
      state.loadingOlder = false;
      return;
    }
    state.loadingOlder = false;
    if (state.current !== c) return;
    c.messages = page.messages.concat(c.messages);
    c.has_more = page.has_more;
    const before = ui.chatScroll.scrollHeight - ui.chatScroll.scrollTop;
    const first = ui.messages.querySelector(".message");
    for (const message of page.messages) ui.messages.insertBefore(messageView(message), first);
    renderOlderNote();
    ui.chatScroll.scrollTop = ui.chatScroll.scrollHeight - before;
    updateAnswerActions();
  }

  function renderOlderNote() {
    const old = ui.messages.querySelector(".older-note");
    if (old) old.remove();
    if (state.current && state.current.has_more)
      ui.messages.prepend(
        h(
          "p",
          { class: "older-note" },
          h("button", { type: "button", class: "small-button", onclick: loadOlder }, "Show older messages"),
        ),
      );
  }

  function renderChatHeader() {
    const c = state.current;
    $("#chat-title").textContent = c ? plainTitle(c.title) || "New chat" : state.currentId ? "Loading…" : "New chat";
    const subtitle = $("#chat-subtitle");
    subtitle.replaceChildren();
    if (c) {
      if (!c.own)
        subtitle.append("from " + (c.origin_name || c.origin.slice(0, 8)), h("span", { class: "chip" }, "read-only"));
      if (c.private) subtitle.append(h("span", { class: "chip offline" }, "private"));
    }
    const downloads = $("#chat-downloads");
    downloads.hidden = !c;
    if (c) {
      const base = "/api/conversations/" + encodeURIComponent(c.id) + "/download?format=";
      $("#download-md").href = base + "md";
      $("#download-md").setAttribute("aria-label", "Download .md (this conversation as Markdown)");
      $("#download-json").href = base + "json";
      $("#download-json").setAttribute("aria-label", "Download .json (this conversation as JSON)");
    }
    const chatLink = document.querySelector('.nav a[data-view="chat"]');
    chatLink.href = state.currentId ? "#/chat/" + encodeURIComponent(state.currentId) : "#/chat";
  }

  function renderChat() {
    renderChatHeader();
    const c = state.current;
    ui.messages.replaceChildren(...(c ? c.messages.map(messageView) : []));
    renderOlderNote();
    if (c && !c.own)
      ui.messages.append(
        h(
          "p",
          { class: "read-only-note" },
          "This conversation belongs to " +
            (c.origin_name || "another node") +
            ": you can read it here, and continue it on that node.",
        ),
      );
    ui.composer.hidden = Boolean(c && !c.own);
    updateWelcome();
    updateAnswerActions();
    updateComposer();
  }

  function updateWelcome() {
    ui.welcome.hidden = ui.messages.children.length > 0 || Boolean(state.currentId && !state.current);
    ui.newPrivate.parentElement.hidden = Boolean(state.currentId);
  }

  function isNearBottom() {
    const el = ui.chatScroll;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 140;
  }

  function scrollToBottom(force) {
    if (force || isNearBottom()) ui.chatScroll.scrollTo({ top: ui.chatScroll.scrollHeight, behavior: "auto" });
  }

  function senderLabel(message) {
    if (message.role === "assistant") return "Assistant"; // who answered is in the line under it
    const host = message.host_info && message.host_info.hostname;
    // A guest shares this node's id with its owner and other guests: only their own chats are "You".
    const othersChat = state.role === "guest" && state.current && !state.current.own;
    if ((!message.origin || message.origin === myId()) && !othersChat)
      return message.sender && message.sender !== "user" ? message.sender : "You";
    return (message.sender || "user") + (host ? " on " + host : "");
  }

  function messageHead(message) {
    return h(
      "div",
      { class: "message-head" },
      h("span", { class: "sender" }, senderLabel(message)),
      message.timestamp
        ? h(
            "time",
            { datetime: message.timestamp, title: new Date(message.timestamp).toLocaleString() },
            formatClock(message.timestamp),
          )
        : null,
    );
  }

  /** The article of one stored message (or of a local one not stored yet). */
  function messageView(message) {
    const article = h("article", {
      class: "message " + message.role,
      "data-id": message.id || null,
      "aria-label": (message.role === "assistant" ? "Answer" : "Message") + " from " + senderLabel(message),
    });
    article.append(messageHead(message));
    if (message.role === "assistant") {
      const body = h("div", { class: "markdown" });
      body.append(window.NeuroMarkdown.render(message.content));
      article.append(h("div", { class: "bubble glass" }, body, h("div", { class: "answer-status", role: "status" })));
      if (message.cut_off) article.append(cutOffNote());
      article.append(answerMeta(message, {}));
    } else {
      article.append(h("div", { class: "bubble" }, message.content));
      if (message.id) article.append(questionActions());
      if (message.replaces) article.dataset.replaces = message.replaces;
    }
    if (message.cut_off) article.classList.add("cut-off");
    article.dataset.content = message.content;
    if (window.NeuroMedia) window.NeuroMedia.decorate(article, message); // pictures, thinking (media.js)
    return article;
  }

  function cutOffNote() {
    return h(
      "p",
      { class: "cut-off-note" },
      icon("stop"),
      h("strong", null, "Cut off"),
      " · this answer stopped before it was complete; what arrived is kept.",
    );
  }

  function questionActions() {
    return h(
      "div",
      { class: "question-actions" },
      h(
        "button",
        {
          type: "button",
          class: "action-button edit-question",
          "aria-label": "Edit this question",
          hidden: true,
          onclick: (event) => startEdit(event.currentTarget.closest(".message")),
        },
        icon("edit"),
        h("span", { class: "label" }, "Edit"),
      ),
    );
  }

  /** Edit-and-resend: the last question becomes a text box; Send stores the edit, which replaces it. */
  function startEdit(article) {
    if (!article || state.stream) return;
    const bubble = article.querySelector(".bubble");
    const box = h("textarea", { class: "edit-box", rows: "3", "aria-label": "Edit your question" });
    box.value = article.dataset.content || "";
    const cancel = () => {
      form.remove();
      bubble.hidden = false;
      article.querySelector(".edit-question").focus();
    };
    const form = h(
      "form",
      { class: "edit-form" },
      box,
      h(
        "div",
        { class: "edit-bar" },
        h("button", { type: "button", class: "small-button", onclick: cancel }, "Cancel"),
        h("button", { type: "submit", class: "small-button primary" }, "Ask again"),
      ),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = box.value.trim();
      if (!text) return;
      if (state.stream || (state.started && !state.live && state.eventsOpened)) return;
      form.remove();
      bubble.hidden = false;
      sendMessage(text, article.dataset.id);
    });
    box.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        cancel();
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    bubble.hidden = true;
    bubble.after(form);
    box.focus();
  }

  /** Questions replaced by their edit, and the answers they had, are dimmed and marked. */
  function markReplaced() {
    const replaced = new Set(
      [...ui.messages.querySelectorAll(".message[data-replaces]")].map((el) => el.dataset.replaces),
    );
    let inReplaced = false;
    for (const article of ui.messages.querySelectorAll(".message")) {
      if (article.classList.contains("user")) inReplaced = replaced.has(article.dataset.id);
      article.classList.toggle("replaced", inReplaced);
      if (inReplaced && article.classList.contains("user") && !article.querySelector(".replaced-note"))
        article.append(h("p", { class: "replaced-note" }, "Edited: the new version is below."));
    }
    // A stored question with no answer after it (it failed) stays, marked; the LLM is not told it.
    const stored = [...ui.messages.querySelectorAll(".message")];
    stored.forEach((article, index) => {
      const next = stored[index + 1];
      const unanswered =
        article.classList.contains("user") && article.dataset.id && next && next.classList.contains("user");
      article.classList.toggle("unanswered", Boolean(unanswered));
      const note = article.querySelector(".unanswered-note");
      if (unanswered && !note && !article.classList.contains("replaced"))
        article.append(h("p", { class: "replaced-note unanswered-note" }, "Not answered: kept here, not sent as history."));
      if (!unanswered && note) note.remove();
    });
  }

  /** Who answered, with which model and how fast, plus the Copy and Regenerate buttons. */
  function answerMeta(message, live) {
    // An answer whose host went down mid-way and another host continued (answered_by_hosts).
    const hosts = (message.answered_by_hosts || []).map((host) => host.name || host.node_id.slice(0, 8));
    const node =
      (hosts.length > 1 ? hosts[0] : null) ||
      live.node_name ||
      message.answered_by_name ||
      (message.answered_by ? message.answered_by.slice(0, 8) : null) ||
      (message.host_info && message.host_info.hostname);
    const continuedOn = hosts.length > 1 ? hosts.slice(1).join(", ") : live.continued_on;
    const model = live.model || message.model;
    const speed = live.tokens_per_second || message.tokens_per_second;
    const waited = typeof live.waited_s === "number" ? live.waited_s : message.waited_s;
    const article = () => meta.closest(".message");
    const meta = h(
      "div",
      { class: "answer-meta" },
      node ? h("span", null, "answered by ", h("span", { class: "node" }, node)) : null,
      continuedOn ? h("span", { class: "continued" }, "continued on ", h("span", { class: "node" }, continuedOn)) : null,
      (live.node_id || message.answered_by) && (live.node_id || message.answered_by) === myId()
        ? h("span", { class: "chip this-computer" }, "this computer")
        : null,
      model ? h("span", { class: "model" }, model) : null,
      speed ? h("span", { class: "speed" }, speed.toFixed(1) + " tokens/s") : null,
      typeof waited === "number"
        ? h("span", { class: "waited", title: "How long this answer waited for its host" },
            "waited " + (waited < 10 ? waited.toFixed(1) : Math.round(waited)) + " s")
        : null,
      h(
        "span",
        { class: "answer-actions" },
        h(
          "button",
          {
            type: "button",
            class: "action-button copy-answer",
            "aria-label": "Copy this answer",
            onclick: (event) => copyWithFeedback(event.currentTarget, article().dataset.content || ""),
          },
          icon("copy"),
          h("span", { class: "label" }, "Copy"),
        ),
        h(
          "button",
          {
            type: "button",
            class: "action-button regenerate",
            "aria-label": "Regenerate the answer",
            hidden: true,
            onclick: regenerate,
          },
          icon("refresh"),
          h("span", { class: "label" }, "Regenerate"),
        ),
      ),
    );
    return meta;
  }

  /** Regenerate shows only on the last answer, Edit on the last question, of an own conversation,
   * when nothing streams. */
  function updateAnswerActions() {
    markReplaced();
    const answers = ui.messages.querySelectorAll(".message.assistant[data-id]");
    const canRegenerate = Boolean(state.current && state.current.own && !state.stream);
    answers.forEach((answer, index) => {
      const button = answer.querySelector(".regenerate");
      if (button) button.hidden = !(canRegenerate && index === answers.length - 1);
    });
    const questions = ui.messages.querySelectorAll(".message.user[data-id]");
    questions.forEach((question, index) => {
      const button = question.querySelector(".edit-question");
      if (button) button.hidden = !(canRegenerate && index === questions.length - 1);
    });
  }

  /** Appends messages stored since the page drew the conversation (from peers, or after a stop); a
   * local question or answer that is now stored (a Stop, or the node restarted mid-answer) is
   * replaced by the stored one, so one answer shows and its Retry is gone. */
  async function syncCurrentConversation() {
    const id = state.currentId;
    if (!id || (state.stream && state.stream.conversationId === id)) return;
    let conversation;
    try {
      conversation = await api(conversationPath(id));
    } catch (error) {
      return;
    }
    if (state.currentId !== id || !state.current || (state.stream && state.stream.conversationId === id)) return;
    const known = new Set(state.current.messages.map((m) => m.id));
    const older = state.current.messages;
    const added = conversation.messages.filter((m) => !known.has(m.id));
    Object.assign(state.current, conversation, {
      messages: older.concat(added),
      has_more: state.current.has_more,
    });
    const shown = new Set([...ui.messages.querySelectorAll(".message[data-id]")].map((el) => el.dataset.id));
    const stick = isNearBottom();
    for (const message of conversation.messages) {
      if (shown.has(message.id)) continue;
      const local = [...ui.messages.querySelectorAll(".message." + message.role + ":not([data-id])")].find((el) =>
        message.role === "user"
          ? el.dataset.content === message.content
          : answersStoredQuestion(el, message, conversation),
      );
      const view = messageView(message);
      if (local) local.replaceWith(view);
      else ui.messages.insertBefore(view, ui.messages.querySelector(".read-only-note"));
    }
    renderChatHeader();
    updateWelcome();
    updateAnswerActions();
    if (stick) scrollToBottom(true);
  }

  /** Whether the local answer ``el`` (stopped, or failed when the node went down) is the stored ``message``:
   * the question before it is the one the store answers with ``message``. */
  function answersStoredQuestion(el, message, conversation) {
    if (!el.classList.contains("stopped") && !el.classList.contains("failed")) return false;
    let question = el.previousElementSibling;
    while (question && !question.classList.contains("user")) question = question.previousElementSibling;
    if (!question) return false;
    const at = conversation.messages.indexOf(message);
    const asked = conversation.messages.slice(0, at).reverse().find((m) => m.role === "user");
    if (!asked) return false;
    return question.dataset.id ? question.dataset.id === asked.id : question.dataset.content === asked.content;
  }

  const scheduleCurrentSync = debounce(syncCurrentConversation, 120);

  // ==== chat: the composer ===================================================================

  function updateComposer() {
    const value = ui.prompt.value;
    const size = UTF8.encode(value).length;
    ui.charCount.textContent = size + " / " + MAX_BYTES;
    ui.charCount.classList.toggle("near-limit", size > MAX_BYTES * 0.9);
    const streaming = Boolean(state.stream);
    renderOfflineNotice();
    const offline = state.started && !state.live && state.eventsOpened;
    ui.send.disabled = streaming || !value.trim() || offline || size > MAX_BYTES;
    ui.send.hidden = streaming;
    ui.stop.hidden = !streaming;
    const noLlm = state.models !== null && llmHostCount() === 0;
    ui.prompt.placeholder = noLlm
      ? "No LLM on the mesh yet: your message is saved, but nobody can answer it (see above)"
      : "Ask anything…";
    renderNoLlmNotice(noLlm);
  }

  /** Why this computer's own LLM does not answer (Ollama installed but stopped), from /api/health. */
  function localLlmProblem() {
    const llm = state.health && state.health.llm;
    return llm && llm.state === "stopped" && state.role !== "guest" ? llm.problem : null;
  }

  function renderNoLlmNotice(noLlm) {
    const problem = localLlmProblem();
    const show = noLlm || Boolean(problem);
    ui.notice.hidden = !show;
    const kind = (noLlm ? "none" : "") + "|" + (problem || "");
    if (!show) {
      ui.notice.replaceChildren();
      ui.notice.dataset.kind = "";
      return;
    }
    if (ui.notice.dataset.kind === kind) return; // keep the <details> open or closed as the user left it
    ui.notice.dataset.kind = kind;
    if (!noLlm) {
      ui.notice.replaceChildren(
        h("strong", null, "This computer's LLM is stopped: "),
        window.NeuroMarkdown.render(problem + ". Meanwhile the other LLMs of the mesh answer."),
      );
      return;
    }
    if (problem) {
      ui.notice.replaceChildren(
        h("strong", null, "No LLM answers yet: "),
        window.NeuroMarkdown.render(problem + "."),
      );
      return;
    }
    ui.notice.replaceChildren(
      h("strong", null, "No LLM on the mesh yet: "),
      "no linked computer runs a language model, so questions are saved and shared but nobody answers them.",
      h(
        "details",
        null,
        h("summary", null, "How to add one"),
        "On any computer of this network install Ollama, run ",
        h("code", null, "ollama pull llama3.2:1b"),
        ", then start NeuroMesh there: it finds Ollama by itself and the whole mesh can use it. ",
        "Or start a node with ",
        h("code", null, "--ollama-url http://HOST:11434"),
        ".",
      ),
    );
  }

  function autoGrow() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, window.innerHeight * 0.4) + "px";
  }

  function onPromptKeydown(event) {
    if (
      event.key === "Enter" &&
      !event.shiftKey &&
      !event.altKey &&
      !event.ctrlKey &&
      !event.metaKey &&
      !event.isComposing
    ) {
      event.preventDefault();
      submitPrompt();
    }
  }

  function submitPrompt() {
    const text = ui.prompt.value;
    if (!text.trim() || state.stream || ui.send.disabled) return;
    ui.prompt.value = "";
    autoGrow();
    updateComposer();
    sendMessage(text.trim());
  }

  function chosenModel() {
    return ui.picker.value || undefined;
  }

  /** Sends ``content``: creates the conversation if needed, then streams the answer. */
  async function sendMessage(content, replaces, images) {
    if (state.stream || (state.current && !state.current.own)) return;
    images = images || (window.NeuroMedia && window.NeuroMedia.take());
    const userView = messageView({
      role: "user",
      content,
      images,
      timestamp: new Date().toISOString(),
      origin: myId(),
      sender: displayName() || "user",
    });
    userView.classList.add("pending");
    ui.messages.append(userView);
    updateWelcome();
    scrollToBottom(true);
    let conversationId = state.currentId;
    if (!conversationId) {
      try {
        const record = await api("/api/conversations", {
          method: "POST",
          body: { title: titleFrom(content), private: ui.newPrivate.checked },
        });
        record.messages = [];
        state.currentId = conversationId = record.id;
        state.current = record;
        location.hash = "#/chat/" + encodeURIComponent(record.id); // route() sees it is already open
        renderChatHeader();
        updateWelcome();
        scheduleConversationsRefresh();
      } catch (error) {
        userView.append(
          inlineError("The conversation could not be created: " + error.message, () => {
            userView.remove();
            sendMessage(content, replaces, images);
          }),
        );
        return;
      }
    }
    streamAnswer(
      conversationId,
      "/api/conversations/" + encodeURIComponent(conversationId) + "/messages",
      { content, model: chosenModel(), replaces: replaces || undefined, sender: displayName() || undefined, images },
      { userView, content, replaces, images },
    );
  }

  function regenerate() {
    if (state.stream || !state.current) return;
    const id = state.current.id;
    streamAnswer(
      id,
      "/api/conversations/" + encodeURIComponent(id) + "/regenerate",
      { model: chosenModel() },
      { userStored: true },
    );
  }

  function inlineError(message, retry) {
    // Markdown, so that the node's `commands` and https:// links in the message read well.
    return h(
      "div",
      { class: "inline-error", role: "alert" },
      h("div", { class: "error-message" }, window.NeuroMarkdown.render(message)),
      retry
        ? h("button", { type: "button", class: "small-button retry", onclick: retry }, icon("refresh"), "Retry")
        : null,
    );
  }

  /** The answer being written: a bubble that takes status lines, tokens, the end or an error. */
  function liveAnswer() {
    const body = h("div", { class: "markdown" });
    const status = h(
      "div",
      { class: "answer-status", role: "status" },
      h("span", { class: "typing", "aria-hidden": "true" }, h("i"), h("i"), h("i")),
      h("span", { class: "status-text" }, "Finding an LLM on the mesh…"),
    );
    const element = h(
      "article",
      { class: "message assistant streaming", "aria-busy": "true", "aria-label": "Answer being written" },
      messageHead({ role: "assistant", timestamp: new Date().toISOString() }),
      h("div", { class: "bubble glass" }, body, status),
    );
    let text = "";
    let info = {};
    let frame = 0;
    const draw = () => {
      frame = 0;
      const stick = isNearBottom();
      body.replaceChildren(window.NeuroMarkdown.render(text));
      element.dataset.content = text;
      if (stick) scrollToBottom(true);
    };
    const setStatus = (message) => {
      status.querySelector(".status-text").textContent = message;
    };
    const end = () => {
      cancelAnimationFrame(frame);
      draw();
      element.classList.remove("streaming");
      element.removeAttribute("aria-busy");
      status.replaceChildren();
    };
    return {
      element,
      status: setStatus,
      start(data) {
        info = data;
        setStatus((data.node_name || "A node") + " is answering" + (data.model ? " with " + data.model : "") + "…");
      },
      continued(data) {
        info.continued_on = data.node_name;
        setStatus((data.from_node_name || "The host") + " stopped: " + (data.node_name || "another host") + " continues…");
      },
      thinking(content) {
        if (window.NeuroMedia) window.NeuroMedia.thinking(element, content);
        status.querySelector(".typing").hidden = true;
      },
      token(content) {
        text += content;
        status.querySelector(".typing").hidden = true;
        if (!frame) frame = requestAnimationFrame(draw);
      },
      finish(data) {
        const message = data.message || {};
        if (typeof message.content === "string") text = message.content;
        end();
        if (message.id) element.dataset.id = message.id;
        element.setAttribute("aria-label", "Answer from " + (data.node_name || message.answered_by_name || "the mesh"));
        element.append(answerMeta(message, Object.assign({}, info, data)));
      },
      fail(message, retry, stored) {
        end();
        element.classList.add("failed");
        if (!text) element.querySelector(".bubble").hidden = true;
        if (stored && stored.id) {
          // What arrived before the host went down is stored, marked as cut off.
          element.dataset.id = stored.id;
          element.classList.add("cut-off");
          element.append(cutOffNote());
        }
        element.append(inlineError(message, retry));
      },
      stopped() {
        end();
        element.classList.add("stopped");
        element.append(
          h(
            "div",
            { class: "answer-meta" },
            h("span", { class: "stopped-note" }, "Stopped."),
            info.node_name ? h("span", null, "answered by ", h("span", { class: "node" }, info.node_name)) : null,
          ),
        );
        if (text) {
          element.classList.add("cut-off");
          element.querySelector(".bubble").after(cutOffNote());
        }
      },
    };
  }

  /** Reads a text/event-stream body, calling onEvent(type, payload) for each event. */
  async function readEventStream(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let type = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue;
        let payload;
        try {
          payload = JSON.parse(data.join("\n"));
        } catch (error) {
          continue;
        }
        onEvent(type, payload);
      }
      if (done) return;
    }
  }

  /** Posts to ``path`` and shows the streamed answer; Stop aborts it (the node cancels upstream). */
  async function streamAnswer(conversationId, path, body, context) {
    const controller = new AbortController();
    const answer = liveAnswer();
    ui.messages.append(answer.element);
    state.stream = { controller, conversationId, answer };
    updateComposer();
    updateAnswerActions();
    updateWelcome();
    scrollToBottom(true);
    let userStored = Boolean(context.userStored);
    let ended = false;
    const retry = () => {
      if (state.stream) return;
      answer.element.remove();
      // A question the page found stored after a reconnect (its local bubble replaced) is not asked twice.
      if (userStored || (context.userView && !context.userView.isConnected)) {
        regenerate();
      } else {
        if (context.userView) context.userView.remove();
        sendMessage(context.content, context.replaces, context.images);
      }
    };
    const markUserStored = (message) => {
      userStored = true;
      scheduleConversationsRefresh();
      if (context.userView && message) {
        const stored = messageView(message);
        context.userView.replaceWith(stored);
        context.userView = stored;
      }
    };
    try {
      const response = await fetchOrExplain(path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await apiError(response);
      if (!(response.headers.get("Content-Type") || "").includes("text/event-stream")) {
        const data = await response.json(); // a node that does not stream: {user, assistant}
        markUserStored(data.user || (data.role === "user" ? data : null));
        if (!data.assistant) throw new Error("The node saved the message but sent no answer.");
        answer.finish({ message: data.assistant });
        ended = true;
      } else {
        await readEventStream(response, (type, data) => {
          if (type === "user") markUserStored(data.message);
          else if (type === "queued")
            answer.status(
              "Waiting in the queue of " + (data.node_name || "an LLM host") + ": position " + data.position + "…",
            );
          else if (type === "start") answer.start(data);
          else if (type === "continued") answer.continued(data);
          else if (type === "token") answer.token(data.content || "");
          else if (type === "thinking") answer.thinking(data.content || "");
          else if (type === "done") {
            answer.finish(data);
            ended = true;
          } else if (type === "error") {
            answer.fail(data.error || "The answer failed.", retry, data.message);
            ended = true;
          }
        });
        if (!ended) answer.fail("The answer broke off before it was complete.", retry);
      }
    } catch (error) {
      if (error.name === "AbortError") answer.stopped();
      else if (error.signIn) answer.fail(SIGNED_OUT + " Then press Retry.", retry);
      else {
        // A stream cut by the node going down reads "network error": say what happened instead.
        answer.fail(error instanceof TypeError ? NODE_DOWN : error.message || String(error), retry);
        // Nothing was stored: give the question back to the composer, unless a new draft is there.
        if (!userStored && error.nodeDown && !ui.prompt.value.trim()) {
          ui.prompt.value = context.content;
          autoGrow();
        }
      }
    } finally {
      if (state.stream && state.stream.controller === controller) state.stream = null;
      if (context.userView) context.userView.classList.remove("pending");
      updateComposer();
      updateAnswerActions();
      scheduleConversationsRefresh();
      if (state.currentId === conversationId) scheduleCurrentSync();
    }
  }

  function stopAnswer() {
    if (state.stream) state.stream.controller.abort();
  }

  // ==== models ===============================================================================

  async function refreshModels() {
    try {
      state.models = await api("/api/models");
    } catch (error) {
      state.models = null;
    }
    renderModelPicker();
    updateComposer();
    renderStatus();
    window.dispatchEvent(new CustomEvent("neuromesh:models")); // models.js: the room's models list
  }

  const scheduleModelsRefresh = debounce(refreshModels, 200);

  function renderModelPicker() {
    const models = (state.models && state.models.models) || [];
    const saved = ui.picker.value || localStorage.getItem("neuromesh.model") || "";
    const auto = h(
      "option",
      { value: "" },
      state.models && state.models.default ? "Auto (" + state.models.default + ")" : "Auto",
    );
    const options = models.map((model) => {
      const hosts = model.hosts || [];
      const where = hosts.length === 1 ? (hosts[0].local ? "this node" : hosts[0].name) : hosts.length + " nodes";
      const can = window.NeuroMedia ? window.NeuroMedia.capabilityLabel(model) : "";
      return h("option", { value: model.name }, model.name + " · " + where + can);
    });
    ui.picker.replaceChildren(auto, ...options);
    ui.picker.value = models.some((model) => model.name === saved) ? saved : "";
    ui.picker.disabled = models.length === 0;
    ui.picker.title = models.length ? "The model that answers" : "No model on the mesh";
    if (window.NeuroMedia) window.NeuroMedia.setModels(state.models); // the attach button (media.js)
  }

  // ==== mesh view ============================================================================

  function renderMesh() {
    if (state.view !== "mesh") return;
    renderMeshOverview();
    renderGraph();
    renderPeerRows();
    renderQueues();
    renderPeerConversations();
  }

  /** Each LLM host's queue: how many chats it answers and how many wait, by requester (counts only). */
  function renderQueues() {
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

  function card(value, label) {
    return h(
      "div",
      { class: "card glass" },
      h("div", { class: "value gradient-text" }, String(value)),
      h("div", { class: "label" }, label),
    );
  }

  function renderMeshOverview() {
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
  function renderGraph() {
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
      const quality = linkHealth(peer);
      links.append(
        svg(
          "line",
          { class: "link " + quality, x1: cx, y1: cy, x2: x, y2: y },
          svg("title", null, (health ? health.name : "this node") + " ↔ " + peer.name + ": " + formatRtt(peer.rtt_ms) +
            (peer.tls ? ", private (" + peer.tls.version + " " + peer.tls.cipher + ")" : "")),
        ),
      );
      // The label beside its line, not on it: moved off the middle, across the line's direction.
      const length = Math.hypot(x - cx, y - cy) || 1;
      const [nx, ny] = [-(y - cy) / length, (x - cx) / length];
      const side = ny > 0 ? -1 : 1;
      const [ox, oy] = [side * nx, side * ny];
      links.append(
        svg(
          "text",
          {
            class: "link-label",
            x: (cx * 0.45 + x * 0.55 + ox * 8).toFixed(1),
            y: (cy * 0.45 + y * 0.55 + oy * 10 + 4).toFixed(1),
            "text-anchor": Math.abs(ox) > 0.5 ? (ox > 0 ? "start" : "end") : "middle",
          },
          (peer.tls ? "🔒 " : "") + formatRtt(peer.rtt_ms),
        ),
      );
      nodes.append(
        graphNode(
          peer,
          x,
          y,
          18,
          "peer" + (state.graphIds.has(peer.node_id) ? "" : " entering"),
          Math.sin(angle) < -0.3,
        ),
      );
    });
    nodes.append(
      graphNode(
        health ? { node_id: health.node_id, name: health.name, has_llm: health.has_llm } : { name: "this node" },
        cx,
        cy,
        28,
        "self",
      ),
    );
    state.graphIds = new Set(peers.map((peer) => peer.node_id));
    const defs = svg(
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
    const empty = peers.length
      ? null
      : svg(
          "text",
          { class: "empty-note", x: cx, y: height - 48 },
          svg("tspan", { x: cx }, "No peers linked yet: nodes on the same"),
          svg("tspan", { x: cx, dy: "1.3em" }, "network appear here by themselves."),
        );
    graph.replaceChildren(
      svg("title", { id: "mesh-graph-title" }, "Network graph"),
      svg(
        "desc",
        { id: "mesh-graph-desc" },
        (health ? health.name : "This node") +
          " is linked to " +
          plural(peers.length, "peer") +
          (peers.length
            ? ": " + peers.map((p) => p.name + (p.has_llm ? " (LLM)" : "") + " " + formatRtt(p.rtt_ms)).join(", ")
            : "") +
          ".",
      ),
      defs,
      links,
      nodes,
      empty,
    );
  }

  function graphNode(peer, x, y, r, kind, labelAbove) {
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

  function renderPeerRows() {
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
    const health = state.health;
    const self = health
      ? h(
          "tr",
          { "data-node-id": health.node_id, class: "online this-computer" },
          h("th", { scope: "row" }, health.name, health.has_llm ? h("span", { class: "chip llm" }, "LLM") : null,
            h("span", { class: "chip this-computer" }, "this computer")),
          h("td", null, "127.0.0.1:" + health.ports.http),
          h("td", null, (health.llm && health.llm.models && health.llm.models.length) ? health.llm.models.join(", ") : h("span", { class: "muted" }, "none")),
          h("td", null, "—"),
          h("td", null, "—"),
          h("td", null, "now"),
        )
      : null;
    $("#peer-rows").replaceChildren(
      ...(self ? [self] : []),
      ...peers.map((peer) => {
        const load = peer.load || {};
        const loadText =
          peer.has_llm && load.parallel
            ? (load.in_flight || 0) +
              "/" +
              load.parallel +
              " busy" +
              (load.queued ? ", " + load.queued + " queued" : "")
            : "—";
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
              ? h(
                  "a",
                  { href: pageUrl, target: "_blank", rel: "noopener noreferrer" },
                  peer.address + ":" + peer.http_port,
                )
              : peer.address,
          ),
          h(
            "td",
            null,
            peer.models && peer.models.length ? peer.models.join(", ") : h("span", { class: "muted" }, "none"),
          ),
          h("td", null, loadText),
          h(
            "td",
            null,
            h("span", { class: "chip " + (peer.connected ? linkHealth(peer) : "") }, formatRtt(peer.rtt_ms)),
          ),
          h("td", null, peer.last_seen ? agoFromEpoch(peer.last_seen) : "never"),
        );
      }),
    );
  }

  function renderPeerConversations() {
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

  // ==== diagnostics view =====================================================================

  /** A counter's key as a label in the style of the others: "frames_sent" -> "Frames sent". */
  function counterLabel(key) {
    const words = String(key).replace(/[_-]+/g, " ").replace(/([a-z])([A-Z])/g, "$1 $2").trim().toLowerCase();
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function kv(rows) {
    return h(
      "dl",
      { class: "kv" },
      rows.filter(Boolean).map(([key, value]) => [h("dt", null, key), h("dd", null, value)]),
    );
  }

  function panel(title, ...content) {
    return h("section", { class: "panel glass" }, h("h2", null, title), ...content);
  }

  function table(headers, rows, empty) {
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

  async function refreshDiagnostics() {
    await refreshHealth();
    renderDiagnostics();
  }

  function renderDiagnostics() {
    const d = state.health;
    if (state.view !== "diagnostics") return;
    if (!d) {
      $("#diagnostics").replaceChildren(
        panel("This node", h("p", { class: "error-text" }, "The node does not answer.")),
      );
      return;
    }
    const llm = d.llm || {};
    const interfaces = d.interfaces || [];
    const errors = d.recent_errors || [];
    const counters = Object.entries(d.counters || {}).map(([key, value]) => [counterLabel(key), String(value)]);
    const sync = Object.entries(d.sync || {}).map(([key, value]) => ["Sync: " + counterLabel(key).toLowerCase(), String(value)]);
    $("#diagnostics").replaceChildren(
      panel(
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
      ),
      panel(
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
      ),
      panel(
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
      ),
      panel(
        "LLM backend",
        d.llm
          ? kv([
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
            ])
          : kv([["Has an LLM", d.has_llm ? "yes" : "no"]]),
      ),
      panel(
        "Recent errors",
        errors.length
          ? h(
              "ul",
              { class: "error-list" },
              errors
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
                ),
            )
          : h("p", { class: "muted" }, "None: all quiet."),
      ),
      panel(
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
      ),
    );
  }

  // ==== refreshing and live events ===========================================================

  async function refreshHealth() {
    const first = !state.health;
    try {
      state.health = await api("/api/health");
    } catch (error) {
      return;
    }
    if (first && state.current) renderChat(); // "You" needs this node's id
    renderStatus();
    if (localLlmProblem() || ui.notice.dataset.kind) updateComposer();
  }

  async function refreshPeers() {
    let peers;
    try {
      peers = await api("/api/peers");
    } catch (error) {
      return;
    }
    state.peers = new Map(peers.map((peer) => [peer.node_id, peer]));
    renderStatus();
    renderMesh();
  }

  async function refreshAll() {
    await Promise.all([refreshHealth(), refreshPeers(), refreshConversations(), refreshModels()]);
    renderMesh();
    renderDiagnostics();
    if (state.currentId && state.current) syncCurrentConversation();
  }

  function onPeerEvent(peer) {
    if (!peer || !peer.node_id) return;
    state.peers.set(peer.node_id, Object.assign(state.peers.get(peer.node_id) || {}, peer));
    renderStatus();
    renderMesh();
    scheduleModelsRefresh();
    schedulePeersRefresh(); // the round trip of a new link is measured a moment later
  }

  const schedulePeersRefresh = debounce(refreshPeers, 1500);

  function connectEvents() {
    if (state.events) state.events.close();
    const source = new EventSource("/api/events");
    state.events = source;
    source.addEventListener("open", () => {
      setLive(true);
      if (state.eventsOpened) refreshAll(); // back after a break: catch up on what was missed
      state.eventsOpened = true;
    });
    source.addEventListener("error", () => {
      setLive(false);
      // EventSource reconnects by itself after a network break, but not after a refusal (a guest's
      // session ended, say): then try again in a moment, or once the room code is entered.
      if (source.readyState === EventSource.CLOSED && state.events === source) {
        state.events = null;
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
      state.peers.set(peer.node_id, Object.assign(state.peers.get(peer.node_id) || {}, peer));
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

  function poll() {
    if (document.hidden || !$("#signin").hidden) return;
    if (state.role === null) probeAccess();
    refreshHealth().then(() => {
      if (state.view === "diagnostics") renderDiagnostics();
    });
    refreshPeers();
  }

  // ==== the room: guests' sign-in, the owner's room status and invitation =====================
  //
  // The node's owner uses the page on the node's own computer. With --guests, other devices of
  // the room get the page too, after they enter the guest code: until then every page API call
  // answers 401 {"error", "guest_login": true}, and POST /api/guest/login {"code"} sets the
  // session cookie. GET /api/guests tells the owner the addresses and the code to give out.

  /** Who this page is for: GET /api/guests answers the owner, refuses a guest (403), asks a stranger to sign in (401). */
  async function probeAccess() {
    try {
      state.invite = await api("/api/guests");
      state.role = "owner";
    } catch (error) {
      if (error.signIn) return "signin"; // apiError has shown the sign-in form
      if (error.status === 403) state.role = "guest";
      else if (error.status === 404 || error.status === 405) state.role = "owner"; // a node without guests
      else if (error.status === undefined) state.role = null; // no answer: ask again at the next poll
      state.invite = null;
    }
    renderStatus();
    return state.role;
  }

  function roomStatusText(health) {
    const room = (health && health.room) || {}; // no "room": a node without room codes, so an open room
    if (room.closed)
      return "Room closed by a code" + (room.key_hash ? " (key " + String(room.key_hash).slice(0, 16) + ")" : "");
    return "Open room: anyone on this network can join. To close it, start every node with --mesh-key <code>.";
  }

  function renderRoom() {
    const box = $("#room");
    const show = state.role === "owner" && Boolean(state.health);
    box.hidden = !show;
    $("#invite-open").hidden = !(show && state.invite && state.invite.guests);
    if (!show) return;
    const room = state.health.room || {};
    const key = room.closed ? "closed:" + room.key_hash : "open";
    const status = $("#room-status");
    if (status.dataset.key === key) return; // unchanged: leave it for screen readers and selection
    status.dataset.key = key;
    status.className = "room-status " + (room.closed ? "closed" : "open");
    status.title = roomStatusText(state.health);
    expandRoomStatus(false);
    status.replaceChildren(
      ...(room.closed
        ? [icon("lock"), h("span", null, roomStatusText(state.health))]
        : [
            icon("unlock"),
            h(
              "span",
              null,
              h("strong", null, "Open room:"),
              " anyone on this network can join. To close it, start every node with ",
              h("code", null, "--mesh-key <code>"),
              ".",
            ),
          ]),
    );
  }

  /** The room's notice is one line until "more" is pressed. */
  function expandRoomStatus(expanded) {
    $("#room-status").classList.toggle("expanded", expanded);
    $("#room").classList.toggle("expanded", expanded);
    const more = $("#room-more");
    more.setAttribute("aria-expanded", String(expanded));
    more.textContent = expanded ? "less" : "more";
  }

  // -- the owner's invitation --------------------------------------------------------------------

  async function openInvite() {
    const dialog = $("#invite");
    try {
      state.invite = await api("/api/guests"); // the code may have changed since the page opened
    } catch (error) {
      if (error.signIn) return;
    }
    if (!state.invite) return;
    renderInvite();
    if (!dialog.open) dialog.showModal();
    $("#invite-copy-code").focus();
  }

  function closeInvite() {
    const dialog = $("#invite");
    if (dialog.open) dialog.close();
  }

  function renderInvite() {
    const invite = state.invite || {};
    const urls = Array.isArray(invite.urls) ? invite.urls : [];
    $("#invite-urls").replaceChildren(
      ...(urls.length
        ? urls.map((url) =>
            h(
              "li",
              { class: "invite-url-row" },
              h("code", { class: "invite-url" }, url),
              h(
                "button",
                {
                  type: "button",
                  class: "small-button",
                  "aria-label": "Copy the address " + url,
                  onclick: (event) => copyWithFeedback(event.currentTarget, url),
                },
                icon("copy"),
                h("span", { class: "label" }, "Copy"),
              ),
            ),
          )
        : [
            h(
              "li",
              { class: "invite-none" },
              "Other devices cannot reach this node yet: it listens on this computer only. Start it with ",
              h("code", null, "--host 0.0.0.0"),
              " (the default) and its network addresses appear here.",
            ),
          ]),
    );
    $("#invite-code").textContent = invite.code || "—";
    // The first address as a QR code, drawn here (qr.js): a phone's camera opens it.
    const figure = $("#invite-qr");
    figure.hidden = !urls.length || !window.NeuroQR;
    if (!figure.hidden) {
      let code = null;
      try {
        code = window.NeuroQR.svg(urls[0], "QR code of the address " + urls[0]);
      } catch (error) {
        figure.hidden = true;
      }
      if (code) {
        $("#invite-qr-code").replaceChildren(code);
        $("#invite-qr-caption").textContent =
          "Scan with a phone's camera to open " + urls[0] + (invite.code ? ", then enter the guest code." : ".");
      }
    }
    $("#invite-note").replaceChildren(...inviteCodes(Boolean(invite.code_is_mesh_key)));
  }

  /** Which code does what: the guest code is for browsers, the room code (--mesh-key) for computers. */
  function inviteCodes(same) {
    return [
      h(
        "li",
        null,
        h("strong", null, "Guest code"),
        " (above): lets a browser chat here as a guest, who sees only their own chats and the ones shared " +
          "in the room. ",
        same ? "" : "This code opens this computer only.",
      ),
      h(
        "li",
        { class: same ? "invite-warning" : null },
        h("strong", null, "Room code"),
        " (",
        h("code", null, "--mesh-key"),
        same
          ? "): here the same code, so whoever has it can also join a computer to the mesh as a node, with every " +
              "computer's shared chats. Give it only to people you would let do both."
          : "): lets a computer join the mesh as a node. You keep it; it is not shown here.",
      ),
    ];
  }

  // -- a guest's sign-in -------------------------------------------------------------------------

  const signin = {
    busy: false,
    waitUntil: 0,
    timer: 0,
  };

  /** Shows the room-code form instead of the app; ``ended``: a signed-in guest's session ran out. */
  function showSignIn(ended) {
    const box = $("#signin");
    if (!box.hidden) return;
    closeInvite();
    closeSidebar(false);
    $(".app").hidden = true; // an answer being written goes on behind the form
    $(".skip-link").hidden = true;
    const reason = $("#signin-reason");
    reason.hidden = !(ended && state.started);
    reason.textContent = reason.hidden
      ? ""
      : "Your sign-in has ended (the NeuroMesh computer may have restarted). Enter the guest code again.";
    setSignInError("");
    $("#signin-code").value = "";
    box.hidden = false;
    document.title = "Join the room · NeuroMesh";
    $("#signin-code").focus();
  }

  function setSignInError(message) {
    const input = $("#signin-code");
    $("#signin-error").textContent = message;
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  function setSignInBusy(busy) {
    signin.busy = busy;
    renderSignInButton();
  }

  function renderSignInButton() {
    const button = $("#signin-submit");
    const wait = Math.ceil((signin.waitUntil - Date.now()) / 1000);
    button.disabled = signin.busy || wait > 0;
    button.textContent = signin.busy ? "Checking…" : wait > 0 ? "Wait " + wait + " s" : "Join";
  }

  /** After a 429: the button counts down the seconds the node asked to wait. */
  function waitBeforeRetry(seconds) {
    signin.waitUntil = Date.now() + seconds * 1000;
    clearInterval(signin.timer);
    signin.timer = setInterval(() => {
      renderSignInButton();
      if (Date.now() >= signin.waitUntil) clearInterval(signin.timer);
    }, 1000);
    renderSignInButton();
  }

  function retryAfterSeconds(response, body) {
    const header = parseInt(response.headers.get("Retry-After") || "", 10);
    if (header > 0) return header;
    const match = /(\d+) seconds?/.exec((body && body.error) || "");
    return match ? parseInt(match[1], 10) : 30;
  }

  async function submitSignIn(event) {
    event.preventDefault();
    if (signin.busy || Date.now() < signin.waitUntil) return;
    const input = $("#signin-code");
    const code = input.value.trim();
    if (!code) {
      setSignInError("Enter the guest code first: your teacher has it.");
      input.focus();
      return;
    }
    setSignInBusy(true);
    let response;
    let body = null;
    try {
      response = await fetch("/api/guest/login", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ code }),
      });
      try {
        body = await response.json();
      } catch (error) {
        /* not JSON */
      }
    } catch (error) {
      setSignInBusy(false);
      setSignInError(
        "The NeuroMesh computer does not answer. Check that this device is on the room's network " +
          "and that NeuroMesh still runs there, then try again.",
      );
      input.focus();
      return;
    }
    setSignInBusy(false);
    if (response.ok) {
      signedIn(body || {});
      return;
    }
    if (response.status === 403) {
      setSignInError("That code is not right. Check it with your teacher and try again.");
    } else if (response.status === 429) {
      const seconds = retryAfterSeconds(response, body);
      setSignInError(
        "Too many tries from this device. Wait " + plural(seconds, "second") + ", then try again.",
      );
      waitBeforeRetry(seconds);
    } else if (response.status === 400) {
      setSignInError("Enter the guest code first: your teacher has it.");
    } else {
      setSignInError("The NeuroMesh computer could not sign you in just now. Try again in a moment.");
    }
    input.focus();
    input.select();
  }

  /** The code was right: the app, for a guest (or for the owner, who never needed a code). */
  function signedIn(body) {
    state.role = body.role === "owner" ? "owner" : "guest";
    state.invite = null;
    $("#signin").hidden = true;
    $(".app").hidden = false;
    $(".skip-link").hidden = false;
    setSignInError("");
    if (state.role === "owner") probeAccess();
    if (!state.started) startApp();
    else {
      refreshAll();
      if (!state.events) connectEvents();
      if (state.view === "chat" && state.currentId) loadConversation(state.currentId);
    }
    renderStatus();
    renderConversationList();
    if (state.view === "chat" && !ui.composer.hidden) ui.prompt.focus();
    else $("#main").focus();
  }

  // ==== particle background ==================================================================

  function motionOff() {
    try {
      return localStorage.getItem("neuromesh.motion") === "off";
    } catch (error) {
      return false;
    }
  }

  function startParticles() {
    const canvas = $("#particles");
    const context = canvas.getContext("2d");
    const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
    const colors = ["#22d3ee", "#3b82f6", "#8b5cf6", "#ec4899"];
    let particles = [];
    let frame = 0;
    let width = 0;
    let height = 0;

    function resize() {
      const ratio = Math.min(window.devicePixelRatio || 1, 2);
      width = window.innerWidth;
      height = window.innerHeight;
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
      context.setTransform(ratio, 0, 0, ratio, 0, 0);
      const count = Math.min(70, Math.round((width * height) / 22000));
      particles = Array.from({ length: count }, (_, i) => ({
        x: Math.random() * width,
        y: Math.random() * height,
        vx: (Math.random() - 0.5) * 0.25,
        vy: (Math.random() - 0.5) * 0.25,
        r: 1 + Math.random() * 1.6,
        color: colors[i % colors.length],
      }));
      draw();
    }

    function draw() {
      context.clearRect(0, 0, width, height);
      for (let i = 0; i < particles.length; i++) {
        const a = particles[i];
        for (let j = i + 1; j < particles.length; j++) {
          const b = particles[j];
          const distance = Math.hypot(a.x - b.x, a.y - b.y);
          if (distance < 120) {
            context.strokeStyle = "rgba(139, 92, 246, " + (0.16 * (1 - distance / 120)).toFixed(3) + ")";
            context.lineWidth = 1;
            context.beginPath();
            context.moveTo(a.x, a.y);
            context.lineTo(b.x, b.y);
            context.stroke();
          }
        }
      }
      for (const p of particles) {
        context.globalAlpha = 0.7;
        context.fillStyle = p.color;
        context.beginPath();
        context.arc(p.x, p.y, p.r, 0, Math.PI * 2);
        context.fill();
      }
      context.globalAlpha = 1;
    }

    function step() {
      for (const p of particles) {
        p.x += p.vx;
        p.y += p.vy;
        if (p.x < -10) p.x = width + 10;
        if (p.x > width + 10) p.x = -10;
        if (p.y < -10) p.y = height + 10;
        if (p.y > height + 10) p.y = -10;
      }
      draw();
      frame = requestAnimationFrame(step);
    }

    /** Runs only while the tab is visible and the user has not asked for less motion. */
    function update() {
      const off = motionOff();
      canvas.hidden = off;
      const run = !document.hidden && !reducedMotion.matches && !off;
      if (run && !frame) frame = requestAnimationFrame(step);
      if (!run && frame) {
        cancelAnimationFrame(frame);
        frame = 0;
      }
      canvas.dataset.running = run ? "true" : "false";
    }

    window.addEventListener("resize", debounce(resize, 150));
    document.addEventListener("visibilitychange", update);
    const toggle = $("#motion-toggle");
    const label = () => {
      toggle.setAttribute("aria-pressed", motionOff() ? "false" : "true");
      toggle.textContent = "Animated background: " + (motionOff() ? "off" : reducedMotion.matches ? "off (reduced motion)" : "on");
    };
    toggle.addEventListener("click", () => {
      try {
        localStorage.setItem("neuromesh.motion", motionOff() ? "on" : "off");
      } catch (error) {
        /* not kept */
      }
      label();
      update();
    });
    reducedMotion.addEventListener("change", label);
    label();
    reducedMotion.addEventListener("change", update);
    resize();
    update();
  }

  // ==== start ================================================================================

  function fillStaticIcons() {
    for (const slot of document.querySelectorAll("[data-icon]")) slot.prepend(icon(slot.dataset.icon));
  }

  function bindEvents() {
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
    $("#diag-refresh").addEventListener("click", refreshDiagnostics);
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
    $("#signin-form").addEventListener("submit", submitSignIn);
    $("#signin-code").addEventListener("input", () => setSignInError(""));
    $("#invite-open").addEventListener("click", openInvite);
    $("#room-more").addEventListener("click", () =>
      expandRoomStatus(!$("#room-status").classList.contains("expanded")),
    );
    $("#invite-close").addEventListener("click", closeInvite);
    $("#invite").addEventListener("click", (event) => {
      if (event.target === event.currentTarget) closeInvite(); // a click on the backdrop
    });
    $("#invite-copy-code").addEventListener("click", (event) =>
      copyWithFeedback(event.currentTarget, $("#invite-code").textContent),
    );
    for (const button of document.querySelectorAll(".suggestion")) {
      button.addEventListener("click", () => {
        if (!state.stream) sendMessage(button.textContent.trim());
      });
    }
    ui.composer.addEventListener("submit", (event) => {
      event.preventDefault();
      submitPrompt();
    });
    ui.prompt.addEventListener("keydown", onPromptKeydown);
    ui.prompt.addEventListener("input", () => {
      autoGrow();
      updateComposer();
    });
    ui.stop.addEventListener("click", stopAnswer);
    ui.picker.addEventListener("change", () => localStorage.setItem("neuromesh.model", ui.picker.value));
    ui.chatScroll.addEventListener("scroll", () => {
      if (ui.chatScroll.scrollTop < 80) loadOlder();
    });
    ui.messages.addEventListener("click", (event) => {
      const button = event.target.closest(".copy-code");
      if (button) copyWithFeedback(button, button.closest(".code-block").querySelector("pre code").textContent);
    });
  }

  /** The app proper: views, live events and polling (for a guest, once the room code is in). */
  function startApp() {
    if (state.started) return;
    state.started = true;
    route();
    connectEvents();
    refreshAll();
    setInterval(poll, 5000);
  }

  async function boot() {
    fillStaticIcons();
    bindEvents();
    renderStatus();
    renderWho();
    renderModelPicker();
    startParticles();
    if ((await probeAccess()) !== "signin") startApp();
  }

  boot();
})();
