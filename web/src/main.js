// Nadi's live page: pick an instrument, watch its ticks and 1-minute candles update live.
// Data: /v1/instruments (the picker), /v1/candles?interval=1m (initial candles), /v1/gaps
// (open gaps), and the /ws hub (live ticks; DESIGN.md section 7). An API key, when the server
// needs one, is read from ?key= in the page URL.
import { CandlestickSeries, createChart, createSeriesMarkers } from "lightweight-charts";

const IST_S = 19800; // the chart's time axis shows UTC; shifting by +05:30 makes it read IST
const MAX_ROWS = 60; // ticks kept in the table
const MAX_MARKERS = 300;
const key = new URLSearchParams(location.search).get("key");
const headers = key ? { Authorization: `Bearer ${key}` } : {};

const $ = (id) => document.getElementById(id);
const state = {
  token: null,
  ws: null,
  ticks: 0,
  candles: new Map(), // bucket (IST-shifted seconds) -> candle
  closeTs: new Map(), // bucket -> exchange_ts (ns) of the trade that set its close
  staleMarkers: [],
  gapMarkers: [],
  lastTick: null,
  reconnectMs: 500,
};

const chart = createChart($("chart"), {
  autoSize: true,
  layout: { background: { color: "#ffffff" }, textColor: "#1d2733" },
  timeScale: { timeVisible: true, secondsVisible: false, barSpacing: 10, rightOffset: 4 },
  grid: { vertLines: { color: "#f0f2f5" }, horzLines: { color: "#f0f2f5" } },
});
const series = chart.addSeries(CandlestickSeries, {
  upColor: "#1f9d55", downColor: "#d64545", wickUpColor: "#1f9d55", wickDownColor: "#d64545", borderVisible: false,
});
const markers = createSeriesMarkers(series, []);

// For tests and the curious: what the page has drawn.
window.nadiLive = {
  get ticks() { return state.ticks; },
  get candles() { return series.data().length; },
  get lastTick() { return state.lastTick; },
  get connected() { return state.ws !== null && state.ws.readyState === WebSocket.OPEN; },
};

function setStatus(text) { $("status").textContent = text; }

function istTime(ns) {
  const d = new Date(Number(BigInt(ns) / 1000000n) + IST_S * 1000);
  return d.toISOString().slice(11, 23);
}

function bucketOf(ns) { return Math.floor(Number(BigInt(ns) / 1000000000n) / 60) * 60 + IST_S; }

