// What the page knows, in one place: read it anywhere, change it only through the functions here.

const data = {
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
  loadingOlder: false, // an older page of the open conversation is on its way
  collapsed: new Set(), // the sidebar's machine groups the person closed
};

const listeners = new Map(); // key -> functions told when that key changes

/** The page's state, read-only: a write through it throws; change it with update() or the helpers below. */
export const state = new Proxy(data, {
  set(target, key) {
    throw new TypeError("state." + String(key) + " changes through update() in state.js");
  },
  deleteProperty(target, key) {
    throw new TypeError("state." + String(key) + " changes through update() in state.js");
  },
});

/** Calls ``fn(value)`` after each change of ``key``. */
export function onChange(key, fn) {
  if (!listeners.has(key)) listeners.set(key, []);
  listeners.get(key).push(fn);
}

function notify(key) {
  for (const fn of listeners.get(key) || []) fn(data[key]);
}

/** Sets each key of ``changes``, then tells the listeners of those whose value changed. */
export function update(changes) {
  const changed = Object.keys(changes).filter((key) => data[key] !== changes[key]);
  Object.assign(data, changes);
  changed.forEach(notify);
}

/** The peer list as /api/peers gave it. */
export function replacePeers(peers) {
  update({ peers: new Map(peers.map((peer) => [peer.node_id, peer])) });
}

/** One peer's news (an event): merged into what is known of it. */
export function mergePeer(peer) {
  data.peers.set(peer.node_id, Object.assign(data.peers.get(peer.node_id) || {}, peer));
  notify("peers");
}

/** The open conversation's lock, as the node now has it. */
export function setCurrentPrivate(id, value) {
  if (!data.current || data.current.id !== id) return;
  data.current.private = value;
  notify("current");
}

/** An older page of the open conversation, put before the messages it shows. */
export function prependMessages(page) {
  data.current.messages = page.messages.concat(data.current.messages);
  data.current.has_more = page.has_more;
  notify("current");
}

/** A machine group of the sidebar opened or closed by the person. */
export function setCollapsed(key, collapsed) {
  if (collapsed) data.collapsed.add(key);
  else data.collapsed.delete(key);
}

/** The peers the graph shows now: the next drawing animates only the ones that are new. */
export function setGraphIds(peers) {
  data.graphIds = new Set(peers.map((peer) => peer.node_id));
}

export const myId = () => (state.health ? state.health.node_id : null);
export const connectedPeers = () => [...state.peers.values()].filter((peer) => peer.connected);

export function llmHostCount() {
  if (state.models && typeof state.models.llm_hosts === "number") return state.models.llm_hosts;
  if (state.health && typeof state.health.llm_hosts === "number") return state.health.llm_hosts;
  return connectedPeers().filter((peer) => peer.has_llm).length + (state.health && state.health.has_llm ? 1 : 0);
}
