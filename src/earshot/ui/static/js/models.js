// The models panel: every catalog model (GET /v1/models) with its cache state (GET /api/ps),
// kept current by the cache events; idle time and time to idle eviction tick locally from the
// server's own numbers (no clock skew).

import { ApiError, getJSON, sendJSON, request } from "./api.js";
import { bytes, el, seconds } from "./format.js";

// Model ids may hold "/" (Systran/faster-whisper-base): encode each part, keep the slashes.
const psPath = (id) => `/api/ps/${id.split("/").map(encodeURIComponent).join("/")}`;
const IN_USE_RECHECK_MS = 2000; // a release has no event: look again while a model is in use
const REFRESH_DEBOUNCE_MS = 150;

export class ModelsPanel {
  constructor({ tbody, summary, onError }) {
    this.tbody = tbody;
    this.summary = summary;
    this.onError = onError;
    this.catalog = [];
    this.rows = new Map(); // id -> {tr, cells}
    this.ps = new Map(); // id -> /api/ps entry, with fetchedAt (ms)
    this.pending = new Map(); // id -> "loading" | "evicting" (an action this page sent)
    this.failed = new Map(); // id -> message of the last failed load
    this.limits = { max_models: null, memory_budget_bytes: null };
    this.eventGen = 0;
    this.refreshing = false;
    this.again = false;
    this.timer = null;
    this.recheck = null;
  }

  async start() {
    const models = await getJSON("/v1/models");
    this.catalog = models.data;
    setInterval(() => this.tick(), 1000);
    this.tbody.replaceChildren(...this.catalog.map((m) => this.makeRow(m)));
    await this.refresh();
  }

  modelsOf(task) {
    return this.catalog.filter((m) => m.task === task).map((m) => m.id);
  }

  makeRow(model) {
    const cells = {
      state: el("span", { class: "state", "data-state": "not-loaded", text: "not loaded" }),
      meter: el("meter", { min: 0, max: 1, value: 0 }),
      size: el("span", { class: "size", text: "-" }),
      idle: el("td", { class: "idle", text: "-" }),
      expires: el("td", { class: "expires", text: "-" }),
      inUse: el("td", { class: "in-use", text: "0" }),
      pinned: el("td", { class: "pinned", text: "no" }),
      load: el("button", { type: "button", class: "load", text: "Load", onclick: () => this.load(model.id) }),
      unload: el("button", { type: "button", class: "unload", text: "Unload", onclick: () => this.unload(model.id) }),
      pin: el("button", { type: "button", class: "pin", text: "Pin", onclick: () => this.togglePin(model.id) }),
    };
    const name = el("td", { class: "name" }, el("span", { class: "id", text: model.id }));
    if (model.aliases && model.aliases.length) {
      name.append(el("small", { class: "aliases", text: model.aliases.join(", ") }));
    }
    const tr = el(
      "tr",
      { "data-model": model.id },
      name,
      el("td", { text: model.task }),
      el("td", { text: model.source }),
      el("td", {}, cells.state),
      el("td", { class: "memory" }, cells.meter, cells.size),
      cells.idle,
      cells.expires,
      cells.inUse,
      cells.pinned,
      el("td", { class: "actions" }, cells.load, cells.unload, cells.pin),
    );
    this.rows.set(model.id, { tr, cells });
    return tr;
  }

  // ------------------------------------------------------------------ state

