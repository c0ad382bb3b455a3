// Inline SVG charts built from data in the page. Every mark has a text label or a distinct
// shape (filled circle = adapter, hollow square = base, dashes for reference lines), so none
// depends on colour alone. Each chart carries a <title> and a text summary for screen readers.
import { s, fmt, signed } from "./dom.js";

function scale(lo, hi, a, b) {
  const span = hi - lo || 1;
  return (x) => a + ((x - lo) / span) * (b - a);
}

function niceRange(values, pad = 0.05) {
  const xs = values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  if (!xs.length) return [0, 1];
  let lo = Math.min(...xs);
  let hi = Math.max(...xs);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

function ticks(lo, hi, n = 5) {
  const out = [];
  for (let i = 0; i <= n; i += 1) out.push(lo + ((hi - lo) * i) / n);
  return out;
}

/**
 * Dot-and-whisker chart, one row per item: {label, mean, lo, hi, base, baseLo, baseHi}.
 * opts: {title, zero: draw x=0 (for lifts), signed: format with a sign, width}
 */
export function ciChart(rows, opts = {}) {
  const width = opts.width || 820;
  const labelW = 170;
  const valueW = 190;
  const rowH = 26;
  const top = 36;
  const height = top + rowH * rows.length + 26;
  const vals = rows.flatMap((r) => [r.lo, r.hi, r.mean, r.baseLo, r.baseHi, r.base]);
  if (opts.zero) vals.push(0);
  const [lo, hi] = niceRange(vals);
  const x = scale(lo, hi, labelW, width - valueW);
  const f = opts.signed ? signed : fmt;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart",
    "aria-label": opts.title || "scores with 95% confidence intervals" },
  s("title", {}, opts.title || "scores with 95% confidence intervals"));
  for (const t of ticks(lo, hi)) {
    svg.append(s("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 6, y2: height - 22 }),
      s("text", { x: x(t), y: height - 8, "text-anchor": "middle" }, f(t, 2)));
  }
  if (opts.zero && lo < 0 && hi > 0) {
    svg.append(s("line", { class: "zero", x1: x(0), x2: x(0), y1: top - 8, y2: height - 22 }),
      s("text", { x: x(0) + 3, y: top - 4, class: "small" }, "0 = no lift"));
  }
  rows.forEach((r, i) => {
    const y = top + i * rowH + rowH / 2;
    svg.append(s("text", { x: labelW - 8, y: y + 4, "text-anchor": "end" }, r.label));
    if (r.base !== null && r.base !== undefined) {
      const yb = y + 6;
      svg.append(s("line", { class: "ci", x1: x(r.baseLo ?? r.base), x2: x(r.baseHi ?? r.base), y1: yb, y2: yb, "stroke-dasharray": "3 2" }),
        s("rect", { class: "pt-base", x: x(r.base) - 4, y: yb - 4, width: 8, height: 8 },
          s("title", {}, `base ${fmt(r.base)} [${fmt(r.baseLo)}, ${fmt(r.baseHi)}]`)));
    }
    if (r.mean !== null && r.mean !== undefined) {
      const ya = r.base !== null && r.base !== undefined ? y - 5 : y;
      svg.append(s("line", { class: "ci", x1: x(r.lo ?? r.mean), x2: x(r.hi ?? r.mean), y1: ya, y2: ya }),
        s("line", { class: "ci", x1: x(r.lo ?? r.mean), x2: x(r.lo ?? r.mean), y1: ya - 4, y2: ya + 4 }),
        s("line", { class: "ci", x1: x(r.hi ?? r.mean), x2: x(r.hi ?? r.mean), y1: ya - 4, y2: ya + 4 }),
        s("circle", { class: "pt-adapter", cx: x(r.mean), cy: ya, r: 5 },
          s("title", {}, `${r.label} ${f(r.mean)} [${f(r.lo)}, ${f(r.hi)}]`)));
    }
    const text = r.mean === null || r.mean === undefined ? "no score" : `${f(r.mean)} [${f(r.lo)}, ${f(r.hi)}]`;
    svg.append(s("text", { x: width - valueW + 10, y: y + 4, class: "mono" }, text));
  });
  const legend = opts.legend !== false;
  if (legend) {
    svg.append(s("circle", { class: "pt-adapter", cx: labelW, cy: 8, r: 4 }),
      s("text", { x: labelW + 8, y: 12 }, opts.adapterLabel || "adapter, 95% CI"));
    if (rows.some((r) => r.base !== null && r.base !== undefined)) {
      svg.append(s("rect", { class: "pt-base", x: labelW + 150, y: 4, width: 8, height: 8 }),
        s("text", { x: labelW + 162, y: 12 }, "base on the same items (dashed CI)"));
    }
  }
  return svg;
}

