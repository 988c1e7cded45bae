// NeuroMesh page: pictures for vision models, a reasoning model's thinking, the models'
// capabilities. An ES module beside app.js, which calls it through window.NeuroMedia:
//   setModels(list)       the /api/models reply, each time the model picker is drawn
//   capabilityLabel(m)    " · vision, thinking" for a model's option in the picker
//   take()                the attached pictures (base64, no data: prefix) for the next question
//   decorate(article, m)  a stored message's pictures, or its collapsed thinking
//   thinking(article, t)  the live answer's thinking, streamed into its collapsed section
// Pictures are downscaled in the browser (canvas) to fit what one message may carry.

const MAX_IMAGES = 4; // the node's MAX_MESSAGE_IMAGES
const MAX_TOTAL = 224 * 1024; // the node's MAX_IMAGES_BYTES: base64 of all pictures of a message
const MAX_ONE = 200 * 1024; // one picture, so that two fit when both are small
const MAX_FILE = 25 * 1024 * 1024; // larger files are refused before they are decoded
const MAX_SIDE = 1280; // longest side after downscaling, before any further shrinking
const SHOWN = ["vision", "thinking", "tools", "embedding"];

const state = { models: null, images: [] };
const $ = (selector) => document.querySelector(selector);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "onclick") node.addEventListener("click", value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function imageType(base64) {
  if (base64.startsWith("iVBOR")) return "image/png";
  if (base64.startsWith("R0lG")) return "image/gif";
  if (base64.startsWith("UklGR")) return "image/webp";
  return "image/jpeg";
}

function dataUrl(base64) {
  return "data:" + imageType(base64) + ";base64," + base64;
}

// ---- models and their capabilities -----------------------------------------------------------

function chosenModel() {
  const picker = $("#model-picker");
  const models = (state.models && state.models.models) || [];
  const name = (picker && picker.value) || (state.models && state.models.default) || "";
  return models.find((model) => model.name === name) || null;
}

function canSee() {
  const model = chosenModel();
  return Boolean(model && (model.capabilities || []).includes("vision"));
}

function capabilityLabel(model) {
  const shown = (model.capabilities || []).filter((c) => SHOWN.includes(c));
  return shown.length ? " · " + shown.join(", ") : "";
}

function setModels(models) {
  state.models = models;
  renderAttach();
}

// ---- attaching pictures ----------------------------------------------------------------------

function say(text) {
  const note = $("#attach-note");
  if (!note) return;
  note.textContent = text || "";
  note.hidden = !text;
}

async function decode(file) {
  if (window.createImageBitmap) return createImageBitmap(file);
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  const image = new Image();
  image.src = url;
  await image.decode();
  return image;
}

/** The picture as JPEG base64 of at most ``budget`` characters: smaller and softer until it fits. */
function shrink(picture, budget) {
  const canvas = document.createElement("canvas");
  const width = picture.width || picture.naturalWidth;
  const height = picture.height || picture.naturalHeight;
  let scale = Math.min(1, MAX_SIDE / Math.max(width, height));
  for (let round = 0; round < 12; round++) {
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff"; // a transparent PNG on white, as JPEG has no transparency
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(picture, 0, 0, canvas.width, canvas.height);
    for (const quality of [0.85, 0.7, 0.55]) {
      const base64 = canvas.toDataURL("image/jpeg", quality).split(",", 2)[1] || "";
      if (base64.length <= budget) return base64;
    }
    scale *= 0.75;
  }
  return null;
}

async function attach(files) {
  if (!canSee()) {
    say("The chosen model cannot see pictures: choose one marked “vision”.");
    return;
  }
  for (const file of files) {
    if (state.images.length >= MAX_IMAGES) {
      say("At most " + MAX_IMAGES + " pictures go with one message.");
      break;
    }
    if (!file.type.startsWith("image/")) {
      say(file.name + " is not a picture.");
      continue;
    }
    if (file.size > MAX_FILE) {
      say(file.name + " is over " + MAX_FILE / 1024 / 1024 + " MB: take a smaller picture.");
      continue;
    }
    const room = Math.min(MAX_ONE, MAX_TOTAL - state.images.reduce((sum, image) => sum + image.length, 0));
    if (room < 16 * 1024) {
      say("No room for another picture in this message: send it with the next one.");
      break;
    }
    try {
      const base64 = shrink(await decode(file), room);
      if (!base64) say(file.name + " could not be made small enough.");
      else state.images.push(base64);
    } catch (error) {
      say(file.name + " could not be read as a picture.");
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const strip = $("#attachments");
  if (!strip) return;
  strip.replaceChildren(
    ...state.images.map((base64, index) =>
      el(
        "span",
        { class: "attachment" },
        el("img", { src: dataUrl(base64), alt: "Picture " + (index + 1) + " to send" }),
        el(
          "button",
          {
            type: "button",
            class: "attachment-remove",
            "aria-label": "Remove picture " + (index + 1),
            onclick: () => {
              state.images.splice(index, 1);
              renderAttachments();
            },
          },
          "×",
        ),
      ),
    ),
  );
  strip.hidden = state.images.length === 0;
}

function renderAttach() {
  const button = $("#attach-button");
  if (!button) return;
  const vision = canSee();
  button.hidden = !vision;
  if (!vision && state.images.length) {
    state.images = [];
    renderAttachments();
    say("The pictures were removed: the chosen model cannot see pictures.");
  }
}

function take() {
  if (!state.images.length || !canSee()) return undefined;
  const images = state.images;
  state.images = [];
  renderAttachments();
  say("");
  return images;
}

function pictureIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const icon = document.createElementNS(ns, "svg");
  icon.setAttribute("viewBox", "0 0 24 24");
  icon.setAttribute("aria-hidden", "true");
  icon.setAttribute("class", "attach-icon");
  for (const [tag, attrs] of [
    ["rect", { x: "3", y: "5", width: "18", height: "14", rx: "2" }],
    ["circle", { cx: "9", cy: "10", r: "1.8" }],
    ["path", { d: "M4 17l5-5 4 4 3-3 4 4" }],
  ]) {
    const part = document.createElementNS(ns, tag);
    for (const [key, value] of Object.entries(attrs)) part.setAttribute(key, value);
    icon.append(part);
  }
  return icon;
}

function buildComposer() {
  const composer = $("#composer");
  const bar = composer && composer.querySelector(".composer-bar");
  if (!bar || $("#attach-button")) return;
  const input = el("input", { type: "file", id: "attach-input", accept: "image/*", multiple: "", hidden: "" });
  const button = el(
    "button",
    { type: "button", id: "attach-button", class: "attach-button", "aria-label": "Attach a picture",
      title: "Attach a picture (or paste one)", hidden: "" },
    pictureIcon(),
  );
  button.addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    attach(Array.from(input.files || []));
    input.value = "";
  });
  bar.prepend(button, input);
  const strip = el("div", { id: "attachments", class: "attachments", "aria-label": "Pictures to send", hidden: "" });
  const note = el("div", { id: "attach-note", class: "attach-note", role: "status", hidden: "" });
  bar.before(strip, note);
  const prompt = $("#prompt");
  if (prompt) {
    prompt.addEventListener("paste", (event) => {
      const files = Array.from((event.clipboardData && event.clipboardData.files) || []).filter((file) =>
        file.type.startsWith("image/"),
      );
      if (!files.length) return;
      event.preventDefault();
      attach(files);
    });
  }
  const picker = $("#model-picker");
  if (picker) picker.addEventListener("change", renderAttach);
}

