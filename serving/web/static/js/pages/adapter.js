// One adapter: versions (sha256, files, sizes), model card, lineage, training run with its loss
// curve, eval runs with CIs and lift, human reviews, aliases with the gated Promote button.
import { api, getAll } from "../api.js";
import { ciChart, lineageGraph, lossChart } from "../charts.js";
import { bytes, ci, configLabel, fmt, h, higherIsBetter, kv, notice, primary, setParams, short, signed, when } from "../dom.js";
import { renderMarkdown } from "../markdown.js";

function section(title, ...body) {
  return h("section", { "aria-label": title }, h("h2", {}, title), ...body);
}

function decodingText(d) {
  if (!d) return "–";
  const keep = ["max_new_tokens", "temperature", "top_p", "do_sample", "seed", "primary_metric", "batch_size", "quantize"];
  const parts = keep.filter((k) => d[k] !== undefined && d[k] !== null).map((k) => `${k}=${d[k]}`);
  return parts.join(" ") || JSON.stringify(d).slice(0, 80);
}

function gateView(gate) {
  if (!gate) return null;
  const l = gate.lift;
  const prod = gate.production;
  return h("div", { class: "gate" },
    kv([
      ["gate", gate.ok ? "passes" : "refuses"],
      ["metric", gate.metric],
      l && ["lift over base", `${ci(l.diff, l.ci_low, l.ci_high, true, 4)} (95% CI${l.sign_flipped ? ", sign flipped" : ""})`],
      l && ["eval", `run ${l.eval_run_id}, n=${l.n}, data ${short(l.data_sha256)}`],
      prod && ["vs production", prod.comparable === false ? `v${prod.version}: not comparable`
        : prod.metric ? `v${prod.version}: ${fmt(prod.candidate_mean, 4)} vs ${fmt(prod.mean, 4)} (difference ${signed(prod.difference, 4)}${prod.paired ? `, paired CI [${signed(prod.paired.ci_low, 4)}, ${signed(prod.paired.ci_high, 4)}]` : ""})` : `v${prod.version}`],
    ]),
    gate.reasons && gate.reasons.length ? h("ul", {}, gate.reasons.map((r) => h("li", {}, r))) : null);
}

function promotePanel(name, v, onChange) {
  const out = h("div", { id: "promote-result", "aria-live": "polite" });
  const force = h("input", { type: "checkbox", id: "promote-force" });
  const reason = h("input", { type: "text", id: "promote-reason", placeholder: "why the gate is overridden (recorded)", size: 40 });
  const promote = h("button", { type: "button", id: "promote-button" }, `Promote ${name}@${v.version} to production`);
  const check = h("button", { type: "button", class: "secondary", id: "gate-check" }, "Check the gate");
  promote.addEventListener("click", async () => {
    promote.disabled = true;
    out.replaceChildren(h("p", { class: "muted" }, "Asking the gate…"));
    try {
      const body = { version: v.version };
      if (force.checked) Object.assign(body, { force: true, reason: reason.value });
      const move = await api(`/v1/adapters/${encodeURIComponent(name)}/aliases/production`, { method: "PUT", body });
      out.replaceChildren(...[notice(`production → ${move.adapter}@${move.version}${move.forced ? " (forced: " + move.reason + ")" : ""}; `
        + "requests for " + `${move.adapter}@production get this version from now on.`, "ok"), gateView(move.gate)].filter(Boolean));
      onChange(await api(`/v1/adapters/${encodeURIComponent(name)}/aliases`), await api(`/v1/adapters/${encodeURIComponent(name)}`));
    } catch (err) {
      out.replaceChildren(h("div", { class: "notice error", role: "alert", "data-status": err.status },
        h("strong", {}, `Refused (HTTP ${err.status}${err.code ? ", " + err.code : ""})`), h("pre", { class: "refusal" }, err.message)));
    } finally {
      promote.disabled = false;
    }
  });
  check.addEventListener("click", async () => {
    out.replaceChildren(h("p", { class: "muted" }, "Checking…"));
    try {
      const gate = await api("/v1/ops/gate.check", { method: "POST", body: { version_row: { id: v.id, adapter: name, version: v.version } } });
      out.replaceChildren(gateView(gate));
    } catch (err) {
      out.replaceChildren(notice(err.message, "error"));
    }
  });
  return h("div", { class: "card" },
    h("p", {}, "Production is gated: the latest eval's lift over the base must be positive at 95%, and not worse than the current production version on the same data."),
    h("div", { class: "row" }, promote, check),
    h("details", {}, h("summary", {}, "Override the gate"),
      h("div", { class: "row" }, h("label", { class: "inline" }, force, "force"), h("label", {}, "Reason", reason))),
    out);
}

