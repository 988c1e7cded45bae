// The composer: the prompt, sending, the streamed answer, and the model picker.

import { inlineError, stopAnswer, streamAnswer } from "./answer.js";
import { messageView, renderChatHeader, scrollToBottom, updateWelcome } from "./chat.js";
import { scheduleConversationsRefresh, titleFrom } from "./conversations.js";
import { api, debounce, h, ui } from "./dom.js";
import { llmHostCount, myId, onChange, state, update } from "./state.js";
import { displayName, renderOfflineNotice, renderStatus } from "./views.js";

export const MAX_BYTES = 262144; // a message's limit in bytes of UTF-8: the node's MAX_CONTENT_BYTES (256 KiB)
export const UTF8 = new TextEncoder();

export function updateComposer() {
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
export function localLlmProblem() {
  const llm = state.health && state.health.llm;
  return llm && llm.state === "stopped" && state.role !== "guest" ? llm.problem : null;
}

export function renderNoLlmNotice(noLlm) {
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

export function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, window.innerHeight * 0.4) + "px";
}

export function onPromptKeydown(event) {
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

export function submitPrompt() {
  const text = ui.prompt.value;
  if (!text.trim() || state.stream || ui.send.disabled) return;
  ui.prompt.value = "";
  autoGrow();
  updateComposer();
  sendMessage(text.trim());
}

export function chosenModel() {
  return ui.picker.value || undefined;
}

/** Sends ``content``: creates the conversation if needed, then streams the answer. */
export async function sendMessage(content, replaces, images) {
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
      conversationId = record.id;
      update({ currentId: record.id, current: record });
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

export function regenerate() {
  if (state.stream || !state.current) return;
  const id = state.current.id;
  streamAnswer(
    id,
    "/api/conversations/" + encodeURIComponent(id) + "/regenerate",
    { model: chosenModel() },
    { userStored: true },
  );
}


// ==== models ===============================================================================

export async function refreshModels() {
  try {
    update({ models: await api("/api/models") });
  } catch (error) {
    update({ models: null });
  }
  renderModelPicker();
  updateComposer();
  renderStatus();
  window.dispatchEvent(new CustomEvent("neuromesh:models")); // models.js: the room's models list
}

export const scheduleModelsRefresh = debounce(refreshModels, 200);

export function renderModelPicker() {
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

/** The suggestions, the prompt, its buttons and the model picker; the composer follows the connection. */
export function bindComposer() {
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
  onChange("live", () => updateComposer());
}
