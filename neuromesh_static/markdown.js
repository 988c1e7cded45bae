// NeuroMesh: a safe Markdown subset rendered by building DOM nodes.
//
// Text from an LLM or a peer is never parsed as HTML: every piece becomes a text node or an
// element made with createElement, so "<img onerror=...>" shows as those characters.
// Supported: paragraphs (single newlines kept), headings, - * + and 1. lists, > quotes,
// --- rules, **bold**, *italic* / _italic_, `inline code`, ``` fenced code ``` (with a copy
// button), [text](https://...) links and bare http(s) URLs (rel=noopener, new tab), and GFM
// tables (a header row, a |:--|:-:|--:| row, body rows).
"use strict";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const LIST_ITEM = /^ {0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const MAX_COLUMNS = 64; // a hostile "table" of thousands of columns stays a paragraph
// One alternative per inline form; the earliest match in the text wins.
const INLINE = new RegExp(
  [
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)", // 1,2: `code`
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 3: **bold**
    "__(?=\\S)([\\s\\S]*?\\S)__", // 4: __bold__
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*", // 5: *italic*
    "_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)", // 6: _italic_
    "\\[([^\\]\\n]+)\\]\\(\\s*(https?:\\/\\/[^\\s()]+)\\s*\\)", // 7,8: [text](url)
    "(https?:\\/\\/[^\\s<>\"'`]*[^\\s<>\"'`.,;:!?)\\]])", // 9: bare URL
  ].join("|"),
  "g",
);

function safeUrl(text) {
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch (error) {
    return null;
  }
}

function link(url, label) {
  const a = document.createElement("a");
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  a.textContent = label;
  return a;
}

function appendText(parent, text) {
  // Single newlines inside a paragraph become line breaks.
  text.split("\n").forEach((part, index) => {
    if (index) parent.append(document.createElement("br"));
    if (part) parent.append(part);
  });
}

function renderInline(text, parent) {
  const pattern = new RegExp(INLINE.source, "g");
  let last = 0;
  let match;
  while ((match = pattern.exec(text)) !== null) {
    const start = match.index;
    if (match[6] !== undefined && start > 0 && /\w/.test(text[start - 1])) {
      pattern.lastIndex = start + 1; // snake_case_words are not italic
      continue;
    }
    appendText(parent, text.slice(last, start));
    last = pattern.lastIndex;
    if (match[2] !== undefined) {
      const code = document.createElement("code");
      code.textContent = match[2].replace(/^ (.+) $/, "$1");
      parent.append(code);
    } else if (match[3] !== undefined || match[4] !== undefined) {
      const strong = document.createElement("strong");
      renderInline(match[3] !== undefined ? match[3] : match[4], strong);
      parent.append(strong);
    } else if (match[5] !== undefined || match[6] !== undefined) {
      const em = document.createElement("em");
      renderInline(match[5] !== undefined ? match[5] : match[6], em);
      parent.append(em);
    } else {
      const label = match[7] !== undefined ? match[7] : match[9];
      const url = safeUrl(match[7] !== undefined ? match[8] : match[9]);
      parent.append(url ? link(url, label) : match[0]);
    }
  }
  appendText(parent, text.slice(last));
}

function codeBlock(code, language) {
  const block = document.createElement("div");
  block.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.className = "code-language";
  label.textContent = language || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy " + (language || "code") + " to the clipboard");
  head.append(label, copy);
  const pre = document.createElement("pre");
  const body = document.createElement("code");
  body.textContent = code;
  pre.append(body);
  block.append(head, pre);
  return block;
}

/** The cells of a table row: outer pipes dropped, split at pipes that are not escaped (\|). */
function tableCells(line) {
  const cells = [];
  let cell = "";
  const text = line.trim().replace(/^\|/, "");
  for (let i = 0; i < text.length; i += 1) {
    if (text[i] === "\\" && text[i + 1] === "|") {
      cell += "|";
      i += 1;
    } else if (text[i] === "|") {
      cells.push(cell.trim());
      cell = "";
    } else cell += text[i];
  }
  if (cell.trim() || !/\|\s*$/.test(line)) cells.push(cell.trim());
  return cells;
}

