// Review: the blinded A/B review in the browser. The server draws rows from the version's latest
// eval outputs and keeps which side is the adapter; the page sees only A and B. Ratings are
// checked and un-blinded exactly as an imported CSV sheet (evals/review.py).
import { api } from "../api.js";
import { ci, h, notice, refLink, when } from "../dom.js";

const SCALE = [[1, "A much better"], [2, "A better"], [3, "same / can't tell"], [4, "B better"], [5, "B much better"]];

function resultView(res) {
  return h("div", { class: "notice ok", id: "review-result", role: "status" },
    h("strong", {}, `${res.adapter}@${res.version}: adapter preferred ${ci(res.preference_rate, res.ci_low, res.ci_high)} (95% CI, ${res.method})`),
    h("p", {}, `adapter better on ${res.adapter_preferred}, base better on ${res.base_preferred}, ties ${res.ties}, of ${res.n} rows. Stored with the adapter: `,
      refLink(`${res.adapter}@${res.version}`)));
}

async function startForm(root, route) {
  const [versions, reviews, evals] = await Promise.all([api("/v1/adapters"), api("/v1/reviews"), api("/v1/evals")]);
  // a round needs eval outputs of the version, under any configuration
  const evaluated = new Set(evals.map((e) => e.ref));
  const refs = versions.map((v) => v.ref).filter((r) => evaluated.has(r));
  const sel = h("select", { id: "review-ref" }, refs.map((r) => h("option", { value: r }, r)));
  if (route.params.get("ref")) {
    const want = route.params.get("ref");
    if (!refs.includes(want)) sel.append(h("option", { value: want }, want));
    sel.value = want;
  }
  const n = h("input", { type: "number", id: "review-n", min: 1, max: 500, value: 10 });
  const seed = h("input", { type: "number", id: "review-seed", placeholder: "random" });
  const msg = h("div", { "aria-live": "polite" });
  const form = h("form", { id: "review-start" },
    h("div", { class: "row" }, h("label", {}, "Adapter version", sel), h("label", {}, "Rows", n), h("label", {}, "Seed (optional)", seed),
      h("button", { type: "submit" }, "Start a blinded review")), msg);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const body = { ref: sel.value, n: Number(n.value) || 10 };
      if (seed.value !== "") body.seed = Number(seed.value);
      const created = await api("/v1/reviews", { method: "POST", body });
      location.hash = `#/review?id=${created.review_id}`;
    } catch (err) {
      msg.replaceChildren(notice(err.message, "error"));
    }
  });
  const refOf = new Map(evals.map((e) => [e.id, e.ref])); // a round is drawn from one eval run of one version
  root.append(h("h1", {}, "Review"),
    h("p", {}, "A blinded A/B review: each row shows a prompt, the reference and two answers, one from the adapter and one from the base, in an order drawn at random per row. Which side is the adapter is revealed only after all rows are rated. The same rounds can be done as a CSV sheet (loradex review export / import)."),
    refs.length ? form : h("p", { class: "muted" }, "No adapter version has an eval run with outputs yet: loradex eval NAME --data FILE."),
    h("h2", {}, "Rounds"),
    reviews.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Review", "Version", "n", "Status", "Created", "Adapter preferred (95% CI)"].map((c) => h("th", {}, c)))),
      h("tbody", {}, reviews.map((r) => h("tr", {}, h("td", {}, h("a", { href: `#/review?id=${r.id}` }, String(r.id))),
        h("td", {}, refOf.get(r.eval_run_id) || "–"), h("td", { class: "num" }, r.n),
        h("td", {}, r.status === "imported" ? "rated" : h("a", { href: `#/review?id=${r.id}` }, "waiting for ratings: continue")),
        h("td", {}, when(r.created_at)),
        h("td", { class: "mono" }, r.result ? ci(r.result.preference_rate, r.result.ci_low, r.result.ci_high) : "–"))))) : h("p", { class: "muted" }, "No rounds yet."));
}

async function rateForm(root, id) {
  const sheet = await api(`/v1/reviews/${id}`);
  root.append(h("p", { class: "small" }, h("a", { href: "#/review" }, "← Review rounds")),
    h("h1", {}, `Review ${id}: ${sheet.adapter}@${sheet.version} against the base`));
  if (sheet.status === "imported") {
    root.append(h("p", {}, "This round is rated."), resultView({ ...sheet.result, adapter: sheet.adapter, version: sheet.version }));
    return;
  }
  const progress = h("p", { id: "review-progress", "aria-live": "polite" });
  const msg = h("div", { "aria-live": "polite" });
  const items = sheet.rows.map((row, i) => h("article", { class: "card rating", "data-row": row.row_id },
    h("h3", {}, `Row ${i + 1} of ${sheet.rows.length}`),
    h("div", {}, h("strong", {}, "Prompt: "), row.prompt),
    h("div", { class: "small muted" }, "Reference: ", row.reference ?? "–"),
    h("div", { class: "grid2" }, h("div", {}, h("h3", {}, "Answer A"), h("div", { class: "answer" }, row.answer_a)),
      h("div", {}, h("h3", {}, "Answer B"), h("div", { class: "answer" }, row.answer_b))),
    h("fieldset", {}, h("legend", {}, "Which answer is better?"),
      SCALE.map(([v, label]) => h("label", { class: "inline" }, h("input", { type: "radio", name: `rate-${row.row_id}`, value: v }), `${v} ${label}`))),
    h("label", {}, "Comment (optional, not stored)", h("input", { type: "text", name: `comment-${row.row_id}`, size: 60 }))));
  const submit = h("button", { type: "submit", id: "review-submit" }, "Submit all ratings");
  const form = h("form", { id: "review-rate" }, items, h("div", { class: "row" }, submit), msg);
  const update = () => {
    const done = sheet.rows.filter((r) => form.querySelector(`input[name="rate-${r.row_id}"]:checked`)).length;
    progress.textContent = `${done} of ${sheet.rows.length} rated.`;
  };
  form.addEventListener("change", update);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const ratings = sheet.rows.map((r) => {
      const picked = form.querySelector(`input[name="rate-${r.row_id}"]:checked`);
      return { row_id: r.row_id, rating: picked ? Number(picked.value) : null, comment: form.querySelector(`input[name="comment-${r.row_id}"]`).value || null };
    });
    submit.disabled = true;
    try {
      const res = await api(`/v1/reviews/${id}/ratings`, { method: "POST", body: { ratings } });
      const byRow = new Map(res.rows.map((r) => [r.row_id, r]));
      for (const el of items) {
        const r = byRow.get(el.dataset.row);
        if (r) el.append(h("p", { class: "small" }, h("strong", {}, `Unblinded: the adapter was ${r.adapter_was}; preferred: ${r.preferred}.`)));
        for (const input of el.querySelectorAll("input")) input.disabled = true;
      }
      msg.replaceChildren(resultView(res));
    } catch (err) {
      submit.disabled = false;
      msg.replaceChildren(notice(err.message, "error"));
    }
  });
  root.append(h("p", {}, "Scale: 1 A much better · 2 A better · 3 same · 4 B better · 5 B much better. Every row needs a rating."), progress, form);
  update();
}

export async function render(root, route) {
  const id = route.params.get("id");
  if (id) return rateForm(root, Number(id));
  return startForm(root, route);
}