  scheduleRefresh(delay = REFRESH_DEBOUNCE_MS) {
    if (this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.refresh().catch((e) => this.onError(e));
    }, delay);
  }

  async refresh() {
    if (this.refreshing) { this.again = true; return; }
    this.refreshing = true;
    try {
      const gen = this.eventGen;
      const started = performance.now();
      const ps = await getJSON("/api/ps");
      if (gen !== this.eventGen) {
        this.scheduleRefresh(); // an event arrived meanwhile: this answer may predate it
        return;
      }
      this.limits = { max_models: ps.max_models, memory_budget_bytes: ps.memory_budget_bytes };
      const at = (started + performance.now()) / 2;
      this.ps = new Map(ps.models.map((m) => [m.model, { ...m, fetchedAt: at }]));
      for (const [id, what] of this.pending) {
        const entry = this.ps.get(id);
        if (what === "loading" && entry && entry.loaded) this.pending.delete(id);
      }
      this.renderAll();
      clearTimeout(this.recheck);
      if (ps.models.some((m) => m.in_use > 0)) {
        this.recheck = setTimeout(() => this.scheduleRefresh(0), IN_USE_RECHECK_MS);
      }
    } finally {
      this.refreshing = false;
      if (this.again) { this.again = false; this.scheduleRefresh(); }
    }
  }

  // A cache event: show what it says at once, then read /api/ps for the details.
  onEvent(record) {
    const id = record.model;
    this.eventGen += 1;
    const entry = this.ps.get(id);
    switch (record.event) {
      case "model_load_started":
        this.failed.delete(id);
        this.ps.set(id, { ...(entry || { model: id, in_use: 0, pinned: false, size_bytes: 0 }), loading: true, loaded: false, fetchedAt: performance.now() });
        break;
      case "model_loaded":
        this.pending.delete(id);
        this.ps.set(id, { ...(entry || { model: id, in_use: 0, pinned: false }), loading: false, loaded: true, size_bytes: record.footprint_bytes, idle_seconds: null, expires_at: null, fetchedAt: performance.now() });
        break;
      case "model_evicted":
        this.pending.delete(id);
        this.ps.delete(id);
        break;
      case "model_load_failed":
        this.pending.delete(id);
        this.ps.delete(id);
        this.failed.set(id, `${record.error_kind}: ${record.message}`);
        break;
      default:
        break;
    }
    if (this.rows.has(id)) this.render(id);
    this.renderSummary();
    this.scheduleRefresh();
  }

  stateOf(id) {
    const entry = this.ps.get(id);
    if (this.pending.get(id) === "evicting") return "evicting";
    if (entry && entry.loading && !entry.loaded) return "loading";
    if (entry && entry.loaded) return "loaded";
    if (this.pending.get(id) === "loading") return "loading";
    if (this.failed.has(id)) return "failed";
    return "not-loaded";
  }

  scale() {
    const budget = this.limits.memory_budget_bytes;
    if (budget) return budget;
    let total = 0;
    for (const m of this.ps.values()) total += m.size_bytes || 0;
    return Math.max(total, 1);
  }

  // ------------------------------------------------------------------ rendering

  renderAll() {
    for (const id of this.rows.keys()) this.render(id);
    this.renderSummary();
  }

  renderSummary() {
    const loaded = [...this.ps.values()].filter((m) => m.loaded);
    const used = loaded.reduce((sum, m) => sum + (m.size_bytes || 0), 0);
    const parts = [`${loaded.length} of ${this.catalog.length} loaded`, bytes(used)];
    if (this.limits.memory_budget_bytes) parts[1] += ` of ${bytes(this.limits.memory_budget_bytes)} budget`;
    if (this.limits.max_models) parts.push(`max_models ${this.limits.max_models}`);
    this.summary.textContent = parts.join(" · ");
    const scale = this.scale();
    for (const [id, row] of this.rows) {
      const entry = this.ps.get(id);
      row.cells.meter.max = scale;
      row.cells.meter.value = entry ? entry.size_bytes || 0 : 0;
    }
  }

  render(id) {
    const { tr, cells } = this.rows.get(id);
    const entry = this.ps.get(id);
    const state = this.stateOf(id);
    tr.dataset.state = state;
    cells.state.dataset.state = state;
    cells.state.textContent = state === "not-loaded" ? "not loaded" : state;
    cells.state.title = state === "failed" ? this.failed.get(id) : "";
    const size = entry && entry.size_bytes ? bytes(entry.size_bytes) : "-";
    cells.size.textContent = entry && entry.size_measured === false && size !== "-" ? `~${size}` : size;
    cells.inUse.textContent = entry ? String(entry.in_use || 0) : "0";
    cells.pinned.textContent = entry && entry.pinned ? "yes" : "no";
    const busy = this.pending.has(id);
    cells.load.hidden = state === "loaded" || state === "loading" || state === "evicting";
    cells.unload.hidden = state !== "loaded";
    cells.pin.hidden = state !== "loaded";
    cells.pin.textContent = entry && entry.pinned ? "Unpin" : "Pin";
    for (const b of [cells.load, cells.unload, cells.pin]) b.disabled = busy;
    this.tickRow(id);
  }

  tick() {
    for (const id of this.ps.keys()) if (this.rows.has(id)) this.tickRow(id);
  }

  tickRow(id) {
    const { cells } = this.rows.get(id);
    const entry = this.ps.get(id);
    if (!entry || !entry.loaded) {
      cells.idle.textContent = entry && entry.loading ? "loading" : "-";
      cells.expires.textContent = "-";
      return;
    }
    const elapsed = (performance.now() - entry.fetchedAt) / 1000;
    const idle = entry.idle_seconds === null || entry.idle_seconds === undefined ? null : entry.idle_seconds + elapsed;
    cells.idle.textContent = idle === null ? (entry.in_use ? "in use" : "-") : seconds(idle);
    const keep = entry.keep_alive;
    if (entry.pinned || (typeof keep === "number" && keep < 0)) cells.expires.textContent = "never";
    else if (entry.expires_at && idle !== null && typeof keep === "number") cells.expires.textContent = seconds(keep - idle);
    else cells.expires.textContent = "-";
  }

  // ------------------------------------------------------------------ actions

  async act(id, what, call) {
    this.pending.set(id, what);
    this.render(id);
    try {
      await call();
    } catch (e) {
      this.pending.delete(id);
      if (e instanceof ApiError && e.code === "model_not_loaded") { /* unloaded meanwhile */ }
      else this.onError(e);
    } finally {
      if (this.pending.get(id) === what && what !== "evicting") this.pending.delete(id);
      this.render(id);
      this.scheduleRefresh(0);
    }
  }

  load(id) {
    return this.act(id, "loading", () => sendJSON("POST", psPath(id), {}));
  }

  unload(id) {
    return this.act(id, "evicting", async () => {
      const response = await request(psPath(id), { method: "DELETE" });
      const body = await response.json();
      if (body.status === "unloaded") this.pending.delete(id);
      // "scheduled": in use, it goes when released; the model_evicted event clears the state
    });
  }

  togglePin(id) {
    const entry = this.ps.get(id);
    const pin = !(entry && entry.pinned);
    return this.act(id, "pinning", () => sendJSON("POST", psPath(id), { pin }));
  }
}
