// Follow GET /api/events?stream=true with fetch() (so the Bearer header goes along), replaying
// what was missed on reconnect with Last-Event-ID.

import { AuthError, getJSON, headers, readEvents } from "./api.js";

const SILENCE_MS = 45000; // the server sends a keepalive comment every 15 s
const MAX_BACKOFF_MS = 10000;

export class EventStream {
  constructor({ onRecord, onState, onAuthError }) {
    this.onRecord = onRecord;
    this.onState = onState;
    this.onAuthError = onAuthError;
    this.lastId = 0;
    this.retryMs = 1000;
    this.stopped = false;
    this.controller = null;
  }

  // The buffered events first (GET /api/events), then the live stream from the newest of them.
  async start() {
    const { events } = await getJSON("/api/events");
    for (const record of events) {
      this.lastId = Math.max(this.lastId, record.id);
      this.onRecord(record, { live: false });
    }
    this.loop();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async loop() {
    let backoff = this.retryMs;
    while (!this.stopped) {
      this.controller = new AbortController();
      let watchdog = null;
      const activity = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
      };
      try {
        this.onState(this.lastId ? "reconnecting" : "connecting");
        const extra = { Accept: "text/event-stream" };
        if (this.lastId) extra["Last-Event-ID"] = String(this.lastId);
        // hits=true: cache hits are not kept in the server's buffer, only streamed to who asks
        const response = await fetch("/api/events?stream=true&hits=true", {
          headers: headers(extra),
          signal: this.controller.signal,
          cache: "no-store",
        });
        if (response.status === 401) {
          this.stopped = true;
          this.onAuthError(new AuthError("The server no longer accepts this API key."));
          return;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        this.onState("live");
        backoff = this.retryMs;
        activity();
        await readEvents(response, (message) => this.message(message), activity);
      } catch (e) {
        if (this.stopped) return;
        if (!(e instanceof Error)) throw e;
      } finally {
        clearTimeout(watchdog);
      }
      if (this.stopped) return;
      this.onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, backoff));
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    }
  }

  message({ id, data, retry }) {
    if (retry) this.retryMs = Math.min(retry, MAX_BACKOFF_MS);
    if (!data) return;
    let record;
    try {
      record = JSON.parse(data);
    } catch {
      return;
    }
    if (id && /^\d+$/.test(id)) this.lastId = Math.max(this.lastId, Number(id));
    this.onRecord(record, { live: true });
  }
}
