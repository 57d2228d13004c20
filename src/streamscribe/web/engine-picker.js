// Model, variant and language pickers, filled from GET /api/v1/audio/stream/status. Unavailable engines
// stay visible, greyed, with the server's reason; they can be chosen only when the server falls back.

import { STATUS_PATH } from "./stream-client.js";

const MODEL_NAMES = { whisper: "Whisper", parakeet: "Parakeet", canary: "Canary" };
const OTHER_LANGUAGE = "other";
const STORAGE_KEY = "streamscribe.engine";

let languageNames = null;
try {
  languageNames = new Intl.DisplayNames([navigator.language || "en"], { type: "language" });
} catch {
  // Older browsers: show codes only.
}

function languageLabel(code) {
  const name = languageNames?.of(code);
  return name && name !== code ? `${name} (${code})` : code;
}

function option(value, label, { disabled = false, unavailable = false, title = "" } = {}) {
  const element = new Option(label, value);
  element.disabled = disabled;
  if (unavailable) element.className = "unavailable";
  if (title) element.title = title;
  return element;
}

export class EnginePicker {
  constructor({ model, variant, language, languageOther, languageOtherField, hint, table, onChange }) {
    Object.assign(this, { model, variant, language, languageOther, languageOtherField, hint, table, onChange });
    this.engines = [];
    this.fallback = true;
    this.defaultModel = "whisper";
    model.addEventListener("change", () => this.fillVariants());
    variant.addEventListener("change", () => this.fillLanguages());
    language.addEventListener("change", () => this.update());
    languageOther.addEventListener("input", () => this.update());
  }

  /** Loads the engine list; on failure keeps a usable Whisper-only picker and returns the error. */
  async load(key = "") {
    let error = null;
    // The key goes along in case the server guards this endpoint too (browsers can set headers here).
    const headers = { Accept: "application/json", ...(key ? { "X-API-KEY": key } : {}) };
    try {
      const response = await fetch(STATUS_PATH, { headers, cache: "no-store" });
      if (!response.ok) throw new Error(`the server answered ${response.status}`);
      const status = await response.json();
      this.engines = status.engines;
      this.fallback = status.fallback;
      this.defaultModel = status.default_model;
    } catch (exc) {
      error = exc;
      this.engines = [{ model: "whisper", variant: "standard", languages: ["en"], available: true, reason: null }];
    }
    this.renderTable(error);
    this.fillModels();
    return error;
  }

  selectable(rows) {
    return this.fallback || rows.some((row) => row.available);
  }

