"use strict";
// The Dandelion trainer manager: one page per section, fed by the daemon's JSON API
// (docs/webui.md). Data from the network is only ever put into the page as text.
(function () {
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 2000;
  const MAX_LOG_LINES = 5000;
  const LEVELS = ["debug", "info", "warning", "error", "critical"];
  const TRAINING_SERIES = ["loss", "validation_loss", "learning_rate", "samples_per_second",
    "global_step", "round_seconds", "fraction_averaged", "round_peers"];
  const STARTABLE_STATES = ["idle", "stopped", "crashed"];
  // A crashed worker waits to be restarted: stopping cancels that.
  const STOPPABLE_STATES = ["starting", "training", "syncing", "crashed"];
  let actionPending = false;

  let selfId = "";
  let overview = null;

  // ---- helpers ------------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  async function api(path, opts) {
    let res;
    try {
      res = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
    } catch (e) {
      setConn(false, "daemon unreachable");
      return { ok: false, status: 0, data: { error: "cannot reach the daemon" } };
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = { error: "unreadable answer (" + res.status + ")" }; }
    if (res.status === 401) {
      showBanner("Not logged in: open the login URL the daemon printed when it started " +
        "(it ends in ?token=…).");
    }
    setConn(true);
    return { ok: res.ok, status: res.status, data: data };
  }

  function post(path, body) {
    return api(path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body || {}),
    });
  }

  function showBanner(text) {
    const b = $("banner");
    b.textContent = text;
    b.classList.remove("hidden");
  }

  function setConn(ok, text) {
    const c = $("conn-state");
    c.textContent = ok ? "connected" : text;
  }

  function facts(dl, pairs) {
    dl.replaceChildren();
    for (const [label, value] of pairs) {
      dl.append(el("dt", { text: label }));
      dl.append(value instanceof Node ? el("dd", {}, value) : el("dd", { text: value === null || value === undefined ? "—" : String(value) }));
    }
  }

  function message(id, text, kind) {
    const m = $(id);
    m.textContent = text || "";
    m.className = "message" + (kind ? " " + kind : "");
  }

  function shortId(id) {
    return id && id.length > 20 ? id.slice(0, 10) + "…" + id.slice(-6) : (id || "");
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined) return "—";
    if (typeof v !== "number") return String(v);
    return digits === undefined ? String(v) : v.toFixed(digits);
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + " h " : "") + (h || m ? m + " min " : "") + sec + " s";
  }

  function fmtWhen(t) {
    if (!t) return "—";
    return new Date(t * 1000).toLocaleString();
  }

  function pill(text, kind) {
    return el("span", { class: "pill" + (kind ? " " + kind : ""), text: text });
  }

  function muted(text) {
    return el("span", { class: "muted", text: text });
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return String(n);
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function fmtMaybe(v, digits) {
    return v === null || v === undefined ? "—" : fmtNum(v, digits);
  }

  // Any JSON value as page elements: objects become nested lists of labelled values, lists
  // become lines; never a raw JSON text.
  function structured(value, labels, key) {
    if (value === null || value === undefined) return muted("—");
    if (Array.isArray(value)) {
      if (!value.length) return muted("none");
      const box = el("div");
      for (const v of value) box.append(el("div", {}, structured(v, labels, "")));
      return box;
    }
    if (typeof value === "object") {
      const entries = Object.entries(value);
      if (!entries.length) return muted("none");
      const dl = el("dl", { class: "nested" });
      for (const [k, v] of entries) {
        dl.append(el("dt", { text: (labels && labels[k]) || k.replace(/_/g, " ") }),
          el("dd", { "data-key": k }, structured(v, labels, k)));
      }
      return dl;
    }
    if (typeof value === "boolean") return document.createTextNode(value ? "yes" : "no");
    if (key === "bytes") return document.createTextNode(fmtBytes(value));
    if (typeof value === "string" && /^[0-9a-f]{40,}$/.test(value)) {
      return el("span", { class: "mono", title: value, text: shortId(value) });
    }
    return document.createTextNode(String(value));
  }

  function peerList(peers) {
    if (!Array.isArray(peers) || !peers.length) return muted("none");
    const box = el("div", { class: "peer-list" });
    for (const p of peers) {
      box.append(el("div", { class: "mono", title: p, "data-peer": p }, shortId(p),
        p === selfId ? el("span", { class: "muted", text: " (this node)" }) : null));
    }
    return box;
  }

  function addrList(addrs) {
    const box = el("div");
    for (const a of addrs || []) box.append(el("div", { class: "mono", text: a }));
    if (!box.childElementCount) box.append(el("span", { class: "muted", text: "none" }));
    return box;
  }

  // ---- dashboard ----------------------------------------------------------------------------

  async function refreshDashboard() {
    const r = await api("/api/overview");
    if (!r.ok) return;
    overview = r.data;
    const n = overview.node;
    selfId = n.peer_id;
    $("self-id").textContent = shortId(selfId);
    $("self-id").title = selfId;
    facts($("node-facts"), [
      ["Peer id", el("span", { class: "mono", text: n.peer_id })],
      ["Network", n.network],
      ["Reachable", n.reachable ? pill("directly", "ok") : pill("behind NAT, via relays")],
      ["DHT mode", n.dht_mode],
      ["Relay", n.relay ? "serves as a relay" : "no"],
      ["Connected peers", n.connected_peers],
      ["Relay reservations", n.relay_reservations],
      ["Uptime", fmtDuration(n.uptime_s)],
    ]);

    const t = overview.training;
    const methods = overview.methods;
    $("training-unavailable").classList.toggle("hidden", t.available);
    if (t.available) {
      facts($("training-facts"), [
        ["State", pill(t.state || "unknown", t.state === "training" ? "ok" : (t.state === "crashed" ? "bad" : ""))],
        ["Run", t.run || "—"],
        ["Local step", fmtNum(t.step)],
        ["Global step", fmtNum(t.global_step)],
        ["Loss", fmtMaybe(t.loss, 4)],
        ["Validation loss", t.validation_loss === null || t.validation_loss === undefined ? "—" :
          fmtNum(t.validation_loss, 4) + " at step " + t.validation_step],
        ["Learning rate", t.learning_rate === null || t.learning_rate === undefined ? "—" : t.learning_rate.toExponential(2)],
        ["Samples/s", fmtMaybe(t.samples_per_second, 2)],
        ["Detail", t.detail || t.error || "—"],
      ]);
    } else {
      $("training-facts").replaceChildren();
    }
    $("training-start").disabled = actionPending ||
      !(methods["training.start"] && t.available && STARTABLE_STATES.includes(t.state));
    $("training-stop").disabled = actionPending ||
      !(methods["training.stop"] && t.available && STOPPABLE_STATES.includes(t.state));

    facts($("run-facts"), [
      ["Run joined", overview.run || "none"],
      ["Worker", overview.worker ? "enabled" : "disabled (--no-worker)"],
    ]);
    const canJoin = methods["run.join"];
    $("join-run").disabled = !canJoin;
    $("join-form").querySelector("button").disabled = !canJoin;
    if (!canJoin && !$("join-message").textContent) {
      message("join-message", "Joining a run is not available on this node.", "");
    }

    const bar = $("progress-bar");
    if (t.available && typeof t.global_step === "number") {
      if (overview.max_steps) {
        const frac = Math.min(1, t.global_step / overview.max_steps);
        bar.style.width = (frac * 100).toFixed(1) + "%";
        $("progress-text").textContent = "global step " + t.global_step + " of " +
          overview.max_steps + " (" + (frac * 100).toFixed(1) + " %)";
      } else {
        bar.style.width = "0";
        $("progress-text").textContent = "global step " + t.global_step + " (run length not known here)";
      }
    } else {
      bar.style.width = "0";
      $("progress-text").textContent = "Global progress is not available on this node: it does not train.";
    }
    if (t.available) {
      const lr = t.last_round || null;
      facts($("contribution-facts"), [
        ["Local steps", fmtNum(t.step)],
        ["Samples/s", fmtMaybe(t.samples_per_second, 2)],
        ["Last round", lr ? "round " + fmtNum(lr.round) + (lr.averaged ? ", averaged" : ", not averaged") +
          (typeof lr.round_seconds === "number" ? " in " + lr.round_seconds.toFixed(1) + " s" : "") : "none yet"],
        ["Fraction averaged", lr && typeof lr.fraction_averaged === "number" ? (lr.fraction_averaged * 100).toFixed(1) + " %" : "—"],
        ["Members", lr ? fmtNum(lr.members) : "—"],
        ["Peers in round", lr ? peerList(lr.peers) : muted("—")],
      ]);
    } else {
      facts($("contribution-facts"), [["Contribution", "not available on this node"]]);
    }
  }

  async function refreshDataset() {
    const r = await api("/api/dataset");
    $("dataset-unavailable").classList.toggle("hidden", r.status !== 501);
    if (!r.ok) {
      facts($("dataset-facts"), r.status === 501 ? [] : [["Error", r.data.error]]);
      $("dataset-runs").replaceChildren();
      return;
    }
    const d = r.data;
    const pairs = [];
    for (const [key, value] of Object.entries(d)) {
      if (key === "clients" || key === "watching") continue; // the table below
      pairs.push([DATASET_LABELS[key] || key.replace(/_/g, " "),
        key === "role" ? pill(value === "server" ? "serves a dataset" : "serves no dataset", value === "server" ? "ok" : "")
          : structured(value, DATASET_LABELS, key)]);
    }
    facts($("dataset-facts"), pairs);
    $("dataset-runs").replaceChildren(datasetRuns(d.clients || {}, d.watching || {}));
  }

  // The worker's newest sample images, newest step first (training.sample_every).
  let samplesShown = null;
  async function refreshSamples() {
    const r = await api("/api/samples");
    const list = r.ok ? (r.data.samples || []) : [];
    const key = (r.ok ? "" : "error ") + list.map((s) => s.name + ":" + s.bytes).join(",");
    if (key === samplesShown) return; // unchanged: keep the images already loaded
    samplesShown = key;
    if (!list.length) {
      $("samples").replaceChildren(el("div", { class: "small",
        text: r.ok ? "No sample images yet (the run config's training.sample_every sets how often they are drawn)."
          : "Sample images are not available: " + (r.data.error || r.status) }));
      return;
    }
    $("samples").replaceChildren(...list.map((s) => el("figure", { class: "sample" },
      el("img", { src: "/api/samples/" + encodeURIComponent(s.name) + "?b=" + s.bytes,
        alt: "sample " + s.prompt + " at step " + s.step, loading: "lazy" }),
      el("figcaption", { class: "small", text: "step " + s.step + " · prompt " + s.prompt + " · " + s.weights + " weights" }))));
  }

  const DATASET_LABELS = {
    role: "Role", run: "Run served", manifest: "Manifest", signed_manifest: "Signed manifest",
    samples: "Samples", bytes: "Size", epoch: "Epoch", chunks: "Chunks",
    completed: "Chunks done this epoch", active_leases: "Leases out now", receipts: "Receipts",
    leases_granted: "Leases granted", open_leases: "Leases held for the worker",
    cached_chunks: "Cached chunks", rejected_holders: "Rejected holders",
  };

  // The runs whose chunks this node fetches, one row each: what used to be a JSON blob.
  function datasetRuns(clients, watching) {
    const runs = Array.from(new Set(Object.keys(clients).concat(Object.keys(watching)))).sort();
    if (!runs.length) return el("div", { class: "small", text: "This node fetches no run's chunks." });
    const cell = (v) => el("td", {}, v === null || v === undefined ? muted("—") : structured(v, DATASET_LABELS, ""));
    return el("table", { class: "compact" },
      el("thead", {}, el("tr", {}, el("th", { text: "Run fetched" }), el("th", { text: "Cached chunks" }),
        el("th", { text: "Rejected holders" }), el("th", { text: "Config version" }))),
      el("tbody", {}, ...runs.map((run) => {
        const c = clients[run] || {};
        return el("tr", { "data-run": run }, el("td", { class: "mono", text: run }),
          cell(c.cached_chunks), cell(c.rejected_holders), cell(watching[run]));
      })));
  }

  async function trainingAction(which) {
    actionPending = true;
    $("training-start").disabled = $("training-stop").disabled = true;
    message("training-message", which === "start" ? "Asking the daemon to start training…" : "Stopping after the current step…");
    let r;
    try {
      r = await post("/api/training/" + which, {});
    } finally {
      actionPending = false;
    }
    // The state card shows what actually happens next; this only reports the request.
    if (r.ok) message("training-message", which === "start" ? "Start requested." : "Stop requested.", "ok");
    else message("training-message", r.data.error || "failed", "error");
    refreshDashboard();
  }

  async function joinRun(run) {
    const r = await post("/api/runs/join", { run: run });
    return r;
  }

  // ---- logs ---------------------------------------------------------------------------------

  const logLines = [];
  let lastSeq = 0;
  let socket = null;

  function logVisible(line) {
    const min = LEVELS.indexOf($("log-level").value);
    const lvl = LEVELS.indexOf(line.level);
    if (lvl !== -1 && lvl < min) return false;
    const f = $("log-filter").value.toLowerCase();
    return !f || (line.message + " " + line.logger).toLowerCase().includes(f);
  }

  function logRow(line) {
    return el("div", { class: "line lvl-" + line.level, "data-seq": String(line.seq) },
      el("span", { class: "t", text: new Date(line.time * 1000).toTimeString().slice(0, 8) + " " }),
      el("span", { class: "lv", text: line.level.toUpperCase() }),
      el("span", { class: "lg", text: line.logger + ": " }),
      line.message);
  }

  function renderLogs() {
    const term = $("log-terminal");
    term.replaceChildren(...logLines.filter(logVisible).map(logRow));
    updateLogCount();
    if ($("log-follow").checked) term.scrollTop = term.scrollHeight;
  }

  function updateLogCount() {
    $("log-count").textContent = $("log-terminal").childElementCount + " of " + logLines.length + " lines";
  }

  function addLogLine(line) {
    if (line.seq <= lastSeq) return;
    lastSeq = line.seq;
    logLines.push(line);
    const term = $("log-terminal");
    if (logLines.length > MAX_LOG_LINES) {
      const dropped = logLines.shift();
      const first = term.firstElementChild;
      if (first && first.getAttribute("data-seq") === String(dropped.seq)) first.remove();
    }
    if (logVisible(line)) {
      term.append(logRow(line));
      if ($("log-follow").checked) term.scrollTop = term.scrollHeight;
    }
    updateLogCount();
  }

  function connectLogs() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/api/logs/live?after=" + lastSeq);
    socket.onopen = () => { const p = $("log-live"); p.textContent = "live"; p.className = "pill ok"; };
    socket.onmessage = (ev) => { try { addLogLine(JSON.parse(ev.data)); } catch (e) { /* skip */ } };
    socket.onclose = () => {
      const p = $("log-live"); p.textContent = "reconnecting"; p.className = "pill bad";
      setTimeout(connectLogs, 2000);
    };
  }

  // ---- configuration ------------------------------------------------------------------------

  let loadedSettings = null;

  async function loadConfigPage() {
    await refreshDashboard();
    const info = $("runconfig-info"), area = $("runconfig-toml"), publish = $("runconfig-publish");
    publish.classList.add("hidden");
    area.readOnly = true;
    message("runconfig-message", "");
    if (!overview || !overview.methods["runconfig.get"]) {
      info.textContent = "";
      area.classList.add("hidden");
      message("runconfig-message", "Run configs are not available on this node.", "");
    } else {
      const r = await api("/api/runconfig" + (overview.run ? "?run=" + encodeURIComponent(overview.run) : ""));
      if (r.ok) {
        const owner = r.data.owner === selfId;
        area.classList.remove("hidden");
        area.value = r.data.toml || "";
        info.textContent = "run " + r.data.run + ", version " + r.data.version + ", owner " +
          shortId(r.data.owner) + (owner ? " (this node: you may edit and publish)" : " (read only: published by its owner)");
        if (owner && overview.methods["runconfig.publish"]) {
          area.readOnly = false;
          publish.classList.remove("hidden");
        }
      } else {
        area.classList.add("hidden");
        info.textContent = overview.run ? "" : "No run joined: join one from the Runs page.";
        message("runconfig-message", r.data.error, r.status >= 500 ? "error" : "");
      }
    }
    await loadSettings();
  }

  async function publishRunConfig() {
    message("runconfig-message", "Publishing…");
    const r = await post("/api/runconfig", { toml: $("runconfig-toml").value });
    if (r.ok) {
      await loadConfigPage();
      message("runconfig-message", "Published version " + r.data.version + ".", "ok");
    } else {
      message("runconfig-message", r.data.error || "failed", "error");
    }
  }

  const SETTING_HINTS = {
    device: "auto picks CUDA when available",
    micro_batch: "samples per forward pass; 0 lets the run config decide",
    mixed_precision: "auto follows the device",
    attention: "attention implementation",
    gradient_checkpointing: "less memory, a little slower",
    eight_bit_adam: "8-bit optimizer states (bitsandbytes)",
    follow_symlinks: "also train on files that symlinks in the data folder lead to outside it",
    share_telemetry: "publish this peer's loss and throughput for the run's charts",
    devices: "GPUs (or CPU processes) this peer trains on together; more than 1 needs a local data folder",
  };

  async function loadSettings() {
    const form = $("settings-form");
    const r = await api("/api/settings");
    if (!r.ok) { message("settings-message", r.data.error, "error"); return; }
    loadedSettings = r.data.settings;
    form.replaceChildren();
    form.append(el("label", { text: "data directory" }),
      el("span", { class: "mono small", text: r.data.data_dir + " (set with --data-dir; takes a restart)" }));
    for (const [key, value] of Object.entries(loadedSettings)) {
      let input;
      const choices = r.data.choices[key];
      if (choices) {
        input = el("select");
        for (const c of choices) input.append(el("option", { value: c, text: c }));
        input.value = value;
      } else if (typeof value === "boolean") {
        input = el("input", { type: "checkbox" });
        input.checked = value;
      } else if (typeof value === "number") {
        input = el("input", { type: "number", step: "1" });
        input.value = String(value);
      } else {
        input = el("input", { type: "text" });
        input.value = String(value);
      }
      input.id = "setting-" + key;
      input.name = key;
      form.append(el("label", { htmlFor: input.id, text: key.replace(/_/g, " ") }), input);
      if (SETTING_HINTS[key]) form.append(el("div", { class: "hint", text: SETTING_HINTS[key] }));
    }
  }

  function readSetting(key) {
    const input = $("setting-" + key);
    const old = loadedSettings[key];
    if (input.type === "checkbox") return input.checked;
    if (typeof old === "number") {
      const text = input.value.trim();
      return /^-?\d+$/.test(text) ? Number(text) : text; // the server says what is wrong
    }
    return input.value;
  }

  async function saveSettings() {
    if (!loadedSettings) return;
    const changes = {};
    for (const key of Object.keys(loadedSettings)) {
      const v = readSetting(key);
      if (v !== loadedSettings[key]) changes[key] = v;
    }
    if (!Object.keys(changes).length) { message("settings-message", "Nothing changed."); return; }
    const r = await post("/api/settings", { changes: changes });
    if (r.ok) {
      message("settings-message", "Saved: " + Object.keys(changes).join(", ") + ".", "ok");
      loadedSettings = r.data.settings;
    } else {
      message("settings-message", r.data.error || "failed", "error");
    }
  }

  // ---- peers --------------------------------------------------------------------------------

  async function refreshPeers() {
    const r = await api("/api/peers");
    if (!r.ok) return;
    const body = $("peers-table").querySelector("tbody");
    const now = Date.now() / 1000;
    body.replaceChildren(...r.data.peers.map((p) => {
      const banned = p.banned_until && p.banned_until > now;
      return el("tr", { class: p.self ? "self" : "", "data-peer": p.peer_id },
        el("td", { class: "mono", title: p.peer_id }, shortId(p.peer_id), p.self ? el("span", { class: "muted", text: " (this node)" }) : null),
        el("td", {}, p.self ? "—" : (p.connected ? pill(p.connection, p.connection === "direct" ? "ok" : "") : el("span", { class: "muted", text: "not connected" }))),
        el("td", { class: "addrs" }, addrList(p.connected ? p.addrs : p.announced_addrs)),
        el("td", { text: p.reachable === null ? "—" : (p.reachable ? "yes" : "no (NAT)") }),
        el("td", { text: (p.roles || []).join(", ") || "—" }),
        el("td", { text: p.bandwidth_mbps === null ? "not measured" : p.bandwidth_mbps.toFixed(1) + " Mbit/s" }),
        el("td", { text: p.score === null ? "—" : p.score.toFixed(2) }),
        el("td", {}, banned ? pill("banned until " + new Date(p.banned_until * 1000).toLocaleTimeString(), "bad") : String(p.bans || 0)),
        el("td", { text: String(p.violations || 0) }));
    }));
    $("peers-note").textContent = r.data.peers.length + " peers known" +
      (r.data.members_error ? " (members lookup failed: " + r.data.members_error + ")" : "") +
      ". Bandwidth is shown once averaging rounds measure it.";
  }

  // ---- networking ---------------------------------------------------------------------------

  async function refreshNetwork() {
    const r = await api("/api/network");
    if (!r.ok) return;
    const n = r.data;
    facts($("net-addrs"), [
      ["Listening on", addrList(n.listen_addrs)],
      ["Advertised", addrList(n.addrs)],
      ["Data plane", n.dataplane.advertise || (n.dataplane.port ? "port " + n.dataplane.port : "—")],
    ]);
    facts($("net-reach"), [
      ["Reachable", n.reachable ? pill("directly", "ok") : pill("behind NAT, via relays")],
      ["Setting", n.reachability_setting],
      ["DHT mode", n.dht_mode],
      ["Relay role", n.relay ? "serves as a circuit relay" : "no"],
      ["Relays wanted", n.relays_wanted],
    ]);
    const relays = $("net-relays");
    if (!n.relay_reservations.length) {
      relays.replaceChildren(el("span", { class: "muted", text: n.reachable ? "none needed: this node is reachable" : "none yet" }));
    } else {
      relays.replaceChildren(el("table", {},
        el("thead", {}, el("tr", {}, el("th", { text: "Relay" }), el("th", { text: "Expires in" }))),
        el("tbody", {}, ...n.relay_reservations.map((x) => el("tr", {},
          el("td", { class: "mono", title: x.relay, text: shortId(x.relay) }),
          el("td", { text: fmtDuration(x.expires_in) }))))));
    }
    const pm = n.port_mapping;
    facts($("net-portmap"), [
      ["Opt-in", pm.enabled ? pill("enabled (--upnp)", "ok") : pill("off")],
      ["Mapping", pm.state ? pm.state.method + ": " + pm.state.external + " → port " + pm.state.internal_port : (pm.enabled ? "none yet" : "—")],
      ["Confirmed", pm.state ? (pm.state.confirmed ? "yes, a public peer dialled it" : "not yet") : "—"],
      ["Mapped addresses", addrList(pm.mapped_addrs)],
    ]);
    $("net-portmap-note").textContent = pm.note;
  }

  // ---- runs ---------------------------------------------------------------------------------

  async function refreshRuns() {
    const r = await api("/api/runs");
    const body = $("runs-table").querySelector("tbody");
    if (r.status === 501) {
      $("runs-unavailable").classList.remove("hidden");
      $("runs-table").classList.add("hidden");
      body.replaceChildren();
      return;
    }
    $("runs-unavailable").classList.add("hidden");
    $("runs-table").classList.remove("hidden");
    if (!r.ok) { message("runs-message", r.data.error, "error"); return; }
    const joined = overview ? overview.run : "";
    const canJoin = overview ? overview.methods["run.join"] : false;
    body.replaceChildren(...(r.data.runs || []).map((run) => {
      const button = el("button", { type: "button", text: run.run === joined ? "Joined" : "Join" });
      button.disabled = !canJoin || run.run === joined;
      button.addEventListener("click", async () => {
        const res = await joinRun(run.run);
        if (res.ok) message("runs-message", "Joined run " + run.run + ".", "ok");
        else message("runs-message", res.data.error || "failed", "error");
        await refreshDashboard();
        refreshRuns();
      });
      return el("tr", { "data-run": run.run },
        el("td", { class: "mono", text: run.run }),
        el("td", { text: run.name }),
        el("td", { text: run.model }),
        el("td", { class: "mono", title: run.owner, text: shortId(run.owner) }),
        el("td", { text: String(run.version) }),
        el("td", { text: fmtWhen(run.updated_at) }),
        el("td", {}, button));
    }));
    if (!body.childElementCount) {
      body.append(el("tr", {}, el("td", { colSpan: 7, class: "muted", text: "No runs advertised yet." })));
    }
  }

  // ---- charts -------------------------------------------------------------------------------

  const charts = new Map(); // name -> {card, canvas, points, since}

  function chartCard(name, help) {
    const canvas = el("canvas");
    const latest = el("span", { class: "latest" });
    const count = el("span", { class: "small count" });
    const card = el("div", { class: "card chart-card", "data-series": name, "data-points": "0" },
      el("div", { class: "chart-head" }, el("h2", { text: name.replace(/_/g, " ") }), latest),
      el("div", { class: "small", text: help }),
      canvas, count);
    return { card: card, canvas: canvas, latest: latest, count: count, points: [], since: 0 };
  }

  async function refreshCharts() {
    const r = await api("/api/telemetry");
    if (!r.ok) return;
    const names = r.data.series.map((s) => s.name);
    const order = (n) => { const i = TRAINING_SERIES.indexOf(n); return i === -1 ? 100 : i; };
    const sorted = r.data.series.slice().sort((a, b) => order(a.name) - order(b.name) || a.name.localeCompare(b.name));
    const grid = $("charts-grid");
    for (const s of sorted) {
      if (!charts.has(s.name)) {
        const c = chartCard(s.name, s.help);
        charts.set(s.name, c);
      }
    }
    grid.replaceChildren(...sorted.map((s) => charts.get(s.name).card));
    const training = TRAINING_SERIES.filter((n) => names.includes(n));
    $("charts-note").textContent = training.length ? "" :
      "Training series (loss, validation loss, learning rate, samples/s, global step, round time, fraction averaged, peers per round) appear once this node trains. Below: the node's own numbers, sampled every few seconds.";
    await Promise.all(sorted.map(async (s) => {
      const c = charts.get(s.name);
      const res = await api("/api/telemetry/" + s.name + "?since=" + c.since);
      if (!res.ok) return;
      for (const p of res.data.points) c.points.push(p);
      if (c.points.length > 2000) c.points.splice(0, c.points.length - 2000);
      if (c.points.length) c.since = c.points[c.points.length - 1][0];
      c.card.setAttribute("data-points", String(c.points.length));
      c.count.textContent = c.points.length + " points";
      c.latest.textContent = c.points.length ? window.DandelionChart.fmtValue(c.points[c.points.length - 1][1]) : "";
      window.DandelionChart.drawChart(c.canvas, c.points);
    }));
  }

  // ---- navigation ---------------------------------------------------------------------------

  const PAGES = {
    dashboard: async () => { await refreshDashboard(); await refreshDataset(); await refreshSamples(); },
    logs: null,
    config: null, // loaded on entry only, so a timer never overwrites what the user types
    peers: refreshPeers,
    network: refreshNetwork,
    runs: async () => { await refreshDashboard(); await refreshRuns(); },
    charts: refreshCharts,
  };
  let page = "dashboard";
  let busy = false;

  function show(name) {
    if (!(name in PAGES)) name = "dashboard";
    page = name;
    for (const p of Object.keys(PAGES)) $("page-" + p).classList.toggle("hidden", p !== name);
    for (const a of document.querySelectorAll("#sidebar a")) a.classList.toggle("active", a.dataset.page === name);
    if (name === "config") loadConfigPage();
    if (name === "logs") renderLogs();
    tick();
  }

  async function tick() {
    const fn = PAGES[page];
    if (!fn || busy) return;
    busy = true;
    try { await fn(); } finally { busy = false; }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("training-start").addEventListener("click", () => trainingAction("start"));
    $("training-stop").addEventListener("click", () => trainingAction("stop"));
    $("join-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const run = $("join-run").value.trim();
      if (!run) { message("join-message", "Enter a run id.", "error"); return; }
      const r = await joinRun(run);
      if (r.ok) message("join-message", "Joined run " + run + ".", "ok");
      else message("join-message", r.data.error || "failed", "error");
      refreshDashboard();
    });
    $("settings-save").addEventListener("click", saveSettings);
    $("runconfig-publish").addEventListener("click", publishRunConfig);
    $("log-level").addEventListener("change", renderLogs);
    $("log-filter").addEventListener("input", renderLogs);
    window.addEventListener("hashchange", () => show(location.hash.slice(1)));
    window.addEventListener("resize", () => { for (const c of charts.values()) window.DandelionChart.drawChart(c.canvas, c.points); });
    refreshDashboard();
    connectLogs();
    show(location.hash.slice(1) || "dashboard");
    setInterval(tick, REFRESH_MS);
  });
})();