// ---- stored messages and the live answer -----------------------------------------------------

function thinkingSection(bubble) {
  let section = bubble.querySelector("details.thinking");
  if (!section) {
    section = el(
      "details",
      { class: "thinking" },
      el("summary", null, "Thinking…"),
      el("div", { class: "thinking-text" }),
    );
    bubble.prepend(section);
  }
  return section;
}

function thinking(article, text) {
  const bubble = article.querySelector(".bubble");
  if (!bubble || !text) return;
  bubble.hidden = false;
  thinkingSection(bubble).querySelector(".thinking-text").append(text);
}

function decorate(article, message) {
  const bubble = article.querySelector(".bubble");
  if (!bubble) return;
  if (message.role === "assistant" && message.thinking) {
    thinkingSection(bubble).querySelector(".thinking-text").textContent = message.thinking;
  }
  if (message.role === "user" && Array.isArray(message.images) && message.images.length) {
    bubble.append(
      el(
        "div",
        { class: "message-images" },
        ...message.images.map((base64, index) =>
          el("img", { src: dataUrl(base64), alt: "Picture " + (index + 1) + " of the question", loading: "lazy" }),
        ),
      ),
    );
  }
}

window.NeuroMedia = { setModels, capabilityLabel, take, decorate, thinking };
buildComposer();
if (!state.models) {
  fetch("/api/models", { headers: { Accept: "application/json" } })
    .then((response) => (response.ok ? response.json() : null))
    .then((models) => {
      if (models && !state.models) setModels(models);
    })
    .catch(() => {});
}
