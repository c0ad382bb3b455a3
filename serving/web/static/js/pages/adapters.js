// Adapters: one row per adapter (its latest version), searchable, sortable, filtered by base and alias.
import { api } from "../api.js";
import { bytes, ci, h, setParams } from "../dom.js";

const COLUMNS = [
  ["name", "Name"], ["versions", "Versions", "num"], ["base", "Base"], ["rank", "Rank", "num"], ["targets", "Targets"],
  ["size", "Size", "num"], ["aliases", "Aliases"], ["score", "Score as served (95% CI)", "num"], ["lift", "Lift over base (95% CI)", "num"],
];

function summarise(versions) {
  const byName = new Map();
  for (const v of versions) {
    if (!byName.has(v.adapter)) byName.set(v.adapter, []);
    byName.get(v.adapter).push(v);
  }
  return [...byName.entries()].map(([name, vs]) => {
    vs.sort((a, b) => a.version - b.version);
    const latest = vs[vs.length - 1];
    // scores as this server serves each version (its serving configuration); the newest scored version
    const scored = [...vs].reverse().find((v) => v.score && v.score.mean !== null && v.score.mean !== undefined);
    const sc = scored ? scored.score : null;
    const hasLift = sc && sc.lift !== null && sc.lift !== undefined;
    const aliases = vs.flatMap((v) => (v.aliases || []).map((a) => `${a}→${v.version}`));
    return {
      name, versions: vs.length, base: latest.base, rank: latest.rank, targets: (latest.target_modules || []).join(", "),
      size: latest.size_bytes, aliases, aliasNames: vs.flatMap((v) => v.aliases || []),
      score: sc ? sc.mean : null, scoreText: sc ? `${ci(sc.mean, sc.ci_low, sc.ci_high)} ${sc.metric}` : "–",
      scoreNote: sc ? "" : latest.score_note || "", config: sc ? sc.config : (latest.served_config || {}).label || "",
      scoredRef: scored ? `${name}@${scored.version}` : null, n: sc ? sc.n : null,
      lift: hasLift ? sc.lift : null, liftText: hasLift ? ci(sc.lift, sc.lift_ci_low, sc.lift_ci_high, true) : "–",
      liftSure: hasLift ? (sc.lift_ci_low > 0 ? "above 0" : sc.lift_ci_high < 0 ? "below 0" : "CI spans 0") : "",
    };
  });
}

export async function render(root, route) {
  const versions = await api("/v1/adapters");
  const rows = summarise(versions);
  const p = route.params;
  const state = { q: p.get("q") || "", base: p.get("base") || "", alias: p.get("alias") || "", sort: p.get("sort") || "name", dir: p.get("dir") || "asc" };
  const bases = [...new Set(rows.map((r) => r.base))].sort();
  const aliases = [...new Set(rows.flatMap((r) => r.aliasNames))].sort();

  const search = h("input", { type: "search", id: "adapter-search", placeholder: "name, base or target", value: state.q, "aria-label": "Search adapters" });
  const baseSel = h("select", { id: "filter-base" }, h("option", { value: "" }, "any base"), bases.map((b) => h("option", { value: b }, b)));
  const aliasSel = h("select", { id: "filter-alias" }, h("option", { value: "" }, "any alias"), h("option", { value: "-" }, "no alias"),
    aliases.map((a) => h("option", { value: a }, a)));
  baseSel.value = state.base;
  aliasSel.value = state.alias;
  const tbody = h("tbody");
  const count = h("p", { class: "muted small", "aria-live": "polite" });
  const headRow = h("tr");
  const table = h("table", { id: "adapters-table" }, h("thead", {}, headRow), tbody);

  function draw() {
    setParams("adapters", { q: state.q, base: state.base, alias: state.alias, sort: state.sort === "name" ? "" : state.sort, dir: state.dir === "asc" ? "" : state.dir });
    const q = state.q.toLowerCase();
    let shown = rows.filter((r) => (!q || `${r.name} ${r.base} ${r.targets}`.toLowerCase().includes(q))
      && (!state.base || r.base === state.base)
      && (!state.alias || (state.alias === "-" ? !r.aliasNames.length : r.aliasNames.includes(state.alias))));
    const key = state.sort;
    const sign = state.dir === "asc" ? 1 : -1;
    shown = shown.sort((a, b) => {
      const x = key === "aliases" ? a.aliases.join(",") : a[key];
      const y = key === "aliases" ? b.aliases.join(",") : b[key];
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * sign;
    });
    headRow.replaceChildren(...COLUMNS.map(([k, label, cls]) => {
      const sorted = state.sort === k;
      const btn = h("button", { type: "button", class: "sort", "data-sort": k }, label, sorted ? (state.dir === "asc" ? " ▲" : " ▼") : "");
      btn.addEventListener("click", () => {
        state.dir = state.sort === k && state.dir === "asc" ? "desc" : "asc";
        state.sort = k;
        draw();
        headRow.querySelector(`[data-sort="${k}"]`).focus();
      });
      return h("th", { class: cls || "", "aria-sort": sorted ? (state.dir === "asc" ? "ascending" : "descending") : "none" }, btn);
    }));
    tbody.replaceChildren(...shown.map((r) => h("tr", { "data-adapter": r.name },
      h("td", {}, h("a", { href: `#/adapter/${encodeURIComponent(r.name)}` }, r.name)),
      h("td", { class: "num" }, r.versions),
      h("td", {}, r.base),
      h("td", { class: "num" }, r.rank ?? "–"),
      h("td", { class: "mono small" }, r.targets),
      h("td", { class: "num" }, bytes(r.size)),
      h("td", {}, r.aliases.map((a) => h("span", { class: "tag alias" }, a))),
      h("td", { class: "num mono" }, r.scoreText, h("div", { class: "small muted" }, r.scoredRef ? `${r.scoredRef}, n=${r.n}, ${r.config}` : r.scoreNote)),
      h("td", { class: "num mono" }, r.liftText, r.liftSure ? h("div", { class: "small muted" }, r.liftSure) : ""),
    )));
    count.textContent = `${shown.length} of ${rows.length} adapters (${versions.length} versions)`;
  }

  search.addEventListener("input", () => { state.q = search.value; draw(); });
  baseSel.addEventListener("change", () => { state.base = baseSel.value; draw(); });
  aliasSel.addEventListener("change", () => { state.alias = aliasSel.value; draw(); });
  root.append(
    h("h1", {}, "Adapters"),
    h("div", { class: "row" }, h("label", {}, "Search", search), h("label", {}, "Base", baseSel), h("label", {}, "Alias", aliasSel)),
    count,
    rows.length ? h("div", { class: "scroll" }, table) : h("p", {}, "No adapters yet: `loradex register PATH --name NAME` or `loradex train`."),
  );
  draw();
}