/** The columns' alignments if lines[i] is a table's header and lines[i + 1] its delimiter row, else null. */
function tableStart(lines, i) {
  if (i + 1 >= lines.length || !lines[i].includes("|") || !lines[i + 1].includes("-")) return null;
  if (!lines[i + 1].includes("|") && !/^\s*\|/.test(lines[i])) return null; // "a|b" over "---" is a heading
  const delimiters = tableCells(lines[i + 1]);
  if (!delimiters.every((cell) => /^:?-+:?$/.test(cell))) return null;
  if (delimiters.length !== tableCells(lines[i]).length || delimiters.length > MAX_COLUMNS) return null;
  return delimiters.map((cell) => {
    const left = cell.startsWith(":");
    const right = cell.endsWith(":");
    return left && right ? "center" : right ? "right" : left ? "left" : "";
  });
}

function tableRow(cells, aligns, tag) {
  const row = document.createElement("tr");
  aligns.forEach((align, index) => {
    const cell = document.createElement(tag);
    if (tag === "th") cell.scope = "col";
    if (align) cell.className = "align-" + align;
    renderInline(cells[index] || "", cell);
    row.append(cell);
  });
  return row;
}

/** A <table> in a scrolling box: as many columns as the header, short rows padded, long ones cut. */
function table(header, rows, aligns) {
  const node = document.createElement("table");
  const head = document.createElement("thead");
  head.append(tableRow(header, aligns, "th"));
  node.append(head);
  if (rows.length) {
    const body = document.createElement("tbody");
    for (const cells of rows) body.append(tableRow(cells, aligns, "td"));
    node.append(body);
  }
  const box = document.createElement("div");
  box.className = "table-scroll";
  box.append(node);
  return box;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line) || QUOTE.test(line) || RULE.test(line);
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i += 1;
    } else if ((match = FENCE.exec(line))) {
      const close = new RegExp("^ {0,3}" + match[1][0] + "{" + match[1].length + ",}\\s*$");
      const code = [];
      i += 1;
      while (i < lines.length && !close.test(lines[i])) code.push(lines[i++]);
      i += 1; // the closing fence (absent while an answer is still streaming)
      parent.append(codeBlock(code.join("\n").replace(/\n+$/, ""), match[2]));
    } else if ((match = tableStart(lines, i))) {
      const header = tableCells(line);
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i]) && !tableStart(lines, i))
        rows.push(tableCells(lines[i++]));
      parent.append(table(header, rows, match));
    } else if (RULE.test(line)) {
      parent.append(document.createElement("hr"));
      i += 1;
    } else if ((match = HEADING.exec(line))) {
      const heading = document.createElement("h" + Math.min(match[1].length + 2, 6));
      renderInline(match[2], heading);
      parent.append(heading);
      i += 1;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        quoted.push(match[1]);
        i += 1;
      }
      const quote = document.createElement("blockquote");
      renderBlocks(quoted, quote);
      parent.append(quote);
    } else if ((match = LIST_ITEM.exec(line))) {
      const ordered = /\d/.test(match[1]);
      const items = [];
      while (i < lines.length && lines[i].trim()) {
        const itemMatch = LIST_ITEM.exec(lines[i]);
        if (itemMatch && /\d/.test(itemMatch[1]) === ordered) items.push([itemMatch[2]]);
        else if (itemMatch || (!/^\s/.test(lines[i]) && startsBlock(lines[i]))) break;
        else items[items.length - 1].push(lines[i].trim()); // a continuation line
        i += 1;
      }
      parent.append(list(items, ordered, parseInt(match[1], 10)));
    } else {
      const paragraph = [lines[i++]];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i]) && !tableStart(lines, i))
        paragraph.push(lines[i++]);
      const p = document.createElement("p");
      renderInline(paragraph.join("\n"), p);
      parent.append(p);
    }
  }
}

function list(items, ordered, start) {
  const node = document.createElement(ordered ? "ol" : "ul");
  if (ordered && start > 1) node.start = start;
  for (const lines of items) {
    const item = document.createElement("li");
    renderInline(lines.join("\n"), item);
    node.append(item);
  }
  return node;
}

/** A DocumentFragment for ``source``: DOM nodes only, no HTML parsing. */
function render(source) {
  const fragment = document.createDocumentFragment();
  renderBlocks(
    String(source == null ? "" : source)
      .replace(/\r\n?/g, "\n")
      .split("\n"),
    fragment,
  );
  return fragment;
}

window.NeuroMarkdown = { render: render, safeUrl: safeUrl };
