// Drives the taskvm serve UI in headless Chromium: the task list shows TASK_ID; its page
// shows log lines arriving, a screenshot, and a noVNC console whose canvas draws the guest's
// screen. Prints one JSON line of findings (and the canvas as a PNG data URL) for the Rust
// test to judge. Usage: node console.mjs BASE_URL TASK_ID LOG_MARKER
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [base, taskId, marker] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'taskvm-chromium-'));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const findings = {};
try {
  const page = browser.pages()[0] || await browser.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(String(error)));
  await page.goto(`${base}/`);
  await page.waitForSelector(`a[href="/tasks/${taskId}"]`, { timeout: 15000 });
  findings.listed = true;
  await page.click(`a[href="/tasks/${taskId}"]`);
  await page.waitForURL(`**/tasks/${taskId}`);
  await page.waitForFunction((text) => document.getElementById('log').textContent.includes(text),
    marker, { timeout: 60000 });
  findings.logLine = true;
  await page.waitForFunction(() => {
    const image = document.getElementById('screenshot');
    return !image.hidden && image.complete && image.naturalWidth > 0;
  }, null, { timeout: 30000 });
  findings.screenshot = await page.evaluate(() => {
    const image = document.getElementById('screenshot');
    return { width: image.naturalWidth, height: image.naturalHeight };
  });
  await page.click('#open-console', { timeout: 15000 });
  await page.waitForSelector('#console[data-connected="true"] canvas', { timeout: 20000 });
  // Wait for the first full frame to be drawn: the canvas stops being one colour.
  await page.waitForFunction(() => {
    const canvas = document.querySelector('#console canvas');
    if (!canvas || canvas.width < 64) return false;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const first = data.slice(0, 3).join();
    for (let i = 0; i < data.length; i += 4 * 97) {
      if (data.slice(i, i + 3).join() !== first) return true;
    }
    return false;
  }, null, { timeout: 30000 });
  findings.canvas = await page.evaluate(() => {
    const canvas = document.querySelector('#console canvas');
    return { width: canvas.width, height: canvas.height, png: canvas.toDataURL('image/png') };
  });
  findings.problems = problems;
} catch (error) {
  findings.error = String(error);
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(findings));
