// Two small SVG charts for the analysis page, drawn by hand (no chart library, nothing fetched):
// a bar chart of mean KL by position with a draggable marker at L, and a line chart of the rescue curve.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PAD = { left: 52, right: 14, top: 24, bottom: 36 };

function el(name, attrs, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function frame(svg) {
  const [, , w, h] = svg.getAttribute("viewBox").split(" ").map(Number);
  svg.replaceChildren();
  return { w, h, x0: PAD.left, x1: w - PAD.right, y0: h - PAD.bottom, y1: PAD.top };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function axes(svg, f, yMax, xLabel, yLabel, yFormat) {
  svg.append(el("line", { class: "axis", x1: f.x0, y1: f.y0, x2: f.x1, y2: f.y0 }));
  svg.append(el("line", { class: "axis", x1: f.x0, y1: f.y0, x2: f.x0, y2: f.y1 }));
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    const y = f.y0 - ((f.y0 - f.y1) * i) / 4;
    svg.append(el("line", { class: "axis", x1: f.x0 - 4, y1: y, x2: f.x0, y2: y }));
    svg.append(el("text", { x: f.x0 - 6, y: y + 4, "text-anchor": "end" }, yFormat(v)));
  }
  svg.append(el("text", { x: (f.x0 + f.x1) / 2, y: f.h - 4, "text-anchor": "middle" }, xLabel));
  svg.append(el("text", { x: 12, y: (f.y0 + f.y1) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(f.y0 + f.y1) / 2})` }, yLabel));
}

// Bars of `values` (position 1..T); a marker after the first L bars, moved by dragging or by setMarker(L).
// onMove(L) is called whenever the marker moves.
function klChart(svg, values, L, onMove) {
  const f = frame(svg);
  const T = values.length;
  const yMax = niceMax(Math.max(...values, 0));
  axes(svg, f, yMax, "answer position (token)", "mean KL (nats)", (v) => v.toFixed(yMax < 0.1 ? 3 : 2));
  const bw = (f.x1 - f.x0) / Math.max(T, 1);
  const bars = values.map((v, t) => {
    const h = ((f.y0 - f.y1) * v) / yMax;
    const bar = el("rect", { class: "bar", x: f.x0 + t * bw + 0.5, y: f.y0 - h, width: Math.max(bw - 1, 0.5), height: h });
    bar.append(el("title", {}, `position ${t + 1}: ${v.toFixed(4)}`));
    svg.append(bar);
    return bar;
  });
  const step = Math.max(1, Math.ceil(T / 10));
  for (let t = 0; t < T; t += step) {
    svg.append(el("text", { x: f.x0 + (t + 0.5) * bw, y: f.y0 + 14, "text-anchor": "middle" }, String(t + 1)));
  }
  const shade = el("rect", { class: "shade", y: f.y1, height: f.y0 - f.y1, x: f.x0 });
  const marker = el("line", { class: "marker", y1: f.y1 - 4, y2: f.y0 });
  const label = el("text", { y: f.y1 + 10, "text-anchor": "start" });
  svg.prepend(shade);
  svg.append(marker, label);

  function setMarker(l) {
    const Lc = Math.min(Math.max(1, Math.round(l)), T);
    const x = f.x0 + Lc * bw;
    shade.setAttribute("width", x - f.x0);
    marker.setAttribute("x1", x);
    marker.setAttribute("x2", x);
    label.setAttribute("x", x + 4);
    label.textContent = `L = ${Lc}`;
    bars.forEach((b, t) => b.classList.toggle("before", t < Lc));
    return Lc;
  }
  function fromPointer(ev) {
    const box = svg.getBoundingClientRect();
    const x = ((ev.clientX - box.left) / box.width) * f.w;
    return Math.round((x - f.x0) / bw);
  }
  let dragging = false;
  svg.onpointerdown = (ev) => { dragging = true; svg.setPointerCapture(ev.pointerId); onMove(setMarker(fromPointer(ev))); };
  svg.onpointermove = (ev) => { if (dragging) onMove(setMarker(fromPointer(ev))); };
  svg.onpointerup = () => { dragging = false; };
  onMove(setMarker(L));
  return setMarker;
}

// Accuracy (0..1) against prefix length: points equally spaced by rank of L (lengths grow geometrically).
function rescueChart(svg, lengths, accuracy) {
  const f = frame(svg);
  axes(svg, f, 1, "teacher prefix length L (tokens)", "student accuracy", (v) => `${Math.round(v * 100)}%`);
  const n = lengths.length;
  const xs = lengths.map((_, i) => f.x0 + ((i + 0.5) * (f.x1 - f.x0)) / n);
  const ys = accuracy.map((a) => f.y0 - (f.y0 - f.y1) * a);
  svg.append(el("polyline", { class: "curve", points: xs.map((x, i) => `${x},${ys[i]}`).join(" ") }));
  xs.forEach((x, i) => {
    const dot = el("circle", { class: "point", cx: x, cy: ys[i], r: 4 });
    dot.append(el("title", {}, `L = ${lengths[i]}: ${(accuracy[i] * 100).toFixed(1)}%`));
    svg.append(dot);
    svg.append(el("text", { x, y: f.y0 + 14, "text-anchor": "middle" }, String(lengths[i])));
    svg.append(el("text", { x, y: ys[i] - 8, "text-anchor": "middle" }, `${Math.round(accuracy[i] * 100)}%`));
  });
}

window.Charts = { klChart, rescueChart };
