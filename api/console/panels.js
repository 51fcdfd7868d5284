/*
 * Ledgerflow admin console: the Policy and Access panels, built with the helpers console.js
 * exposes as `window.ledgerflowConsole` (loaded after it). Same rules as console.js: server data
 * reaches the page only as text, the API authorizes and audits everything, every change asks for
 * a reason. Amounts are typed and sent as strings, never numbers.
 *
 * - Policy (every role reads; role security edits): each asset's approval threshold, second
 *   approval threshold (two distinct approvers) and daily limit, and where it comes from
 *   (configuration or an admin's override); set or reset an asset's override.
 * - Access (role security): admins (create, rotate a credential, disable) and a user's API keys
 *   (look up by email, revoke). A new credential is shown once, in the page, never stored.
 * - Flow limits (every role reads; operators change): each limit with its holders, waiters,
 *   tokens and deferrals; set a limit (the whole limit) or remove it.
 */
'use strict';

(() => {
  const lf = window.ledgerflowConsole;
  if (!lf) return;
  const { el, api, mutate, table, time, route, can } = lf;

  // ------------------------------------------------------------------ policy

  async function policyView(parts, params, view) {
    const page = await api('GET', '/withdrawal-policies');
    const items = page.items || [];
    const shown = (v) => (v === undefined || v === null ? '—' : v);
    const cols = [
      ['asset', (p) => p.asset],
      ['approval above', (p) => shown(p.approval_threshold)],
      ['two approvers above', (p) => shown(p.second_approval_threshold)],
      ['daily limit per user', (p) => shown(p.daily_limit)],
      ['source', (p) => p.source + (p.updated_by ? ' (' + p.updated_by + ', ' + time(p.updated_at) + ')' : '')],
      ['', (p) => [
        el('button', { type: 'button', needs: 'administer', 'data-asset': p.asset, onclick: () => edit(p) }, 'Edit…'), ' ',
        p.source === 'admin'
          ? el('button', { type: 'button', needs: 'administer', onclick: () => mutate('Reset ' + p.asset + ' policy',
            'Removes the override: the configuration applies again.',
            (reason) => api('POST', '/withdrawal-policies/' + encodeURIComponent(p.asset) + '/reset', { body: { reason } }),
            () => p.asset + ' policy reset to the configuration', () => route()) }, 'Reset…')
          : null]],
    ];
    const form = el('form', { id: 'policy-form', class: 'filters', hidden: true });
    function edit(p) {
      const input = (name, value) => el('label', null, name.replace(/_/g, ' '),
        el('input', { name, value: value || '', placeholder: 'none', inputmode: 'decimal', spellcheck: 'false' }));
      form.replaceChildren(
        el('strong', null, 'New policy for ' + p.asset + ' (empty: none)'),
        input('approval_threshold', p.approval_threshold),
        input('second_approval_threshold', p.second_approval_threshold),
        input('daily_limit', p.daily_limit),
        el('button', { type: 'submit', class: 'primary', id: 'policy-save' }, 'Save…'));
      form.hidden = false;
      form.onsubmit = (e) => {
        e.preventDefault();
        const data = new FormData(form);
        const body = {};
        for (const k of ['approval_threshold', 'second_approval_threshold', 'daily_limit']) {
          const v = String(data.get(k) || '').trim();
          body[k] = v === '' ? null : v; // a string: amounts never travel as JSON numbers
        }
        mutate('Change ' + p.asset + ' withdrawal policy', 'Applies to withdrawals requested from now on.',
          (reason) => api('PUT', '/withdrawal-policies/' + encodeURIComponent(p.asset), { body: { ...body, reason } }),
          () => p.asset + ' policy changed', () => route());
      };
    }
    view.show(
      el('h1', null, 'Withdrawal policy'),
      el('p', { class: 'muted' }, 'A withdrawal above the approval threshold waits for an approver; above the second '
        + 'threshold, for two different approvers. Changes need the security role and a reason, and are audited.'),
      el('div', { class: 'actions' }, el('button', { type: 'button', onclick: () => route() }, 'Refresh')),
      table('policy-table', cols, items, (p) => ({ 'data-asset': p.asset })),
      form);
  }

  // ------------------------------------------------------------------ access

  /** Shows a credential once, as text, with who it belongs to. */
  function credentialNotice(what, credential) {
    return el('p', { class: 'banner ok', id: 'credential' }, what + ': ',
      el('code', { class: 'mono' }, credential), ' — shown once; hand it over now.');
  }

  async function accessView(parts, params, view) {
    if (!can('administer')) {
      view.show(el('h1', null, 'Access'), el('p', { class: 'muted' }, 'Managing admins and API keys needs the security role.'));
      return;
    }
    const admins = (await api('GET', '/admins')).items || [];
    const notice = el('div', { id: 'access-notice' });
    const withCredential = (title, call) => async (reason) => {
      const r = await call(reason);
      notice.replaceChildren(credentialNotice(title + ' ' + r.admin.name, r.credential));
      return r;
    };
    const adminCols = [
      ['name', (a) => a.name],
      ['role', (a) => a.role],
      ['linked user', (a) => a.user_email || '—'],
      ['credential', (a) => el('span', { class: 'mono' }, a.credential_prefix + '_…')],
      ['created', (a) => time(a.created_at)],
      ['disabled', (a) => (a.disabled_at ? time(a.disabled_at) : '')],
      ['', (a) => (a.disabled_at ? '' : [
        el('button', { type: 'button', needs: 'administer', onclick: () => mutate('Rotate credential of ' + a.name,
          'The current credential stops working at once; the new one is shown once.',
          withCredential('New credential of', (reason) => api('POST', '/admins/' + a.id + '/rotate', { body: { reason } })),
          () => 'Credential of ' + a.name + ' rotated', null) }, 'Rotate…'), ' ',
        el('button', { type: 'button', needs: 'administer', class: 'danger', onclick: () => mutate('Disable ' + a.name,
          'Its credential stops working at once.',
          (reason) => api('POST', '/admins/' + a.id + '/disable', { body: { reason } }),
          () => a.name + ' disabled', () => route()) }, 'Disable…')])],
    ];
    const create = el('form', { id: 'admin-create', class: 'filters' },
      el('label', null, 'name', el('input', { name: 'name', required: true, spellcheck: 'false' })),
      el('label', null, 'role', el('select', { name: 'role' },
        ['viewer', 'operator', 'approver', 'security'].map((r) => el('option', { value: r }, r)))),
      el('label', null, 'linked user email (optional)', el('input', { name: 'user_email', type: 'email' })),
      el('button', { type: 'submit', class: 'primary' }, 'Create admin…'));
    create.onsubmit = (e) => {
      e.preventDefault();
      const data = new FormData(create);
      const body = { name: String(data.get('name') || '').trim(), role: String(data.get('role')) };
      const email = String(data.get('user_email') || '').trim();
      if (email) body.user_email = email;
      mutate('Create admin ' + body.name, 'Role ' + body.role + '.',
        withCredential('Credential of new admin', (reason) => api('POST', '/admins', { body: { ...body, reason } })),
        () => 'Admin ' + body.name + ' created', null);
    };
    const keysTable = el('div', { id: 'api-keys' });
    const lookup = el('form', { id: 'api-key-lookup', class: 'filters' },
      el('label', null, 'user email', el('input', { name: 'email', type: 'email', required: true })),
      el('button', { type: 'submit' }, 'Show API keys'));
    async function showKeys(email) {
      const keys = (await api('GET', '/api-keys', { query: { email } })).items || [];
      keysTable.replaceChildren(table('api-keys-table', [
        ['key', (k) => el('span', { class: 'mono' }, k.prefix + '_…')],
        ['created', (k) => time(k.created_at)],
        ['expires', (k) => time(k.expires_at)],
        ['revoked', (k) => time(k.revoked_at)],
        ['', (k) => (k.revoked_at ? '' : el('button', { type: 'button', needs: 'administer', class: 'danger',
          onclick: () => mutate('Revoke API key ' + k.prefix, 'The public API refuses it within a second.',
            (reason) => api('POST', '/api-keys/' + k.id + '/revoke', { body: { reason } }),
            () => 'API key ' + k.prefix + ' revoked', () => showKeys(email)) }, 'Revoke…'))],
      ], keys, (k) => ({ 'data-id': k.id })));
    }
    lookup.onsubmit = (e) => {
      e.preventDefault();
      const email = String(new FormData(lookup).get('email') || '').trim();
      showKeys(email).catch((err) => keysTable.replaceChildren(el('p', { class: 'error' }, 'Could not load: ' + err.message)));
    };
    view.show(
      el('h1', null, 'Access'),
      notice,
      el('h2', null, 'Admins'),
      table('admins-table', adminCols, admins, (a) => ({ 'data-id': a.id, 'data-name': a.name })),
      create,
      el('h2', null, 'API keys of a user'),
      lookup,
      keysTable);
  }

  // ------------------------------------------------------------------ flow limits

  async function flowView(parts, params, view) {
    const items = (await api('GET', '/flow/limits')).limits || [];
    const shown = (v) => (v === undefined || v === null ? '—' : String(v));
    const rate = (r) => (r ? r.capacity + ' + ' + r.refill + ' / ' + r.window_ms + ' ms' : '—');
    const cols = [
      ['key', (l) => el('span', { class: 'mono' }, l.key)],
      ['concurrency', (l) => shown(l.concurrency)],
      ['rate (capacity + refill / window)', (l) => rate(l.rate)],
      ['weight', (l) => shown(l.fair_weight)],
      ['holders', (l) => shown(l.holders)],
      ['waiters', (l) => shown(l.waiters)],
      ['tokens', (l) => shown(l.tokens)],
      ['deferred', (l) => shown(l.deferred)],
      ['source', (l) => l.source + (l.reason ? ': ' + l.reason : '')],
      ['updated', (l) => time(l.updated_at)],
      ['', (l) => el('button', { type: 'button', needs: 'operate', class: 'danger',
        onclick: () => mutate('Remove limit ' + l.key, 'The key falls back to its class\'s limit, or none.',
          (reason) => api('POST', '/flow/limits/' + encodeURIComponent(l.key) + '/remove', { body: { reason } }),
          () => 'Limit ' + l.key + ' removed', () => route()) }, 'Remove…')],
    ];
    const field = (name, hint) => el('label', null, name.replace(/_/g, ' '),
      el('input', { name, placeholder: hint, inputmode: 'numeric', spellcheck: 'false' }));
    const form = el('form', { id: 'flow-form', class: 'filters' },
      el('label', null, 'key', el('input', { name: 'key', required: true, placeholder: 'user:* or queue:<name>', spellcheck: 'false' })),
      field('concurrency', 'none'), field('fair_weight', '1'),
      field('rate_capacity', 'none'), field('rate_refill', ''), field('rate_window_ms', ''),
      el('button', { type: 'submit', needs: 'operate' }, 'Set limit…'));
    form.onsubmit = (e) => {
      e.preventDefault();
      const data = new FormData(form);
      const num = (k) => {
        const v = String(data.get(k) || '').trim();
        return v === '' ? null : Number(v);
      };
      const key = String(data.get('key') || '').trim();
      const body = { concurrency: num('concurrency'), fair_weight: num('fair_weight') };
      if (num('rate_capacity') !== null) {
        body.rate = { capacity: num('rate_capacity'), refill: num('rate_refill'), window_ms: num('rate_window_ms') };
      }
      mutate('Set limit ' + key, 'Every worker applies it at its next claim.',
        (reason) => api('PUT', '/flow/limits/' + encodeURIComponent(key), { body: { ...body, reason } }),
        () => 'Limit ' + key + ' set', () => route());
    };
    view.show(
      el('h1', null, 'Flow limits'),
      el('p', { class: 'muted' }, 'Concurrency limits, rate limits and fairness weights per key, '
        + 'class (user:*) or queue (queue:<name>). Changes need the operate permission and a reason, and are audited.'),
      el('div', { class: 'actions' }, el('button', { type: 'button', onclick: () => route() }, 'Refresh')),
      table('flow-table', cols, items, (l) => ({ 'data-key': l.key })),
      form);
  }

  lf.addView('policy', policyView);
  lf.addView('access', accessView);
  lf.addView('flow', flowView);
})();