function evalTable(runs) {
  return h("div", { class: "scroll" }, h("table", { class: "evals" },
    h("thead", {}, h("tr", {}, ["Run", "Data", "Served as", "n", "Metric", "Score (95% CI)", "Base (95% CI)", "Lift (95% CI)", "Win rate", "Decoding", ""].map((c) => h("th", {}, c)))),
    h("tbody", {}, runs.map((r) => {
      const metric = primary(r.metrics);
      const m = (r.metrics || {})[metric] || {};
      const b = (r.base_metrics || {})[metric] || {};
      const p = (r.paired || {})[metric];
      return h("tr", { "data-run": r.id },
        h("td", {}, String(r.id)), h("td", { class: "small" }, h("span", { class: "mono" }, short(r.data_sha256)), h("div", { class: "muted" }, r.data_path || "")),
        h("td", { class: "small", title: r.config_key || "" }, configLabel(r.serving_config)),
        h("td", { class: "num" }, r.n), h("td", {}, `${metric}${higherIsBetter(metric) ? " ↑" : " ↓"}`),
        h("td", { class: "num mono" }, ci(m.mean, m.ci_low, m.ci_high),
          r.zero_effect ? h("div", { class: "zero-effect", style: "color: var(--bad)" }, `zero effect: outputs = base's on ${Math.round((r.identical_rate || 0) * 100)}%`) : ""),
        h("td", { class: "num mono" }, ci(b.mean, b.ci_low, b.ci_high)),
        h("td", { class: "num mono" }, p ? ci(p.diff, p.ci_low, p.ci_high, true) : "–"),
        h("td", { class: "num" }, r.win_rate && r.win_rate.rate !== undefined ? `${Math.round(r.win_rate.rate * 100)}%` : "–"),
        h("td", { class: "small mono" }, decodingText(r.decoding)),
        h("td", {}, h("a", { href: `#/compare?a=${r.id}&b=base` }, "per sample")));
    }))));
}

function forgettingTable(rows, ref) {
  // held-out loss on the shipped general-text set (evals/forgetting.py): positive change = forgetting
  if (!rows.length) return h("p", { class: "muted" }, `Not measured: loradex eval ${ref} --forgetting`);
  return h("table", { class: "forgetting" },
    h("thead", {}, h("tr", {}, ["Run", "Served as", "n", "Base NLL", "Adapter NLL", "Change, nats/token (95% CI)"].map((c) => h("th", {}, c)))),
    h("tbody", {}, [...rows].reverse().map((f) => h("tr", {},
      h("td", {}, String(f.id)), h("td", { class: "small", title: f.config_key || "" }, configLabel(f.serving_config)),
      h("td", { class: "num" }, f.n), h("td", { class: "num mono" }, f.base_nll.mean.toFixed(3)),
      h("td", { class: "num mono" }, f.adapter_nll.mean.toFixed(3)), h("td", { class: "num mono" }, ci(f.diff, f.ci_low, f.ci_high, true))))));
}

