// Shared by both pages: building elements safely (text, never HTML from a store), numbers, statuses, scan links.
"use strict";

const pv = {
  // An element with text content and attributes; children appended.
  el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) node.append(child);
    return node;
  },
  // Each path segment of an id encoded: ids are store paths relative to their root.
  encodeId(id) { return id.split("/").map(encodeURIComponent).join("/"); },
  scanUrl(id) { return "/scans/" + pv.encodeId(id); },
  formats: new Map(),  // digits -> Intl.NumberFormat: made once (toLocaleString per number is slow on big tables)
  number(value, digits = 0) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    let format = pv.formats.get(digits);
    if (!format) {
      format = new Intl.NumberFormat("en-GB", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
      pv.formats.set(digits, format);
    }
    return format.format(Number(value));
  },
  time(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toLocaleString("en-GB", { year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  },
  // The one count every page shows: frames done (their done flag set) of frames expected, where the scan file says.
  framesText(summary) {
    const expected = summary.frames_expected;
    return expected ? `${pv.number(summary.frames_done)} of ${pv.number(expected)}` : pv.number(summary.frames_done);
  },
  // Why a scan ended other than complete (e.g. "idle_timeout"), or why its store cannot be read; null if neither.
  reason(summary) {
    return summary.problem || (summary.status !== "complete" && summary.status !== "running" ? summary.end_reason : null) || null;
  },
  // The status with its reason under it, e.g. "incomplete" + "idle_timeout".
  statusCell(summary) {
    const cell = pv.el("span", { class: `status status-${summary.status}`, text: summary.status });
    const why = pv.reason(summary);
    if (why) cell.append(pv.el("span", { class: "reason", text: why }));
    return cell;
  },
  daemonText(daemon) {
    if (!daemon) return "no daemon answers: showing the stores only";
    const slurm = (daemon.slurm_jobs || []).length ? `; SLURM ${daemon.slurm_jobs.join(", ")}` : "";
    return `daemon pid ${daemon.pid}, up ${pv.number(daemon.uptime_s)} s, ${daemon.workers} worker(s), ` +
      `${pv.number(daemon.queued)} frames waiting, ${pv.number(daemon.in_flight)} in flight${slurm}`;
  },
  connection(state) {
    const node = document.getElementById("connection");
    if (!node) return;
    node.className = "connection " + state;
    node.textContent = state === "live" ? "live" : "reconnecting…";
  },
};
window.pv = pv;
