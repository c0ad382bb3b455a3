// The hub API from the page: the key from sessionStorage as a Bearer header, errors as ApiError.
const KEY = "loradex.apiKey";

export class ApiError extends Error {
  constructor(status, body, text) {
    const err = (body && body.error) || {};
    super(err.message || text || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || null;
    this.code = err.code || null;
    this.body = body;
  }
}

let pendingKey = null;

/** Ask for the key once (concurrent 401s share one dialog); resolves false when cancelled. */
export function askKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason || "This server needs an API key.";
  input.value = "";
  pendingKey = new Promise((resolve) => {
    const done = (ok) => {
      dialog.removeEventListener("close", onClose);
      pendingKey = null;
      resolve(ok);
    };
    const onClose = () => {
      if (dialog.returnValue === "cancel" || !input.value) return done(false);
      sessionStorage.setItem(KEY, input.value.trim());
      window.dispatchEvent(new Event("loradex-key"));
      done(true);
    };
    document.getElementById("key-cancel").onclick = () => dialog.close("cancel");
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
  return pendingKey;
}

export function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** fetch a hub route; on 401 ask for the key and retry. `raw: true` returns the Response (for streams). */
export async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const headers = authHeaders();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401 && attempt < 3) {
      const data = await r.json().catch(() => null);
      const ok = await askKey((data && data.error && data.error.message) || "This server needs an API key.");
      if (ok) continue;
    }
    if (raw && r.ok) return r;
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!r.ok) throw new ApiError(r.status, data, text);
    return data;
  }
}

/** Several GETs at once, one result each (an error object instead of throwing). */
export async function getAll(paths) {
  return Promise.all(paths.map((p) => api(p).catch((e) => e)));
}
