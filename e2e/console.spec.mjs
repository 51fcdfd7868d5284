// Ledgerflow admin console, end to end in headless Chromium (playwright-core driving Debian's chromium).
//
// Run by workers/tests/console_e2e.rs, which starts Postgres, the admin listener and a real job
// runner, seeds an operator and dead jobs, then checks the database after this script exits 0:
//
//   node e2e/console.spec.mjs <admin base url> <operator credential> <queue> <reason> <viewer credential>
//
// The script: checks the console's security headers; signs in with a wrong credential and expects
// a visible 401 error; signs in properly; finds the dead jobs of <queue> with the filters (markup
// in their args/errors must stay text); opens the target job, retries it with <reason> through the
// reason dialog, and waits until the runner has completed it; finds the retry in the audit log;
// checks that a credential refused mid-session signs out visibly; finally signs in as a viewer,
// expects the page to name the viewer and their role, the operator-only buttons disabled and the
// Access panel left out of the navigation, and a retry forced through the disabled button to be
// refused visibly by the API with 403, the session kept.
// It prints `target=<job id>` so the caller can check it picked the right job.
// CHROMIUM overrides the browser path (default /usr/bin/chromium); E2E_SCREENSHOTS=<dir> saves a
// screenshot of each main view there (to look at the console without running it by hand).
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [baseUrl, token, queue, reason, viewerToken] = process.argv.slice(2);
if (!baseUrl || !token || !queue || !reason || !viewerToken) {
  console.error('usage: node console.spec.mjs <admin base url> <operator credential> <queue> <reason> <viewer credential>');
  process.exit(64);
}
const TOTAL_BUDGET_MS = 90_000;
const STEP_TIMEOUT_MS = 15_000;

// A hard stop, so a hung browser fails the run instead of hanging CI.
const watchdog = setTimeout(() => {
  console.error(`console e2e: FAILED: no result within ${TOTAL_BUDGET_MS / 1000}s`);
  process.exit(3);
}, TOTAL_BUDGET_MS);

let step = 'start';
const shots = process.env.E2E_SCREENSHOTS;
async function shot(page, name) {
  if (shots) await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}
function check(condition, message) {
  if (!condition) throw new Error(`${step}: ${message}`);
}

