// keel status page: polls /v1/providers and /v1/stats, draws cards, charts and tables.
// No framework, no build step, nothing loaded from elsewhere. Text from the server is
// always set as textContent, never parsed as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "keel.apiKey";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const params = new URLSearchParams(location.search);
  // At most a day: a browser runs a setTimeout delay past 2^31-1 ms (or Infinity) at once,
  // so an operator's "?refresh=3000000" to pause the page would poll in a tight loop.
  const MAX_REFRESH_SECONDS = 86400;
  const asked = Number(params.get("refresh"));
  const refreshSeconds = asked > 0 ? Math.min(MAX_REFRESH_SECONDS, Math.max(0.2, asked)) : 2;

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let lastOkAt = null;
  let lastStats = null;
  let keysConfigured = false;

  // --- DOM helpers --------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) el.setAttribute(name, String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const fmt = {
    ms(v) {
      if (v === null || v === undefined) return "–";
      return v >= 1000 ? `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)} s` : `${Math.round(v)} ms`;
    },
    bytes(v) {
      if (v === null || v === undefined) return "–";
      const mib = v / 1048576;
      return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(mib >= 100 ? 0 : 1)} MiB`;
    },
    pct(v) {
      return v === null || v === undefined ? "–" : `${Math.round(v * 100)}%`;
    },
    int(v) {
      return v === null || v === undefined ? "–" : Number(v).toLocaleString("en");
    },
    duration(seconds) {
      if (seconds < 60) return `${Math.round(seconds)} s`;
      if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
      if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
      return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
    },
  };

  // --- API access: the key goes with every call; a 401 asks for one ---------------

  class AuthNeeded extends Error {}

  function storedKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  // A header carries Latin-1 and no control characters: a key holding anything else (a
  // pasted smart quote) made Headers.set throw, which read as keel not answering.
  function keyProblem(key) {
    const bad = [...key].find((c) => c.codePointAt(0) > 0xff || /[\u0000-\u001f\u007f]/.test(c));
    if (bad === undefined) return null;
    const code = `U+${bad.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
    const shown = /[\u0000-\u001f\u007f]/.test(bad) ? code : `“${bad}” (${code})`;
    return `This key holds a character no key can hold: ${shown}. Copy the key again, or type it.`;
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = storedKey();
    if (key) {
      const problem = keyProblem(key);
      if (problem) {
        sessionStorage.removeItem(KEY_STORAGE);
        throw new AuthNeeded(problem);
      }
      headers.set("Authorization", `Bearer ${key}`);
    }
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (response.status === 401) {
      keysConfigured = true;
      // The server's text is advice for curl (which header to send); here the page sends it.
      throw new AuthNeeded(
        key ? "The key was refused: check it (a character missing or extra?), or ask keel's admin for one." : "",
      );
    }
    return response;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return (body && body.error && body.error.message) || `HTTP ${response.status}`;
    } catch {
      return `HTTP ${response.status}`;
    }
  }

  async function getJson(path) {
    const response = await api(path);
    if (!response.ok) {
      const error = new Error(`${path}: ${await errorMessage(response)}`);
      error.retryAfter = Number(response.headers.get("Retry-After")) || 0;
      throw error;
    }
    return response.json();
  }

  function askForKey(message) {
    markStale(false);
    noteKeyedLinks();
    $("dashboard").hidden = true;
    for (const id of ["tiles", "roles", "latency-chart", "traffic-chart", "acceptance", "models"]) {
      $(id).replaceChildren();
    }
    $("play-result").hidden = true;
    $("play-placeholder").hidden = false;
    $("auth").hidden = false;
    $("forget-key").hidden = !storedKey();
    showAuthError(message);
    setLive("auth", "API key needed");
    $("key-input").focus();
  }

  function showAuthError(message) {
    const error = $("auth-error");
    error.hidden = !message;
    error.textContent = message || "";
  }

  // Links cannot send a key: with keys configured, say which of the footer's JSON links
  // answer a browser 401 (each asked once, without the key), and how to read them.
  let linksNoted = false;
  async function noteKeyedLinks() {
    if (linksNoted || !keysConfigured) return;
    linksNoted = true;
    const links = [...document.querySelectorAll("#json-links a[data-path]")];
    const needKey = [];
    await Promise.all(
      links.map(async (link) => {
        try {
          const response = await fetch(link.dataset.path, { cache: "no-store" });
          if (response.status !== 401) return;
        } catch {
          return;
        }
        link.after(h("span", { class: "needs-key" }, " (needs your key)"));
        link.dataset.needsKey = "true";
        needKey.push(link.dataset.path);
      }),
    );
    if (!needKey.length) return;
    const path = needKey.includes("v1/providers") ? "v1/providers" : needKey[0];
    const example = `curl -H 'Authorization: Bearer …' ${new URL(path, document.baseURI).href}`;
    const note = $("json-key-note");
    note.replaceChildren("A link cannot send your key: ", h("code", {}, example));
    note.hidden = false;
  }

  // --- refresh loop -------------------------------------------------------------

  function setLive(state, text) {
    $("live").dataset.state = state;
    // Unchanged text is left alone: a polite live region would read it out every poll.
    if ($("live-text").textContent !== text) $("live-text").textContent = text;
  }

  // While keel does not answer, what the page shows is its last answer: greyed out and
  // dated, so that "serving" or "all up" is not read as now (processes may be gone).
  function markStale(stale) {
    $("dashboard").classList.toggle("stale", stale);
    const note = $("stale-note");
    note.hidden = !stale;
    if (stale && lastOkAt) {
      const at = new Date(lastOkAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
      note.textContent = `Stale: what keel said as of ${at}. It has not answered since; nothing below is current.`;
    }
  }

  async function refresh() {
    clearTimeout(timer);
    let backoff = 0;
    try {
      const stats = await getJson("v1/stats");
      const providers = stats.providers || { roles: {} };
      $("auth").hidden = true;
      $("dashboard").hidden = false;
      $("banner").hidden = true;
      $("forget-key").hidden = !storedKey();
      lastOkAt = Date.now();
      lastStats = stats;
      render(providers, stats);
      markStale(false);
      setLive("ok", `live · every ${refreshSeconds} s`);
      if (storedKey()) {
        keysConfigured = true;
        noteKeyedLinks();
      }
    } catch (error) {
      backoff = error.retryAfter || 0;
      if (error instanceof AuthNeeded) {
        askForKey(error.message);
        return; // polling resumes once a key is given
      } else {
        const since = lastOkAt ? ` (last answer ${fmt.duration((Date.now() - lastOkAt) / 1000)} ago)` : "";
        const what = error instanceof TypeError ? "keel is not answering" : "refresh failed";
        $("banner").textContent = `${what}: ${error.message}${since}. Retrying…`;
        $("banner").hidden = false;
        markStale(true);
        setLive("error", what);
      }
    }
    const wait = Math.min(MAX_REFRESH_SECONDS, Math.max(refreshSeconds, backoff));
    timer = setTimeout(refresh, wait * 1000);
  }

  function render(providers, stats) {
    renderTiles(providers, stats);
    renderRoles(providers);
    renderLatency(stats.series);
    renderTraffic(stats.series);
    renderAcceptance(stats.acceptance, (stats.shared_state || {}).events);
    renderModels(stats);
  }

  // --- provider cards -----------------------------------------------------------

  const WORKER_DOWN = new Set(["failed", "stopped", "unhealthy", "auth failed", "breaker open"]);
  const WORKER_BUSY = new Set(["starting", "loading", "restarting", "rate limited"]);

  function providerStatus(p) {
    const worker = p.worker || {};
    if (p.auth_failed) return ["down", "auth failed"];
    if (WORKER_DOWN.has(worker.state)) return ["down", `worker ${worker.state}`];
    // Before health: a breaker that opened is why no request goes there (a failing
    // backend is unhealthy too, which said only "down"). /v1/providers gives no reopen time.
    if (p.breaker === "open") return ["down", "breaker open"];
    if (!p.healthy) return ["down", "down"];
    if (WORKER_BUSY.has(worker.state)) return ["warn", `worker ${worker.state}`];
    if (p.rate_limited_for > 0) return ["warn", `rate limited for ${Math.ceil(p.rate_limited_for)} s`];
    if (p.breaker === "half_open") return ["warn", "half-open"];
    if (!p.usable) return ["warn", "not usable"];
    return ["ok", "healthy"];
  }

  // The chain's links in order; a link with api_endpoints is one group of replicas (one
  // `position`), which share the load rather than fall back to one another.
  function chainGroups(chain) {
    const groups = [];
    for (const p of chain) {
      const position = p.position ?? groups.length;
      const last = groups[groups.length - 1];
      if (last && last.position === position) last.members.push(p);
      else groups.push({ position, members: [p] });
    }
    return groups;
  }

  // The link that serves: /v1/providers says whether the role's last request was a
  // fallback's (serving_fallback), not which one; a usable fallback that requests moved
  // to (fallbacks_to) is the best guess, else the first usable fallback. Otherwise the
  // first usable link, where the next request goes (the primary while it is usable).
  function servingGroup(groups, servingFallback) {
    const usable = (g) => g.members.some((p) => p.usable);
    if (servingFallback) {
      const fallbacks = groups.slice(1).filter(usable);
      const moved = fallbacks.find((g) => g.members.some((p) => p.fallbacks_to > 0));
      if (moved || fallbacks.length) return moved || fallbacks[0];
    }
    return groups.find(usable) || null;
  }

  function renderRoles(providers) {
    const roles = providers.roles || {};
    const sections = Object.entries(roles).map(([role, info]) => {
      const groups = chainGroups(info.providers || []);
      const serving = servingGroup(groups, info.serving_fallback);
      const admission = info.admission || {};
      const cards = [];
      groups.forEach((group, index) => {
        if (index > 0) cards.push(h("span", { class: "arrow", "aria-hidden": "true" }, "→"));
        const members = group.members.map((p) =>
          providerCard(role, p, group === serving && p.usable),
        );
        if (members.length === 1) cards.push(members[0]);
        else {
          cards.push(
            h(
              "div",
              { class: "replicas", role: "group", "aria-label": `${members.length} replicas sharing the load` },
              h("div", { class: "replicas-note" }, `${members.length} replicas · share the load`),
              h("div", { class: "replicas-cards" }, members),
            ),
          );
        }
      });
      return h(
        "div",
        { class: "role", dataset: { role } },
        h(
          "div",
          { class: "role-head" },
          h("h3", { class: "role-name" }, role),
          h(
            "span",
            { class: "role-admission" },
            `${admission.active ?? 0}/${admission.max_concurrent ?? "?"} active · ${admission.waiting ?? 0} waiting` +
              (admission.rejected ? ` · ${admission.rejected} rejected` : ""),
          ),
          serving ? null : h("span", { class: "role-alert" }, "no provider can serve this role"),
          serving && serving !== groups[0] ? h("span", { class: "role-fallback" }, "serving from fallback") : null,
        ),
        h("div", { class: "chain" }, cards),
      );
    });
    $("roles").replaceChildren(...sections);
  }

  function providerCard(role, p, serving) {
    const [status, label] = providerStatus(p);
    const worker = p.worker || {};
    const facts = [
      ["breaker", p.breaker],
      ["first token p50", fmt.ms(p.latency_p50_ms)],
      ["in flight", p.outstanding],
    ];
    if (p.endpoint) facts.push(["endpoint", p.endpoint]);
    // Prompts keel built that this backend's window refused, sent again at half.
    if (p.prompts_shrunk) facts.push(["prompts halved", p.prompts_shrunk]);
    const limit = worker.rate_limit;
    if (limit) {
      // A configured rate_limit: the time requests waited on it is never silent.
      facts.push(["rate limit", `${limit.request_per_minute}/min`]);
      facts.push([
        "limit wait",
        `${limit.waited} waited · mean ${fmt.ms(limit.wait_mean_ms)}` +
          (limit.refused ? ` · ${limit.refused} refused` : ""),
      ]);
    }
    if (worker.pid !== undefined) {
      facts.push(["worker", `${worker.state ?? "?"} · pid ${worker.pid ?? "–"}`]);
      facts.push(["restarts", worker.restarts ?? 0]);
    }
    const pills = [];
    if (serving) pills.push(h("span", { class: "pill serving" }, "serving"));
    else if (status === "ok") pills.push(h("span", { class: "pill ok" }, "standby"));
    if (status !== "ok") pills.push(h("span", { class: `pill ${status}` }, label));
    const error = p.last_error || worker.last_error;
    return h(
      "article",
      {
        class: `card status-${status}${serving ? " serving" : ""}`,
        dataset: { role, provider: p.name, status, serving: String(serving) },
      },
      h("div", { class: "card-name" }, p.name),
      h(
        "div",
        { class: "card-sub" },
        h("div", { class: "card-model" }, `${p.model} · ${p.kind}`),
        h("div", { class: "pills" }, pills),
      ),
      h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      error ? h("div", { class: `last-error${status === "ok" ? " old" : ""}`, title: "last error" }, error) : null,
    );
  }

  // --- summary tiles ------------------------------------------------------------

  function renderTiles(providers, stats) {
    const summary = stats.summary || {};
    const roles = Object.values(providers.roles || {});
    const down = roles.flatMap((r) => r.providers || []).filter((p) => providerStatus(p)[0] === "down").length;
    const unserved = roles.filter((r) => !(r.providers || []).some((p) => p.usable)).length;
    const accepted = (stats.acceptance || []).reduce(
      (acc, row) => ({ viewed: acc.viewed + row.viewed, selected: acc.selected + row.selected }),
      { viewed: 0, selected: 0 },
    );
    const rate = accepted.viewed ? accepted.selected / accepted.viewed : null;
    const tile = (label, value, detail, tone) =>
      h("div", { class: `tile${tone ? " " + tone : ""}` }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), h("div", { class: "detail" }, detail));
    const errorRate = summary.requests ? summary.errors / summary.requests : 0;
    $("tiles").replaceChildren(
      tile("Providers", down ? `${down} down` : "all up", unserved ? `${unserved} role(s) cannot be served` : "every role has a provider", down ? "bad" : "good"),
      tile("Requests", fmt.int(summary.requests), "last hour"),
      tile("Errors", fmt.int(summary.errors), summary.requests ? `${(errorRate * 100).toFixed(1)}% of requests` : "last hour", summary.errors ? "bad" : null),
      tile("Completion p50", fmt.ms(summary.p50_ms), `p95 ${fmt.ms(summary.p95_ms)} · last hour`),
      stats.acceptance === null
        ? tile("Acceptance", "–", "events database unreachable", "bad")
        : tile("Acceptance", fmt.pct(rate), accepted.viewed ? `${accepted.selected} of ${accepted.viewed} viewed` : "no views yet"),
      tile("Worker restarts", fmt.int(stats.worker_restarts), "since start", stats.worker_restarts ? "bad" : null),
      sharedStateTile(stats.shared_state || {}, tile),
      tile("keel memory", fmt.bytes(stats.server && stats.server.rss_bytes), `up ${fmt.duration(stats.uptime_seconds || 0)}`),
    );
  }

  // Where the per-key limits, the keys and the events are kept, and what keel does
  // while a store does not answer (limits per replica, keys as last read, events held).
  function sharedStateTile(shared, tile) {
    const limits = shared.rate_limits || {};
    const keys = shared.keys || {};
    const events = shared.events || {};
    const redis = limits.store === "redis" || keys.store === "redis";
    const problems = [];
    if (limits.up === false) problems.push("rate limits per replica");
    if (keys.up === false) problems.push("keys as last read");
    if (events.up === false) problems.push(`events database down · ${fmt.int(events.buffered ?? 0)} held`);
    if (events.dropped) problems.push(`${fmt.int(events.dropped)} events dropped`);
    const down = [];
    if (limits.up === false || keys.up === false) down.push("Redis");
    if (events.up === false) down.push(events.store === "postgres" ? "PostgreSQL" : "events store");
    const stores = `${redis ? "Redis" : "in process"} · events in ${events.store === "postgres" ? "PostgreSQL" : "SQLite"}`;
    const value = down.length ? `${down.join(" & ")} down` : problems.length ? "up, with losses" : "all up";
    const el = tile("Shared state", value, problems.length ? problems.join(" · ") : stores, problems.length ? "bad" : null);
    el.id = "shared-state";
    const errors = [limits.last_error, keys.last_error, events.last_error].filter(Boolean);
    if (errors.length) el.title = [...new Set(errors)].join("\n");
    return el;
  }

  // --- charts (inline SVG) ------------------------------------------------------

  // The axis top: four equal steps of 1, 2 or 5 times a power of ten.
  function niceMax(value, integer) {
    if (!(value > 0)) return 4;
    const raw = value / 4;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    let step = 10 * magnitude;
    for (const factor of [1, 2, 5]) {
      if (raw <= factor * magnitude) {
        step = factor * magnitude;
        break;
      }
    }
    return 4 * (integer ? Math.max(1, Math.ceil(step)) : step);
  }

  function frame(container, maxValue, label, integer) {
    const width = Math.max(280, container.clientWidth || 560);
    const height = container.clientHeight || 200;
    const pad = { left: 52, right: 10, top: 10, bottom: 24 };
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    const plot = { x0: pad.left, x1: width - pad.right, y0: height - pad.bottom, y1: pad.top };
    const top = niceMax(maxValue, integer);
    const y = (v) => plot.y0 - (v / top) * (plot.y0 - plot.y1);
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      svg.append(
        s("line", { class: "grid-line", x1: plot.x0, x2: plot.x1, y1: y(v), y2: y(v) }),
        s("text", { class: "axis-label", x: plot.x0 - 8, y: y(v) + 4, "text-anchor": "end" }, label(v)),
      );
    }
    return { svg, plot, y, width, height };
  }

  function xAxis(chart, count) {
    const { plot, svg } = chart;
    const x = (i) => plot.x0 + ((i + 0.5) / count) * (plot.x1 - plot.x0);
    for (const minutesAgo of [60, 45, 30, 15, 0]) {
      const i = count - 1 - minutesAgo;
      const at = minutesAgo === 60 ? plot.x0 : minutesAgo === 0 ? plot.x1 : x(i);
      const anchor = minutesAgo === 60 ? "start" : minutesAgo === 0 ? "end" : "middle";
      svg.append(s("text", { class: "axis-label", x: at, y: chart.height - 6, "text-anchor": anchor }, minutesAgo ? `−${minutesAgo} min` : "now"));
    }
    return x;
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function renderLatency(series) {
    const container = $("latency-chart");
    const points = series.filter((m) => m.p50_ms !== null);
    const max = Math.max(0, ...points.map((m) => m.p95_ms ?? m.p50_ms));
    const chart = frame(container, max, (v) => fmt.ms(v));
    const x = xAxis(chart, series.length);
    const latest = points[points.length - 1];
    chart.svg.setAttribute(
      "aria-label",
      latest
        ? `Completion latency, last hour per minute; latest minute with completions (${clock(latest.t)}): p50 ${fmt.ms(latest.p50_ms)}, p95 ${fmt.ms(latest.p95_ms)}`
        : "Completion latency, last hour: no completions",
    );
    if (!points.length) {
      chart.svg.append(s("text", { class: "empty", x: (chart.plot.x0 + chart.plot.x1) / 2, y: chart.height / 2, "text-anchor": "middle" }, "no completions in the last hour"));
      container.replaceChildren(chart.svg);
      return;
    }
    // Consecutive minutes with data form a run; gaps break the lines.
    const runs = [];
    series.forEach((m, i) => {
      if (m.p50_ms === null) return;
      const run = runs.length && runs[runs.length - 1].last === i - 1 ? runs[runs.length - 1] : null;
      if (run) {
        run.items.push([i, m]);
        run.last = i;
      } else runs.push({ last: i, items: [[i, m]] });
    });
    for (const run of runs) {
      const upper = run.items.map(([i, m]) => `${x(i)},${chart.y(m.p95_ms)}`);
      const lower = run.items.map(([i, m]) => `${x(i)},${chart.y(m.p50_ms)}`).reverse();
      if (run.items.length > 1) {
        chart.svg.append(
          s("polygon", { class: "p95-area", points: [...upper, ...lower].join(" ") }),
          s("polyline", { class: "p95", points: upper.join(" ") }),
          s("polyline", { class: "p50", points: [...lower].reverse().join(" ") }),
        );
      }
    }
    for (const [i, m] of runs.flatMap((r) => r.items)) {
      chart.svg.append(
        s("circle", { class: "p95-dot", cx: x(i), cy: chart.y(m.p95_ms), r: 2.5 }),
        s("circle", { class: "p50-dot", cx: x(i), cy: chart.y(m.p50_ms), r: 3 }, s("title", {}, `${clock(m.t)} · p50 ${fmt.ms(m.p50_ms)} · p95 ${fmt.ms(m.p95_ms)} · ${m.completions} completions`)),
      );
    }
    container.replaceChildren(chart.svg);
  }

  function renderTraffic(series) {
    const container = $("traffic-chart");
    const max = Math.max(0, ...series.map((m) => m.requests));
    const chart = frame(container, max, (v) => fmt.int(v), true);
    const x = xAxis(chart, series.length);
    const total = series.reduce((acc, m) => ({ requests: acc.requests + m.requests, errors: acc.errors + m.errors }), { requests: 0, errors: 0 });
    chart.svg.setAttribute(
      "aria-label",
      `Requests and errors, last hour per minute: ${fmt.int(total.requests)} requests, ${fmt.int(total.errors)} errors in all`,
    );
    const slot = (chart.plot.x1 - chart.plot.x0) / series.length;
    const barWidth = Math.max(1.5, slot * 0.7);
    if (!max) {
      chart.svg.append(s("text", { class: "empty", x: (chart.plot.x0 + chart.plot.x1) / 2, y: chart.height / 2, "text-anchor": "middle" }, "no model requests in the last hour"));
    }
    series.forEach((m, i) => {
      if (!m.requests) return;
      const title = s("title", {}, `${clock(m.t)} · ${m.requests} requests · ${m.errors} errors`);
      const ok = m.requests - m.errors;
      chart.svg.append(s("rect", { class: "bar", x: x(i) - barWidth / 2, width: barWidth, y: chart.y(m.requests), height: chart.y(0) - chart.y(m.requests), rx: 1.5 }, title));
      if (m.errors) {
        chart.svg.append(s("rect", { class: "bar-err", x: x(i) - barWidth / 2, width: barWidth, y: chart.y(m.requests), height: chart.y(ok) - chart.y(m.requests), rx: 1.5 }, title.cloneNode(true)));
      }
    });
    container.replaceChildren(chart.svg);
  }

  // --- tables -------------------------------------------------------------------

  function renderAcceptance(rows, events) {
    if (rows === null) {
      const why = events && events.last_error ? ` (${events.last_error})` : "";
      $("acceptance").replaceChildren(
        h("div", { class: "empty-note bad" }, `The events database is unreachable${why}: acceptance figures return when it answers.`),
      );
      return;
    }
    if (!rows || !rows.length) {
      $("acceptance").replaceChildren(h("div", { class: "empty-note" }, "No completions served in the last 24 hours."));
      return;
    }
    const body = rows.map((row) =>
      h(
        "tr",
        { dataset: { language: row.language } },
        h("td", {}, h("span", { class: "mono" }, row.language)),
        h("td", { class: "num" }, fmt.int(row.served)),
        h("td", { class: "num" }, fmt.int(row.viewed)),
        h("td", { class: "num" }, fmt.int(row.selected)),
        h(
          "td",
          {},
          h(
            "div",
            { class: "rate" },
            h("div", { class: "rate-bar" }, rateFill(row.acceptance_rate)),
            h("span", { class: "rate-text" }, fmt.pct(row.acceptance_rate)),
          ),
        ),
      ),
    );
    $("acceptance").replaceChildren(
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, h("th", {}, "language"), h("th", { class: "num" }, "served"), h("th", { class: "num" }, "viewed"), h("th", { class: "num" }, "accepted"), h("th", {}, "rate"))),
        h("tbody", {}, body),
      ),
    );
  }

  function rateFill(rate) {
    const fill = h("div", { class: "rate-fill" });
    fill.style.width = `${Math.round((rate || 0) * 100)}%`;
    return fill;
  }

  function stateTone(state) {
    if (state === "ready" || state === "ok") return "ok";
    if (WORKER_DOWN.has(state)) return "down";
    if (WORKER_BUSY.has(state)) return "warn";
    return "";
  }

  function renderModels(stats) {
    const server = stats.server || {};
    const rows = [
      h(
        "tr",
        { dataset: { process: "keel" } },
        h("td", {}, h("strong", {}, "keel"), h("div", { class: "card-model" }, "server process")),
        h("td", {}, "–"),
        h("td", {}, h("span", { class: "state ok" }, "running")),
        h("td", { class: "num mono" }, server.pid ?? "–"),
        h("td", { class: "num" }, fmt.bytes(server.rss_bytes)),
        h("td", { class: "num" }, "–"),
      ),
    ];
    for (const m of stats.models || []) {
      rows.push(
        h(
          "tr",
          { dataset: { provider: m.provider } },
          h("td", {}, h("strong", {}, m.model), h("div", { class: "card-model mono" }, m.provider)),
          h("td", {}, (m.roles || []).join(", ")),
          h("td", {}, h("span", { class: `state ${stateTone(m.state)}` }, m.state ?? "–")),
          h("td", { class: "num mono" }, m.pid ?? (m.endpoint ? "remote" : "–")),
          h("td", { class: "num" }, fmt.bytes(m.rss_bytes)),
          h("td", { class: "num" }, m.restarts ?? "–"),
        ),
      );
    }
    $("models").replaceChildren(
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, h("th", {}, "model"), h("th", {}, "roles"), h("th", {}, "state"), h("th", { class: "num" }, "pid"), h("th", { class: "num" }, "memory"), h("th", { class: "num" }, "restarts"))),
        h("tbody", {}, rows),
      ),
    );
  }

  // --- playground ---------------------------------------------------------------

  const EXTENSIONS = { python: "py", javascript: "js", typescript: "ts", go: "go", rust: "rs", java: "java", c: "c", cpp: "cpp", ruby: "rb" };

  async function runPlayground(event) {
    event.preventDefault();
    const code = $("play-code");
    const language = $("play-language").value;
    // The caret splits prefix from suffix; untouched, the whole text is the prefix.
    const caret = document.activeElement === code || code.dataset.touched ? code.selectionEnd : code.value.length;
    const prefix = code.value.slice(0, caret);
    const suffix = code.value.slice(caret);
    const body = {
      language,
      segments: { prefix, suffix, filepath: `playground.${EXTENSIONS[language] || "txt"}` },
      debug_options: { return_prompt: true },
    };
    const button = $("play-run");
    button.disabled = true;
    button.textContent = "Completing…";
    $("play-error").hidden = true;
    const started = performance.now();
    try {
      const response = await api("v1/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const result = await response.json();
      const elapsed = performance.now() - started;
      $("play-prefix").textContent = prefix;
      $("play-completion").textContent = result.choices && result.choices.length ? result.choices[0].text : "";
      $("play-provider").textContent = response.headers.get("X-Keel-Provider") || "(not named)";
      $("play-time").textContent = `${fmt.ms(elapsed)} · ${result.id}`;
      $("play-prompt").textContent = (result.debug_data && result.debug_data.prompt) || "(no prompt returned)";
      $("play-result").hidden = false;
      $("play-placeholder").hidden = true;
    } catch (error) {
      if (error instanceof AuthNeeded) {
        askForKey(error.message);
      } else {
        $("play-error").textContent = `The completion failed: ${error.message}`;
        $("play-error").hidden = false;
      }
    } finally {
      button.disabled = false;
      button.textContent = "Complete";
    }
  }

  // --- wiring -------------------------------------------------------------------

  function start() {
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      const problem = keyProblem(key);
      if (problem) {
        showAuthError(problem); // refused here: a poll with it could never be sent
        $("key-input").focus();
        return;
      }
      sessionStorage.setItem(KEY_STORAGE, key);
      $("key-input").value = "";
      refresh();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("forget-key").hidden = true;
      refresh();
    });
    $("play-form").addEventListener("submit", runPlayground);
    const code = $("play-code");
    for (const type of ["keyup", "click"]) code.addEventListener(type, () => (code.dataset.touched = "1"));
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (lastStats && !$("dashboard").hidden) {
          renderLatency(lastStats.series);
          renderTraffic(lastStats.series);
        }
      }, 150);
    });
    refresh();
  }

  start();
})();
