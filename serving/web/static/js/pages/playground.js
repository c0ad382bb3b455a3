// Playground: one prompt to the base and several adapters at once. Each model gets its own
// streaming /v1/chat/completions request, all sent together, so the engine batches them into one
// mixed batch; answers stream side by side with tokens/s.
import { api, authHeaders } from "../api.js";
import { fmt, h, notice, setParams } from "../dom.js";

async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function stream(model, prompt, opts, card, signal) {
  const out = card.querySelector(".answer");
  const stat = card.querySelector(".stat");
  out.textContent = "";
  card.dataset.state = "waiting";
  stat.textContent = "waiting…";
  const t0 = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal, headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: [{ role: "user", content: prompt }], stream: true, max_tokens: opts.maxTokens,
        temperature: opts.temperature, stream_options: { include_usage: true } }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || `HTTP ${r.status}`);
    }
    for await (const chunk of sse(r)) {
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        const text = c.delta && c.delta.content;
        if (text) {
          if (first === null) first = performance.now();
          chunks += 1;
          out.textContent += text;
          const secs = (performance.now() - first) / 1000;
          stat.textContent = `${chunks} chunks · ${secs > 0 ? fmt(chunks / secs, 1) : "–"} tok/s`;
        }
        if (c.finish_reason) card.dataset.finish = c.finish_reason;
      }
    }
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const genSecs = first === null ? 0 : (end - first) / 1000;
    stat.textContent = `${tokens} tokens in ${fmt((end - t0) / 1000, 2)} s · ${genSecs > 0 ? fmt(tokens / genSecs, 1) : "–"} tok/s after the first token · first token ${first === null ? "–" : Math.round(first - t0) + " ms"} · ${card.dataset.finish || ""}`;
    if (!out.textContent.trim()) out.textContent = "(only whitespace or special tokens)";
    card.dataset.state = "done";
  } catch (err) {
    card.dataset.state = "error";
    stat.textContent = err.name === "AbortError" ? "stopped" : `error: ${err.message}`;
  }
}

export async function render(root, route) {
  const models = (await api("/v1/models")).data.map((m) => m.id);
  const base = models[0];
  const adapters = models.filter((m) => m !== base && m.includes("@"));
  const wanted = (route.params.get("models") || "").split(",").filter(Boolean);
  const chosen = new Set(wanted.length ? [base, ...wanted] : [base, ...adapters.filter((m) => /@\d+$/.test(m)).slice(0, 3)]);
  const boxes = [base, ...adapters].map((m) => {
    const box = h("input", { type: "checkbox", value: m, name: "model", checked: chosen.has(m) || null });
    return h("label", { class: "inline" }, box, m === base ? `${m} (base)` : m);
  });
  const prompt = h("textarea", { id: "prompt", "aria-label": "Prompt" }, route.params.get("prompt") || "Write one sentence about the sea.");
  const maxTokens = h("input", { type: "number", id: "max-tokens", min: 1, max: 512, value: 48 });
  const temperature = h("input", { type: "number", id: "temperature", min: 0, max: 2, step: 0.1, value: 0 });
  const send = h("button", { type: "submit", id: "send" }, "Send to all");
  const stop = h("button", { type: "button", class: "secondary", id: "stop", disabled: true }, "Stop");
  const answers = h("div", { class: "cards", id: "answers", "aria-live": "polite" });
  const msg = h("div");
  let controller = null;

  const form = h("form", { id: "playground-form" },
    h("fieldset", {}, h("legend", {}, "Models (each is one request; sent at once they share the engine's batch)"), h("div", { class: "row" }, boxes)),
    h("label", { class: "wide" }, "Prompt", prompt),
    h("div", { class: "row" }, h("label", {}, "Max new tokens", maxTokens), h("label", {}, "Temperature (0 = greedy)", temperature), send, stop));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const picked = [...form.querySelectorAll("input[name=model]:checked")].map((b) => b.value);
    msg.replaceChildren();
    if (!picked.length) { msg.replaceChildren(notice("Choose at least one model.", "error")); return; }
    setParams("playground", { models: picked.filter((m) => m !== base).join(",") });
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const cards = picked.map((m) => h("div", { class: "card", "data-model": m }, h("h3", {}, m === base ? `${m} (base)` : m),
      h("div", { class: "answer" }), h("div", { class: "stat" })));
    answers.replaceChildren(...cards);
    const opts = { maxTokens: Number(maxTokens.value) || 48, temperature: Number(temperature.value) || 0 };
    const t0 = performance.now();
    await Promise.all(picked.map((m, i) => stream(m, prompt.value, opts, cards[i], controller.signal)));
    msg.replaceChildren(h("p", { class: "small muted", id: "playground-total" }, `${picked.length} answers in ${fmt((performance.now() - t0) / 1000, 2)} s (all requests in flight together).`));
    send.disabled = false;
    stop.disabled = true;
  });
  stop.addEventListener("click", () => controller && controller.abort());
  root.append(h("h1", {}, "Playground"), form, msg, answers);
  return () => controller && controller.abort();
}
