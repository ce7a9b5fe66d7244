// The dashboard at several window widths in headless Chromium.
//   node dashboard-widths.mjs <admin base url> <admin token> <screenshot prefix> <width>...
// Prints one JSON object: per width, whether the page scrolls sideways, the
// buttons that are off screen or covered, and each destination's circuit text.
import { chromium } from 'playwright-core';

const [, , base, token, prefix, ...widths] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const out = {};
for (const w of widths.map(Number)) {
  const page = await browser.newPage({ viewport: { width: w, height: 900 } });
  await page.goto(base + '/');
  await page.waitForSelector('#auth', { state: 'visible', timeout: 10000 });
  await page.fill('#token', token);
  await page.click('#token-save');
  await page.waitForSelector('#failed-table tbody tr[data-id]', { timeout: 10000 });
  await page.waitForSelector('#destinations-table tbody tr[data-name]', { timeout: 10000 });
  const seen = await page.evaluate(() => {
    const vw = window.innerWidth;
    const unusable = [];
    for (const b of document.querySelectorAll('button')) {
      if (b.offsetParent === null) continue; // hidden (e.g. the closed detail)
      b.scrollIntoView({ block: 'center', inline: 'nearest' });
      const r = b.getBoundingClientRect();
      const x = r.left + r.width / 2;
      const y = r.top + r.height / 2;
      const onScreen = r.left >= 0 && r.right <= vw && r.width > 0;
      const top = document.elementFromPoint(x, y);
      // A label broken over two lines ("Retr / y") is not usable either.
      const fontSize = parseFloat(getComputedStyle(b).fontSize) || 13;
      const wrapped = b.clientHeight > 1.6 * fontSize + 8;
      if (!onScreen || wrapped || !(top === b || b.contains(top))) {
        unusable.push(b.textContent + ' @' + Math.round(r.left) + '..' + Math.round(r.right)
          + (wrapped ? ' wrapped' : ''));
      }
    }
    const scrolled = [...document.querySelectorAll('.scroll')]
      .filter((d) => d.scrollWidth > d.clientWidth + 1).map((d) => d.firstElementChild.id);
    const circuits = {};
    for (const tr of document.querySelectorAll('#destinations-table tbody tr[data-name]')) {
      circuits[tr.dataset.name] = tr.querySelector('td.circuit').textContent;
    }
    return {
      pageScrollsSideways: document.documentElement.scrollWidth > vw,
      unusable, scrolled, circuits,
    };
  });
  await page.screenshot({ path: prefix + '-' + w + '.png', fullPage: true });
  out[w] = seen;
  await page.close();
}
console.log(JSON.stringify(out));
await browser.close();
