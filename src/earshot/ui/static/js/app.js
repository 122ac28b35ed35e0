// Start-up: ask for the API key if the server needs one, then the panels and the event stream.

import { AuthError, auth, getJSON } from "./api.js";
import { EventsPanel } from "./events.js";
import { ModelsPanel } from "./models.js";
import { Playground } from "./playground.js";
import { loadSettings } from "./settings.js";
import { EventStream } from "./stream.js";

const $ = (id) => document.getElementById(id);
let stream = null;
let started = false;

function showError(e) {
  if (e instanceof AuthError) { askForKey("The server no longer accepts this API key: enter it again."); return; }
  $("banner-text").textContent = e && e.message ? e.message : String(e);
  $("banner").hidden = false;
}

function setConnection(state) {
  const conn = $("conn");
  conn.dataset.state = state;
  conn.textContent = state;
}

function askForKey(message) {
  if (stream) { stream.stop(); stream = null; }
  auth.forget();
  $("app").hidden = true;
  $("tabs").hidden = true;
  $("forget-key").hidden = true;
  $("auth").hidden = false;
  $("auth-message").textContent = message || "";
  setConnection("needs key");
  $("auth-key").focus();
}

function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const view of ["cache", "playground", "settings"]) $(`view-${view}`).hidden = view !== name;
}

async function startApp(keyRequired) {
  if (started) { location.reload(); return; } // a second start (new key): begin from a clean page
  const models = new ModelsPanel({ tbody: document.querySelector("#models tbody"), summary: $("models-summary"), onError: showError });
  await models.start(); // throws AuthError for a refused key before anything is shown
  started = true;
  $("auth").hidden = true;
  $("app").hidden = false;
  $("tabs").hidden = false;
  $("forget-key").hidden = !keyRequired;

  const events = new EventsPanel({
    list: $("timeline"),
    counts: $("event-counts"),
    summary: $("events-summary"),
    thrash: $("thrash-detail"),
    badge: $("thrash"),
    showRequests: $("show-requests"),
  });
  let renderQueued = false;
  stream = new EventStream({
    onRecord: (record, how) => {
      events.add(record, how);
      if (record.model) models.onEvent(record);
      else if (record.event === "events_dropped") models.scheduleRefresh(0);
      if (!renderQueued) {
        renderQueued = true;
        setTimeout(() => { renderQueued = false; events.render(); }, 50);
      }
    },
    onState: (state, { reconnected } = {}) => {
      setConnection(state);
      if (reconnected) models.scheduleRefresh(0); // whatever the replay cannot tell (a release)
    },
    onAuthError: (e) => showError(e),
  });
  await stream.start();
  events.render();

  const playground = new Playground({ onError: showError });
  playground.setModels(models);
  const settings = await loadSettings(document.querySelector("#settings tbody"));
  const thrashWindow = settings.thrash_window_seconds;
  if (thrashWindow) events.thrashWindow = thrashWindow.value;
  events.renderThrash();
  document.body.dataset.ready = "true";
}

async function main() {
  $("banner-close").addEventListener("click", () => { $("banner").hidden = true; });
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  $("forget-key").addEventListener("click", () => { auth.forget(); location.reload(); });
  const [health, authInfo] = await Promise.all([
    fetch("/health").then((r) => r.json()),
    fetch("/ui/auth.json").then((r) => r.json()),
  ]);
  $("version").textContent = health.version ? `v${health.version}` : "";
  const keyRequired = Boolean(authInfo.api_key_required);

  $("auth-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("auth-key").value.trim();
    if (!key) return;
    auth.set(key, true);
    $("auth-message").textContent = "checking…";
    try {
      await startApp(keyRequired);
    } catch (err) {
      if (err instanceof AuthError) askForKey("The server refused this API key (HTTP 401). Check the key and try again.");
      else showError(err);
    }
  });

  if (keyRequired && !auth.key) { askForKey(""); return; }
  try {
    await startApp(keyRequired);
  } catch (err) {
    if (err instanceof AuthError) askForKey("The saved API key was refused: enter it again.");
    else showError(err);
  }
}

main().catch(showError);
