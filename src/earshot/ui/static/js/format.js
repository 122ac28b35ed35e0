// Small formatting and DOM helpers (text only: nothing from the server becomes markup).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  let value = Number(n);
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (Math.abs(value) < 1024 || unit === "TiB") {
      return unit === "B" ? `${Math.round(value)} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return "-";
}

export function seconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "-";
  let n = Math.max(0, Math.floor(s));
  if (n < 60) return `${n}s`;
  let m = Math.floor(n / 60); n %= 60;
  if (m < 60) return `${m}m ${n}s`;
  let h = Math.floor(m / 60); m %= 60;
  if (h < 24) return `${h}h ${m}m`;
  const d = Math.floor(h / 24); h %= 24;
  return `${d}d ${h}h`;
}

export function duration(s) {
  if (s === null || s === undefined) return "-";
  return s < 10 ? `${Number(s).toFixed(2)} s` : seconds(s);
}

export function clock(iso) {
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return "--:--:--";
  return t.toLocaleTimeString([], { hour12: false });
}