/** Training loss per step, with the held-out losses as labelled reference lines. */
export function lossChart(curve, { heldOut = null, baseHeldOut = null, title = "training loss" } = {}) {
  const width = 640;
  const height = 240;
  const m = { l: 48, r: 150, t: 16, b: 30 };
  const pts = (curve || []).map((p) => (Array.isArray(p) ? p : [p.step, p.loss])).filter((p) => Number.isFinite(p[1]));
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart", "aria-label": title },
    s("title", {}, title));
  if (!pts.length) {
    svg.append(s("text", { x: 20, y: 40 }, "no loss curve recorded"));
    return svg;
  }
  const [x0, x1] = niceRange(pts.map((p) => p[0]), 0);
  const [y0, y1] = niceRange([...pts.map((p) => p[1]), heldOut, baseHeldOut], 0.08);
  const x = scale(x0, x1, m.l, width - m.r);
  const y = scale(y0, y1, height - m.b, m.t);
  for (const t of ticks(y0, y1, 4)) {
    svg.append(s("line", { class: "grid", x1: m.l, x2: width - m.r, y1: y(t), y2: y(t) }),
      s("text", { x: m.l - 6, y: y(t) + 4, "text-anchor": "end" }, fmt(t, 2)));
  }
  for (const t of ticks(x0, x1, 4)) {
    svg.append(s("text", { x: x(t), y: height - 10, "text-anchor": "middle" }, String(Math.round(t))));
  }
  svg.append(s("line", { class: "axis", x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b }),
    s("text", { x: width - m.r + 8, y: height - 10 }, "step"));
  svg.append(s("polyline", { class: "loss", points: pts.map((p) => `${x(p[0])},${y(p[1])}`).join(" ") }));
  if (pts.length <= 60) pts.forEach((p) => svg.append(s("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, class: "pt-adapter" })));
  const last = pts[pts.length - 1];
  svg.append(s("text", { x: width - m.r + 6, y: y(last[1]) + 4 }, `train loss ${fmt(last[1])}`));
  const ref = (v, cls, label) => {
    if (v === null || v === undefined) return;
    svg.append(s("line", { class: cls, x1: m.l, x2: width - m.r, y1: y(v), y2: y(v) }),
      s("text", { x: width - m.r + 6, y: y(v) + 4 }, `${label} ${fmt(v)}`));
  };
  ref(heldOut, "heldout", "held-out (adapter) - -");
  ref(baseHeldOut, "baseloss", "held-out (base) ···");
  return svg;
}

/**
 * Lineage as columns of boxes with arrows: training run -> version -> evals -> merges -> exports.
 * columns: [{title, nodes: [{id, label, sub, href, current}]}]; edges: [[fromId, toId]]
 */
export function lineageGraph(columns, edges) {
  const colW = 150;
  const gap = 36;
  const boxH = 38;
  const vgap = 10;
  const top = 24;
  const rows = Math.max(1, ...columns.map((c) => c.nodes.length));
  const width = columns.length * colW + (columns.length - 1) * gap + 8;
  const height = top + rows * (boxH + vgap) + 4;
  const pos = {};
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart lineage",
    "aria-label": "lineage: training run, version, evals, merges, exports" },
  s("title", {}, "lineage: training run → version → evals → merges → exports"),
  s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
    s("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7580" }))));
  columns.forEach((col, ci) => {
    const x = 4 + ci * (colW + gap);
    svg.append(s("text", { x: x + colW / 2, y: 14, "text-anchor": "middle", "font-weight": 600 }, col.title));
    if (!col.nodes.length) {
      svg.append(s("text", { x: x + colW / 2, y: top + boxH / 2 + 4, "text-anchor": "middle", class: "muted" }, "none"));
    }
    col.nodes.forEach((n, ri) => {
      const y = top + ri * (boxH + vgap);
      pos[n.id] = { x, y };
      const g = s("g", { class: `node${n.current ? " current" : ""}` },
        s("rect", { x, y, width: colW, height: boxH, rx: 4 }),
        s("text", { x: x + 6, y: y + 15 }, n.label.length > 22 ? n.label.slice(0, 21) + "…" : n.label),
        s("text", { x: x + 6, y: y + 30, class: "small" }, (n.sub || "").slice(0, 24)),
        s("title", {}, `${n.label}${n.sub ? " — " + n.sub : ""}`));
      svg.append(n.href ? s("a", { href: n.href }, g) : g);
    });
  });
  for (const [a, b] of edges) {
    if (!pos[a] || !pos[b]) continue;
    const x1 = pos[a].x + colW;
    const y1 = pos[a].y + boxH / 2;
    const x2 = pos[b].x;
    const y2 = pos[b].y + boxH / 2;
    const mx = (x1 + x2) / 2;
    svg.insertBefore(s("path", { class: "edge", d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2 - 1} ${y2}` }), svg.children[2] || null);
  }
  return svg;
}
