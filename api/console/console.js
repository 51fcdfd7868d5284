/*
 * Ledgerflow admin console: a vanilla-JS client of the admin API on the same origin.
 *
 * No framework and no build step: the admin listener serves this file as it is (embedded in the
 * binary). Rules this file keeps:
 * - server data only ever reaches the page as text (`textContent`, text nodes, attribute values
 *   set through the DOM), never as markup — job args and error texts are attacker-influenced;
 * - that text shows what it holds: hidden characters (controls, bidi overrides, zero-width
 *   characters) become visible `\uXXXX` escapes (`visible`), and every cell is a bidi
 *   isolate (console.css), so no value can reorder what is shown around it;
 * - the admin credential lives in sessionStorage (this tab only, gone when it closes) and is sent
 *   as the bearer header; a 401 anywhere signs out with a visible message, a 403 is shown as an
 *   error and keeps the session;
 * - the API is the authority: buttons are hints, every action is authorized, validated and audited
 *   server-side, and every mutation asks for the reason the API requires. The signed-in admin's
 *   role (`GET /v1/me`) only decides which buttons are enabled (`needs: 'operate'` …) and which
 *   panels the navigation offers.
 *
 * `panels.js` (loaded after this file) adds the Policy and Access panels through the small
 * `window.ledgerflowConsole` interface this file exposes.
 */
'use strict';

