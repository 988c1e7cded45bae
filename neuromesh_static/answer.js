// The answer being written: the streamed reply to a chat, its bubble, Stop and Retry.

import { answerMeta, cutOffNote, isNearBottom, messageHead, messageView, scheduleCurrentSync, scrollToBottom, updateAnswerActions, updateWelcome } from "./chat.js";
import { autoGrow, regenerate, sendMessage, updateComposer } from "./composer.js";
import { scheduleConversationsRefresh } from "./conversations.js";
import { NODE_DOWN, SIGNED_OUT, apiError, fetchOrExplain, h, icon, ui } from "./dom.js";
import { state, update } from "./state.js";

export function inlineError(message, retry) {
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
class LiveAnswer {
  constructor() {
    this.body = h("div", { class: "markdown" });
    this.statusLine = h(
      "div",
      { class: "answer-status", role: "status" },
      h("span", { class: "typing", "aria-hidden": "true" }, h("i"), h("i"), h("i")),
      h("span", { class: "status-text" }, "Finding an LLM on the mesh…"),
    );
    this.element = h(
      "article",
      { class: "message assistant streaming", "aria-busy": "true", "aria-label": "Answer being written" },
      messageHead({ role: "assistant", timestamp: new Date().toISOString() }),
      h("div", { class: "bubble glass" }, this.body, this.statusLine),
    );
    this.text = "";
    this.info = {};
    this.frame = 0;
  }

  draw() {
    this.frame = 0;
    const stick = isNearBottom();
    this.body.replaceChildren(window.NeuroMarkdown.render(this.text));
    this.element.dataset.content = this.text;
    if (stick) scrollToBottom(true);
  }

  status(message) {
    this.statusLine.querySelector(".status-text").textContent = message;
  }

  end() {
    cancelAnimationFrame(this.frame);
    this.draw();
    this.element.classList.remove("streaming");
    this.element.removeAttribute("aria-busy");
    this.statusLine.replaceChildren();
  }

  start(data) {
    this.info = data;
    this.status((data.node_name || "A node") + " is answering" + (data.model ? " with " + data.model : "") + "…");
  }

  continued(data) {
    this.info.continued_on = data.node_name;
    this.status((data.from_node_name || "The host") + " stopped: " + (data.node_name || "another host") + " continues…");
  }

  thinking(content) {
    if (window.NeuroMedia) window.NeuroMedia.thinking(this.element, content);
    this.statusLine.querySelector(".typing").hidden = true;
  }

  token(content) {
    this.text += content;
    this.statusLine.querySelector(".typing").hidden = true;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  finish(data) {
    const message = data.message || {};
    if (typeof message.content === "string") this.text = message.content;
    this.end();
    if (message.id) this.element.dataset.id = message.id;
    this.element.setAttribute("aria-label", "Answer from " + (data.node_name || message.answered_by_name || "the mesh"));
    this.element.append(answerMeta(message, Object.assign({}, this.info, data)));
  }

  fail(message, retry, stored) {
    this.end();
    this.element.classList.add("failed");
    if (!this.text) this.element.querySelector(".bubble").hidden = true;
    if (stored && stored.id) {
      // What arrived before the host went down is stored, marked as cut off.
      this.element.dataset.id = stored.id;
      this.element.classList.add("cut-off");
      this.element.append(cutOffNote());
    }
    this.element.append(inlineError(message, retry));
  }

  stopped() {
    this.end();
    this.element.classList.add("stopped");
    this.element.append(
      h(
        "div",
        { class: "answer-meta" },
        h("span", { class: "stopped-note" }, "Stopped."),
        this.info.node_name ? h("span", null, "answered by ", h("span", { class: "node" }, this.info.node_name)) : null,
      ),
    );
    if (this.text) {
      this.element.classList.add("cut-off");
      this.element.querySelector(".bubble").after(cutOffNote());
    }
  }
}

/** Reads a text/event-stream body, calling onEvent(type, payload) for each event. */
export async function readEventStream(response, onEvent) {
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
export async function streamAnswer(conversationId, path, body, context) {
  const controller = new AbortController();
  const answer = new LiveAnswer();
  ui.messages.append(answer.element);
  update({ stream: { controller, conversationId, answer } });
  updateComposer();
  updateAnswerActions();
  updateWelcome();
  scrollToBottom(true);
  const turn = { context, answer, userStored: Boolean(context.userStored), ended: false };
  turn.retry = () => retryTurn(turn);
  try {
    const response = await fetchOrExplain(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await apiError(response);
    await receiveAnswer(turn, response);
  } catch (error) {
    streamFailed(turn, error);
  } finally {
    if (state.stream && state.stream.controller === controller) update({ stream: null });
    if (context.userView) context.userView.classList.remove("pending");
    updateComposer();
    updateAnswerActions();
    scheduleConversationsRefresh();
    if (state.currentId === conversationId) scheduleCurrentSync();
  }
}

/** Retry after a failed answer: asks again, or asks for another answer if the question is stored. */
function retryTurn(turn) {
  const context = turn.context;
  if (state.stream) return;
  turn.answer.element.remove();
  // A question the page found stored after a reconnect (its local bubble replaced) is not asked twice.
  if (turn.userStored || (context.userView && !context.userView.isConnected)) {
    regenerate();
  } else {
    if (context.userView) context.userView.remove();
    sendMessage(context.content, context.replaces, context.images);
  }
}

function markUserStored(turn, message) {
  const context = turn.context;
  turn.userStored = true;
  scheduleConversationsRefresh();
  if (context.userView && message) {
    const stored = messageView(message);
    context.userView.replaceWith(stored);
    context.userView = stored;
  }
}

async function receiveAnswer(turn, response) {
  const answer = turn.answer;
  if (!(response.headers.get("Content-Type") || "").includes("text/event-stream")) {
    const data = await response.json(); // a node that does not stream: {user, assistant}
    markUserStored(turn, data.user || (data.role === "user" ? data : null));
    if (!data.assistant) throw new Error("The node saved the message but sent no answer.");
    answer.finish({ message: data.assistant });
    turn.ended = true;
    return;
  }
  await readEventStream(response, (type, data) => onAnswerEvent(turn, type, data));
  if (!turn.ended) answer.fail("The answer broke off before it was complete.", turn.retry);
}

function onAnswerEvent(turn, type, data) {
  const answer = turn.answer;
  if (type === "user") markUserStored(turn, data.message);
  else if (type === "queued")
    answer.status("Waiting in the queue of " + (data.node_name || "an LLM host") + ": position " + data.position + "…");
  else if (type === "start") answer.start(data);
  else if (type === "continued") answer.continued(data);
  else if (type === "token") answer.token(data.content || "");
  else if (type === "thinking") answer.thinking(data.content || "");
  else if (type === "done") {
    answer.finish(data);
    turn.ended = true;
  } else if (type === "error") {
    answer.fail(data.error || "The answer failed.", turn.retry, data.message);
    turn.ended = true;
  }
}

function streamFailed(turn, error) {
  const answer = turn.answer;
  if (error.name === "AbortError") answer.stopped();
  else if (error.signIn) answer.fail(SIGNED_OUT + " Then press Retry.", turn.retry);
  else {
    // A stream cut by the node going down reads "network error": say what happened instead.
    answer.fail(error instanceof TypeError ? NODE_DOWN : error.message || String(error), turn.retry);
    // Nothing was stored: give the question back to the composer, unless a new draft is there.
    if (!turn.userStored && error.nodeDown && !ui.prompt.value.trim()) {
      ui.prompt.value = turn.context.content;
      autoGrow();
    }
  }
}

export function stopAnswer() {
  if (state.stream) state.stream.controller.abort();
}
