/* NeuroMesh: a small QR code encoder for the "Invite guests" dialog (no library, no CDN).
 *
 * Byte mode, error correction level M, versions 1 to 6 (up to 106 bytes: plenty for a URL).
 * NeuroQR.encode(text) -> {size, modules: [[bool]], version, mask}; NeuroQR.svg(text, scale)
 * -> an <svg> element. Follows ISO/IEC 18004: Reed-Solomon over GF(256) (0x11d), the eight
 * masks scored by the four penalty rules, BCH-coded format information.
 */
"use strict";

// Per version at level M: [data codewords per block, number of blocks, EC codewords per block].
const BLOCKS = { 1: [16, 1, 10], 2: [28, 1, 16], 3: [44, 1, 26], 4: [32, 2, 18], 5: [43, 2, 24], 6: [27, 4, 16] };
const ALIGN = { 2: 18, 3: 22, 4: 26, 5: 30, 6: 34 }; // the one alignment pattern's centre (row = col)

/** GF(256)'s powers of 2 (twice over, so sums of logarithms need no modulo) and their logarithms. */
function fieldTables() {
  const exp = new Array(512);
  const log = new Array(256);
  let x = 1;
  for (let i = 0; i < 255; i++) {
    exp[i] = x;
    log[x] = i;
    x <<= 1;
    if (x & 0x100) x ^= 0x11d;
  }
  for (let i = 255; i < 512; i++) exp[i] = exp[i - 255];
  return [exp, log];
}

const [EXP, LOG] = fieldTables();

const mul = (a, b) => (a && b ? EXP[LOG[a] + LOG[b]] : 0);

function generator(degree) {
  let poly = [1];
  for (let i = 0; i < degree; i++) {
    const next = new Array(poly.length + 1).fill(0);
    for (let j = 0; j < poly.length; j++) {
      next[j] ^= poly[j];
      next[j + 1] ^= mul(poly[j], EXP[i]);
    }
    poly = next;
  }
  return poly;
}

function remainder(data, degree) {
  const gen = generator(degree);
  const out = data.concat(new Array(degree).fill(0));
  for (let i = 0; i < data.length; i++) {
    const factor = out[i];
    if (factor) for (let j = 0; j < gen.length; j++) out[i + j] ^= mul(gen[j], factor);
  }
  return out.slice(data.length);
}

function utf8(text) {
  return Array.from(new TextEncoder().encode(text));
}

/** The codewords of ``bytes`` at ``version``: data, padded, then interleaved with their EC. */
function codewords(bytes, version) {
  const [perBlock, blocks, ecPerBlock] = BLOCKS[version];
  const capacity = perBlock * blocks;
  const bits = [];
  const put = (value, length) => {
    for (let i = length - 1; i >= 0; i--) bits.push((value >>> i) & 1);
  };
  put(0b0100, 4);
  put(bytes.length, 8);
  for (const b of bytes) put(b, 8);
  put(0, Math.min(4, capacity * 8 - bits.length));
  while (bits.length % 8) bits.push(0);
  const data = [];
  for (let i = 0; i < bits.length; i += 8) data.push(parseInt(bits.slice(i, i + 8).join(""), 2));
  for (let pad = 0; data.length < capacity; pad++) data.push(pad % 2 ? 0x11 : 0xec);
  const dataBlocks = [];
  const ecBlocks = [];
  for (let b = 0; b < blocks; b++) {
    const block = data.slice(b * perBlock, (b + 1) * perBlock);
    dataBlocks.push(block);
    ecBlocks.push(remainder(block, ecPerBlock));
  }
  const out = [];
  for (let i = 0; i < perBlock; i++) for (const block of dataBlocks) out.push(block[i]);
  for (let i = 0; i < ecPerBlock; i++) for (const block of ecBlocks) out.push(block[i]);
  return out;
}

function emptyGrid(size) {
  return Array.from({ length: size }, () => new Array(size).fill(null));
}

/** Finder, separator, timing and alignment patterns, the dark module; format areas reserved. */
function functionPatterns(version) {
  const size = 17 + 4 * version;
  const grid = emptyGrid(size);
  const finder = (row, col) => {
    for (let r = -1; r <= 7; r++)
      for (let c = -1; c <= 7; c++) {
        const y = row + r;
        const x = col + c;
        if (y < 0 || y >= size || x < 0 || x >= size) continue;
        const ring = Math.max(Math.abs(r - 3), Math.abs(c - 3));
        grid[y][x] = ring !== 2 && ring !== 4;
      }
  };
  finder(0, 0);
  finder(0, size - 7);
  finder(size - 7, 0);
  for (let i = 8; i < size - 8; i++) grid[6][i] = grid[i][6] = i % 2 === 0;
  if (ALIGN[version]) {
    const centre = ALIGN[version];
    for (let r = -2; r <= 2; r++)
      for (let c = -2; c <= 2; c++) grid[centre + r][centre + c] = Math.max(Math.abs(r), Math.abs(c)) !== 1;
  }
  for (let i = 0; i < 9; i++) {
    if (grid[8][i] === null) grid[8][i] = false;
    if (grid[i][8] === null) grid[i][8] = false;
  }
  for (let i = 0; i < 8; i++) {
    grid[8][size - 1 - i] = false;
    grid[size - 1 - i][8] = false;
  }
  grid[size - 8][8] = true; // the dark module
  return grid;
}

