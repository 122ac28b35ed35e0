// The events panel: a bounded live timeline of cache events, counters, and the thrashing state
// in the terms of the EarshotEvictionStorm alert (alerts/earshot.rules.yml).

import { bytes, clock, duration, el } from "./format.js";

export const MAX_ROWS = 200; // timeline entries kept in the page; older ones are dropped
const REQUEST_KINDS = new Set(["cache_hit", "cache_miss", "cache_coalesced"]);

// EarshotEvictionStorm: rate over 2m of reloads * 60 > 3 AND of capacity/memory evictions * 60 > 3,
// i.e. more than 6 of each within the last 120 s (the alert then waits `for: 1m` before firing).
export const STORM_WINDOW_S = 120;
export const STORM_PER_MINUTE = 3;

export class ThrashMeter {
  constructor() {
    this.reloads = [];
    this.evictions = [];
  }

  add(record, at) {
    if (record.event === "model_load_started" && record.reload) this.reloads.push(at);
    if (record.event === "model_evicted" && (record.reason === "capacity" || record.reason === "memory")) {
      this.evictions.push(at);
    }
  }

  state(now) {
    const since = now - STORM_WINDOW_S * 1000;
    while (this.reloads.length && this.reloads[0] < since) this.reloads.shift();
    while (this.evictions.length && this.evictions[0] < since) this.evictions.shift();
    const perMinute = (n) => (n / STORM_WINDOW_S) * 60;
    const reloads = perMinute(this.reloads.length);
    const evictions = perMinute(this.evictions.length);
    return { reloads, evictions, thrashing: reloads > STORM_PER_MINUTE && evictions > STORM_PER_MINUTE };
  }
}

const LABELS = {
  model_load_started: "loading",
  model_loaded: "loaded",
  model_load_failed: "load failed",
  model_evicted: "evicted",
  cache_hit: "hit",
  cache_miss: "miss",
  cache_coalesced: "coalesced",
  events_dropped: "dropped",
};

function details(r) {
  switch (r.event) {
    case "model_load_started":
      return r.reload ? "reload: evicted within the thrash window" : "";
    case "model_loaded":
      return `in ${duration(r.duration_s)} · ${r.measured === false ? "~" : ""}${bytes(r.footprint_bytes)}${r.reload ? " · reload" : ""}`;
    case "model_load_failed":
      return `${r.error_kind}${r.out_of_memory ? " (out of memory)" : ""} after ${duration(r.duration_s)}: ${r.message}`;
    case "model_evicted":
      return `${r.reason} · idle ${duration(r.idle_s)} · resident ${duration(r.resident_s)} · ${bytes(r.footprint_bytes)}`;
    case "events_dropped":
      return `${r.dropped} events not received: this tab read too slowly`;
    default:
      return "";
  }
}

export class EventsPanel {
  constructor({ list, counts, summary, thrash, badge, showRequests }) {
    this.list = list;
    this.countsEl = counts;
    this.summary = summary;
    this.thrashEl = thrash;
    this.badge = badge;
    this.showRequests = showRequests;
    this.meter = new ThrashMeter();
    this.counts = { loads: 0, reloads: 0, failures: 0, hits: 0, misses: 0, dropped: 0 };
    this.evictions = {};
    this.received = 0;
    this.skew = 0; // browser clock minus server clock, from live events
    this.thrashWindow = null;
    this.countCells = new Map();
    this.lastThrash = null;
    setInterval(() => this.renderThrash(), 1000);
  }

  serverNow() {
    return Date.now() - this.skew;
  }

  add(record, { live }) {
    const at = Date.parse(record.at);
    if (live && !Number.isNaN(at)) this.skew = Date.now() - at;
    this.received += 1;
    if (record.id) this.list.dataset.lastId = String(record.id);
    this.count(record);
    if (!Number.isNaN(at)) this.meter.add(record, at);
    if (!REQUEST_KINDS.has(record.event) || this.showRequests.checked) this.prepend(record);
  }

  count(r) {
    const c = this.counts;
    if (r.event === "model_loaded") c.loads += 1;
    else if (r.event === "model_load_started" && r.reload) c.reloads += 1;
    else if (r.event === "model_load_failed") c.failures += 1;
    else if (r.event === "cache_hit") c.hits += 1;
    else if (r.event === "cache_miss") c.misses += 1;
    else if (r.event === "events_dropped") c.dropped += r.dropped || 0;
    else if (r.event === "model_evicted") this.evictions[r.reason] = (this.evictions[r.reason] || 0) + 1;
  }

  prepend(r) {
    const kind = r.event || "?";
    const item = el(
      "li",
      { class: `ev ev-${kind}`, "data-event": kind, "data-reason": r.reason || null, "data-reload": r.reload ? "true" : null },
      el("time", { datetime: r.at || null, text: r.at ? clock(r.at) : "" }),
      el("span", { class: "kind", text: LABELS[kind] || kind }),
      el("span", { class: "model", text: r.model || "" }),
      el("span", { class: "detail", text: details(r) }),
    );
    this.list.prepend(item);
    while (this.list.childElementCount > MAX_ROWS) this.list.lastElementChild.remove();
  }

  render() {
    const rows = [
      ["loads", this.counts.loads],
      ["reloads", this.counts.reloads],
      ...Object.entries(this.evictions).sort().map(([reason, n]) => [`evicted: ${reason}`, n]),
      ["failed loads", this.counts.failures],
      ["hits", this.counts.hits],
      ["misses", this.counts.misses],
    ];
    if (this.counts.dropped) rows.push(["dropped", this.counts.dropped]);
    for (const [name, n] of rows) {
      let cell = this.countCells.get(name);
      if (!cell) {
        cell = el("dd", {});
        this.countCells.set(name, cell);
        this.countsEl.append(el("div", { "data-count": name }, el("dt", { text: name }), cell));
      }
      cell.textContent = String(n);
    }
    this.summary.textContent = `${this.received} received, newest ${this.list.childElementCount} shown`;
    this.renderThrash();
  }

  renderThrash() {
    const s = this.meter.state(this.serverNow());
    const key = `${s.thrashing}|${s.reloads.toFixed(1)}|${s.evictions.toFixed(1)}|${this.thrashWindow}`;
    if (key === this.lastThrash) return;
    this.lastThrash = key;
    const windowText = this.thrashWindow === null ? "" : ` A reload is a load within ${this.thrashWindow} s (thrash_window_seconds) of the model's eviction.`;
    this.thrashEl.dataset.thrashing = String(s.thrashing);
    this.thrashEl.textContent =
      `${s.thrashing ? "Thrashing" : "Not thrashing"}: ${s.reloads.toFixed(1)} reloads/min and ` +
      `${s.evictions.toFixed(1)} capacity/memory evictions/min over the last 2 min ` +
      `(EarshotEvictionStorm: both above ${STORM_PER_MINUTE}/min).${windowText}`;
    this.badge.hidden = !s.thrashing;
  }
}