  fillModels() {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}");
    const models = [...new Set(this.engines.map((row) => row.model))];
    this.model.replaceChildren(
      ...models.map((name) => {
        const rows = this.engines.filter((row) => row.model === name);
        const available = rows.some((row) => row.available);
        return option(name, `${MODEL_NAMES[name] ?? name}${available ? "" : " — unavailable"}`, {
          disabled: !this.selectable(rows),
          unavailable: !available,
          title: available ? "" : rows[0].reason ?? "",
        });
      }),
    );
    const preferred = [saved.model, this.defaultModel, "whisper"].find(
      (name) => name && [...this.model.options].some((o) => o.value === name && !o.disabled),
    );
    if (preferred) this.model.value = preferred;
    this.fillVariants(saved);
  }

  fillVariants(saved = {}) {
    const rows = this.engines.filter((row) => row.model === this.model.value);
    this.variant.replaceChildren(
      ...rows.map((row) =>
        option(row.variant, `${row.variant}${row.available ? "" : " — unavailable"}`, {
          disabled: !row.available && !this.fallback,
          unavailable: !row.available,
          title: row.reason ?? "",
        }),
      ),
    );
    if (saved.variant && rows.some((row) => row.variant === saved.variant)) this.variant.value = saved.variant;
    else {
      const firstAvailable = rows.find((row) => row.available);
      if (firstAvailable) this.variant.value = firstAvailable.variant;
    }
    this.fillLanguages(saved);
  }

  fillLanguages(saved = {}) {
    const row = this.selectedRow;
    const known = (row?.languages ?? ["en"]).filter((code) => code !== "...");
    const openEnded = (row?.languages ?? []).includes("...");
    const previous = saved.language ?? this.language.value;
    const options = known.map((code) => option(code, languageLabel(code)));
    if (openEnded) options.push(option(OTHER_LANGUAGE, "Other…"));
    this.language.replaceChildren(...options);
    if (known.includes(previous)) this.language.value = previous;
    else if (openEnded && previous && previous !== OTHER_LANGUAGE) {
      this.language.value = OTHER_LANGUAGE;
      this.languageOther.value = previous;
    }
    this.update();
  }

  get selectedRow() {
    return this.engines.find((row) => row.model === this.model.value && row.variant === this.variant.value);
  }

  /** The config fields for the chosen engine. */
  get choice() {
    const language =
      this.language.value === OTHER_LANGUAGE ? this.languageOther.value.trim().toLowerCase() : this.language.value;
    return { model: this.model.value, variant: this.variant.value, language: language || "en" };
  }

  /** Why Start cannot be used with this choice, or null. */
  get problem() {
    const row = this.selectedRow;
    if (row && !row.available && !this.fallback) return `${row.model} (${row.variant}) is unavailable here.`;
    if (this.language.value === OTHER_LANGUAGE && !/^[a-z]{2,8}$/i.test(this.languageOther.value.trim())) {
      return "Type a language code such as it or pt.";
    }
    return null;
  }

  update() {
    this.languageOtherField.hidden = this.language.value !== OTHER_LANGUAGE;
    const row = this.selectedRow;
    if (row && !row.available) {
      const name = `${MODEL_NAMES[row.model] ?? row.model} (${row.variant})`;
      this.hint.textContent = this.fallback
        ? `${name} is unavailable here: ${row.reason}. The server will fall back to its default engine and say so.`
        : `${name} is unavailable here: ${row.reason}.`;
      this.hint.hidden = false;
    } else {
      this.hint.textContent = this.problem ?? "";
      this.hint.hidden = !this.problem;
    }
    for (const tr of this.table.querySelectorAll("tr[data-model]")) {
      tr.classList.toggle("selected", tr.dataset.model === row?.model && tr.dataset.variant === row?.variant);
    }
    localStorage.setItem(STORAGE_KEY, JSON.stringify(this.choice));
    this.onChange();
  }

  setDisabled(disabled) {
    for (const element of [this.model, this.variant, this.language, this.languageOther]) element.disabled = disabled;
  }

  renderTable(error) {
    if (error) {
      const cell = document.createElement("td");
      cell.colSpan = 3;
      cell.className = "note error-text";
      cell.textContent = `Could not load the engine list (${error.message}); Whisper is assumed.`;
      const tr = document.createElement("tr");
      tr.append(cell);
      this.table.replaceChildren(tr);
      return;
    }
    this.table.replaceChildren(
      ...this.engines.map((row) => {
        const tr = document.createElement("tr");
        tr.dataset.model = row.model;
        tr.dataset.variant = row.variant;
        tr.className = row.available ? "available" : "unavailable";
        const model = document.createElement("td");
        model.textContent = MODEL_NAMES[row.model] ?? row.model;
        const variant = document.createElement("td");
        variant.textContent = row.variant;
        const status = document.createElement("td");
        const badge = document.createElement("span");
        badge.className = `badge ${row.available ? "ok" : "off"}`;
        badge.textContent = row.available ? "available" : "unavailable";
        status.append(badge);
        if (!row.available && row.reason) {
          const reason = document.createElement("span");
          reason.className = "reason";
          reason.textContent = row.reason;
          status.append(reason);
        } else if (row.available) {
          const languages = document.createElement("span");
          languages.className = "reason";
          languages.textContent = row.languages.join(", ").replace(", ...", " and more");
          status.append(languages);
        }
        tr.append(model, variant, status);
        return tr;
      }),
    );
  }
}
