// DOM helpers: every text goes in as a text node, so nothing from the API is ever parsed as HTML.
const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") throw new Error("inline styles are refused by the page's CSP; use a class");
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** h("td", {class: "num"}, "text", child, [more]) */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element (svg, g, line, rect, text ...). */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toFixed(digits);
}

export function signed(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  return (x >= 0 ? "+" : "") + Number(x).toFixed(digits);
}

export function ci(mean, lo, hi, sign = false, digits = 3) {
  if (mean === null || mean === undefined) return "–";
  const f = sign ? signed : fmt;
  return `${f(mean, digits)} [${f(lo, digits)}, ${f(hi, digits)}]`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let x = Number(n);
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
  return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(ts) {
  if (!ts) return "–";
  return String(ts).replace("T", " ").slice(0, 19);
}

export function short(sha, n = 12) {
  return sha ? String(sha).slice(0, n) : "–";
}

export const PRIMARY_ORDER = ["similarity", "exact", "perplexity"];

/** The primary metric of a {metric: ...} map: similarity, else exact, else perplexity, else the first. */
export function primary(metrics) {
  const keys = Object.keys(metrics || {});
  return PRIMARY_ORDER.find((m) => keys.includes(m)) || keys[0] || null;
}

export function higherIsBetter(metric) {
  return metric !== "perplexity";
}

export function notice(text, kind = "") {
  return h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

export function refLink(ref) {
  const name = String(ref).split("@")[0];
  return h("a", { href: `#/adapter/${encodeURIComponent(name)}` }, ref);
}

/** Parse "#/page/arg?x=1" into {page, arg, params}. */
export function parseHash(hash) {
  const raw = (hash || "").replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || "adapters", arg: parts[1] || null, params: new URLSearchParams(query || "") };
}

export function setParams(page, params) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ""));
  const hash = `#/${page}${q.toString() ? "?" + q.toString() : ""}`;
  if (location.hash !== hash) history.replaceState(null, "", hash);
}

/** A serving configuration's short label (as evals/config.py's config_label): "nf4/fp32 cpu", or "unknown". */
export function configLabel(cfg) {
  if (!cfg || !cfg.quantize) return "unknown";
  return `${cfg.quantize}/${cfg.dtype || "?"} ${cfg.device || "?"}`;
}