async function getJSON(url) {
  const r = await fetch(url, { headers });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function loadInstruments() {
  try {
    const body = await getJSON("/v1/instruments?limit=5000");
    const sel = $("instrument");
    for (const i of body.instruments) {
      const o = document.createElement("option");
      o.value = i.instrument_token;
      o.textContent = `${i.tradingsymbol} · ${i.exchange} · ${i.instrument_token}`;
      sel.appendChild(o);
    }
  } catch (e) {
    $("instrument").hidden = true; // no master: the token input is the picker
  }
}

async function loadCandles(token) {
  const end = new Date(Date.now() + 60_000);
  const start = new Date(Date.now() - 6 * 3600_000);
  const url = `/v1/candles?instrument_token=${token}&interval=1m&start=${encodeURIComponent(start.toISOString())}&end=${encodeURIComponent(end.toISOString())}`;
  const body = await getJSON(url);
  for (const c of body.candles) {
    const t = Math.floor(Date.parse(c.bucket) / 1000) + IST_S;
    state.candles.set(t, { time: t, open: c.open, high: c.high, low: c.low, close: c.close });
  }
  series.setData([...state.candles.values()].sort((a, b) => a.time - b.time));
}

async function loadGaps(token) {
  if (token !== state.token) return;
  try {
    const body = await getJSON(`/v1/gaps?status=open&instrument_token=${token}`);
    const ul = $("gaps");
    ul.replaceChildren();
    state.gapMarkers = [];
    for (const g of body.gaps) {
      const li = document.createElement("li");
      li.textContent = `${g.trading_day}: sequences ${g.from_seq}–${g.to_seq} missing (${g.repaired_count} filled)`;
      ul.appendChild(li);
      const t = Math.floor(Math.floor(Date.parse(g.detected_at) / 1000) / 60) * 60 + IST_S;
      state.gapMarkers.push({ time: t, position: "belowBar", color: "#d64545", shape: "circle", text: `gap ${g.from_seq}–${g.to_seq}` });
    }
    if (!body.gaps.length) ul.innerHTML = '<li class="muted">none</li>';
    drawMarkers();
  } catch (e) {
    $("gaps").innerHTML = '<li class="muted">(gaps unavailable)</li>';
  }
}

function drawMarkers() {
  const all = [...state.gapMarkers, ...state.staleMarkers].filter((m) => state.candles.has(m.time));
  all.sort((a, b) => a.time - b.time);
  markers.setMarkers(all);
}

function onTick(t) {
  if (t.instrument_token !== state.token) return;
  state.ticks += 1;
  state.lastTick = t;
  $("count").textContent = String(state.ticks);
  // Table: newest first, STALE and RECOVERED rows highlighted.
  const tr = document.createElement("tr");
  tr.className = t.status.toLowerCase();
  for (const v of [istTime(t.exchange_ts), t.sequence_id, t.last_price.toFixed(2), t.last_qty ?? "", t.status]) {
    const td = document.createElement("td");
    td.textContent = String(v);
    tr.appendChild(td);
  }
  const body = $("ticks");
  body.insertBefore(tr, body.firstChild);
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
  // Candle of the tick's minute.
  const b = bucketOf(t.exchange_ts);
  let c = state.candles.get(b);
  if (!c) {
    c = { time: b, open: t.last_price, high: t.last_price, low: t.last_price, close: t.last_price };
    state.candles.set(b, c);
    state.closeTs.set(b, t.exchange_ts);
  } else {
    c.high = Math.max(c.high, t.last_price);
    c.low = Math.min(c.low, t.last_price);
    // A late (RECOVERED) tick changes the close only if it is the minute's latest trade.
    if (t.exchange_ts >= (state.closeTs.get(b) ?? 0)) {
      c.close = t.last_price;
      state.closeTs.set(b, t.exchange_ts);
    }
  }
  const last = series.data().at(-1);
  if (!last || last.time <= b) series.update({ ...c });
  else series.setData([...state.candles.values()].sort((x, y) => x.time - y.time)); // late tick
  if (t.status === "RECOVERED") scheduleGapRefresh(); // a gap shrank or closed
  if (t.status === "STALE") {
    state.staleMarkers.push({ time: b, position: "aboveBar", color: "#f2b84b", shape: "arrowDown", text: `STALE #${t.sequence_id}` });
    if (state.staleMarkers.length > MAX_MARKERS) state.staleMarkers.shift();
    drawMarkers();
  }
}

let gapRefresh = null;
function scheduleGapRefresh() {
  if (gapRefresh) return;
  gapRefresh = setTimeout(() => { gapRefresh = null; loadGaps(state.token); }, 500);
}

function onMessage(m) {
  switch (m.type) {
    case "tick": onTick(m); break;
    case "synced": setStatus(`live · ${m.instrument_token}`); break;
    case "dropped": setStatus(`live · ${m.count} messages dropped (slow connection)`); break;
    case "error": setStatus(`error ${m.code}: ${m.message}`); break;
    default: break;
  }
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => {
    state.reconnectMs = 500;
    if (key) ws.send(JSON.stringify({ op: "auth", key }));
    setStatus("connected");
    if (state.token) subscribe(state.token, state.since);
  };
  ws.onmessage = (ev) => {
    const data = JSON.parse(ev.data); // one message, or an array of them when the client is behind
    if (Array.isArray(data)) data.forEach(onMessage); else onMessage(data);
  };
  ws.onclose = (ev) => {
    state.ws = null;
    setStatus(`disconnected (${ev.code}); retrying…`);
    setTimeout(connect, state.reconnectMs);
    state.reconnectMs = Math.min(state.reconnectMs * 2, 10_000);
  };
}

function subscribe(token, since) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  const m = { op: "subscribe", instruments: [token] };
  if (since) m.since = since;
  state.ws.send(JSON.stringify(m));
}

async function watch(token) {
  if (!Number.isInteger(token) || token <= 0) return;
  if (state.token && state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ op: "unsubscribe", instruments: [state.token] }));
  }
  Object.assign(state, { token, ticks: 0, lastTick: null, candles: new Map(), closeTs: new Map(), staleMarkers: [], gapMarkers: [], since: null });
  $("ticks").replaceChildren();
  $("count").textContent = "0";
  series.setData([]);
  history.replaceState(null, "", `?${new URLSearchParams({ ...(key ? { key } : {}), token })}`);
  setStatus(`loading ${token}…`);
  try {
    await loadCandles(token);
  } catch (e) {
    // No candle endpoint (or an instrument the master does not know yet): build the candles
    // from the ticks of the last 15 minutes, replayed by the hub.
    state.since = new Date(Date.now() - 15 * 60_000).toISOString();
  }
  subscribe(token, state.since);
  loadGaps(token);
}

$("pick").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const typed = parseInt($("token").value, 10);
  watch(Number.isInteger(typed) ? typed : parseInt($("instrument").value, 10));
});
$("instrument").addEventListener("change", () => {
  $("token").value = "";
  watch(parseInt($("instrument").value, 10));
});
setInterval(() => state.token && loadGaps(state.token), 10_000);

loadInstruments();
connect();
const initial = parseInt(new URLSearchParams(location.search).get("token") ?? "", 10);
if (Number.isInteger(initial)) watch(initial);
