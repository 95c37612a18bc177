// txmq dashboard: redraws the overview charts from GET /api/overview every
// 2 s. Plain SVG, no libraries, no build step.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 600, H = 200, PAD = 24;

  function draw(svg, series, keys) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    let max = 1;
    for (const p of series) for (const k of keys) max = Math.max(max, p[k] || 0);
    const axis = document.createElementNS(SVG, "line");
    axis.setAttribute("class", "axis");
    axis.setAttribute("x1", PAD); axis.setAttribute("x2", W);
    axis.setAttribute("y1", H - PAD); axis.setAttribute("y2", H - PAD);
    svg.appendChild(axis);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 2); label.setAttribute("y", 12);
    label.textContent = max.toFixed(max < 10 ? 1 : 0) + "/s";
    svg.appendChild(label);
    if (series.length < 2) return;
    const t0 = series[0].t, t1 = series[series.length - 1].t;
    const span = Math.max(1, t1 - t0);
    for (const k of keys) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", k.replace("_", "-").replace("msg-", ""));
      line.setAttribute("data-series", k);
      line.setAttribute("points", series.map(function (p) {
        const x = PAD + (W - PAD) * (p.t - t0) / span;
        const y = (H - PAD) - (H - PAD - 16) * (p[k] || 0) / max;
        return x.toFixed(1) + "," + y.toFixed(1);
      }).join(" "));
      svg.appendChild(line);
    }
  }

  function setLast(svg, attrs, point) {
    for (const [attr, key] of attrs) svg.setAttribute(attr, (point ? point[key] : 0).toFixed(2));
  }

  async function refresh() {
    const msgs = document.getElementById("chart-messages");
    const txs = document.getElementById("chart-transactions");
    if (!msgs || !txs) return;
    try {
      const r = await fetch("/api/overview", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) return;
      const data = await r.json();
      const series = data.series || [];
      const last = series.length ? series[series.length - 1] : null;
      draw(msgs, series, ["msg_in", "msg_out"]);
      draw(txs, series, ["prepared", "committed", "rolled_back", "parked"]);
      setLast(msgs, [["data-last-in", "msg_in"], ["data-last-out", "msg_out"]], last);
      setLast(txs, [["data-last-prepared", "prepared"], ["data-last-committed", "committed"],
                    ["data-last-rolled-back", "rolled_back"], ["data-last-parked", "parked"]], last);
      const pending = document.getElementById("pending-now");
      if (pending) pending.textContent = String(data.pending || 0);
      msgs.setAttribute("data-points", String(series.length));
    } catch (e) {
      // The dashboard restarted or the network blinked: the next tick tries again.
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!document.getElementById("chart-messages")) return;
    refresh();
    setInterval(refresh, 2000);
  });
})();
