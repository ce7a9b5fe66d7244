// Drives the dashboard in headless Chromium (system chromium, playwright-core).
//   node dashboard.mjs <admin base url> <admin token> <screenshot path>
// Prints one JSON object with what it saw.
import { chromium } from 'playwright-core';

const [, , base, token, shot] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage();
let dialogs = 0;
page.on('dialog', (d) => { dialogs += 1; d.dismiss(); });
await page.goto(base + '/');
// The token is asked for when ADMIN_TOKEN is set.
await page.waitForSelector('#auth', { state: 'visible', timeout: 10000 });
await page.fill('#token', token);
await page.click('#token-save');
await page.waitForSelector('#failed-table tbody tr[data-id]', { timeout: 10000 });
const failedBefore = (await page.textContent('#count-failed')).trim();

// The job whose payload carries markup: shown as text, never run.
await page.locator('#failed-table tbody tr', { hasText: 'xss' }).locator('button.show').click();
await page.waitForFunction(() => document.querySelector('#payload').textContent.length > 0);
const payloadText = await page.textContent('#payload');
const pwned = await page.evaluate(() => window.__pwned === true);

// Retry a failed job from its button; the failed count goes down.
await page.locator('#failed-table tbody tr', { hasText: 'retry-me' }).locator('button.retry').click();
await page.waitForFunction((before) => document.querySelector('#count-failed').textContent.trim() !== before,
  failedBefore, { timeout: 15000 });
const failedAfter = (await page.textContent('#count-failed')).trim();
const sparkline = await page.isVisible('#sparkline');
// The chart is the relay's history: what failed before the page was opened.
const rate = await page.textContent('#rate');
// Each destination with its circuit; Pause turns into Resume.
const row = page.locator('#destinations-table tbody tr[data-name="default"]');
await row.waitFor({ timeout: 10000 });
const circuit = (await row.locator('td.circuit').textContent()).trim();
await row.locator('button.pause').click();
await page.waitForFunction(() => {
  const td = document.querySelector('#destinations-table tbody tr[data-name="default"] td.paused');
  return td && td.textContent === 'yes';
}, null, { timeout: 10000 });
const pausedShown = true;
await page.locator('#destinations-table tbody tr[data-name="default"] button.resume').click();
await page.waitForFunction(() => {
  const td = document.querySelector('#destinations-table tbody tr[data-name="default"] td.paused');
  return td && td.textContent === 'no';
}, null, { timeout: 10000 });
// An action the relay refuses (what a Retry button does, for a job that is
// gone): its error is still on the page after the refreshes that follow.
await page.evaluate(() => act('/admin/jobs/999999/retry', 'POST'));
for (let i = 0; i < 2; i += 1) {
  const seen = await page.textContent('#status');
  await page.waitForFunction((s) => document.querySelector('#status').textContent !== s, seen, { timeout: 10000 });
}
const actionError = (await page.textContent('#error')).trim();
await page.screenshot({ path: shot, fullPage: true });
console.log(JSON.stringify({ failedBefore, failedAfter, payloadText, pwned, dialogs, sparkline, rate, circuit, pausedShown, actionError }));
await browser.close();
