// Compare: two versions (or a version and the base) on the same eval items, per sample:
// outputs, reference, scores, wins and losses marked with words and arrows as well as colour,
// sorted by the largest difference first.
import { api } from "../api.js";
import { configLabel, fmt, h, higherIsBetter, notice, primary, setParams, short, signed } from "../dom.js";

function runLabel(r) {
  const served = "serving_config" in r ? ` · ${configLabel(r.serving_config)}` : "";
  return `${r.ref || "base"} · run ${r.id} · data ${short(r.data_sha256, 8)} · n=${r.n}${served}`;
}

export async function render(root, route) {
  const runs = await api("/v1/evals");
  root.append(h("h1", {}, "Compare"));
  if (!runs.length) {
    root.append(h("p", {}, "No eval runs yet: loradex eval NAME --data FILE"));
    return;
  }
  const aId = Number(route.params.get("a")) || runs[0].id;
  const a = runs.find((r) => r.id === aId) || runs[0];
  const peers = runs.filter((r) => r.id !== a.id && r.data_sha256 === a.data_sha256 && r.n === a.n);
  const bParam = route.params.get("b") || "base";
  const b = bParam === "base" ? null : peers.find((r) => String(r.id) === bParam) || null;

  const aSel = h("select", { id: "compare-a" }, runs.map((r) => h("option", { value: r.id }, runLabel(r))));
  aSel.value = String(a.id);
  const bSel = h("select", { id: "compare-b" }, h("option", { value: "base" }, `the base (same items, run ${a.id})`),
    peers.map((r) => h("option", { value: r.id }, runLabel(r))));
  bSel.value = b ? String(b.id) : "base";
  const go = () => { location.hash = `#/compare?a=${aSel.value}&b=${aSel.value === String(a.id) ? bSel.value : "base"}`; };
  aSel.addEventListener("change", go);
  bSel.addEventListener("change", go);
  root.append(h("div", { class: "row" }, h("label", {}, "A: version (eval run)", aSel), h("label", {}, "B: the base or another version on the same data and n", bSel)));
  setParams("compare", { a: a.id, b: b ? b.id : "base" });

  const [ra, rb] = await Promise.all([api(`/v1/evals/${a.id}`), b ? api(`/v1/evals/${b.id}`) : null]);
  const metric = primary(ra.run.metrics);
  const higher = higherIsBetter(metric);
  const bName = b ? b.ref : "base";
  const bySample = new Map((rb ? rb.samples : []).map((s) => [s.idx, s]));
  let mismatched = 0;
  const rows = ra.samples.map((s) => {
    const other = rb ? bySample.get(s.idx) : null;
    if (rb && (!other || other.reference !== s.reference)) mismatched += 1;
    const scoreA = (s.scores || {})[metric];
    const scoreB = rb ? ((other && other.scores) || {})[metric] : (s.base_scores || {})[metric];
    const outB = rb ? other && other.output : s.base_output;
    const diff = scoreA !== undefined && scoreB !== undefined && scoreA !== null && scoreB !== null ? (scoreA - scoreB) * (higher ? 1 : -1) : null;
    return { idx: s.idx, prompt: s.prompt, reference: s.reference, outA: s.output, outB, scoreA, scoreB, diff };
  });
  rows.sort((x, y) => Math.abs(y.diff ?? 0) - Math.abs(x.diff ?? 0) || x.idx - y.idx);
  const eps = 1e-9;
  const wins = rows.filter((r) => r.diff > eps).length;
  const losses = rows.filter((r) => r.diff < -eps).length;
  const ties = rows.length - wins - losses;
  const meanDiff = rows.reduce((t, r) => t + (r.diff ?? 0), 0) / (rows.length || 1);
  if (rb && (ra.run.config_key || null) !== (rb.run.config_key || null)) {
    root.append(notice(`A was scored served as ${configLabel(ra.run.serving_config)}, B as ${configLabel(rb.run.serving_config)}: `
      + "part of any difference may be the serving configuration, not the adapter.", "error"));
  }
  if (mismatched) root.append(notice(`${mismatched} sample(s) of run ${b.id} do not match run ${a.id}'s items (different reference): compare runs on the same data only.`, "error"));
  root.append(
    h("p", { id: "compare-summary" }, `Metric ${metric} (${higher ? "higher" : "lower"} is better). A = ${a.ref}, B = ${bName}. `,
      h("strong", {}, `A better on ${wins}, B better on ${losses}, equal on ${ties}`), ` of ${rows.length}; mean difference ${signed(meanDiff)} (positive = A better). Sorted by largest difference.`),
    h("div", { class: "scroll" }, h("table", { id: "compare-table" },
      h("thead", {}, h("tr", {}, ["#", "Prompt and reference", `A: ${a.ref}`, `B: ${bName}`, `${metric} A`, `${metric} B`, "Difference", "Verdict"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => {
        const kind = r.diff > eps ? "win" : r.diff < -eps ? "loss" : "tie";
        const verdict = kind === "win" ? "▲ A better" : kind === "loss" ? "▼ B better" : "= same";
        return h("tr", { class: kind, "data-idx": r.idx, "data-verdict": kind },
          h("td", { class: "num" }, r.idx),
          h("td", {}, h("div", {}, r.prompt), h("div", { class: "small muted" }, "reference: ", r.reference ?? "–")),
          h("td", { class: "answer" }, r.outA ?? "–"), h("td", { class: "answer" }, r.outB ?? "–"),
          h("td", { class: "num mono" }, fmt(r.scoreA)), h("td", { class: "num mono" }, fmt(r.scoreB)),
          h("td", { class: "num mono" }, signed(r.diff)), h("td", { class: `verdict ${kind}` }, verdict));
      })))));
}