function reviewTable(reviews) {
  if (!reviews.length) return h("p", { class: "muted" }, "No human review yet. ", h("a", { href: "#/review" }, "Start one"), ".");
  return h("table", { class: "reviews" },
    h("thead", {}, h("tr", {}, ["Review", "Eval run", "n", "Status", "Adapter preferred (95% CI)", "Adapter / base / ties", "Method"].map((c) => h("th", {}, c)))),
    h("tbody", {}, reviews.map((r) => {
      const res = r.result || {};
      return h("tr", { "data-review": r.id },
        h("td", {}, h("a", { href: `#/review?id=${r.id}` }, String(r.id))), h("td", {}, r.eval_run_id ?? "–"), h("td", { class: "num" }, r.n),
        h("td", {}, r.status === "imported" ? "rated" : "waiting for ratings"),
        h("td", { class: "num mono" }, res.preference_rate !== undefined ? ci(res.preference_rate, res.ci_low, res.ci_high) : "–"),
        h("td", { class: "num" }, res.n !== undefined ? `${res.adapter_preferred} / ${res.base_preferred} / ${res.ties}` : "–"),
        h("td", { class: "small" }, res.method || ""));
    })));
}

function judgeTable(judgements) {
  if (!judgements.length) return h("p", { class: "muted" }, "No judge yet: loradex eval NAME --data FILE --judge REF_OR_URL");
  return h("table", { class: "judgements" },
    h("thead", {}, h("tr", {}, ["Judgement", "Eval run", "Judge", "n", "Adapter preferred (95% CI)", "Wins / ties / losses", "Position-consistent"].map((c) => h("th", {}, c)))),
    h("tbody", {}, judgements.map((j) => {
      const s = j.summary || {};
      const consistency = s.consistency_rate === null || s.consistency_rate === undefined ? "–"
        : `${s.consistent}/${s.n_parsed} (${Math.round(s.consistency_rate * 100)}%)` + (s.position_biased ? ` POSITION-BIASED (slot ${s.biased_toward})` : "");
      return h("tr", { "data-judgement": j.id },
        h("td", {}, String(j.id)), h("td", {}, j.eval_run_id), h("td", { class: "small" }, j.judge_model && j.judge_model !== j.judge ? `${j.judge} (${j.judge_model})` : j.judge),
        h("td", { class: "num" }, s.n_unparsed ? `${s.n_parsed} (+${s.n_unparsed} unparsed)` : s.n),
        h("td", { class: "num mono" }, s.preference_rate !== null && s.preference_rate !== undefined ? ci(s.preference_rate, s.ci_low, s.ci_high) : "–"),
        h("td", { class: "num" }, `${s.wins ?? 0} / ${s.ties ?? 0} / ${s.losses ?? 0}`),
        h("td", { class: s.position_biased ? "small error" : "small" }, consistency));
    })));
}

async function trainingSection(v) {
  const tr = v.training_run;
  if (!tr) return h("p", { class: "muted" }, "Registered from files (no training run recorded by loradex).");
  const [run, curve] = await getAll([`/v1/runs/${tr.id}`, `/v1/runs/${tr.id}/curve`]);
  if (run instanceof Error) return notice(run.message, "error");
  const cost = run.cost_usd !== null && run.cost_usd !== undefined ? `$${fmt(run.cost_usd, 4)}` : "–";
  const basis = run.cost_basis ? ` (${Object.entries(run.cost_basis).map(([k, x]) => `${k}=${x}`).join(", ")})` : "";
  return h("div", { class: "grid2" },
    h("div", {},
      kv([["run", `${run.id} (${run.status})`], ["data", run.data_path], ["data sha256", h("span", { class: "mono" }, run.data_sha256 || "–")],
        ["data counts", run.data_counts ? JSON.stringify(run.data_counts) : "–"], ["device", `${run.device || "–"} ${run.precision || ""} ${run.quantization || ""}`],
        ["steps", run.steps], ["duration", run.duration_s ? `${fmt(run.duration_s, 1)} s` : "–"], ["tokens/s", fmt(run.tokens_per_s, 1)],
        ["cost", cost + basis], ["final loss", fmt(run.final_loss)],
        ["held-out loss", `${fmt(run.eval_loss)} (base ${fmt(run.eval_loss_before)})`]]),
      h("details", {}, h("summary", {}, "Training config (fully resolved)"), h("pre", { class: "config" }, JSON.stringify(run.config, null, 2)))),
    curve instanceof Error ? notice(curve.message, "error") : h("figure", {},
      lossChart(curve.curve, { heldOut: curve.eval_loss, baseHeldOut: curve.eval_loss_before, title: `loss curve of training run ${tr.id}` }),
      h("figcaption", { class: "small muted" }, "Solid: training loss per step. Dashed: held-out loss of the adapter. Dotted: held-out loss of the base before training.")));
}

