// Chat: opening a conversation and drawing its messages.

import { regenerate, sendMessage, updateComposer } from "./composer.js";
import { plainTitle, renderConversationList } from "./conversations.js";
import { $, api, copyWithFeedback, debounce, formatClock, h, icon, ui } from "./dom.js";
import { myId, prependMessages, state, update } from "./state.js";
import { closeSidebar } from "./views.js";

export function openConversation(id) {
  closeSidebar(false);
  location.hash = "#/chat/" + encodeURIComponent(id);
}

export function startNewChat() {
  update({ currentId: null, current: null });
  ui.newPrivate.checked = false;
  renderChat();
  renderConversationList();
  ui.prompt.focus();
}

export async function loadConversation(id) {
  update({ currentId: id, current: null });
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
  update({ current: conversation });
  renderChat();
  if (state.stream && state.stream.conversationId === id) ui.messages.append(state.stream.answer.element);
  scrollToBottom(true);
}

export const PAGE = 100; // messages fetched at once: a long conversation loads its newest, older ones on scroll-up

export function conversationPath(id, before) {
  return (
    "/api/conversations/" +
    encodeURIComponent(id) +
    "?limit=" +
    PAGE +
    (before ? "&before=" + encodeURIComponent(before) : "")
  );
}

/** Scrolled to the top of a long conversation: the page before the oldest shown, kept in place. */
export async function loadOlder() {
  const c = state.current;
  if (!c || !c.has_more || state.loadingOlder || !c.messages.length) return;
  update({ loadingOlder: true });
  const id = c.id;
  let page;
  try {
    page = await api(conversationPath(id, c.messages[0].id));
  } catch (error) {
    update({ loadingOlder: false });
    return;
  }
  update({ loadingOlder: false });
  if (state.current !== c) return;
  prependMessages(page);
  const before = ui.chatScroll.scrollHeight - ui.chatScroll.scrollTop;
  const first = ui.messages.querySelector(".message");
  for (const message of page.messages) ui.messages.insertBefore(messageView(message), first);
  renderOlderNote();
  ui.chatScroll.scrollTop = ui.chatScroll.scrollHeight - before;
  updateAnswerActions();
}

export function renderOlderNote() {
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

export function renderChatHeader() {
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

export function renderChat() {
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

export function updateWelcome() {
  ui.welcome.hidden = ui.messages.children.length > 0 || Boolean(state.currentId && !state.current);
  ui.newPrivate.parentElement.hidden = Boolean(state.currentId);
}

export function isNearBottom() {
  const el = ui.chatScroll;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 140;
}

export function scrollToBottom(force) {
  if (force || isNearBottom()) ui.chatScroll.scrollTo({ top: ui.chatScroll.scrollHeight, behavior: "auto" });
}

export function senderLabel(message) {
  if (message.role === "assistant") return "Assistant"; // who answered is in the line under it
  const host = message.host_info && message.host_info.hostname;
  // A guest shares this node's id with its owner and other guests: only their own chats are "You".
  const othersChat = state.role === "guest" && state.current && !state.current.own;
  if ((!message.origin || message.origin === myId()) && !othersChat)
    return message.sender && message.sender !== "user" ? message.sender : "You";
  return (message.sender || "user") + (host ? " on " + host : "");
}

export function messageHead(message) {
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
export function messageView(message) {
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

export function cutOffNote() {
  return h(
    "p",
    { class: "cut-off-note" },
    icon("stop"),
    h("strong", null, "Cut off"),
    " · this answer stopped before it was complete; what arrived is kept.",
  );
}

export function questionActions() {
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
export function startEdit(article) {
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
export function markReplaced() {
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
export function answerMeta(message, live) {
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
export function updateAnswerActions() {
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
export async function syncCurrentConversation() {
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
export function answersStoredQuestion(el, message, conversation) {
  if (!el.classList.contains("stopped") && !el.classList.contains("failed")) return false;
  let question = el.previousElementSibling;
  while (question && !question.classList.contains("user")) question = question.previousElementSibling;
  if (!question) return false;
  const at = conversation.messages.indexOf(message);
  const asked = conversation.messages.slice(0, at).reverse().find((m) => m.role === "user");
  if (!asked) return false;
  return question.dataset.id ? question.dataset.id === asked.id : question.dataset.content === asked.content;
}

export const scheduleCurrentSync = debounce(syncCurrentConversation, 120);

/** Older messages on scroll-up, and the copy buttons of code blocks. */
export function bindChat() {
  ui.chatScroll.addEventListener("scroll", () => {
    if (ui.chatScroll.scrollTop < 80) loadOlder();
  });
  ui.messages.addEventListener("click", (event) => {
    const button = event.target.closest(".copy-code");
    if (button) copyWithFeedback(button, button.closest(".code-block").querySelector("pre code").textContent);
  });
}
