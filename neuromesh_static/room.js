// The room: guests' sign-in, the owner's room status and the invitation.

import { loadConversation } from "./chat.js";
import { renderConversationList } from "./conversations.js";
import { $, api, copyWithFeedback, h, icon, plural, ui } from "./dom.js";
import { connectEvents, refreshAll, startApp } from "./live.js";
import { state, update } from "./state.js";
import { closeSidebar, renderStatus } from "./views.js";

//
// The node's owner uses the page on the node's own computer. With --guests, other devices of
// the room get the page too, after they enter the guest code: until then every page API call
// answers 401 {"error", "guest_login": true}, and POST /api/guest/login {"code"} sets the
// session cookie. GET /api/guests tells the owner the addresses and the code to give out.

/** Who this page is for: GET /api/guests answers the owner, refuses a guest (403), asks a stranger to sign in (401). */
export async function probeAccess() {
  try {
    update({ invite: await api("/api/guests"), role: "owner" });
  } catch (error) {
    if (error.signIn) return "signin"; // apiError has shown the sign-in form
    if (error.status === 403) update({ role: "guest" });
    else if (error.status === 404 || error.status === 405) update({ role: "owner" }); // a node without guests
    else if (error.status === undefined) update({ role: null }); // no answer: ask again at the next poll
    update({ invite: null });
  }
  renderStatus();
  return state.role;
}

export function roomStatusText(health) {
  const room = (health && health.room) || {}; // no "room": a node without room codes, so an open room
  if (room.closed)
    return "Room closed by a code" + (room.key_hash ? " (key " + String(room.key_hash).slice(0, 16) + ")" : "");
  return "Open room: anyone on this network can join. To close it, start every node with --mesh-key <code>.";
}

export function renderRoom() {
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
          h("span", null, h("strong", null, "Open room:"),
            " anyone on this network can join. To close it, start every node with ",
            h("code", null, "--mesh-key <code>"), "."),
        ]),
  );
}

/** The room's notice is one line until "more" is pressed. */
export function expandRoomStatus(expanded) {
  $("#room-status").classList.toggle("expanded", expanded);
  $("#room").classList.toggle("expanded", expanded);
  const more = $("#room-more");
  more.setAttribute("aria-expanded", String(expanded));
  more.textContent = expanded ? "less" : "more";
}

// -- the owner's invitation --------------------------------------------------------------------

export async function openInvite() {
  const dialog = $("#invite");
  try {
    update({ invite: await api("/api/guests") }); // the code may have changed since the page opened
  } catch (error) {
    if (error.signIn) return;
  }
  if (!state.invite) return;
  renderInvite();
  if (!dialog.open) dialog.showModal();
  $("#invite-copy-code").focus();
}

export function closeInvite() {
  const dialog = $("#invite");
  if (dialog.open) dialog.close();
}

export function renderInvite() {
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
export function inviteCodes(same) {
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

export const signin = {
  busy: false,
  waitUntil: 0,
  timer: 0,
};

/** Shows the room-code form instead of the app; ``ended``: a signed-in guest's session ran out. */
export function showSignIn(ended) {
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

export function setSignInError(message) {
  const input = $("#signin-code");
  $("#signin-error").textContent = message;
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

export function setSignInBusy(busy) {
  signin.busy = busy;
  renderSignInButton();
}

export function renderSignInButton() {
  const button = $("#signin-submit");
  const wait = Math.ceil((signin.waitUntil - Date.now()) / 1000);
  button.disabled = signin.busy || wait > 0;
  button.textContent = signin.busy ? "Checking…" : wait > 0 ? "Wait " + wait + " s" : "Join";
}

/** After a 429: the button counts down the seconds the node asked to wait. */
export function waitBeforeRetry(seconds) {
  signin.waitUntil = Date.now() + seconds * 1000;
  clearInterval(signin.timer);
  signin.timer = setInterval(() => {
    renderSignInButton();
    if (Date.now() >= signin.waitUntil) clearInterval(signin.timer);
  }, 1000);
  renderSignInButton();
}

export function retryAfterSeconds(response, body) {
  const header = parseInt(response.headers.get("Retry-After") || "", 10);
  if (header > 0) return header;
  const match = /(\d+) seconds?/.exec((body && body.error) || "");
  return match ? parseInt(match[1], 10) : 30;
}

export async function submitSignIn(event) {
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
export function signedIn(body) {
  update({ role: body.role === "owner" ? "owner" : "guest", invite: null });
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

/** The sign-in form, the room status and the invitation. */
export function bindRoom() {
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
}
