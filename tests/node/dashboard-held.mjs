// Reads one destination's "held" cell on the dashboard in headless Chromium.
//   node dashboard-held.mjs <admin base url> <admin token> <destination>
// Prints {held, title, actions, rowTitle, waiting, error}: the cell's text,
// its hover text, the row's buttons, the row's hover text (why its state
// cannot be read), the page's waiting count and its error line.
import { chromium } from 'playwright-core';

const [, , base, token, name] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage();
await page.goto(base + '/');
await page.waitForSelector('#auth', { state: 'visible', timeout: 10000 });
await page.fill('#token', token);
await page.click('#token-save');
const cell = page.locator(`#destinations-table tbody tr[data-name="${name}"] td.held`);
await cell.waitFor({ timeout: 10000 });
await page.waitForFunction((n) => {
  const td = document.querySelector(`#destinations-table tbody tr[data-name="${n}"] td.held`);
  return td && td.textContent !== '0' && td.textContent !== '-';
}, name, { timeout: 10000 });
const held = (await cell.textContent()).trim();
const title = await cell.getAttribute('title');
const actions = await page
  .locator(`#destinations-table tbody tr[data-name="${name}"] td.actions button`)
  .allTextContents();
const rowTitle = await page
  .locator(`#destinations-table tbody tr[data-name="${name}"]`)
  .getAttribute('title');
const waiting = (await page.locator('#count-waiting').textContent()).trim();
const error = (await page.locator('#error').textContent()).trim();
console.log(JSON.stringify({ held, title, actions, rowTitle, waiting, error }));
await browser.close();
