// Small SVG line charts, written here so that no third-party code ships with the package.
"use strict";
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1000 || a < 0.01 ? v.toExponential(1) : v.toPrecision(3);
}

// series: [{name, points: [[x, y], ...]}]; draws axes with min/max labels and a legend.
function lineChart(series, opts) {
  const o = Object.assign({width: 460, height: 220, title: "", xLabel: "step"}, opts || {});
  const pad = {l: 52, r: 12, t: 24, b: 30};
  const svg = svgEl("svg", {width: o.width, height: o.height, class: "chart", "data-title": o.title});
  svg.appendChild(svgEl("text", {x: pad.l, y: 15, class: "title"}, o.title));
  const all = series.flatMap(s => s.points);
  if (!all.length) {
    svg.appendChild(svgEl("text", {x: o.width / 2, y: o.height / 2, "text-anchor": "middle", class: "empty"}, "no points yet"));
    return svg;
  }
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const W = o.width - pad.l - pad.r, H = o.height - pad.t - pad.b;
  const sx = x => pad.l + (x - x0) / (x1 - x0) * W, sy = y => pad.t + (1 - (y - y0) / (y1 - y0)) * H;
  svg.appendChild(svgEl("rect", {x: pad.l, y: pad.t, width: W, height: H, class: "frame"}));
  for (const [y, label] of [[y1, fmt(y1)], [y0, fmt(y0)]]) svg.appendChild(svgEl("text", {x: pad.l - 4, y: sy(y) + 4, "text-anchor": "end", class: "tick"}, label));
  for (const [x, anchor] of [[x0, "start"], [x1, "end"]]) svg.appendChild(svgEl("text", {x: sx(x), y: pad.t + H + 14, "text-anchor": anchor, class: "tick"}, String(x)));
  svg.appendChild(svgEl("text", {x: pad.l + W / 2, y: o.height - 4, "text-anchor": "middle", class: "tick"}, o.xLabel));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    if (s.points.length) {
      const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
      svg.appendChild(svgEl("path", {d, stroke: color, class: "line", "data-series": s.name, "data-points": s.points.length}));
      for (const p of s.points.length < 40 ? s.points : []) svg.appendChild(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color}));
    }
    svg.appendChild(svgEl("text", {x: pad.l + W - 4, y: pad.t + 14 + 14 * i, "text-anchor": "end", fill: color, class: "legend"}, s.name));
  });
  return svg;
}

function sparkline(values, width, height) {
  const w = width || 120, h = height || 24;
  const svg = svgEl("svg", {width: w, height: h, class: "spark"});
  if (values.length < 2) return svg;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const d = values.map((v, i) => (i ? "L" : "M") + (i / (values.length - 1) * (w - 2) + 1).toFixed(1) + " " + (h - 2 - (v - lo) / span * (h - 4)).toFixed(1)).join(" ");
  svg.appendChild(svgEl("path", {d, stroke: COLORS[0], class: "line"}));
  return svg;
}
