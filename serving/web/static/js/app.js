// The page's entry: hash routing (#/adapters, #/adapter/NAME, #/leaderboard, #/compare,
// #/playground, #/review), the header's base and health, and the API-key button.
import { askKey, authHeaders } from "./api.js";
import { h, notice, parseHash } from "./dom.js";
import * as adapters from "./pages/adapters.js";
import * as adapter from "./pages/adapter.js";
import * as leaderboard from "./pages/leaderboard.js";
import * as compare from "./pages/compare.js";
import * as playground from "./pages/playground.js";
import * as review from "./pages/review.js";

const PAGES = { adapters, adapter, leaderboard, compare, playground, review };
const view = document.getElementById("view");
let cleanup = null;
let shown = 0;

async function route() {
  const r = parseHash(location.hash);
  const page = PAGES[r.page] || adapters;
  const navPage = r.page === "adapter" ? "adapters" : r.page;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === navPage) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (cleanup) { try { cleanup(); } catch { /* a page's own teardown */ } cleanup = null; }
  const mine = ++shown;
  delete view.dataset.ready; // tests (and scripts) wait for data-ready and data-shown of the new view
  const root = h("div", { class: "page", "data-page": r.page });
  view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    const done = await page.render(root, r);
    if (mine !== shown) return; // the user went elsewhere meanwhile
    cleanup = typeof done === "function" ? done : null;
    view.replaceChildren(root);
  } catch (err) {
    if (mine !== shown) return;
    view.replaceChildren(h("h1", {}, "Could not load this page"), notice(err.message || String(err), "error"));
  }
  document.title = `loradex · ${r.page}${r.arg ? " · " + r.arg : ""}`;
  view.dataset.shown = String(mine);
  view.dataset.ready = r.page;
}

async function header() {
  const health = document.getElementById("server-health");
  const base = document.getElementById("server-base");
  try {
    const r = await fetch("/health");
    const ok = r.ok && (await r.json()).status === "ok";
    health.textContent = ok ? "health: ok" : `health: HTTP ${r.status}`;
    health.className = `badge ${ok ? "ok" : "bad"}`;
  } catch {
    health.textContent = "health: unreachable";
    health.className = "badge bad";
  }
  try { // no key prompt from here: the pages ask when they need data
    const r = await fetch("/ready", { headers: authHeaders() });
    const body = await r.json().catch(() => ({}));
    if (r.ok) {
      base.textContent = `base: ${body.base} (${body.quantize}, ${body.device}) · ${body.loaded_adapters.length} adapters loaded`;
    } else {
      const why = (body.error && body.error.message) || `HTTP ${r.status}`;
      base.textContent = r.status === 401 ? "base: (API key needed)" : r.status === 503 ? `base: not ready (${why})` : `base: ? (${why})`;
    }
  } catch {
    base.textContent = "base: unreachable";
  }
}

document.getElementById("key-button").addEventListener("click", async () => {
  if (await askKey("Enter this server's API key (kept in this tab only).")) route();
});
window.addEventListener("hashchange", route);
window.addEventListener("loradex-key", header);
header();
setInterval(header, 20000);
route();
