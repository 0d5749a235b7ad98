// meshrt account dashboard: plain JS, no dependencies.
//
// The key is kept in sessionStorage only (this tab) and sent only as
// `Authorization: Bearer` on same-origin fetches of the tenant API. Money arrives as decimal
// strings (USD) and is summed exactly as BigInt picodollars (1e-12 USD); floats are used only for
// bar heights, never for amounts shown.
"use strict";

(function () {
  const KEY_STORAGE = "meshrt.dashboard.key";
  const PICO_DIGITS = 12;
  const PICO = 10n ** BigInt(PICO_DIGITS);
  const CHART_DAYS = 30;
  const DAY_S = 86400;
  const CHART_PAGE = 100;           // the API's maximum page size
  const CHART_MAX_PAGES = 100;      // at most 10,000 sessions summed for the chart

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(window.location.search);
  const pageSize = clampInt(params.get("limit"), 1, 100, 20);

  let key = null;
  let cursor = null;       // last_id of the table's last page
  let generation = 0;      // bumps on sign-out / reload: late answers of an old load are dropped

  // ---- exact money --------------------------------------------------------------------------

  /** A USD decimal string ("0.031744", "-1.5", "12") → BigInt picodollars. Throws on junk. */
  function parsePico(text) {
    const m = /^(-)?(\d+)(?:\.(\d+))?$/.exec(String(text).trim());
    if (!m) throw new Error("not a decimal amount: " + text);
    let frac = m[3] || "";
    if (frac.length > PICO_DIGITS) {
      if (/[^0]/.test(frac.slice(PICO_DIGITS))) throw new Error("more than 12 decimals: " + text);
      frac = frac.slice(0, PICO_DIGITS);
    }
    const value = BigInt(m[2]) * PICO + BigInt(frac.padEnd(PICO_DIGITS, "0"));
    return m[1] ? -value : value;
  }

  /** BigInt picodollars → decimal USD string, at least `minDecimals` places (like the API). */
  function formatPico(pico, minDecimals = 6) {
    const negative = pico < 0n;
    const abs = negative ? -pico : pico;
    const whole = abs / PICO;
    let frac = (abs % PICO).toString().padStart(PICO_DIGITS, "0").replace(/0+$/, "");
    frac = frac.padEnd(minDecimals, "0");
    return (negative ? "-" : "") + groupThousands(whole.toString()) + (frac ? "." + frac : "");
  }

  /** A decimal string shown as is, with thousands separators in its whole part. */
  function groupDecimal(text) {
    const m = /^(-?)(\d+)(\.\d+)?$/.exec(String(text));
    return m ? m[1] + groupThousands(m[2]) + (m[3] || "") : String(text);
  }

  function groupThousands(digits) {
    return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  function usd(text) {
    const s = groupDecimal(text);
    return s.startsWith("-") ? "-$" + s.slice(1) : "$" + s;
  }

  /** An amount as a person reads it, Money.display's rule (docs/billing.md, Money): sign first,
   *  "$", rounded half away from zero to 6 decimals, but never a non-zero amount shown as zero.
   *  Takes BigInt picodollars. The exact amount goes in the element's title. */
  function money(pico) {
    const abs = pico < 0n ? -pico : pico;
    const micro = PICO / 1000000n;
    const rounded = ((abs + micro / 2n) / micro) * micro;
    return usd(formatPico(pico < 0n ? -(rounded || abs) : rounded || abs));
  }

  function exactTitle(pico) {
    return "exactly " + usd(formatPico(pico));
  }

  // ---- small helpers ------------------------------------------------------------------------

  function clampInt(raw, lo, hi, fallback) {
    const n = Number.parseInt(raw, 10);
    return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : fallback;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function utcDay(unixSeconds) {
    return new Date(unixSeconds * 1000).toISOString().slice(0, 10);
  }

  function utcTime(unixSeconds) {
    if (unixSeconds == null) return "–";
    return new Date(unixSeconds * 1000).toISOString().slice(0, 19).replace("T", " ");
  }

  function duration(seconds) {
    const s = Number(seconds) || 0;
    if (s < 60) return s.toFixed(1) + " s";
    const total = Math.round(s);
    const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), r = total % 60;
    return h ? `${h}h ${m}m ${r}s` : `${m}m ${r}s`;
  }

  const intFormat = new Intl.NumberFormat("en-US");
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  // ---- API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, requestId) {
      super(message);
      this.status = status;
      this.code = code;
      this.requestId = requestId;
    }
  }

  async function api(path) {
    let response;
    try {
      response = await fetch(path, {
        headers: { "Authorization": "Bearer " + key, "Accept": "application/json" },
        credentials: "omit", cache: "no-store", redirect: "error", referrerPolicy: "no-referrer",
      });
    } catch (err) {
      throw new ApiError(0, "network_error", "Could not reach the server: " + err.message, null);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const e = (body && body.error) || {};
      throw new ApiError(response.status, e.code || "http_" + response.status,
        e.message || `The server answered ${response.status} ${response.statusText}.`,
        (body && body.request_id) || response.headers.get("x-request-id"));
    }
    if (body === null) throw new ApiError(response.status, "bad_response", "The server sent no JSON.", null);
    return body;
  }

  // ---- views --------------------------------------------------------------------------------

  function showError(err) {
    const box = $("error");
    box.replaceChildren();
    const message = err instanceof ApiError ? err.message : String(err && err.message || err);
    box.append(el("strong", { text: message }));
    if (err instanceof ApiError && err.code) {
      const meta = [err.code];
      if (err.requestId) meta.push(err.requestId);
      box.append(el("span", { class: "error-meta", text: meta.join(" · ") }));
    }
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  function showLogin() {
    $("dashboard").hidden = true;
    $("who").hidden = true;
    $("login").hidden = false;
    $("login-button").disabled = false;
    $("refresh").disabled = false;
    $("key-input").value = "";
    $("key-input").focus();
    document.body.dataset.state = "login";
  }

  function renderAccount(account) {
    $("account-name").textContent = account.name || account.id;
    $("account-name").title = account.id;
    const balance = $("balance");
    balance.textContent = money(parsePico(account.balance));
    balance.title = exactTitle(parsePico(account.balance));
    balance.dataset.raw = account.balance;
    fitValue(balance);
    balance.classList.toggle("negative", parsePico(account.balance) <= 0n);
    // what responses in flight may still cost is held back from the balance (docs/billing.md)
    $("balance-sub").textContent = account.reserved === undefined ? "prepaid, USD"
      : `${usd(account.available)} available · ${usd(account.reserved)} reserved`;
    const limit = account.max_concurrent_sessions;
    $("live").textContent = limit == null ? String(account.live_sessions)
      : `${account.live_sessions} / ${limit}`;
  }

  function reasonBadge(reason) {
    const ok = reason === "client_closed" || reason === "upstream_closed";
    return el("span", { class: "badge " + (ok ? "ok" : "warn"), text: reason || "–" });
  }

  function usageRow(r) {
    const usage = r.usage || {};
    const tokens = el("td", { class: "num tokens", "data-label": "Tokens" }, intFormat.format(usage.total_tokens || 0));
    if (usage.input_tokens != null || usage.output_tokens != null) {
      tokens.append(el("span", {
        class: "detail",
        text: `in ${intFormat.format(usage.input_tokens || 0)} · out ${intFormat.format(usage.output_tokens || 0)}`,
      }));
    }
    const cost = r.cost || {};
    const tr = el("tr", { "data-id": r.id },
      el("td", { class: "time", "data-label": "Ended", title: "started " + utcTime(r.started_at) + " UTC" },
        utcTime(r.ended_at)),
      el("td", { class: "model", "data-label": "Model" }, r.model || "–"),
      el("td", { class: "num", "data-label": "Duration", title: `${r.duration_s} s` }, duration(r.duration_s)),
      tokens,
      el("td", { class: "num cost", "data-label": "Cost",
                 title: (cost.amount != null ? exactTitle(parsePico(cost.amount)) : "") +
                   (r.amended_at != null ? "; amended " + utcTime(r.amended_at) + " UTC: usage from a node that came back" : "") },
        cost.amount != null ? money(parsePico(cost.amount)) : "–",
        r.amended_at != null ? el("span", { class: "detail", text: "amended late" }) : ""),
      el("td", { class: "reason", "data-label": "End reason",
                 title: r.close_code != null ? "close code " + r.close_code : "" }, reasonBadge(r.end_reason)));
    return tr;
  }

  function renderUsagePage(page, append) {
    const body = $("usage-rows");
    if (!append) body.replaceChildren();
    for (const r of page.data) body.append(usageRow(r));
    cursor = page.last_id || cursor;
    $("usage-empty").hidden = body.children.length > 0;
    $("load-more").hidden = !page.has_more;
  }

  /** Sums cost by UTC day of each session's end, exactly; returns {days:[{day, pico}], total, count}. */
  function sumByDay(records, firstDayStart) {
    const days = [];
    const index = new Map();
    for (let i = 0; i < CHART_DAYS; i++) {
      const day = utcDay(firstDayStart + i * DAY_S);
      index.set(day, days.length);
      days.push({ day, pico: 0n, sessions: 0 });
    }
    let total = 0n;
    for (const r of records) {
      if (r.ended_at == null || !r.cost || r.cost.amount == null) continue;
      const i = index.get(utcDay(r.ended_at));
      if (i === undefined) continue;
      const pico = parsePico(r.cost.amount);
      days[i].pico += pico;
      days[i].sessions += 1;
      total += pico;
    }
    return { days, total };
  }

  /** The smallest "nice" scale (1, 2 or 5 × 10^k picodollars) ≥ max, and its grid steps. */
  function niceScale(max) {
    let unit = 1n;
    for (;;) {
      for (const [m, steps] of [[1n, 4n], [2n, 4n], [5n, 5n]]) {
        if (m * unit >= max) return { top: m * unit, steps };
      }
      unit *= 10n;
    }
  }

  let lastChart = null;    // {summary, truncated}: redrawn at the container's width on resize

  function renderTotals(summary, truncated) {
    const total = formatPico(summary.total);
    const value = $("total-30d");
    value.textContent = money(summary.total);
    value.title = exactTitle(summary.total);
    value.dataset.raw = total;
    fitValue(value);
    $("total-30d-sub").textContent = truncated
      ? `first ${intFormat.format(CHART_PAGE * CHART_MAX_PAGES)} sessions only`
      : "sessions ended, UTC days";
  }

  /** Long exact amounts (up to 12 decimals) get a smaller type rather than a line break. */
  function fitValue(node) {
    const n = node.textContent.length;
    node.classList.toggle("long", n > 13 && n <= 18);
    node.classList.toggle("longer", n > 18);
  }

  function renderChart(summary, truncated) {
    lastChart = { summary, truncated };
    const box = $("chart");
    box.replaceChildren();
    const { days, total } = summary;

    let max = 0n;
    for (const d of days) if (d.pico > max) max = d.pico;
    const scale = max > 0n ? niceScale(max) : { top: 1n, steps: 1n };
    const frac = (pico) => Number((pico * 1000000n) / scale.top) / 1000000;  // bar geometry only

    const W = Math.max(320, Math.round(box.clientWidth || 760)), H = 240;
    const left = 88, right = 8, top = 12, bottom = 28;
    const plotW = W - left - right, plotH = H - top - bottom;
    const slot = plotW / days.length, barW = Math.max(2, slot * 0.68);
    const labelEvery = W < 560 ? 10 : 5;
    const chart = svg("svg", {
      viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", class: "chart-svg",
      "aria-label": `Cost per day over the last ${CHART_DAYS} days, total ${money(total)}`,
    });

    // grid lines at exact, round amounts
    const steps = max > 0n ? scale.steps : 0n;
    const ticks = [];
    for (let k = 0n; k <= steps; k++) ticks.push((scale.top * k) / scale.steps);
    // one number of decimals for all labels, so they line up: $0.00025 … $0.00100
    const decimals = Math.max(2, ...ticks.map((t) => (formatPico(t, 0).split(".")[1] || "").length));
    ticks.forEach((t, k) => {
      const y = top + plotH - frac(t) * plotH;
      chart.append(svg("line", { x1: left, x2: W - right, y1: y, y2: y, class: k === 0 ? "axis" : "grid" }));
      chart.append(svg("text", { x: left - 8, y: y + 4, class: "tick y" }, usd(formatPico(t, decimals))));
    });

    days.forEach((d, i) => {
      const x = left + i * slot + (slot - barW) / 2;
      const label = `${d.day}: ${money(d.pico)} (${d.sessions} session${d.sessions === 1 ? "" : "s"})`;
      if (d.pico > 0n) {
        const h = Math.max(2, frac(d.pico) * plotH);
        const bar = svg("rect", {
          x: x.toFixed(2), y: (top + plotH - h).toFixed(2), width: barW.toFixed(2), height: h.toFixed(2),
          rx: Math.min(3, barW / 4).toFixed(2), class: "bar", "data-day": d.day, "data-amount": formatPico(d.pico),
        });
        bar.append(svg("title", {}, label));
        chart.append(bar);
      } else {
        // an invisible hover target, so empty days still tell their "$0"
        const hit = svg("rect", { x: x.toFixed(2), y: top, width: barW.toFixed(2), height: plotH, class: "hit" });
        hit.append(svg("title", {}, label));
        chart.append(hit);
      }
      const isLast = i === days.length - 1;
      if ((i % labelEvery === 0 && days.length - 1 - i >= labelEvery / 2) || isLast) {
        const [, mm, dd] = d.day.split("-");
        chart.append(svg("text", { x: (isLast ? x + barW : x + barW / 2).toFixed(2), y: H - 8,
                                   class: isLast ? "tick x end" : "tick x" },
          isLast ? "today" : `${MONTHS[Number(mm) - 1]} ${Number(dd)}`));
      }
    });

    box.append(chart);
    if (total === 0n) box.append(el("p", { class: "muted empty", text: "No cost in the last 30 days." }));
  }

  async function loadChart(gen) {
    const now = Math.floor(Date.now() / 1000);
    const todayStart = now - (now % DAY_S);
    const firstDayStart = todayStart - (CHART_DAYS - 1) * DAY_S;
    const records = [];
    let after = null, pages = 0, truncated = false;
    for (;;) {
      const q = new URLSearchParams({ start_time: String(firstDayStart), limit: String(CHART_PAGE) });
      if (after) q.set("after", after);
      const page = await api("v1/usage?" + q);
      if (gen !== generation) return;
      records.push(...page.data);
      pages += 1;
      if (!page.has_more || !page.last_id) break;
      if (pages >= CHART_MAX_PAGES) { truncated = true; break; }
      after = page.last_id;
    }
    const summary = sumByDay(records, firstDayStart);
    renderTotals(summary, truncated);
    renderChart(summary, truncated);
  }

  async function loadAll() {
    const gen = ++generation;
    clearError();
    document.body.dataset.state = "loading";
    $("login-button").disabled = true;
    $("refresh").disabled = true;
    try {
      const account = await api("v1/account");
      if (gen !== generation) return;
      renderAccount(account);
      $("login").hidden = true;
      $("who").hidden = false;
      $("dashboard").hidden = false;
      cursor = null;
      const [page] = await Promise.all([
        api("v1/usage?" + new URLSearchParams({ limit: String(pageSize) })),
        loadChart(gen),
      ]);
      if (gen !== generation) return;
      renderUsagePage(page, false);
      document.body.dataset.state = "ready";
    } catch (err) {
      if (gen !== generation) return;
      const rejected = err instanceof ApiError && (err.status === 401 || err.status === 403);
      if (rejected) {
        forgetKey();
        showLogin();
      }
      showError(err);
      document.body.dataset.state = rejected ? "rejected" : "failed";
    } finally {
      if (gen === generation) {
        $("login-button").disabled = false;
        $("refresh").disabled = false;
      }
    }
  }

  async function loadMore() {
    if (!cursor) return;
    const gen = generation;
    const button = $("load-more");
    button.disabled = true;
    try {
      const q = new URLSearchParams({ limit: String(pageSize), after: cursor });
      const page = await api("v1/usage?" + q);
      if (gen !== generation) return;
      renderUsagePage(page, true);
      clearError();
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  }

  function forgetKey() {
    key = null;
    try { sessionStorage.removeItem(KEY_STORAGE); } catch (err) { /* storage off: nothing kept */ }
  }

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key-input").value.trim();
      if (!value) {
        showError(new Error("Enter an API key (it starts with rsk_)."));
        return;
      }
      if (!/^[\x21-\x7e]+$/.test(value)) {  // could not even be sent as a header
        showError(new Error("That is not an API key: keys are rsk_ followed by letters and digits."));
        return;
      }
      key = value;
      try { sessionStorage.setItem(KEY_STORAGE, value); } catch (err) { /* kept in memory only */ }
      $("key-input").value = "";
      loadAll();
    });
    $("refresh").addEventListener("click", () => loadAll());
    $("load-more").addEventListener("click", () => loadMore());
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (lastChart && !$("dashboard").hidden) renderChart(lastChart.summary, lastChart.truncated);
      }, 150);
    });
    $("signout").addEventListener("click", () => {
      generation++;
      lastChart = null;
      forgetKey();
      clearError();
      $("usage-rows").replaceChildren();
      $("chart").replaceChildren();
      showLogin();
    });

    try { key = sessionStorage.getItem(KEY_STORAGE); } catch (err) { key = null; }
    if (key) loadAll(); else showLogin();
  }

  // Exposed for tests and the console; holds no secrets.
  window.meshrtDashboard = { parsePico, formatPico, money };

  start();
})();
