// One scan's page: the newest done frame (or any, with the slider), the projection, the rocking curves and the
// peaks table, kept up to date by /api/stream/<id>. Pictures come as PNGs from the server; the curves are drawn
// here with uPlot (served by this package, see static/vendor).
"use strict";

(() => {
  const id = location.pathname.replace(/^\/scans\//, "").split("/").map(decodeURIComponent).join("/");
  const api = (kind) => `/api/${kind}/${pv.encodeId(id)}`;
  const $ = (name) => document.getElementById(name);
  const MAX_TABLE_ROWS = 500;  // a long scan has thousands of peaks: a page of them, sorted, stays quick
  const slider = $("frame-slider");
  const follow = $("follow");
  const state = { done: [], summary: null, detail: null, viewVersion: -1, framesDone: -1, status: null, colours: new Map(),
                  sort: { column: "id", ascending: true } };

  document.title = `${id}: live peak segmentation`;
  $("title").textContent = id;
  $("api-link").href = `/api/scans/${pv.encodeId(id)}`;

  // A problem of this page (a picture that cannot be made), shown unless it is the scan's own reason, shown already.
  function problem(text) {
    const shown = text && text !== $("reason").textContent ? text : "";
    $("problem").hidden = !shown;
    $("problem").textContent = shown;
  }

  // -- one request at a time per kind, the newest wish wins ------------------------------------
  function latest(run) {
    let busy = false, wanted = null;
    const go = async (arg) => {
      if (busy) { wanted = { arg }; return; }
      busy = true;
      try { await run(arg); } catch (error) { problem(String(error)); }
      busy = false;
      if (wanted) { const next = wanted; wanted = null; go(next.arg); }
    };
    return go;
  }

  async function json(url) {
    const response = await fetch(url, { cache: "no-store" });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }

  // -- the header and the done frames -----------------------------------------------------------
  function expand(ranges) {
    const frames = [];
    for (const [first, last] of ranges) for (let frame = first; frame <= last; frame++) frames.push(frame);
    return frames;
  }

  const loadDetail = latest(async () => {
    const detail = await json(`/api/scans/${pv.encodeId(id)}`);
    state.detail = detail;
    state.done = expand(detail.done);
    $("store-path").textContent = detail.store;
    $("command").textContent = detail.attributes.scan_command || "";
    $("quicklook-link").hidden = !detail.quicklook;
    $("no-quicklook").hidden = detail.quicklook;
    if (detail.quicklook) $("quicklook-link").href = api("quicklook");
    slider.max = String(Math.max(0, state.done.length - 1));
    slider.disabled = state.done.length === 0;
    sections(detail);
    if (follow.checked && state.done.length) {
      slider.value = slider.max;
      showFrame();
    }
    peaksTable(detail.peaks_table);
    document.body.dataset.framesDone = String(detail.frames_done);
  });

  // The pictures and the table only once there is a done frame: a scan that failed before any has its reason, once.
  function sections(detail) {
    const any = state.done.length > 0;
    for (const name of ["frame-section", "projection-section", "curves-section", "peaks-section"]) $(name).hidden = !any;
    const final = detail.status && detail.status !== "running";
    $("no-frames").hidden = any;
    $("no-frames").textContent = any ? "" : final ? "No frame of this scan was processed: nothing to show." : "No frame is done yet.";
  }

  function header(summary) {
    if (!summary) return;
    const status = $("status");
    status.className = `status status-${summary.status}`;
    status.textContent = summary.status;
    $("progress").textContent = `${pv.framesText(summary)} frames done` +
      (summary.fps !== null ? `, ${pv.number(summary.fps, 1)} frames/s` : "") + `, ${pv.number(summary.peaks)} peaks`;
    const why = pv.reason(summary);
    $("reason").hidden = !why;
    $("reason").textContent = why || "";
    document.body.dataset.status = summary.status;
  }

  // -- the colour bar: the grey levels of render.grey, with counts at their level ------------------------
  function niceStep(range, count) {
    const rough = range / count;
    const power = 10 ** Math.floor(Math.log10(rough));
    return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= rough) || 10 * power;
  }

  function colourBar(scale, max) {
    const top = scale === "log" ? Math.log(Math.max(2, max)) : Math.max(1, max);
    const level = (value) => Math.min(1, Math.max(0, scale === "log" ? Math.log(Math.max(1, value)) / top : value / top));
    let values = [];
    if (scale === "log") {
      for (let decade = 1; decade < max; decade *= 10) values.push(decade);
    } else {
      const step = niceStep(Math.max(1, max), 4);
      for (let value = 0; value < max; value += step) values.push(value);
    }
    values = values.filter((value) => level(max) - level(value) > 0.08 || value === 0);  // no label over the top one
    if (max > 0) values.push(max);
    const ticks = values.map((value) => {
      const text = scale === "log" && value === 1 ? "≤ 1" : pv.number(value);
      const tick = pv.el("span", { class: "colour-bar-tick", text, "data-value": value, "data-level": level(value).toFixed(4) });
      tick.style.bottom = `${(level(value) * 100).toFixed(2)}%`;
      return tick;
    });
    $("colour-bar-ticks").replaceChildren(...ticks);
    $("colour-bar-title").textContent = `counts, ${scale} scale`;
    const bar = $("colour-bar");
    bar.dataset.scale = scale;
    bar.dataset.max = String(max);
    bar.hidden = false;
  }

  // -- the frame picture --------------------------------------------------------------------------
  const showFrame = latest(async () => {
    if (!state.done.length) return;
    const frame = state.done[Number(slider.value)];
    const layers = ["tlm", "ssl", "boxes"].filter((name) => $(`layer-${name}`).checked).join(",");
    const url = `${api("frame")}?frame=${frame}&scale=${$("scale").value}&layers=${layers}`;
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) { problem((await response.json()).error); return; }
    const blob = await response.blob();
    const image = $("frame-image");
    const old = image.src;
    await new Promise((resolve) => { image.onload = resolve; image.onerror = resolve; image.src = URL.createObjectURL(blob); });
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    image.dataset.frame = String(frame);
    const h = (name) => response.headers.get(name);
    $("frame-number").textContent = `${frame}`;
    $("frame-axis").textContent = h("X-Axis-Name") !== "frame" ? `${h("X-Axis-Name")} = ${h("X-Axis-Value")}` : "";
    colourBar($("scale").value, Number(h("X-Counts-Max")));
    $("frame-caption").textContent = `${$("scale").value} scale, 0 to ${pv.number(Number(h("X-Counts-Max")))} counts; ` +
      `${h("X-Instances")} TLM instance(s), ${h("X-Boxes")} box(es)` + (follow.checked ? "; the newest done frame" : "");
  });

  slider.addEventListener("input", () => {
    follow.checked = Number(slider.value) === state.done.length - 1;
    showFrame();
  });
  follow.addEventListener("change", () => { if (follow.checked) { slider.value = slider.max; showFrame(); } });
  for (const control of ["scale", "layer-tlm", "layer-ssl", "layer-boxes"]) $(control).addEventListener("change", () => showFrame());

  // -- the projection and the curves ------------------------------------------------------------------
  const loadProjection = latest(async () => {
    const response = await fetch(api("projection"), { cache: "no-store" });
    if (!response.ok) { $("projection-caption").textContent = (await response.json()).error; return; }
    const blob = await response.blob();
    const image = $("projection-image");
    const old = image.src;
    await new Promise((resolve) => { image.onload = resolve; image.onerror = resolve; image.src = URL.createObjectURL(blob); });
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    const covered = Number(response.headers.get("X-Frames-Covered"));
    image.dataset.framesCovered = String(covered);
    $("projection-caption").textContent = `maximum of the raw counts over ${pv.number(covered)} done frames (log scale), ` +
      `${pv.number(Number(response.headers.get("X-Peaks")))} 3D peaks outlined and numbered`;
  });

  let plot = null, plotKey = "";
  const loadCurves = latest(async () => {
    const curves = await json(api("curves"));
    const holder = $("curves");
    const values = curves.series.flatMap((s) => s.y.filter((v) => v !== null));
    const positive = values.length && values.every((v) => v > 0);
    const logScale = positive && Math.max(...values) > 100 * Math.min(...values);
    const key = JSON.stringify([curves.axis_name, logScale, curves.series.map((s) => s.id)]);
    const colours = new Map(curves.series.map((s) => [s.id, s.colour]));
    if (JSON.stringify([...colours]) !== JSON.stringify([...state.colours])) {
      state.colours = colours;
      if (state.detail) peaksTable(state.detail.peaks_table, true);
    }
    const data = [curves.x, ...curves.series.map((s) => s.y)];
    holder.dataset.points = String(values.length);
    holder.dataset.series = String(curves.series.length);
    if (!curves.series.length) {
      if (plot) { plot.destroy(); plot = null; plotKey = ""; }
      holder.textContent = "";
      $("curves-caption").textContent = curves.problem || "no peaks found yet";
      return;
    }
    if (!plot || key !== plotKey) {
      if (plot) plot.destroy();
      holder.textContent = "";
      plot = new uPlot({
        width: Math.max(320, holder.clientWidth), height: 320,
        scales: { x: { time: false }, y: logScale ? { distr: 3 } : {} },
        axes: [{ label: curves.axis_name }, { label: "summed counts", size: 80 }],
        series: [{ label: curves.axis_name }, ...curves.series.map((s) => ({
          label: s.label, stroke: s.colour, width: 1.5, spanGaps: false, points: { show: true, size: 5, fill: s.colour } }))],
        legend: { live: true },
      }, data, holder);
      plotKey = key;
    } else {
      plot.setData(data);
    }
    const shown = curves.series.length < curves.peak_count ? `the ${curves.series.length} brightest of ${curves.peak_count} peaks` : "each peak";
    $("curves-caption").textContent = `rocking curve of ${shown}: summed raw counts inside its voxels, ` +
      `over ${pv.number(curves.frames_covered)} done frames` + (logScale ? " (log scale)" : "");
  });
  window.addEventListener("resize", () => { if (plot) plot.setSize({ width: Math.max(320, $("curves").clientWidth), height: 320 }); });

  // -- the peaks table ------------------------------------------------------------------------------
  let shownTable = "";
  function peaksTable(table, force = false) {
    const head = document.querySelector("#peaks thead tr");
    const body = document.querySelector("#peaks tbody");
    let total = 0;  // a checksum of every value: a peak's sums change while the scan runs, not only the row count
    for (const row of table.rows) for (const value of row) total += value || 0;
    const key = JSON.stringify([state.sort, table.rows.length, total]);
    if (!force && key === shownTable) return;  // a scan's page asks again every frame: redraw only what changed
    shownTable = key;
    if (head.children.length !== table.columns.length) {
      head.textContent = "";
      table.columns.forEach((column) => {
        const th = pv.el("th", { class: "number", text: column, "data-column": column });
        th.addEventListener("click", () => {
          state.sort = { column, ascending: state.sort.column === column ? !state.sort.ascending : true };
          peaksTable(state.detail.peaks_table, true);
        });
        head.append(th);
      });
    }
    for (const th of head.children) {
      th.setAttribute("aria-sort", th.dataset.column === state.sort.column ? (state.sort.ascending ? "ascending" : "descending") : "none");
    }
    const index = Math.max(0, table.columns.indexOf(state.sort.column));
    const sign = state.sort.ascending ? 1 : -1;
    const sorted = [...table.rows].sort((a, b) => sign * ((a[index] ?? -Infinity) - (b[index] ?? -Infinity)));
    const rows = sorted.slice(0, MAX_TABLE_ROWS);
    $("peak-count").textContent = rows.length < sorted.length
      ? `(the first ${pv.number(rows.length)} of ${pv.number(sorted.length)} by ${state.sort.column}; all of them in the JSON)` : `(${sorted.length})`;
    const fragment = document.createDocumentFragment();
    const colours = state.colours;  // the peaks whose rocking curve is drawn, in its colour
    for (const row of rows) {
      const tr = pv.el("tr", { "data-peak": row[0] });
      row.forEach((value, column) => {
        const integer = ["id", "first_frame", "last_frame", "voxels"].includes(table.columns[column]);
        const td = pv.el("td", { class: "number", text: integer ? pv.number(value) : pv.number(value, 4) });
        if (column === 0 && colours.has(row[0])) {
          const swatch = pv.el("span", { class: "swatch" });
          swatch.style.backgroundColor = colours.get(row[0]);
          td.prepend(swatch);
        }
        tr.append(td);
      });
      fragment.append(tr);
    }
    body.replaceChildren(fragment);
  }

  // -- the stream ----------------------------------------------------------------------------------
  const stream = new EventSource(`/api/stream/${pv.encodeId(id)}`);
  stream.addEventListener("open", () => pv.connection("live"));
  stream.addEventListener("error", () => pv.connection("lost"));
  stream.addEventListener("gone", (message) => { problem(JSON.parse(message.data).error); stream.close(); });
  stream.addEventListener("scan", (message) => {
    const { summary, view } = JSON.parse(message.data);
    state.summary = summary;
    header(summary);
    if (summary && (summary.frames_done !== state.framesDone || summary.status !== state.status || summary.peaks !== state.peaks)) {
      state.framesDone = summary.frames_done;
      state.status = summary.status;
      state.peaks = summary.peaks;
      loadDetail();
    }
    problem(view.problem || (summary && summary.problem) || "");
    if (view.version !== state.viewVersion && view.frames_covered > 0) {
      state.viewVersion = view.version;
      loadProjection();
      loadCurves();
    }
    document.body.dataset.framesCovered = String(view.frames_covered);
  });
})();
