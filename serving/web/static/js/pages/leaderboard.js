// Leaderboard: one section per like-for-like key (data, n, metrics, decoding, base, serving config; as
// /v1/leaderboard groups them), versions ranked with 95% CI bars and the base on the same items; never
// mixes sections. A quick run on fewer items gets its own "partial" section after the full one.
import { api } from "../api.js";
import { ciChart } from "../charts.js";
import { ci, configLabel, h, refLink, short, when } from "../dom.js";

const KNOWN = new Set(["data_sha256", "data_path", "metric", "higher_is_better", "rows", "latest",
  "config_key", "config", "serving_config", "as_served", "served", "compare_key", "settings", "settings_label",
  "n", "coverage", "full_n"]);

function coverage(sec) {
  if (sec.coverage !== "partial") return "";
  return h("p", { class: "notice" }, `Partial: a quick run on n=${sec.n} of the ${sec.full_n} items of the full board above; ranked only against runs with the same settings.`);
}

function forgetting(f) {
  if (!f) return "–";
  return h("span", { title: `held-out loss ${f.base_nll.toFixed(3)} -> ${f.adapter_nll.toFixed(3)} nats/token on ${f.data_path} (n=${f.n}); positive = forgetting` },
    ci(f.diff, f.ci_low, f.ci_high, true));
}

function servedAs(sec) {
  // sections are per data set and serving configuration (evals/config.py); older servers send no config
  if (!("config" in sec) && !("serving_config" in sec)) return null;
  const note = sec.served ? " = what this server runs" : sec.as_served ? " = what loradex serve runs by default"
    : sec.serving_config ? " (not the default server's configuration)" : " (recorded before configurations were)";
  return [" Served as ", h("span", { class: "tag config" }, sec.config || configLabel(sec.serving_config)), note, "."];
}

function otherSettings(sec) {
  // anything else a section is keyed by, shown as it comes
  return Object.entries(sec).filter(([k]) => !KNOWN.has(k))
    .map(([k, v]) => `${k}: ${typeof v === "object" && v !== null ? JSON.stringify(v) : v}`);
}

export async function render(root) {
  const { sections } = await api("/v1/leaderboard");
  root.append(h("h1", {}, "Leaderboard"),
    h("p", { class: "muted" }, "One section per data set, item count, metrics, decoding settings and serving configuration: scores from different data or settings are never ranked together, and a quick run on fewer items never replaces the full one. Each version appears once per section, with its latest run there. Forgetting: change in held-out loss on general text (nats/token, adapter - base; positive = worse)."));
  if (!sections.length) {
    root.append(h("p", {}, "No eval runs yet: loradex eval NAME --data FILE"));
    return;
  }
  sections.forEach((sec, i) => {
    const parts = otherSettings(sec);
    const better = sec.higher_is_better ? "higher is better" : "lower is better";
    const rows = sec.rows;
    root.append(h("section", { class: "board", "data-data": sec.data_sha256, "data-config": sec.config || "", "aria-labelledby": `board-${i}` },
      h("h2", { id: `board-${i}` }, `Data ${short(sec.data_sha256)} `, h("span", { class: "muted small" }, sec.data_path || ""),
        sec.settings_label ? h("span", { class: "tag settings" }, sec.settings_label) : ""),
      coverage(sec),
      h("p", {}, `Ranked by ${sec.metric || "?"} (${better}), 95% CIs; latest run ${when(sec.latest)}.`, servedAs(sec),
        sec.config_key ? h("span", { class: "small muted mono" }, ` config ${sec.config_key}`) : "",
        parts.length ? h("span", { class: "small muted" }, " Settings: " + parts.join("; ")) : ""),
      ciChart(rows.map((r) => ({ label: `#${r.rank} ${r.ref}`, mean: r.mean, lo: r.ci_low, hi: r.ci_high, base: r.base_mean, baseLo: r.base_ci_low, baseHi: r.base_ci_high })),
        { title: `${sec.metric} per version on data ${short(sec.data_sha256)}${sec.config ? ", served as " + sec.config : ""}, 95% CI` }),
      h("div", { class: "scroll" }, h("table", {},
        h("thead", {}, h("tr", {}, ["#", "Adapter", "Aliases", "n", `${sec.metric || "score"}`, "Base", "Lift over base", "Win", "Forgetting", "Run"].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows.map((r) => h("tr", {},
          h("td", { class: "num" }, r.rank), h("td", {}, refLink(r.ref), r.zero_effect ? h("span", { class: "tag zero-effect", style: "color: var(--bad); border-color: var(--bad)", title: `outputs equal the base's on ${Math.round((r.identical_rate || 0) * 100)}% of items` }, "zero effect") : ""), h("td", {}, (r.aliases || []).map((a) => h("span", { class: "tag alias" }, a))),
          h("td", { class: "num" }, r.n), h("td", { class: "num mono" }, ci(r.mean, r.ci_low, r.ci_high)),
          h("td", { class: "num mono" }, ci(r.base_mean, r.base_ci_low, r.base_ci_high)),
          h("td", { class: "num mono" }, ci(r.lift, r.lift_ci_low, r.lift_ci_high, true)),
          h("td", { class: "num" }, r.win_rate !== null && r.win_rate !== undefined ? `${Math.round(r.win_rate * 100)}%` : "–"),
          h("td", { class: "num mono" }, forgetting(r.forgetting)),
          h("td", {}, h("a", { href: `#/compare?a=${r.eval_run_id}&b=base` }, `run ${r.eval_run_id}`)))))))));
  });
}
