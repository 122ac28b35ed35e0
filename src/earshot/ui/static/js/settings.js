// The settings view: GET /api/config, each setting's effective value and its source.

import { getJSON } from "./api.js";
import { el } from "./format.js";

export async function loadSettings(tbody) {
  const { settings } = await getJSON("/api/config");
  const rows = Object.entries(settings).map(([name, { value, source }]) =>
    el(
      "tr",
      { "data-setting": name, class: source === "default" ? "default" : "set" },
      el("td", { class: "name", text: name }),
      el("td", { class: "value" }, el("code", { text: JSON.stringify(value) })),
      el("td", { class: "source", text: source }),
    ),
  );
  tbody.replaceChildren(...rows);
  return settings;
}
