// Drives headless Chromium through the beacon's test page (see ../browser.rs):
// `node beacon.mjs PAGE_URL SCREENSHOT_PATH`. Exits non-zero on any page error.
import puppeteer from "puppeteer-core";

const [pageUrl, screenshot] = process.argv.slice(2);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in CI has no user namespace sandbox.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const errors = [];
try {
  const page = await browser.newPage();
  page.on("pageerror", (error) => errors.push(`page error: ${error}`));
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(`console: ${message.text()}`);
  });
  const loaded = () => page.waitForFunction(() => window.tally && window.tally.flush);

  await page.goto(pageUrl, { waitUntil: "load" });
  await loaded();
  // Queued under the batch delay; the reload's pagehide sends them.
  await page.evaluate(() => {
    tally.track("beacon-1");
    tally.track("beacon-1");
    tally.track("beacon-1");
    tally.track("beacon-2", "like");
  });
  await page.reload({ waitUntil: "load" });
  await loaded();
  // One sent by the batch timer, one when the page is left.
  await page.evaluate(() => tally.track("beacon-1"));
  await sleep(1500);
  await page.evaluate(() => tally.track("beacon-1"));
  await page.screenshot({ path: screenshot });
  await page.goto("about:blank");
  // Beacons are sent after the page is gone; give them a moment before the browser goes.
  await sleep(1000);
} finally {
  await browser.close();
}
if (errors.length) {
  console.error(errors.join("\n"));
  process.exit(1);
}
console.log("browser run complete");