const MASKS = [
  (r, c) => (r + c) % 2 === 0,
  (r) => r % 2 === 0,
  (r, c) => c % 3 === 0,
  (r, c) => (r + c) % 3 === 0,
  (r, c) => (Math.floor(r / 2) + Math.floor(c / 3)) % 2 === 0,
  (r, c) => ((r * c) % 2) + ((r * c) % 3) === 0,
  (r, c) => (((r * c) % 2) + ((r * c) % 3)) % 2 === 0,
  (r, c) => (((r + c) % 2) + ((r * c) % 3)) % 2 === 0,
];

function placeData(base, words, mask) {
  const size = base.length;
  const grid = base.map((row) => row.slice());
  const bits = [];
  for (const word of words) for (let i = 7; i >= 0; i--) bits.push((word >>> i) & 1);
  let index = 0;
  let upward = true;
  for (let right = size - 1; right > 0; right -= 2) {
    if (right === 6) right = 5; // the vertical timing column is skipped
    for (let step = 0; step < size; step++) {
      const row = upward ? size - 1 - step : step;
      for (const col of [right, right - 1]) {
        if (base[row][col] !== null) continue;
        const bit = index < bits.length ? bits[index++] === 1 : false;
        grid[row][col] = bit !== MASKS[mask](row, col);
      }
    }
    upward = !upward;
  }
  return grid;
}

function placeFormat(grid, mask) {
  const size = grid.length;
  const value = (0b00 << 3) | mask; // level M is 00
  let rem = value;
  for (let i = 0; i < 10; i++) rem = (rem << 1) ^ ((rem >>> 9) * 0x537);
  const bits = ((value << 10) | rem) ^ 0x5412;
  const bit = (i) => ((bits >>> i) & 1) === 1;
  for (let i = 0; i <= 5; i++) grid[i][8] = bit(i);
  grid[7][8] = bit(6);
  grid[8][8] = bit(7);
  grid[8][7] = bit(8);
  for (let i = 9; i < 15; i++) grid[8][14 - i] = bit(i);
  for (let i = 0; i < 8; i++) grid[8][size - 1 - i] = bit(i);
  for (let i = 8; i < 15; i++) grid[size - 15 + i][8] = bit(i);
  grid[size - 8][8] = true;
}

function penalty(grid) {
  const size = grid.length;
  let score = 0;
  for (let pass = 0; pass < 2; pass++) {
    for (let a = 0; a < size; a++) {
      let run = 1;
      const line = [];
      for (let b = 0; b < size; b++) line.push(pass ? grid[b][a] : grid[a][b]);
      for (let b = 1; b <= size; b++) {
        if (b < size && line[b] === line[b - 1]) run++;
        else {
          if (run >= 5) score += run - 2;
          run = 1;
        }
      }
      const text = line.map((dark) => (dark ? "1" : "0")).join("");
      for (const pattern of ["10111010000", "00001011101"]) {
        for (let at = text.indexOf(pattern); at >= 0; at = text.indexOf(pattern, at + 1)) score += 40;
      }
    }
  }
  for (let r = 0; r < size - 1; r++)
    for (let c = 0; c < size - 1; c++) {
      const v = grid[r][c];
      if (v === grid[r][c + 1] && v === grid[r + 1][c] && v === grid[r + 1][c + 1]) score += 3;
    }
  let dark = 0;
  for (const row of grid) for (const v of row) if (v) dark++;
  score += Math.floor(Math.abs((dark * 20) / (size * size) - 10)) * 10;
  return score;
}

/** The QR code of ``text``: the smallest version (1-6) it fits, the mask of least penalty. */
function encode(text, forcedMask) {
  const bytes = utf8(text);
  const version = [1, 2, 3, 4, 5, 6].find((v) => BLOCKS[v][0] * BLOCKS[v][1] - 2 >= bytes.length);
  if (!version) throw new Error("too long for a QR code of version 6 (106 bytes at most)");
  const words = codewords(bytes, version);
  const base = functionPatterns(version);
  let best = null;
  for (let mask = 0; mask < 8; mask++) {
    if (forcedMask !== undefined && mask !== forcedMask) continue;
    const grid = placeData(base, words, mask);
    placeFormat(grid, mask);
    const score = penalty(grid);
    if (!best || score < best.score) best = { score, grid, mask };
  }
  return { size: best.grid.length, modules: best.grid, version, mask: best.mask };
}

/** An <svg> of the code with its four-module quiet zone, dark on light so phones read it. */
function svgOf(text, label) {
  const code = encode(text);
  const quiet = 4;
  const span = code.size + 2 * quiet;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + span + " " + span);
  svg.setAttribute("class", "qr");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label || "QR code of " + text);
  svg.setAttribute("shape-rendering", "crispEdges");
  const background = document.createElementNS(ns, "rect");
  background.setAttribute("width", String(span));
  background.setAttribute("height", String(span));
  background.setAttribute("fill", "#ffffff");
  svg.append(background);
  let d = "";
  code.modules.forEach((row, r) =>
    row.forEach((dark, c) => {
      if (dark) d += "M" + (c + quiet) + " " + (r + quiet) + "h1v1h-1z";
    }),
  );
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", d);
  path.setAttribute("fill", "#000000");
  svg.append(path);
  svg.dataset.version = String(code.version);
  svg.dataset.mask = String(code.mask);
  return svg;
}

const api = { encode, svg: svgOf };
if (typeof window !== "undefined") window.NeuroQR = api;
if (typeof module !== "undefined" && module.exports) module.exports = api;
