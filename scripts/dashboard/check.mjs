// Opens the dashboard in headless Chromium, waits until it has rendered data, and prints what the
// page shows (KPI texts, chart sizes) as JSON; saves a screenshot.
// Usage: node check.mjs URL SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [url, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push("request failed: " + r.url()));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForSelector("body[data-loaded='1']", { timeout: 15000 });
  const shown = await page.evaluate(() => {
    const t = (id) => document.getElementById(id)?.textContent ?? null;
    const p95 = {};
    for (const el of document.querySelectorAll("[id^='kpi-p95-']")) p95[el.id.slice(8)] = el.textContent;
    const canvas = (id) => {
      const c = document.getElementById(id);
      // A rendered chart has non-blank pixels.
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let ink = 0;
      for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
      return { ink, bars: c.dataset.bars ?? null, points: c.dataset.points ?? null };
    };
    return {
      hit_ratio: t("kpi-hit-ratio"), requests: t("kpi-requests"), cpm: t("kpi-cpm"),
      savings: t("kpi-savings"), errors: t("kpi-errors"), p95,
      routes: document.querySelectorAll("#routes tbody tr").length,
      recent: document.querySelectorAll("#recent tbody tr").length,
      chart_requests: canvas("chart-requests"), chart_cost: canvas("chart-cost"),
      external: [...document.querySelectorAll("script[src],link[href],img[src]")].map((e) => e.src || e.href),
    };
  });
  await page.screenshot({ path: shot, fullPage: true });
  shown.errors = errors;
  console.log(JSON.stringify(shown));
} finally {
  await browser.close();
}
