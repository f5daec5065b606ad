// The front page: every scan under the roots, newest first, kept up to date by /api/stream (no reloading).
"use strict";

(() => {
  const body = document.querySelector("#scans tbody");
  const empty = document.getElementById("empty");
  const scans = new Map();  // id -> summary
  const rows = new Map();   // id -> <tr>

  function row(summary) {
    const tr = pv.el("tr", { "data-id": summary.id, "data-status": summary.status });
    const expected = summary.frames_expected;
    const fraction = expected ? Math.min(1, summary.frames_done / expected) : summary.status === "complete" ? 1 : 0;
    const bar = pv.el("span", { class: `bar bar-${summary.status}` }, pv.el("span"));
    bar.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
    tr.append(
      pv.el("td", { class: "scan" }, pv.el("a", { href: pv.scanUrl(summary.id), text: summary.id })),
      pv.el("td", { class: "status-cell" }, pv.statusCell(summary)),
      pv.el("td", { class: "frames number" },
        pv.el("span", { class: "frames-done", text: summary.frames_done }),
        expected ? ` of ${pv.number(expected)}` : "", bar),
      pv.el("td", { class: "fps number", text: pv.number(summary.fps, 1) }),
      pv.el("td", { class: "peaks number", text: pv.number(summary.peaks) }),
      pv.el("td", { class: "started", text: pv.time(summary.start_time) }),
      pv.el("td", { class: "store", text: summary.store }),
    );
    return tr;
  }

  function newestFirst(a, b) {
    const when = (s) => Date.parse(s.start_time || "") || Date.parse(s.end_time || "") || s.updated * 1000 || 0;
    const ta = when(a), tb = when(b);
    return tb - ta || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  }

  function place() {
    const ordered = [...scans.values()].sort(newestFirst);
    let previous = null;
    for (const summary of ordered) {
      const tr = rows.get(summary.id);
      const expected = previous ? previous.nextSibling : body.firstChild;
      if (tr !== expected) body.insertBefore(tr, expected);
      previous = tr;
    }
    empty.hidden = scans.size > 0;
  }

  function put(summary) {
    scans.set(summary.id, summary);
    const fresh = row(summary);
    const old = rows.get(summary.id);
    if (old) old.replaceWith(fresh);
    else body.append(fresh);
    rows.set(summary.id, fresh);
  }

  function remove(id) {
    scans.delete(id);
    const old = rows.get(id);
    if (old) old.remove();
    rows.delete(id);
  }

  // What needs a person (a root or watched directory that does not exist...), the web view's own and the daemon's:
  // above the table, never missed.
  function problems(data) {
    const lines = [...(data.problems || []), ...((data.daemon && data.daemon.problems) || [])];
    const box = document.getElementById("problems");
    box.hidden = lines.length === 0;
    document.getElementById("problem-list").replaceChildren(...lines.map((line) => pv.el("li", { text: line })));
  }

  function daemon(data) {
    document.getElementById("daemon").textContent = pv.daemonText(data.daemon);
    problems(data);
    document.body.dataset.version = data.version;
  }

  const stream = new EventSource("/api/stream");
  stream.addEventListener("open", () => pv.connection("live"));
  stream.addEventListener("error", () => pv.connection("lost"));
  stream.addEventListener("snapshot", (message) => {
    const data = JSON.parse(message.data);
    for (const id of [...scans.keys()]) remove(id);
    data.scans.forEach(put);
    place();
    daemon(data);
  });
  stream.addEventListener("update", (message) => {
    const data = JSON.parse(message.data);
    data.removed.forEach(remove);
    data.changed.forEach(put);
    place();
    daemon(data);
  });
})();