(() => {
  const TOKEN_KEY = 'ledgerflow.admin.token';
  // Relative to /console/, so the console also works behind a path prefix.
  const API_BASE = '../v1';
  const JOB_STATES = ['scheduled', 'available', 'running', 'retryable', 'completed', 'failed', 'cancelled', 'discarded'];
  const JOB_ACTIVE = new Set(['scheduled', 'available', 'running', 'retryable']);
  const RETRY_FROM = new Set(['scheduled', 'available', 'retryable', 'failed', 'cancelled', 'discarded']);
  const CANCEL_FROM = new Set(['scheduled', 'available', 'running', 'retryable']);
  const DISCARD_FROM = new Set(['scheduled', 'available', 'running', 'retryable', 'failed']);
  const WORKFLOW_ACTIVE = new Set(['running', 'waiting', 'compensating']);
  const WORKFLOW_DONE = new Set(['completed', 'cancelled', 'compensated']);
  const REFRESH_MS = 1500;

  const $ = (id) => document.getElementById(id);

  /** The signed-in admin (`GET /v1/me`): name, role, permissions. Null until known. */
  let me = null;

  /** Whether the signed-in admin's role has `permission` (true while unknown: the API decides). */
  function can(permission) {
    return !me || (me.permissions || []).includes(permission);
  }

  // Characters that hide themselves or change how the text around them reads: C0/C1 controls
  // (but tab and line feed), bidi embeddings/overrides/isolates/marks, zero-width and other
  // invisible format characters. `bc1q\u202Elacol-kcatta` would read as `bc1qattack-local`.
  const HIDDEN = /[\u0000-\u0008\u000B-\u001F\u007F-\u009F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8\u{E0000}-\u{E0FFF}]/gu;

  /** Text with every hidden character written as a visible `\uXXXX` escape. */
  function visible(text) {
    return String(text).replace(HIDDEN, (c) => '\\u' + c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0'));
  }

  // ------------------------------------------------------------------ DOM helpers

  /** Builds an element. Strings and numbers become text nodes; `on*` attrs become listeners. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith('on') && typeof value === 'function') {
        node.addEventListener(key.slice(2).toLowerCase(), value);
      } else if (key === 'class') {
        node.className = value;
      } else if (key === 'needs') {
        // A right the action needs: disabled (with the reason as its title) when the role lacks it.
        node.dataset.needs = value;
        if (!can(value)) {
          node.disabled = true;
          node.title = 'Your role (' + (me ? me.role : '?') + ') may not ' + value;
        }
      } else if (key === 'text') {
        node.textContent = visible(value);
      } else if (value === true) {
        node.setAttribute(key, '');
      } else {
        node.setAttribute(key, String(value));
      }
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(visible(child)));
    }
  }

  function stateBadge(state, id) {
    return el('span', { class: 'state state-' + String(state).replace(/[^a-z_]/g, ''), id }, String(state));
  }

  function time(value) {
    if (!value) return '';
    const d = new Date(value);
    return Number.isNaN(d.getTime()) ? String(value) : d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function json(value) {
    return JSON.stringify(value, null, 2);
  }

  function scalar(value) {
    if (value === null || value === undefined) return '';
    if (typeof value === 'object') return JSON.stringify(value);
    if (typeof value === 'string' && /^\d{4}-\d\d-\d\dT\d\d:\d\d/.test(value)) return time(value);
    return String(value);
  }

  /** A table; `columns` are [header, (row) => cell content]. */
  function table(id, columns, rows, rowAttrs) {
    return el('table', { id },
      el('thead', null, el('tr', null, columns.map(([h]) => el('th', null, h)))),
      el('tbody', null, rows.map((row) =>
        el('tr', rowAttrs ? rowAttrs(row) : null, columns.map(([, cell, cls]) => el('td', { class: cls }, cell(row)))))));
  }

  /** Every field of an object as a definition list (objects as JSON text). */
  function fields(obj, skip) {
    const dl = el('dl', { class: 'fields' });
    for (const [key, value] of Object.entries(obj || {})) {
      if (skip && skip.includes(key)) continue;
      const shown = value !== null && typeof value === 'object' ? el('pre', null, json(value)) : scalar(value);
      append(dl, [el('dt', null, key), el('dd', { 'data-field': key }, shown)]);
    }
    return dl;
  }

  /** The preferred keys present in any item, or the scalar keys of the first one. */
  function pickColumns(items, preferred) {
    const present = preferred.filter((k) => items.some((it) => it && Object.prototype.hasOwnProperty.call(it, k)));
    if (present.length) return present;
    const first = items[0] || {};
    return Object.keys(first).filter((k) => first[k] === null || typeof first[k] !== 'object').slice(0, 8);
  }

  // ------------------------------------------------------------------ banner

  function showBanner(message, ok) {
    const b = $('banner');
    b.textContent = visible(message);
    b.className = ok ? 'banner ok' : 'banner';
    b.hidden = false;
  }

  function clearBanner() {
    $('banner').hidden = true;
  }

  function describe(err) {
    if (err instanceof ApiError) return err.message;
    return 'Unexpected error: ' + (err && err.message ? err.message : String(err));
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, problem) {
      const title = problem && problem.title ? problem.title : 'Error';
      const detail = problem && problem.detail ? problem.detail : '';
      super((status ? status + ' ' : '') + title + (detail ? ': ' + detail : ''));
      this.status = status;
      this.problem = problem || {};
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }

  /** Calls the admin API. A 401 signs out (unless `opts.token` is a candidate being tried). */
  async function api(method, path, opts) {
    const o = opts || {};
    const url = new URL(API_BASE + path, window.location.href);
    for (const [k, v] of Object.entries(o.query || {})) {
      if (v !== undefined && v !== null && v !== '') url.searchParams.set(k, String(v));
    }
    const headers = { Accept: 'application/json', Authorization: 'Bearer ' + (o.token || token()) };
    if (o.body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(url, {
        method,
        headers,
        body: o.body === undefined ? undefined : JSON.stringify(o.body),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (e) {
      throw new ApiError(0, { title: 'Network error', detail: e && e.message ? e.message : String(e) });
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const problem = data && typeof data === 'object' ? data : { title: resp.statusText || 'HTTP error', detail: text.slice(0, 300) };
      const err = new ApiError(resp.status, problem);
      if (resp.status === 401 && !o.token) signOut('Signed out: the admin API refused the credential (' + err.message + ').');
      throw err;
    }
    return data;
  }

  // ------------------------------------------------------------------ reason dialog

  /** Asks for the reason a mutation needs; resolves to the text, or null when cancelled. */
  function askReason(title, detail) {
    const dialog = $('reason-dialog');
    const input = $('reason-input');
    $('reason-title').textContent = visible(title);
    $('reason-detail').textContent = visible(detail || '');
    input.value = '';
    return new Promise((resolve) => {
      const done = (value) => {
        $('reason-form').removeEventListener('submit', onSubmit);
        $('reason-cancel').removeEventListener('click', onCancel);
        dialog.removeEventListener('cancel', onCancel);
        if (dialog.open) dialog.close();
        resolve(value);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const reason = input.value.trim();
        if (!reason) {
          input.focus();
          return;
        }
        done(reason);
      };
      const onCancel = (e) => {
        e.preventDefault();
        done(null);
      };
      $('reason-form').addEventListener('submit', onSubmit);
      $('reason-cancel').addEventListener('click', onCancel);
      dialog.addEventListener('cancel', onCancel);
      dialog.showModal();
      input.focus();
    });
  }

  /** Asks for a reason, runs `call(reason)`, reports the outcome, then `after()`. */
  async function mutate(title, detail, call, success, after) {
    const reason = await askReason(title, detail);
    if (reason === null) return;
    try {
      const result = await call(reason);
      const audit = result && result.audit_id ? ' (audit ' + result.audit_id + ')' : '';
      showBanner(success(result) + audit, true);
    } catch (e) {
      showBanner(title + ' failed: ' + describe(e));
    }
    if (after) await after();
  }

  // ------------------------------------------------------------------ session

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    stopRefresh();
    showLogin(message);
  }

  function showLogin(message) {
    $('app-view').hidden = true;
    $('app-view').replaceChildren();
    $('nav').hidden = true;
    $('logout').hidden = true;
    $('who').textContent = '';
    clearBanner();
    $('login-view').hidden = false;
    const err = $('login-error');
    err.textContent = visible(message || '');
    err.hidden = !message;
    $('login-token').value = '';
    $('login-token').focus();
  }

  function showApp() {
    $('login-view').hidden = true;
    $('app-view').hidden = false;
    $('nav').hidden = false;
    $('logout').hidden = false;
    $('who').textContent = me ? 'signed in as ' + me.name + ' (' + me.role + ')' : 'signed in';
    // Panels for rights the role lacks are left out of the navigation.
    for (const a of document.querySelectorAll('#nav a[data-needs]')) a.hidden = !can(a.dataset.needs);
  }

  async function onLogin(e) {
    e.preventDefault();
    const candidate = $('login-token').value.trim();
    const err = $('login-error');
    err.hidden = true;
    if (!candidate) return;
    $('login-submit').disabled = true;
    try {
      // Who this is, and with which rights: proves the credential too.
      me = await api('GET', '/me', { token: candidate });
      sessionStorage.setItem(TOKEN_KEY, candidate);
      showApp();
      if (!window.location.hash || window.location.hash === '#/' || window.location.hash === '#') {
        window.location.hash = '#/jobs';
      } else {
        route();
      }
    } catch (ex) {
      let message;
      if (ex instanceof ApiError && ex.status === 401) message = 'Sign-in failed: the credential was refused (' + ex.message + ').';
      else if (ex instanceof ApiError && ex.status === 403) message = 'Sign-in failed: this credential may not read the admin API (' + ex.message + ').';
      else message = 'Sign-in failed: ' + describe(ex);
      err.textContent = visible(message);
      err.hidden = false;
    } finally {
      $('login-submit').disabled = false;
    }
  }

  // ------------------------------------------------------------------ routing

  let generation = 0;
  let refreshTimer = null;

  function stopRefresh() {
    if (refreshTimer) clearTimeout(refreshTimer);
    refreshTimer = null;
  }

  function parseHash() {
    const raw = window.location.hash.replace(/^#\/?/, '');
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const params = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
    return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), params };
  }

  function go(path, params) {
    const qs = params ? new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== '')).toString() : '';
    const target = '#/' + path + (qs ? '?' + qs : '');
    if (window.location.hash === target) route();
    else window.location.hash = target;
  }

  const VIEWS = {
    jobs: (parts, params, view) => (parts[1] ? jobDetail(parts[1], view) : jobsList(params, view)),
    queues: (parts, params, view) => queuesView(view),
    workflows: (parts, params, view) => (parts[1] ? workflowDetail(parts[1], view) : workflowsList(params, view)),
    cron: (parts, params, view) => cronView(view),
    'dead-letters': (parts, params, view) => deadLettersView(params, view),
    approvals: (parts, params, view) => approvalsView(view),
    audit: (parts, params, view) => auditView(params, view),
  };

  async function route() {
    if (!token()) {
      showLogin('');
      return;
    }
    if (!me) {
      // A reload keeps the credential but not who it is.
      try {
        me = await api('GET', '/me');
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) return; // already signed out
      }
    }
    showApp();
    stopRefresh();
    const { parts, params } = parseHash();
    const name = VIEWS[parts[0]] ? parts[0] : 'jobs';
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.view === name);
    const gen = ++generation;
    const view = {
      gen,
      live: () => gen === generation,
      // Renders into the app area only if no newer navigation happened meanwhile.
      show: (...nodes) => {
        if (gen === generation) $('app-view').replaceChildren(...nodes.filter(Boolean));
      },
    };
    try {
      await VIEWS[name](parts, params, view);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return; // already signed out
      view.show(el('h1', null, name), el('p', { class: 'error', id: 'view-error', role: 'alert' }, 'Could not load: ' + describe(e)));
    }
  }

  /** A "load more" list: fetches pages and appends their rows to `tbody`. */
  function pager(fetchPage, renderRows, tbody) {
    const button = el('button', { type: 'button', id: 'load-more', hidden: true }, 'Load more');
    const status = el('span', { class: 'muted' });
    let cursor = null;
    let shown = 0;
    const load = async () => {
      button.disabled = true;
      try {
        const page = await fetchPage(cursor);
        const items = page.items || [];
        shown += items.length;
        append(tbody, renderRows(items));
        cursor = page.next_cursor || null;
        button.hidden = !cursor;
        status.textContent = shown + (cursor ? ' shown, more available' : ' shown');
      } catch (e) {
        status.textContent = visible('Could not load more: ' + describe(e));
      } finally {
        button.disabled = false;
      }
    };
    button.addEventListener('click', load);
    return { node: el('div', { class: 'pager' }, button, ' ', status), load };
  }

  // ------------------------------------------------------------------ jobs

  function localToIso(value) {
    if (!value) return '';
    const d = new Date(value);
    return Number.isNaN(d.getTime()) ? '' : d.toISOString();
  }

  function filterForm(id, inputs, params, onApply) {
    const form = el('form', { class: 'filters', id },
      inputs.map(([name, label, control]) => {
        const c = control || el('input', { type: 'text' });
        c.id = 'f-' + name;
        c.name = name;
        c.value = params.get(name) || '';
        return el('label', { for: c.id }, label, c);
      }),
      el('button', { type: 'submit', class: 'primary', id: 'f-apply' }, 'Apply'),
      el('button', { type: 'button', id: 'f-reset', onclick: () => onApply({}) }, 'Reset'));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const values = {};
      for (const [name] of inputs) values[name] = form.elements[name].value.trim();
      onApply(values);
    });
    return form;
  }

  function select(options) {
    return el('select', null, options.map(([value, label]) => el('option', { value }, label)));
  }

  function jobQuery(params) {
    return {
      queue: params.get('queue'),
      kind: params.get('kind'),
      state: params.get('state'),
      q: params.get('q'),
      created_after: localToIso(params.get('created_after')),
      created_before: localToIso(params.get('created_before')),
      sort: params.get('sort'),
      order: params.get('order'),
    };
  }

  async function jobsList(params, view) {
    const stateOptions = [['', 'any'], ['failed,discarded', 'failed or discarded (dead)']].concat(JOB_STATES.map((s) => [s, s]));
    const form = filterForm('jobs-filters', [
      ['queue', 'Queue'],
      ['kind', 'Kind'],
      ['state', 'State', select(stateOptions)],
      ['q', 'Search args'],
      ['created_after', 'Created after', el('input', { type: 'datetime-local', step: 1 })],
      ['created_before', 'Created before', el('input', { type: 'datetime-local', step: 1 })],
      ['sort', 'Sort', select([['', 'created_at'], ['run_at', 'run_at'], ['priority', 'priority'], ['id', 'id']])],
      ['order', 'Order', select([['', 'desc'], ['asc', 'asc']])],
    ], params, (values) => go('jobs', values));

    const query = jobQuery(params);
    const filterBody = {
      queue: query.queue || undefined,
      kind: query.kind || undefined,
      states: query.state ? query.state.split(',') : undefined,
      created_after: query.created_after || undefined,
      created_before: query.created_before || undefined,
      q: query.q || undefined,
    };
    const bulk = (action) => async () => {
      let count;
      try {
        count = (await api('POST', '/jobs/bulk-' + action, { body: { filter: filterBody, dry_run: true } })).count;
      } catch (e) {
        showBanner('Bulk ' + action + ' (dry run) failed: ' + describe(e));
        return;
      }
      await mutate('Bulk ' + action, count + ' job(s) matching the current filters would be affected (at most 1000 per run).',
        (reason) => api('POST', '/jobs/bulk-' + action, { body: { filter: filterBody, reason } }),
        (r) => 'Bulk ' + action + ': ' + r.count + ' job(s) changed',
        () => route());
    };

    const columns = [
      ['id', (j) => el('a', { href: '#/jobs/' + encodeURIComponent(j.id), class: 'mono' }, j.id)],
      ['queue', (j) => j.queue],
      ['kind', (j) => j.kind],
      ['state', (j) => stateBadge(j.state)],
      ['attempt', (j) => j.attempt + '/' + j.max_attempts],
      ['created', (j) => time(j.created_at)],
      ['run at', (j) => time(j.run_at)],
      ['last error', (j) => j.last_error || '', 'err'],
    ];
    const tableNode = table('jobs-table', columns, [], null);
    const tbody = tableNode.querySelector('tbody');
    const rowsOf = (items) => items.map((j) => el('tr', { 'data-id': j.id, 'data-state': j.state, class: 'clickable', onclick: (e) => {
      if (e.target.tagName !== 'A') go('jobs/' + encodeURIComponent(j.id));
    } }, columns.map(([, cell, cls]) => el('td', { class: cls }, cell(j)))));
    const p = pager((cursor) => api('GET', '/jobs', { query: { ...query, cursor, limit: 50 } }), rowsOf, tbody);
    await p.load();
    view.show(
      el('h1', null, 'Jobs'),
      form,
      el('div', { class: 'actions' },
        el('button', { type: 'button', id: 'jobs-refresh', onclick: () => route() }, 'Refresh'),
        el('button', { type: 'button', needs: 'operate', id: 'bulk-retry', onclick: bulk('retry') }, 'Bulk retry matching…'),
        el('button', { type: 'button', needs: 'operate', id: 'bulk-cancel', class: 'danger', onclick: bulk('cancel') }, 'Bulk cancel matching…')),
      tableNode,
      p.node);
  }

  async function jobDetail(id, view) {
    const detail = await api('GET', '/jobs/' + encodeURIComponent(id));
    const job = detail.job;
    const act = (action, verb) => () => mutate(
      verb + ' job', 'Job ' + job.id + ' (' + job.kind + ', now ' + job.state + ').',
      (reason) => api('POST', '/jobs/' + encodeURIComponent(job.id) + '/' + action, { body: { reason } }),
      (r) => 'Job ' + action + ': now ' + r.job.state,
      () => route());
    const attempts = detail.attempts || [];
    view.show(
      el('h1', null, 'Job ', el('span', { class: 'mono' }, job.id), ' ', stateBadge(job.state, 'job-state')),
      el('p', null, el('a', { href: '#/jobs' }, '← all jobs'), ' · ',
        el('a', { href: '#/audit?target_type=job&target_id=' + encodeURIComponent(job.id) }, 'audit log for this job'),
        job.workflow_id ? [' · ', el('a', { href: '#/workflows/' + encodeURIComponent(job.workflow_id) }, 'its workflow')] : null),
      el('div', { class: 'actions' },
        el('button', { type: 'button', needs: 'operate', id: 'job-retry', class: 'primary', disabled: !RETRY_FROM.has(job.state), onclick: act('retry', 'Retry') }, 'Retry…'),
        el('button', { type: 'button', needs: 'operate', id: 'job-cancel', disabled: !CANCEL_FROM.has(job.state), onclick: act('cancel', 'Cancel') }, 'Cancel…'),
        el('button', { type: 'button', needs: 'operate', id: 'job-discard', class: 'danger', disabled: !DISCARD_FROM.has(job.state), onclick: act('discard', 'Discard') }, 'Discard…'),
        el('button', { type: 'button', id: 'job-refresh', onclick: () => route() }, 'Refresh'),
        JOB_ACTIVE.has(job.state) ? el('span', { class: 'muted' }, 'refreshing while the job is active…') : null),
      fields(job, ['args', 'last_error']),
      el('h2', null, 'Last error'),
      // The job keeps its last error after a retry (the attempts below keep every one): once it
      // has moved on, say that the error is history rather than its present state.
      job.last_error && !['retryable', 'failed', 'discarded'].includes(job.state)
        ? el('p', { class: 'muted', id: 'job-last-error-note' }, 'From an earlier attempt; the job is ' + job.state + ' now.')
        : null,
      job.last_error ? el('pre', { id: 'job-last-error' }, job.last_error) : el('p', { class: 'muted' }, 'none'),
      el('h2', null, 'Args'),
      el('pre', { id: 'job-args' }, json(job.args)),
      el('h2', null, 'Attempts (unsuccessful ones; a success is the job itself)'),
      attempts.length
        ? table('attempts-table', [
          ['#', (a) => a.attempt],
          ['worker', (a) => a.worker],
          ['outcome', (a) => stateBadge(a.outcome)],
          ['error', (a) => a.error || '', 'err'],
          ['started', (a) => time(a.started_at)],
          ['finished', (a) => time(a.finished_at)],
        ], attempts)
        : el('p', { class: 'muted' }, 'none recorded'));
    // Follow an active job until it settles, so a retry is seen to complete.
    if (JOB_ACTIVE.has(job.state) && view.live()) {
      refreshTimer = setTimeout(() => {
        if (view.live()) route();
      }, REFRESH_MS);
    }
  }

  // ------------------------------------------------------------------ queues

  async function queuesView(view) {
    const data = await api('GET', '/queues');
    const queues = data.queues || [];
    const act = (q, action) => () => mutate(
      (action === 'pause' ? 'Pause' : 'Resume') + ' queue ' + q.name, action === 'pause'
        ? 'Workers stop claiming from this queue; attempts in flight finish.' : 'Workers claim from this queue again.',
      (reason) => api('POST', '/queues/' + encodeURIComponent(q.name) + '/' + action, { body: { reason } }),
      (r) => 'Queue ' + r.name + (r.paused ? ' paused' : ' resumed'),
      () => route());
    view.show(
      el('h1', null, 'Queues'),
      el('div', { class: 'actions' }, el('button', { type: 'button', onclick: () => route() }, 'Refresh')),
      queues.length ? table('queues-table', [
        ['queue', (q) => el('a', { href: '#/jobs?queue=' + encodeURIComponent(q.name) }, q.name)],
        ['status', (q) => stateBadge(q.paused ? 'paused' : 'active')],
        ...JOB_STATES.map((s) => [s, (q) => String((q.counts || {})[s] || 0)]),
        ['', (q) => el('button', { type: 'button', needs: 'operate', onclick: act(q, q.paused ? 'resume' : 'pause') }, q.paused ? 'Resume…' : 'Pause…')],
      ], queues, (q) => ({ 'data-queue': q.name })) : el('p', { class: 'muted' }, 'No queues yet.'));
  }

  // ------------------------------------------------------------------ workflows

  async function workflowsList(params, view) {
    const form = filterForm('workflows-filters', [
      ['kind', 'Kind'],
      ['state', 'State (comma-separated)'],
      ['sort', 'Sort', select([['', 'created_at'], ['updated_at', 'updated_at'], ['id', 'id']])],
      ['order', 'Order', select([['', 'desc'], ['asc', 'asc']])],
    ], params, (values) => go('workflows', values));
    const query = { kind: params.get('kind'), state: params.get('state'), sort: params.get('sort'), order: params.get('order') };
    const columns = [
      ['id', (w) => el('a', { href: '#/workflows/' + encodeURIComponent(w.id), class: 'mono' }, w.id)],
      ['kind', (w) => w.kind],
      ['state', (w) => stateBadge(w.state)],
      ['current step', (w) => w.current_step || ''],
      ['error', (w) => w.error || '', 'err'],
      ['created', (w) => time(w.created_at)],
      ['updated', (w) => time(w.updated_at)],
    ];
    const tableNode = table('workflows-table', columns, []);
    const tbody = tableNode.querySelector('tbody');
    const p = pager((cursor) => api('GET', '/workflows', { query: { ...query, cursor, limit: 50 } }),
      (items) => items.map((w) => el('tr', { 'data-id': w.id, 'data-state': w.state }, columns.map(([, cell, cls]) => el('td', { class: cls }, cell(w))))), tbody);
    await p.load();
    view.show(el('h1', null, 'Workflows'), form, tableNode, p.node);
  }

  async function workflowDetail(id, view) {
    const d = await api('GET', '/workflows/' + encodeURIComponent(id));
    const wf = d.workflow || {};
    const steps = d.steps || [];
    const base = '/workflows/' + encodeURIComponent(id);
    const after = () => route();
    const resolve = (step, outcome) => () => mutate('Resolve step ' + step + ' as ' + outcome,
      'The external call\'s outcome was checked out of band; the workflow continues accordingly.',
      (reason) => api('POST', base + '/steps/' + encodeURIComponent(step) + '/resolve', { body: { reason, outcome } }),
      () => 'Step ' + step + ' resolved as ' + outcome, after);
    view.show(
      el('h1', null, 'Workflow ', el('span', { class: 'mono' }, wf.id || id), ' ', stateBadge(wf.state || 'unknown', 'workflow-state')),
      el('p', null, el('a', { href: '#/workflows' }, '← all workflows'), ' · ',
        el('a', { href: '#/audit?target_type=workflow&target_id=' + encodeURIComponent(id) }, 'audit log for this workflow')),
      el('div', { class: 'actions' },
        el('button', { type: 'button', needs: 'operate', id: 'workflow-retry', class: 'primary', disabled: wf.state !== 'failed', onclick: () => mutate('Retry workflow', 'Runs the failed step again.',
          (reason) => api('POST', base + '/retry', { body: { reason } }), (r) => 'Workflow now ' + ((r.workflow || {}).state || 'retried'), after) }, 'Retry…'),
        el('button', { type: 'button', needs: 'operate', id: 'workflow-cancel', disabled: WORKFLOW_DONE.has(wf.state), onclick: () => mutate('Cancel workflow', 'Stops the workflow (compensations run if it defines them).',
          (reason) => api('POST', base + '/cancel', { body: { reason } }), (r) => 'Workflow now ' + ((r.workflow || {}).state || 'cancelled'), after) }, 'Cancel…'),
        el('button', { type: 'button', onclick: after }, 'Refresh'),
        WORKFLOW_ACTIVE.has(wf.state) ? el('span', { class: 'muted' }, 'refreshing while the workflow is active…') : null),
      fields(wf),
      el('h2', null, 'Step journal'),
      steps.length ? table('steps-table', [
        ['#', (s) => s.position],
        ['step', (s) => s.step],
        ['status', (s) => stateBadge(s.status)],
        ['attempt', (s) => s.attempt],
        ['error', (s) => s.error || s.call_error || s.compensation_error || '', 'err'],
        ['idempotency key', (s) => el('span', { class: 'mono' }, s.idempotency_key || '')],
        ['started', (s) => time(s.started_at)],
        ['finished', (s) => time(s.finished_at)],
        ['output', (s) => (s.output === null || s.output === undefined ? '' : el('pre', null, json(s.output)))],
        ['', (s) => (s.in_doubt || s.status === 'in_doubt'
          ? [el('button', { type: 'button', needs: 'operate', onclick: resolve(s.step, 'succeeded') }, 'Resolve: succeeded…'), ' ',
            el('button', { type: 'button', needs: 'operate', class: 'danger', onclick: resolve(s.step, 'failed') }, 'Resolve: failed…')]
          : '')],
      ], steps, (s) => ({ 'data-step': s.step, 'data-status': s.status })) : el('p', { class: 'muted' }, 'No steps journaled yet.'));
    // Follow an active workflow until it settles, so a retry is seen to finish.
    if (WORKFLOW_ACTIVE.has(wf.state) && view.live()) {
      refreshTimer = setTimeout(() => {
        if (view.live()) route();
      }, REFRESH_MS);
    }
  }

  // ------------------------------------------------------------------ cron

  async function cronView(view) {
    const data = await api('GET', '/cron');
    const schedules = data.schedules || data.items || [];
    const act = (s, action, verb) => () => mutate(verb + ' schedule ' + s.name,
      action === 'trigger' ? 'Enqueues one run now, in addition to the regular ticks.' : '',
      (reason) => api('POST', '/cron/' + encodeURIComponent(s.name) + '/' + action, { body: { reason } }),
      (r) => 'Schedule ' + s.name + ': ' + action + (r.job_id ? ' (job ' + r.job_id + ')' : ''), () => route());
    const paused = (s) => Boolean(s.paused_at) || s.enabled === false;
    view.show(
      el('h1', null, 'Cron schedules'),
      el('div', { class: 'actions' }, el('button', { type: 'button', onclick: () => route() }, 'Refresh')),
      schedules.length ? table('cron-table', [
        ['name', (s) => s.name],
        ['expression', (s) => el('span', { class: 'mono' }, s.expression)],
        ['timezone', (s) => s.timezone],
        ['job', (s) => (s.job_kind || '') + (s.job_queue ? ' @ ' + s.job_queue : '')],
        ['status', (s) => stateBadge(paused(s) ? 'paused' : 'active')],
        ['catch-up', (s) => scalar(s.catch_up)],
        ['next fire', (s) => time(s.next_fire_at)],
        ['last fire', (s) => time(s.last_fire_at)],
        ['last job', (s) => (s.last_job_id ? el('a', { href: '#/jobs/' + encodeURIComponent(s.last_job_id), class: 'mono' }, s.last_job_id) : '')],
        ['', (s) => [
          el('button', { type: 'button', needs: 'operate', onclick: act(s, 'trigger', 'Trigger') }, 'Trigger now…'), ' ',
          paused(s)
            ? el('button', { type: 'button', needs: 'operate', onclick: act(s, 'resume', 'Resume') }, 'Resume…')
            : el('button', { type: 'button', needs: 'operate', onclick: act(s, 'pause', 'Pause') }, 'Pause…')]],
      ], schedules) : el('p', { class: 'muted' }, 'No schedules.'));
  }

  // ------------------------------------------------------------------ dead letters

  async function deadLettersView(params, view) {
    const after = () => route();
    // Job dead letters: discarded or failed jobs.
    const jobCols = [
      ['id', (j) => el('a', { href: '#/jobs/' + encodeURIComponent(j.id), class: 'mono' }, j.id)],
      ['queue', (j) => j.queue],
      ['kind', (j) => j.kind],
      ['state', (j) => stateBadge(j.state)],
      ['attempt', (j) => j.attempt + '/' + j.max_attempts],
      ['last error', (j) => j.last_error || '', 'err'],
      ['finished', (j) => time(j.finished_at)],
      ['', (j) => el('button', { type: 'button', needs: 'operate', onclick: () => mutate('Redrive job', 'Job ' + j.id + ' runs again.',
        (reason) => api('POST', '/dead-letters/jobs/' + encodeURIComponent(j.id) + '/redrive', { body: { reason } }),
        (r) => 'Job redriven: now ' + ((r.job || {}).state || 'available'), after) }, 'Redrive…')],
    ];
    const jobsSection = el('section', { id: 'dead-jobs' }, el('h2', null, 'Jobs (failed or discarded)'));
    try {
      const jobsTable = table('dead-jobs-table', jobCols, []);
      const p = pager((cursor) => api('GET', '/dead-letters/jobs', { query: { cursor, limit: 50 } }),
        (items) => items.map((j) => el('tr', { 'data-id': j.id }, jobCols.map(([, c, cls]) => el('td', { class: cls }, c(j))))),
        jobsTable.querySelector('tbody'));
      await p.load();
      append(jobsSection, [jobsTable, p.node]);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) throw e;
      append(jobsSection, [el('p', { class: 'error', role: 'alert' }, 'Could not load: ' + describe(e))]);
    }

    // Kafka dead letters: poison messages, redriven through the outbox.
    const pending = params.get('pending') === 'false' ? 'false' : 'true';
    const kafkaSection = el('section', { id: 'dead-messages' }, el('h2', null, 'Kafka messages'),
      el('p', null, pending === 'true'
        ? ['Showing pending ones. ', el('a', { href: '#/dead-letters?pending=false' }, 'Show redriven ones')]
        : ['Showing redriven ones. ', el('a', { href: '#/dead-letters' }, 'Show pending ones')]));
    try {
      const page = await api('GET', '/dead-letters', { query: { pending, limit: 100 } });
      const items = page.items || [];
      const keys = pickColumns(items, ['id', 'source', 'topic', 'partition', 'offset', 'key', 'error', 'attempts', 'created_at', 'redriven_at']);
      const cols = keys.map((k) => [k, (m) => scalar(m[k]), k === 'error' ? 'err' : undefined]);
      // The copy to the dead-letter topic is published after the row is
      // recorded; while the topic refuses it, say why.
      cols.push(['topic copy', (m) => m.copy_state === 'pending'
        ? [el('span', { class: 'badge' }, 'pending' + (m.copy_attempts ? ' (' + m.copy_attempts + ' tries)' : '')),
            m.copy_error ? el('div', { class: 'err' }, m.copy_error) : '']
        : (m.copy_state || ''), undefined]);
      cols.push(['', (m) => [
        el('button', { type: 'button', onclick: async () => {
          try {
            const full = await api('GET', '/dead-letters/' + encodeURIComponent(m.id));
            kafkaSection.appendChild(el('div', null, el('h2', null, 'Dead letter ' + m.id), fields(full)));
          } catch (e) {
            showBanner('Could not load dead letter: ' + describe(e));
          }
        } }, 'Inspect'), ' ',
        el('button', { type: 'button', needs: 'operate', onclick: () => mutate('Redrive message', 'Re-published to its topic through the outbox.',
          (reason) => api('POST', '/dead-letters/' + encodeURIComponent(m.id) + '/redrive', { body: { reason } }),
          () => 'Message ' + m.id + ' redriven', after) }, 'Redrive…'),
        m.copy_state === 'pending' ? [' ', el('button', { type: 'button', onclick: () => mutate('Retry topic copy',
          'The copy to ' + (m.copy_topic || 'the dead-letter topic') + ' is tried again now.',
          (reason) => api('POST', '/dead-letters/' + encodeURIComponent(m.id) + '/copy-retry', { body: { reason } }),
          () => 'Copy of message ' + m.id + ' is due now', after) }, 'Retry copy…')] : '']]);
      append(kafkaSection, [items.length ? table('dead-messages-table', cols, items) : el('p', { class: 'muted' }, 'None.')]);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) throw e;
      append(kafkaSection, [el('p', { class: 'error', role: 'alert' }, 'Could not load: ' + describe(e))]);
    }
    view.show(el('h1', null, 'Dead letters'), jobsSection, kafkaSection);
  }

  // ------------------------------------------------------------------ approvals

  async function approvalsView(view) {
    const page = await api('GET', '/withdrawals/pending', { query: { limit: 100 } });
    const items = page.items || [];
    const act = (w, action) => () => mutate((action === 'approve' ? 'Approve' : 'Reject') + ' withdrawal',
      'Withdrawal of ' + w.amount + ' ' + w.asset + ' for ' + w.user_email + '. Four-eyes: not the requester, '
        + 'not an approver linked to this user, and no admin approves twice.',
      (reason) => api('POST', '/withdrawals/' + encodeURIComponent(w.id) + '/' + action, { body: { reason } }),
      (r) => 'Withdrawal ' + w.id + ': ' + (r.decision === 'approval_recorded'
        ? 'approval ' + r.approvals + ' of ' + r.approvals_required + ' recorded; another approver must approve'
        : (r.decision || action)) + (r.changed === false ? ' (already decided)' : ''), () => route());
    const cols = [
      ['requested', (w) => time(w.requested_at)],
      ['user', (w) => w.user_email],
      ['amount', (w) => w.amount + ' ' + w.asset],
      ['address', (w) => el('span', { class: 'mono' }, w.address)],
      ['status', (w) => w.status],
      ['approvals', (w) => (w.approved_by || []).length + ' of ' + w.approvals_required
        + ((w.approved_by || []).length ? ' (' + w.approved_by.join(', ') + ')' : '')],
      ['filed by', (w) => w.requested_by_name || '—'],
      ['', (w) => [
        // An approver who approved already must leave the next approval to someone else.
        el('button', { type: 'button', needs: 'approve', class: 'primary', onclick: act(w, 'approve'),
          disabled: !!me && (w.approved_by || []).includes(me.name),
          title: !!me && (w.approved_by || []).includes(me.name) ? 'You approved it already' : null }, 'Approve…'), ' ',
        el('button', { type: 'button', needs: 'approve', class: 'danger', onclick: act(w, 'reject') }, 'Reject…')]],
    ];
    view.show(
      el('h1', null, 'Withdrawal approvals'),
      el('p', { class: 'muted' }, 'Withdrawals above their asset\'s approval threshold wait here for an approver; '
        + 'above the second threshold, for two different approvers (see Policy).'),
      el('div', { class: 'actions' }, el('button', { type: 'button', onclick: () => route() }, 'Refresh')),
      items.length ? table('approvals-table', cols, items, (w) => ({ 'data-id': w.id })) : el('p', { class: 'muted' }, 'Nothing waiting.'));
  }

  // ------------------------------------------------------------------ audit

  async function auditView(params, view) {
    const form = filterForm('audit-filters', [
      ['action', 'Action'],
      ['target_type', 'Target type'],
      ['target_id', 'Target id'],
      ['admin_id', 'Admin id'],
    ], params, (values) => go('audit', values));
    const query = { action: params.get('action'), target_type: params.get('target_type'), target_id: params.get('target_id'), admin_id: params.get('admin_id') };
    const columns = [
      ['when', (a) => time(a.created_at)],
      ['admin', (a) => a.admin_name + ' (' + a.admin_role + ')'],
      ['action', (a) => a.action],
      ['target', (a) => (a.target_type === 'job'
        ? el('a', { href: '#/jobs/' + encodeURIComponent(a.target_id), class: 'mono' }, a.target_id)
        : a.target_type + ' ' + a.target_id)],
      ['reason', (a) => a.reason],
      ['details', (a) => el('span', { class: 'mono' }, JSON.stringify(a.details))],
    ];
    const tableNode = table('audit-table', columns, []);
    const p = pager((cursor) => api('GET', '/audit', { query: { ...query, cursor, limit: 50 } }),
      (items) => items.map((a) => el('tr', { 'data-id': a.id, 'data-action': a.action }, columns.map(([, c]) => el('td', null, c(a))))),
      tableNode.querySelector('tbody'));
    await p.load();
    view.show(el('h1', null, 'Audit log'), form, tableNode, p.node);
  }

  // ------------------------------------------------------------------ start

  // The interface panels.js builds its panels with.
  window.ledgerflowConsole = {
    el, api, mutate, table, time, route, can,
    addView(name, render) {
      VIEWS[name] = (parts, params, view) => render(parts, params, view);
    },
  };

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', onLogin);
    $('logout').addEventListener('click', () => signOut('Signed out.'));
    window.addEventListener('hashchange', () => {
      clearBanner();
      route();
    });
    route();
  });
})();
