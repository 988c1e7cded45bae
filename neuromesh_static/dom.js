// The page's small tools: elements and icons without HTML parsing, the node's JSON API, formats.

import { showSignIn } from "./room.js";
import { setLive } from "./views.js";

export const $ = (selector) => document.querySelector(selector);
export const SVG_NS = "http://www.w3.org/2000/svg";

/** An element: h("a", {href: "#", class: "x", onclick: fn}, "text", child, ...). */
export function h(tag, props, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

export function svg(tag, props, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setProps(node, props);
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

export function setProps(node, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

export const ICONS = {
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
export function iconButton(label, onclick, content, extra) {
  return h(
    "button",
    Object.assign({ type: "button", class: "icon-button", "aria-label": label, onclick: onclick }, extra),
    content,
  );
}

export function icon(name) {
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

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body || {};
    // 401 {"error", "guest_login": true}: a guest of this node must enter the guest code first.
    this.signIn = status === 401;
  }
}

export const SIGNED_OUT = "Your sign-in has ended: enter the guest code again.";

/** The ApiError of a non-2xx reply, with the node's sentence; a 401 also asks for the room code. */
export async function apiError(response) {
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
export async function api(path, options) {
  const init = { method: (options && options.method) || "GET", headers: { Accept: "application/json" } };
  if (options && options.body !== undefined) {
    init.headers["Content-Type"] = "application/json"; // the node refuses state changes sent as forms
    init.body = JSON.stringify(options.body);
  }
  const response = await fetchOrExplain(path, init);
  if (!response.ok) throw await apiError(response);
  return response.status === 204 ? null : response.json();
}

export const NODE_DOWN = "This computer's NeuroMesh is not answering: it may be stopped or restarting.";

/** fetch(), but a network failure says in words that the node is down (never "Failed to fetch"). */
export async function fetchOrExplain(path, init) {
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

export function debounce(fn, ms) {
  let timer = null;
  return function () {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

/** "1 peer", "2 peers"; ``many`` for a plural that is not word + "s" ("peers linked"). */
export function plural(n, word, many) {
  return n + " " + noun(n, word, many);
}

export function noun(n, word, many) {
  return n === 1 ? word : many || word + "s";
}

export function formatClock(iso) {
  const date = new Date(iso);
  return isNaN(date) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export function formatAgo(seconds) {
  if (!isFinite(seconds)) return "never";
  if (seconds < 5) return "just now";
  if (seconds < 60) return Math.round(seconds) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

export const agoFromEpoch = (epoch) => formatAgo(Date.now() / 1000 - epoch);
export const agoFromIso = (iso) => formatAgo((Date.now() - new Date(iso).getTime()) / 1000);

export function formatDuration(seconds) {
  seconds = Math.max(0, Math.round(seconds || 0));
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min";
  const hours = Math.floor(seconds / 3600);
  return hours < 48 ? hours + " h " + Math.floor((seconds % 3600) / 60) + " min" : Math.floor(hours / 24) + " d";
}

export const formatMiB = (bytes) => (bytes ? (bytes / 1048576).toFixed(1) + " MiB" : "—");
export const formatRtt = (ms) =>
  ms === null || ms === undefined ? "—" : ms < 10 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms";

export function linkHealth(peer) {
  if (peer.rtt_ms === null || peer.rtt_ms === undefined) return "unknown";
  return peer.rtt_ms < 50 ? "good" : peer.rtt_ms < 200 ? "fair" : "poor";
}

export async function copyText(text) {
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
export async function copyWithFeedback(button, text) {
  const label = button.querySelector(".label") || button;
  const before = label.textContent;
  label.textContent = (await copyText(text)) ? "Copied" : "Copy failed";
  setTimeout(() => {
    label.textContent = before;
  }, 1500);
}

export const ui = {
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

export const narrowScreen = window.matchMedia("(max-width: 767.98px)");
