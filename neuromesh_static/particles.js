// The particle background.

import { $, debounce } from "./dom.js";

export function motionOff() {
  try {
    return localStorage.getItem("neuromesh.motion") === "off";
  } catch (error) {
    return false;
  }
}

const COLORS = ["#22d3ee", "#3b82f6", "#8b5cf6", "#ec4899"];

/** Dots drifting on a canvas, joined by faint lines when near; runs only while asked to. */
class Particles {
  constructor(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.particles = [];
    this.frame = 0;
    this.width = 0;
    this.height = 0;
  }

  resize() {
    const ratio = Math.min(window.devicePixelRatio || 1, 2);
    this.width = window.innerWidth;
    this.height = window.innerHeight;
    this.canvas.width = Math.round(this.width * ratio);
    this.canvas.height = Math.round(this.height * ratio);
    this.context.setTransform(ratio, 0, 0, ratio, 0, 0);
    const count = Math.min(70, Math.round((this.width * this.height) / 22000));
    this.particles = Array.from({ length: count }, (_, i) => ({
      x: Math.random() * this.width,
      y: Math.random() * this.height,
      vx: (Math.random() - 0.5) * 0.25,
      vy: (Math.random() - 0.5) * 0.25,
      r: 1 + Math.random() * 1.6,
      color: COLORS[i % COLORS.length],
    }));
    this.draw();
  }

  draw() {
    const { context, particles } = this;
    context.clearRect(0, 0, this.width, this.height);
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

  step() {
    const { width, height } = this;
    for (const p of this.particles) {
      p.x += p.vx;
      p.y += p.vy;
      if (p.x < -10) p.x = width + 10;
      if (p.x > width + 10) p.x = -10;
      if (p.y < -10) p.y = height + 10;
      if (p.y > height + 10) p.y = -10;
    }
    this.draw();
    this.frame = requestAnimationFrame(() => this.step());
  }

  /** Shown unless switched off; animated only when ``run``. */
  show(off, run) {
    this.canvas.hidden = off;
    if (run && !this.frame) this.frame = requestAnimationFrame(() => this.step());
    if (!run && this.frame) {
      cancelAnimationFrame(this.frame);
      this.frame = 0;
    }
    this.canvas.dataset.running = run ? "true" : "false";
  }
}

export function startParticles() {
  const particles = new Particles($("#particles"));
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
  // Runs only while the tab is visible and the user has not asked for less motion.
  const refresh = () => {
    const off = motionOff();
    particles.show(off, !document.hidden && !reducedMotion.matches && !off);
  };
  window.addEventListener("resize", debounce(() => particles.resize(), 150));
  document.addEventListener("visibilitychange", refresh);
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
    refresh();
  });
  reducedMotion.addEventListener("change", label);
  label();
  reducedMotion.addEventListener("change", refresh);
  particles.resize();
  refresh();
}