const profile = mkdtempSync(join(tmpdir(), 'ledgerflow-e2e-'));
// A fresh profile per run (playwright's persistent context is how it takes a user-data-dir).
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    // Containers often have a tiny /dev/shm; Chromium crashes on it without this.
    '--disable-dev-shm-usage',
  ],
});
const problems = [];
let exitCode = 0;
try {
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  // Script errors and CSP violations (reported as console errors) fail the run. Failed API
  // calls (the 401s this script provokes on purpose) are logged as resource errors: skip those.
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console error: ${m.text()}`);
  });
  const console_ = `${baseUrl}/console/`;

  step = 'security headers';
  const resp = await page.request.get(console_);
  check(resp.status() === 200, `GET /console/ answered ${resp.status()}`);
  const csp = resp.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && csp.includes("default-src 'none'"), `weak CSP: ${csp}`);
  check(resp.headers()['x-content-type-options'] === 'nosniff', 'no nosniff');

  step = 'root redirects to the console';
  await page.goto(`${baseUrl}/`);
  check(new URL(page.url()).pathname === '/console/', `landed on ${page.url()}`);
  await page.locator('#login-view').waitFor({ state: 'visible' });

  step = 'a wrong credential is refused visibly';
  await page.fill('#login-token', 'lfa_this_is_not_a_real_credential');
  await page.click('#login-submit');
  await page.locator('#login-error').waitFor({ state: 'visible' });
  const loginError = await page.textContent('#login-error');
  check(/401/.test(loginError) && /refused/i.test(loginError), `login error says: ${loginError}`);
  check(await page.locator('#nav').isHidden(), 'navigation shown after a refused sign-in');
  check((await page.evaluate(() => sessionStorage.length)) === 0, 'a refused credential was stored');

  step = 'sign in';
  await page.fill('#login-token', token);
  await page.click('#login-submit');
  await page.locator('#nav').waitFor({ state: 'visible' });
  await page.locator('#jobs-table').waitFor();
  step = 'the page shows who is signed in and what the role may do';
  const who = await page.textContent('#who');
  check(/signed in as .+ \(operator\)/.test(who), `who: ${who}`);
  check(await page.locator('#bulk-retry').isEnabled(), 'an operator\'s bulk retry is disabled');
  check(await page.locator('#nav a[data-view="access"]').isHidden(), 'an operator is offered the Access panel');

  step = 'find the dead jobs with the filters';
  await page.fill('#f-queue', queue);
  await page.selectOption('#f-state', 'failed,discarded');
  await page.click('#f-apply');
  await page.waitForFunction((q) => window.location.hash.includes(`queue=${q}`), queue);
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll('#jobs-table tbody tr');
    return rows.length > 0 && [...rows].every((r) => ['failed', 'discarded'].includes(r.dataset.state));
  });
  const rows = await page.locator('#jobs-table tbody tr').evaluateAll((trs) => trs.map((r) => ({ id: r.dataset.id, state: r.dataset.state, text: r.textContent })));
  check(rows.length === 2, `expected the 2 dead jobs of ${queue}, got ${rows.length}: ${JSON.stringify(rows)}`);

  step = 'server data stays text';
  const hostile = rows.find((r) => r.text.includes('<img src=x onerror='));
  check(hostile, 'the hostile error text is not shown literally');
  check((await page.locator('#app-view img, #app-view script').count()) === 0, 'server data became markup');
  check((await page.evaluate(() => window.__lf_xss)) === undefined, 'injected script ran');
  check(hostile.text.includes('bc1q\\u202Elacol-kcatta'), `the bidi override is not shown as an escape: ${JSON.stringify(hostile.text)}`);
  check(!hostile.text.includes('\u202e'), 'a raw bidi override reached the page');

  step = 'narrow to the target by searching its args';
  await page.fill('#f-q', 'e2e-target');
  await page.click('#f-apply');
  await page.waitForFunction(() => document.querySelectorAll('#jobs-table tbody tr').length === 1
    && window.location.hash.includes('q=e2e-target'));
  const target = await page.getAttribute('#jobs-table tbody tr', 'data-id');
  await shot(page, 'jobs');
  console.log(`target=${target}`);

  step = 'job detail shows the failed attempt';
  await page.click(`#jobs-table a[href="#/jobs/${target}"]`);
  await page.locator('#job-state').waitFor();
  check((await page.textContent('#job-state')) === 'discarded', `state is ${await page.textContent('#job-state')}`);
  check((await page.locator('#attempts-table tbody tr').count()) === 1, 'expected one recorded attempt');
  const attemptError = await page.textContent('#attempts-table tbody tr');
  check(attemptError.includes('exchange unavailable'), `attempt row: ${attemptError}`);

  step = 'retry asks for a reason';
  await page.click('#job-retry');
  await page.locator('#reason-dialog').waitFor({ state: 'visible' });
  await page.click('#reason-confirm'); // empty: must not submit
  await shot(page, 'reason-dialog');
  check(await page.locator('#reason-dialog').isVisible(), 'the dialog closed without a reason');
  await page.fill('#reason-input', reason);
  await page.click('#reason-confirm');
  await page.locator('#reason-dialog').waitFor({ state: 'hidden' });
  await page.waitForFunction(() => {
    const b = document.getElementById('banner');
    return !b.hidden && b.textContent.length > 0;
  });
  const banner = await page.textContent('#banner');
  check(/retry/i.test(banner) && /audit/i.test(banner) && (await page.getAttribute('#banner', 'class')) === 'banner ok', `banner: ${banner}`);

  step = 'the runner completes the retried job (the page follows it)';
  await page.waitForFunction(() => {
    const s = document.getElementById('job-state');
    return s && s.textContent === 'completed';
  }, null, { timeout: 30_000 });
  await shot(page, 'job-completed');
  step = 'an error left from before the retry is marked as history';
  if (await page.locator('#job-last-error').count()) {
    const note = await page.locator('#job-last-error-note').textContent();
    check(/earlier attempt/.test(note || '') && /completed/.test(note || ''), `last-error note: ${note}`);
  }

  step = 'the retry is in the audit log';
  await page.click(`a[href="#/audit?target_type=job&target_id=${target}"]`);
  await page.waitForFunction(() => document.querySelectorAll('#audit-table tbody tr').length > 0);
  const audit = await page.locator('#audit-table tbody tr').evaluateAll((trs) => trs.map((r) => ({ action: r.dataset.action, text: r.textContent })));
  check(audit.length === 1 && audit[0].action === 'job.retry' && audit[0].text.includes(reason), `audit rows: ${JSON.stringify(audit)}`);

  step = 'the failed workflow shows its journal';
  await page.click('#nav a[data-view="workflows"]');
  await page.waitForFunction(() => document.querySelectorAll('#workflows-table tbody tr[data-state="failed"]').length === 1);
  const workflow = await page.getAttribute('#workflows-table tbody tr[data-state="failed"]', 'data-id');
  console.log(`workflow=${workflow}`);
  await page.click(`#workflows-table a[href="#/workflows/${workflow}"]`);
  await page.locator('#workflow-state').waitFor();
  check((await page.textContent('#workflow-state')) === 'failed', `state is ${await page.textContent('#workflow-state')}`);
  const journal = await page.locator('#steps-table tbody tr').evaluateAll((trs) => trs.map((r) => `${r.dataset.step}:${r.dataset.status}`));
  check(journal.join(',') === 'reserve:completed,charge:failed', `journal: ${journal.join(',')}`);
  check((await page.textContent('#steps-table tr[data-step="charge"]')).includes('card network down'), 'the step error is not shown');

  step = 'retry the workflow and see it complete';
  await page.click('#workflow-retry');
  await page.fill('#reason-input', reason);
  await page.click('#reason-confirm');
  await page.waitForFunction(() => {
    const s = document.getElementById('workflow-state');
    return s && s.textContent === 'completed';
  }, null, { timeout: 30_000 });
  check((await page.getAttribute('#banner', 'class')) === 'banner ok', `banner: ${await page.textContent('#banner')}`);
  await shot(page, 'workflow-completed');

  // Every other panel loads against the real API without an error.
  const panels = [
    ['queues', 'Queues', '#queues-table'],
    ['workflows', 'Workflows', '#workflows-table'],
    ['cron', 'Cron schedules', null],
    ['flow', 'Flow limits', '#flow-table'],
    ['dead-letters', 'Dead letters', '#dead-jobs-table'],
    ['approvals', 'Withdrawal approvals', null],
    ['policy', 'Withdrawal policy', '#policy-table'],
  ];
  for (const [view, title, tableId] of panels) {
    step = `the ${view} panel loads`;
    await page.click(`#nav a[data-view="${view}"]`);
    await page.waitForFunction((t) => {
      const h = document.querySelector('#app-view h1');
      return h && h.textContent === t;
    }, title);
    const errors = await page.locator('#app-view .error').allTextContents();
    check(errors.length === 0, `errors: ${errors.join(' | ')}`);
    if (tableId) await page.locator(tableId).waitFor();
    await shot(page, view);
  }
  step = 'the queues panel counts the queue';
  await page.click('#nav a[data-view="queues"]');
  await page.locator(`#queues-table tbody tr[data-queue="${queue}"]`).waitFor();
  const queueRow = await page.locator(`#queues-table tbody tr[data-queue="${queue}"] td`).allTextContents();
  // scheduled … discarded: the retried job and the plain one completed, the hostile one dead.
  check(queueRow.join('|') === `${queue}|active|0|0|0|0|2|0|0|1|Pause…`, `queue row: ${queueRow.join('|')}`);
  step = 'the dead-letters panel lists the other dead job';
  await page.click('#nav a[data-view="dead-letters"]');
  await page.locator(`#dead-jobs-table tr[data-id="${hostile.id}"]`).waitFor();
  check((await page.locator(`#dead-jobs-table tr[data-id="${target}"]`).count()) === 0, 'the completed job is still listed as dead');

  step = 'a credential refused mid-session signs out visibly';
  await page.evaluate(() => sessionStorage.setItem('ledgerflow.admin.token', 'lfa_revoked_meanwhile'));
  await page.click('#nav a[data-view="queues"]');
  await page.locator('#login-view').waitFor({ state: 'visible' });
  const signedOut = await page.textContent('#login-error');
  check(/401/.test(signedOut), `sign-out message: ${signedOut}`);
  await shot(page, 'signed-out');
  check((await page.evaluate(() => sessionStorage.getItem('ledgerflow.admin.token'))) === null, 'the refused credential was kept');

  step = 'a viewer sees their role and the operator buttons disabled';
  await page.fill('#login-token', viewerToken);
  await page.click('#login-submit');
  await page.locator('#nav').waitFor({ state: 'visible' });
  const viewerWho = await page.textContent('#who');
  check(/signed in as .+ \(viewer\)/.test(viewerWho), `who: ${viewerWho}`);
  check(await page.locator('#nav a[data-view="access"]').isHidden(), 'a viewer is offered the Access panel');
  await page.evaluate((id) => { window.location.hash = `#/jobs/${id}`; }, hostile.id);
  await page.locator('#job-state').waitFor();
  check(await page.locator('#job-retry').isDisabled(), 'a viewer\'s retry button is enabled');
  const hint = await page.getAttribute('#job-retry', 'title');
  check(/viewer/.test(hint || ''), `the disabled retry does not say why: ${hint}`);
  await page.click('#nav a[data-view="policy"]');
  await page.locator('#policy-table').waitFor();
  check(await page.locator('#policy-table button[data-needs="administer"]').first().isDisabled(),
    'a viewer may edit the withdrawal policy');

  step = 'a viewer is refused a retry visibly (403) and stays signed in';
  // The buttons are hints: force the disabled one, and the API still refuses.
  await page.evaluate((id) => { window.location.hash = `#/jobs/${id}`; }, hostile.id);
  await page.locator('#job-state').waitFor();
  await page.evaluate(() => { document.getElementById('job-retry').disabled = false; });
  await page.click('#job-retry');
  await page.fill('#reason-input', 'a viewer tries');
  await page.click('#reason-confirm');
  await page.waitForFunction(() => {
    const b = document.getElementById('banner');
    return !b.hidden && /403/.test(b.textContent);
  });
  check((await page.getAttribute('#banner', 'class')) === 'banner', 'the refusal is not shown as an error');
  check(await page.locator('#nav').isVisible(), 'a 403 signed the viewer out');
  check((await page.textContent('#job-state')) === 'discarded', 'the job changed anyway');
  await shot(page, 'viewer-403');

  step = 'no script errors or CSP violations';
  check(problems.length === 0, problems.join('\n'));
  console.log('console e2e: ok');
} catch (e) {
  exitCode = 1;
  console.error(`console e2e: FAILED at step "${step}": ${e && e.message ? e.message : e}`);
  if (problems.length) console.error(problems.join('\n'));
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  clearTimeout(watchdog);
}
process.exit(exitCode);
