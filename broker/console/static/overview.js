// The overview: the history the console keeps, then each new sample, from /events (SSE),
// drawn with uPlot (vendored under /static/vendor/uplot). One series per key a sample has.
(function () {
  "use strict";
  const history = [];
  const charts = {};
  const palette = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6",
    "#dd4477", "#66aa00", "#b82e2e", "#316395", "#994499", "#22aa99"];

  function keysOf(name) {
    const keys = new Set();
    for (const s of history) for (const k of Object.keys(s[name] || {})) keys.add(k);
    return Array.from(keys).sort();
  }

  function draw(name) {
    const box = document.querySelector(`[data-chart="${name}"]`);
    const keys = keysOf(name);
    const samples = history.filter((s) => s[name]);
    const data = [samples.map((s) => s.t)];
    for (const k of keys) data.push(samples.map((s) => (s[name][k] ?? null)));
    const signature = keys.join("|");
    let chart = charts[name];
    if (!chart || chart.signature !== signature) {
      if (chart) chart.plot.destroy();
      const opts = {
        width: Math.max(320, box.clientWidth - 10), height: 220,
        series: [{}].concat(keys.map((k, i) => ({ label: k, stroke: palette[i % palette.length], width: 2, spanGaps: true }))),
        axes: [{}, { size: 60 }],
      };
      chart = charts[name] = { plot: new uPlot(opts, data, box), signature };
    } else {
      chart.plot.setData(data);
    }
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function tables(sample) {
    const body = document.querySelector("#totals tbody");
    body.replaceChildren();
    for (const [key, count] of Object.entries(sample.totals || {})) {
      const [type, status] = key.split(" ");
      const tr = document.createElement("tr");
      tr.dataset.key = key;
      tr.append(cell(type), cell(status), cell(String(Math.round(count)), "count"),
        cell(String((sample.rates || {})[key] ?? 0), "rate"));
      body.append(tr);
    }
    const now = document.querySelector("#now tbody");
    now.replaceChildren();
    const rows = Object.entries(sample.pools || {}).concat(Object.entries(sample.flight || {}),
      Object.entries(sample.latency || {}).map(([k, v]) => [k + " (s)", v === null ? "–" : v.toFixed(4)]));
    for (const [k, v] of rows) {
      const tr = document.createElement("tr");
      tr.dataset.key = k;
      tr.append(cell(k), cell(String(v)));
      now.append(tr);
    }
  }

  function show(sample) {
    const error = document.getElementById("feed-error") || (() => {
      const p = document.createElement("p");
      p.id = "feed-error"; p.className = "error"; p.hidden = true;
      document.querySelector("main").prepend(p);
      return p;
    })();
    if (sample.error) { error.textContent = sample.error; error.hidden = false; return; }
    error.hidden = true;
    history.push(sample);
    while (history.length && history[0].t < sample.t - 600) history.shift();
    for (const name of ["rates", "latency", "flight", "pools"]) draw(name);
    tables(sample);
    document.getElementById("updated").textContent =
      "sampled " + new Date(sample.t * 1000).toLocaleTimeString();
  }

  const events = new EventSource("/events");
  events.addEventListener("history", (e) => {
    history.length = 0;
    const past = JSON.parse(e.data);
    if (past.length) { history.push(...past.slice(0, -1)); show(past[past.length - 1]); }
  });
  events.onmessage = (e) => show(JSON.parse(e.data));
})();
