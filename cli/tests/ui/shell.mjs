// Drives a shell button of a taskvm serve page in headless Chromium ("Open shell", "Resume for
// debugging"): clicks it, types a command with the keyboard and waits for its answer in the
// terminal. Prints one JSON line of findings for the Rust test to judge.
// Usage: node shell.mjs BASE_URL PAGE_PATH BUTTON_SELECTOR COMMAND ANSWER
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [base, pagePath, button, command, answer] = process.argv.slice(2);
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
  await page.goto(`${base}${pagePath}`);
  await page.click(button, { timeout: 30000 });
  await page.waitForSelector('#terminal[data-connected="true"]', { timeout: 30000 });
  findings.connected = true;
  // The shell's prompt, then the command typed key by key.
  const screen = () => document.querySelector('#terminal .xterm-rows')?.innerText ?? '';
  await page.waitForFunction(() => (document.querySelector('#terminal .xterm-rows')?.innerText ?? '')
    .includes('#'), null, { timeout: 30000 });
  await page.click('#terminal');
  await page.keyboard.type(command);
  await page.keyboard.press('Enter');
  await page.waitForFunction((wanted) => (document.querySelector('#terminal .xterm-rows')?.innerText ?? '')
    .split('\n').some((line) => line.trim() === wanted), answer, { timeout: 30000 });
  findings.answered = true;
  findings.screen = await page.evaluate(screen);
  findings.problems = problems;
} catch (error) {
  findings.error = String(error);
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(findings));
