"use strict";
// A small time-series line chart on a canvas: points are [unix seconds, value].
(function () {
  function fmtValue(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e6 || a < 1e-3) return v.toExponential(2);
    if (a >= 100) return v.toFixed(0);
    return String(parseFloat(a >= 1 ? v.toFixed(2) : v.toPrecision(3)));
  }
  function fmtTime(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function drawChart(canvas, points, color) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300, h = canvas.clientHeight || 180;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    if (!points.length) {
      ctx.fillText("no points yet", 10, h / 2);
      return;
    }
    const left = 52, right = 10, top = 8, bottom = 22;
    let t0 = points[0][0], t1 = points[points.length - 1][0];
    if (t1 <= t0) { t0 -= 1; t1 += 1; }
    let lo = Infinity, hi = -Infinity;
    for (const p of points) { if (p[1] < lo) lo = p[1]; if (p[1] > hi) hi = p[1]; }
    if (hi === lo) { const pad = Math.abs(hi) * 0.1 || 1; lo -= pad; hi += pad; }
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (w - left - right);
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom);

    ctx.strokeStyle = "#e3e6eb";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4, yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(w - right, yy); ctx.stroke();
      ctx.fillText(fmtValue(v), left - 6, yy);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(fmtTime(t0), left, h - 6);
    ctx.textAlign = "right";
    ctx.fillText(fmtTime(t1), w - right, h - 6);

    ctx.strokeStyle = color || "#d48a00";
    ctx.lineWidth = 1.8;
    ctx.beginPath();
    points.forEach((p, i) => {
      const px = x(p[0]), py = y(p[1]);
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.stroke();
    if (points.length < 40) {
      ctx.fillStyle = color || "#d48a00";
      for (const p of points) { ctx.beginPath(); ctx.arc(x(p[0]), y(p[1]), 2.2, 0, 2 * Math.PI); ctx.fill(); }
    }
  }

  window.DandelionChart = { drawChart: drawChart, fmtValue: fmtValue, fmtTime: fmtTime };
})();
