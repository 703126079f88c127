// Opens the dashboard in headless Chromium and prints what it shows, as JSON:
// `node dashboard.mjs URL KEY SCREENSHOT_PATH`. Exits non-zero on any page error.
import puppeteer from "puppeteer-core";

const [url, key, screenshot] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const errors = [];
let bytes = 0;
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 390, height: 1400 }); // a phone's width
  page.on("pageerror", (error) => errors.push(`page error: ${error}`));
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(`console: ${message.text()}`);
  });
  const cdp = await page.createCDPSession();
  await cdp.send("Network.enable");
  cdp.on("Network.loadingFinished", (event) => { bytes += event.encodedDataLength; });
  await page.evaluateOnNewDocument((key) => localStorage.setItem("tally.key", key), key);
  const started = Date.now();
  await page.goto(url, { waitUntil: "load" });
  // The counts, the chart, and the health panel's first poll (which fills "errors" only
  // once /metrics answers, after "ready"): the parts load independently.
  await page.waitForFunction(() => window.tallyFirstChartMs != null && document.getElementById("count").textContent !== "–"
    && document.getElementById("errors").textContent !== "–");
  const firstLoadBytes = bytes;
  const shown = await page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    const canvas = document.querySelector("#chart canvas");
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) painted++;
    return {
      count: text("count"), countHour: text("count-hour"), uniques: text("uniques"),
      stats: [...document.querySelectorAll("#stats tr")].map((row) => row.textContent),
      top: [...document.querySelectorAll("#top a")].map((a) => a.textContent),
      chartWidth: canvas.width, chartPainted: painted, firstChartMs: window.tallyFirstChartMs,
      message: text("message"), ready: text("ready"), errors: text("errors"),
    };
  });
  // The health panel fills on its second poll (a rate needs two readings).
  await page.waitForFunction(() => document.getElementById("ingest-rate").textContent !== "–", { timeout: 10000 });
  shown.ingestRate = await page.evaluate(() => document.getElementById("ingest-rate").textContent);
  shown.firstLoadBytes = firstLoadBytes;
  shown.firstChartWallMs = Date.now() - started;
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(shown));
} finally {
  await browser.close();
}
if (errors.length) {
  console.error(errors.join("\n"));
  process.exit(1);
}
