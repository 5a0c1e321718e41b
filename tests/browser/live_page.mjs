// Drives the live page in headless Chromium (system package, via playwright-core) for
// tests/test_live_page.py. Usage: node live_page.mjs <page url> <instrument token> <screenshot>
// Prints one JSON object: what the page showed.
import { chromium } from "playwright-core";

const [url, token, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
  ],
});
const result = { errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  page.on("pageerror", (e) => result.errors.push(String(e)));
  await page.goto(url, { waitUntil: "load" });
  // Pick the instrument from the list (served by /v1/instruments).
  await page.waitForSelector(`#instrument option[value="${token}"]`, { state: "attached", timeout: 15000 });
  await page.selectOption("#instrument", token);
  await page.waitForFunction(() => window.nadiLive.ticks >= 20 && window.nadiLive.candles >= 1, null, { timeout: 30000 });
  await page.waitForSelector("#ticks tr.stale", { timeout: 30000 });
  // Let a few more ticks arrive, then look at the drawing.
  await page.waitForTimeout(1000);
  Object.assign(result, await page.evaluate(() => {
    // Candle colours drawn on any of the chart's canvases (the library layers several).
    let coloured = 0;
    for (const c of document.querySelectorAll("#chart canvas")) {
      const ctx = c.getContext("2d");
      if (!ctx || !c.width || !c.height) continue;
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) {
        const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
        if (a > 0 && ((g > 120 && r < 80 && b < 120) || (r > 180 && g < 100 && b < 100))) coloured++;
      }
    }
    return {
      ticks: window.nadiLive.ticks,
      candles: window.nadiLive.candles,
      connected: window.nadiLive.connected,
      rows: document.querySelectorAll("#ticks tr").length,
      staleRows: document.querySelectorAll("#ticks tr.stale").length,
      staleBackground: getComputedStyle(document.querySelector("#ticks tr.stale td")).backgroundColor,
      colouredPixels: coloured,
      status: document.getElementById("status").textContent,
      gaps: [...document.querySelectorAll("#gaps li")].map((li) => li.textContent),
      lastSeq: window.nadiLive.lastTick && window.nadiLive.lastTick.sequence_id,
    };
  }));
  await page.screenshot({ path: shot, fullPage: true });
} catch (e) {
  result.errors.push(String(e && e.stack || e));
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