function lineage(name, v, evals) {
  const tr = v.training_run;
  const cols = [
    { title: "training run", nodes: tr ? [{ id: "t", label: `run ${tr.id}`, sub: `${tr.steps ?? "?"} steps, ${tr.status}` }] : [] },
    { title: "version", nodes: [{ id: "v", label: `${name}@${v.version}`, sub: short(v.digest), current: true }] },
    { title: "evals", nodes: evals.map((e) => ({ id: `e${e.id}`, label: `eval ${e.id}`, sub: `n=${e.n} data ${short(e.data_sha256, 8)}`, href: `#/compare?a=${e.id}&b=base` })) },
    { title: "merges", nodes: (v.merges || []).map((m) => ({ id: `m${m.id}`, label: `merge ${m.id}`, sub: `${m.dtype} ${m.base_name || ""}` })) },
    { title: "exports", nodes: (v.exports || []).map((x) => ({ id: `x${x.id}`, label: `${x.format} export ${x.id}`, sub: bytes(x.size_bytes) })) },
  ];
  const edges = [["t", "v"], ...evals.map((e) => ["v", `e${e.id}`]), ...(v.merges || []).map((m) => ["v", `m${m.id}`])];
  for (const x of v.exports || []) edges.push([x.merge_id ? `m${x.merge_id}` : "v", `x${x.id}`]);
  return lineageGraph(cols, edges);
}

export async function render(root, route) {
  const name = route.arg;
  if (!name) { location.hash = "#/adapters"; return; }
  const [detail, events] = await Promise.all([api(`/v1/adapters/${encodeURIComponent(name)}`), api(`/v1/adapters/${encodeURIComponent(name)}/aliases`)]);
  const versions = detail.versions;
  const wanted = Number(route.params.get("v")) || versions[versions.length - 1].version;
  const v = versions.find((x) => x.version === wanted) || versions[versions.length - 1];
  const ref = `${name}@${v.version}`;

  const picker = h("select", { id: "version-picker", "aria-label": "Version" },
    versions.map((x) => h("option", { value: x.version }, `v${x.version}${x.aliases.length ? " (" + x.aliases.join(", ") + ")" : ""}`)));
  picker.value = String(v.version);
  picker.addEventListener("change", () => { location.hash = `#/adapter/${encodeURIComponent(name)}?v=${picker.value}`; });
  setParams(`adapter/${encodeURIComponent(name)}`, { v: route.params.get("v") });

  const [files, evalRuns] = await Promise.all([
    api(`/v1/adapters/${encodeURIComponent(ref)}/files`).catch((e) => e),
    getAll((v.evals || []).map((e) => `/v1/evals/${e.id}`)),
  ]);
  const runs = evalRuns.filter((r) => !(r instanceof Error)).map((r) => r.run).sort((a, b) => b.id - a.id);
  const readme = files instanceof Error ? null : files.files.find((f) => f.file.toLowerCase() === "readme.md");
  let card = h("p", { class: "muted" }, "No README.md in this version.");
  if (readme) {
    const r = await api(`/v1/store/objects/${readme.sha256}`, { raw: true }).catch((e) => e);
    card = r instanceof Error ? notice(r.message, "error") : renderMarkdown(await r.text());
  }

  const aliasBox = h("span", { id: "aliases" });
  const showAliases = (aliases) => aliasBox.replaceChildren("Aliases: ",
    ...(Object.keys(aliases).length ? Object.entries(aliases).map(([a, n]) => h("span", { class: "tag alias" }, `${a}→${n}`)) : ["none"]));
  showAliases(detail.aliases);
  const eventsBox = h("div", { id: "alias-events" });
  function showEvents(list) {
    eventsBox.replaceChildren(list.length ? h("table", { class: "alias-events" }, h("thead", {}, h("tr", {}, ["When", "Alias", "Version", "Forced", "Reason", "Who"].map((c) => h("th", {}, c)))),
      h("tbody", {}, list.map((e) => h("tr", {}, h("td", {}, when(e.created_at)), h("td", {}, e.alias), h("td", {}, e.version ?? "removed"),
        h("td", {}, e.forced ? "yes" : "no"), h("td", {}, e.reason || ""), h("td", { class: "small" }, e.actor || "")))))
      : h("p", { class: "muted" }, "No alias moves yet."));
  }
  showEvents(events);

  root.append(
    h("p", { class: "small" }, h("a", { href: "#/adapters" }, "← Adapters")),
    h("h1", {}, name, " ", h("span", { class: "muted" }, `@${v.version}`)),
    h("div", { class: "row" }, h("label", {}, "Version", picker),
      aliasBox,
      h("a", { href: `#/playground?models=${encodeURIComponent(ref)}` }, "Try in the playground")),
    section("Version",
      h("div", { class: "grid2" },
        kv([["sha256 (manifest)", h("span", { class: "mono", id: "digest" }, v.digest)], ["base", v.base], ["type", `${v.peft_type} r=${v.rank} alpha=${v.alpha}`],
          ["targets", (v.target_modules || []).join(", ")], ["parameters", v.param_count?.toLocaleString()], ["size", bytes(v.size_bytes)],
          ["trained against", v.quantization || "–"], ["source", v.source], ["created", when(v.created_at)],
          ["features", v.features ? JSON.stringify(v.features) : "–"]]),
        files instanceof Error ? notice(files.message, "error") : h("table", { class: "files" },
          h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", {}, "sha256"), h("th", { class: "num" }, "Size"))),
          h("tbody", {}, files.files.map((f) => h("tr", {}, h("td", { class: "mono small" }, f.file),
            h("td", { class: "mono small", title: f.sha256 }, short(f.sha256, 16)), h("td", { class: "num" }, bytes(f.size_bytes)))))))),
    section("Aliases and promotion", promotePanel(name, v, (list, fresh) => { showEvents(list); showAliases(fresh.aliases); }), h("h3", {}, "Alias moves"), eventsBox),
    section("Lineage", lineage(name, v, [...runs].reverse())),
    section("Eval runs",
      runs.length ? [
        ciChart(runs.map((r) => {
          const m = primary(r.metrics);
          const p = (r.paired || {})[m] || {};
          return { label: `run ${r.id} (${configLabel(r.serving_config)})`, mean: p.diff ?? null, lo: p.ci_low, hi: p.ci_high };
        }), { title: "lift over the base per eval run, 95% CI", zero: true, signed: true, adapterLabel: "lift adapter − base, 95% CI" }),
        evalTable(runs)] : h("p", { class: "muted" }, `No eval yet: loradex eval ${ref} --data FILE`)),
    section("Forgetting (held-out loss on general text)", forgettingTable(v.forgetting || [], ref)),
    section("Human review", reviewTable(v.reviews || []), h("p", {}, h("a", { href: `#/review?ref=${encodeURIComponent(ref)}` }, `Review ${ref} against the base`)),
      h("p", { class: "small muted" }, "A rated round becomes DPO training data: ", h("code", {}, "loradex review pairs REVIEW_ID -o pairs.jsonl"), " then ",
        h("code", {}, `loradex train --method dpo --data pairs.jsonl --from ${ref} --name ${name}`))),
    section("Judges (adapter vs base, both orders)", judgeTable(v.judgements || [])),
    section("Training run", await trainingSection(v)),
    section("Model card", h("div", { class: "card md" }, card)),
  );
}
