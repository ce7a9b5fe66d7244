// cogrelay dashboard: polls the admin API every 2 s; the chart is the relay's
// own last hour (GET /admin/history), so it shows what came before the page. Every value that comes from
// a job is put on the page with textContent, never as HTML, so a payload holding
// markup or script is shown, not run.
'use strict';
const $ = (sel) => document.querySelector(sel);
const LIMIT = 20;
let offset = 0;
// The last action's (or job view's) error, shown for 10 s over refreshes.
let actionError = null;
function shownError(e) {
  actionError = { text: String(e.message || e), at: Date.now() };
  $('#error').textContent = actionError.text;
}
let token = sessionStorage.getItem('cogrelay-admin-token') || '';

async function api(path, method = 'GET') {
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  // A look that never ends would hold every later refresh (one at a time);
  // an action (a retry-all of many jobs) may take longer, and is not cut.
  const opts = { method, headers };
  if (method === 'GET' && typeof AbortSignal.timeout === 'function') opts.signal = AbortSignal.timeout(10000);
  const r = await fetch(path, opts);
  if (r.status === 401) {
    $('#auth').style.display = 'block';
    throw new Error('the admin API wants the token (ADMIN_TOKEN)');
  }
  // (an error's body may not be JSON; a good answer's must be, whole: one
  // cut off by the time bound is an error, not an empty answer)
  const body = await r.json().catch((e) => { if (r.ok) throw e; return {}; });
  if (!r.ok) throw new Error(body.error || r.status + ' ' + r.statusText);
  return body;
}

function cell(row, text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(label, cls, onClick) {
  const b = document.createElement('button');
  b.textContent = label;
  b.className = cls;
  b.addEventListener('click', onClick);
  return b;
}

function lastAnswer(job) {
  const a = job.attempts[job.attempts.length - 1];
  if (!a) return '–';
  return a.status ? 'HTTP ' + a.status : (a.error || '–');
}

function drawHistory(h) {
  const pts = h.points;
  const max = Math.max(1, ...pts.map((p) => Math.max(p.delivered, p.failed)));
  // One bar per 10 s, newest on the right: delivered (blue) under failed (red).
  const step = 720 / 361;
  const x0 = 720 - pts.length * step;
  const bars = $('#bars');
  bars.replaceChildren();
  const rect = (x, y, h, color) => {
    const r = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
    r.setAttribute('x', x.toFixed(1));
    r.setAttribute('y', y.toFixed(1));
    r.setAttribute('width', Math.max(1, step - 0.3).toFixed(1));
    r.setAttribute('height', h.toFixed(1));
    r.setAttribute('fill', color);
    bars.appendChild(r);
  };
  pts.forEach((p, i) => {
    const x = x0 + i * step;
    const hd = (p.delivered / max) * 76;
    const hf = (p.failed / max) * 76;
    if (hd > 0) rect(x, 78 - hd, hd, '#2563eb');
    if (hf > 0) rect(x, 78 - hd - hf, hf, '#b3261e');
  });
  const total = pts.reduce((n, p) => n + p.delivered, 0);
  const failed = pts.reduce((n, p) => n + p.failed, 0);
  const per = h.intervalSecs || 10;
  $('#rate').textContent = total + ' delivered and ' + failed + ' failed in the last hour; peak '
    + (max / per).toFixed(1) + '/s';
  return pts;
}

function drawDestinations(list, pts) {
  const tbody = $('#destinations-table tbody');
  tbody.replaceChildren();
  for (const d of list) {
    const tr = document.createElement('tr');
    tr.dataset.name = d.name;
    cell(tr, d.name);
    // A destination a reload removed is shown while it has jobs or held keys.
    cell(tr, d.configured === false ? '(removed from the file)' : d.url, 'url');
    // While open, when the next trial is due (local time).
    const circuit = d.next_probe_at
      ? d.circuit + ', next trial ' + new Date(d.next_probe_at).toLocaleTimeString()
      : d.circuit || '-';
    cell(tr, circuit, 'circuit circuit-' + (d.circuit || 'none'));
    cell(tr, d.paused == null ? '?' : d.paused ? 'yes' : 'no', 'paused');
    // An ordered destination's held keys (on_failure = "hold"): how many,
    // and each key with its blocking job and since when, on hover.
    const held = d.held_keys || [];
    const heldText = d.error ? '?' : d.ordering === 'session' || held.length ? String(held.length) : '-';
    const heldCell = cell(tr, heldText, 'held');
    heldCell.title = held.map((h) => h.key + ': job ' + h.jobId + ' since '
      + new Date(h.sinceMs).toLocaleTimeString()).join('\n');
    // A destination whose queue cannot be read now: why, on hover.
    if (d.error) tr.title = d.error;
    for (const k of ['waiting', 'delayed', 'failed']) cell(tr, d.counts ? String(d.counts[k]) : '?');
    cell(tr, pts ? String(pts.reduce((n, p) => n + (p.byDestination[d.name] || 0), 0)) : '?');
    const actions = cell(tr, '', 'actions');
    const path = '/admin/destinations/' + encodeURIComponent(d.name);
    // A destination the file no longer gives: Resume only, when paused.
    // One whose state cannot be read now (d.error): neither, paused or not.
    if ((d.configured !== false || d.paused) && d.paused != null) {
      actions.appendChild(d.paused
        ? button('Resume', 'resume', () => act(path + '/resume', 'POST'))
        : button('Pause', 'pause', () => act(path + '/pause', 'POST')));
    }
    actions.appendChild(button('Retry failed', 'retry-destination',
      () => act('/admin/jobs/retry?state=failed&destination=' + encodeURIComponent(d.name), 'POST')));
    tbody.appendChild(tr);
  }
}

// Each part of the page on its own: one the API cannot answer now (the
// counts, while one destination's queue cannot be read) leaves the others
// drawn, and its error is shown. One refresh at a time (a Redis that hangs
// makes each call wait 2 s): one asked meanwhile runs after it.
let refreshing = false;
let refreshAgain = false;
async function refresh() {
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = true;
  try {
    await refreshParts();
  } finally {
    refreshing = false;
  }
  if (refreshAgain) {
    refreshAgain = false;
    refresh();
  }
}

async function refreshParts() {
  const errors = [];
  let parts = 0;
  const part = async (draw) => {
    parts += 1;
    try {
      await draw();
    } catch (e) {
      errors.push(String(e.message || e));
    }
  };
  await part(async () => {
    let c = null;
    try {
      c = await api('/admin/queue');
    } finally {
      for (const k of ['waiting', 'active', 'delayed', 'completed', 'failed']) $('#count-' + k).textContent = c ? String(c[k]) : '?';
    }
  });
  let pts = null;
  await part(async () => { pts = drawHistory(await api('/admin/history')); });
  await part(async () => drawDestinations(await api('/admin/destinations'), pts));
  await part(drawFailed);
  const when = new Date().toLocaleTimeString();
  $('#status').textContent = errors.length === parts ? 'not updated (' + when + ')'
    : 'updated ' + when + (errors.length ? ' (in part)' : '');
  // An action's error stays until the next action, or 10 s.
  if (actionError && Date.now() - actionError.at < 10000) errors.unshift(actionError.text);
  $('#error').textContent = [...new Set(errors)].join('; ');
}

async function drawFailed() {
  const page = await api('/admin/jobs?state=failed&offset=' + offset + '&limit=' + LIMIT);
  const tbody = $('#failed-table tbody');
  tbody.replaceChildren();
  for (const job of page.items) {
    const tr = document.createElement('tr');
    tr.dataset.id = job.id;
    cell(tr, job.id);
    cell(tr, job.destination);
    cell(tr, job.eventKey, 'key');
    cell(tr, String(job.attemptsMade));
    cell(tr, lastAnswer(job));
    cell(tr, job.failedReason || '', 'reason');
    const actions = cell(tr, '', 'actions');
    actions.appendChild(button('Show', 'show', () => show(job.id)));
    actions.appendChild(button('Retry', 'retry', () => act('/admin/jobs/' + encodeURIComponent(job.id) + '/retry', 'POST')));
    actions.appendChild(button('Remove', 'remove', () => act('/admin/jobs/' + encodeURIComponent(job.id), 'DELETE')));
    tbody.appendChild(tr);
  }
  const to = Math.min(offset + page.items.length, page.total);
  $('#page').textContent = page.total ? (offset + 1) + '–' + to + ' of ' + page.total : 'no failed jobs';
  $('#prev').disabled = offset === 0;
  $('#next').disabled = to >= page.total;
}

async function act(path, method) {
  actionError = null;
  try {
    await api(path, method);
  } catch (e) {
    shownError(e);
  }
  refresh();
}

async function show(id) {
  try {
    const job = await api('/admin/jobs/' + encodeURIComponent(id));
    $('#detail').hidden = false;
    $('#detail-id').textContent = job.id;
    $('#detail-meta').textContent = job.state + ' · ' + job.eventKey + ' · created ' + new Date(job.createdAtMs).toISOString()
      + (job.failedReason ? ' · ' + job.failedReason : '');
    const tbody = $('#attempts tbody');
    tbody.replaceChildren();
    for (const a of job.attempts) {
      const tr = document.createElement('tr');
      cell(tr, String(a.n));
      cell(tr, new Date(a.startedAtMs).toISOString());
      cell(tr, String(a.durationMs));
      cell(tr, a.outcome);
      cell(tr, a.status ? 'HTTP ' + a.status : (a.error || ''));
      tbody.appendChild(tr);
    }
    $('#payload').textContent = JSON.stringify(job.payload, null, 2);
  } catch (e) {
    shownError(e);
  }
}

$('#token-save').addEventListener('click', () => {
  token = $('#token').value;
  sessionStorage.setItem('cogrelay-admin-token', token);
  $('#auth').style.display = 'none';
  refresh();
});
$('#retry-all').addEventListener('click', () => act('/admin/jobs/retry?state=failed', 'POST'));
$('#prev').addEventListener('click', () => { offset = Math.max(0, offset - LIMIT); refresh(); });
$('#next').addEventListener('click', () => { offset += LIMIT; refresh(); });
$('#detail-close').addEventListener('click', () => { $('#detail').hidden = true; });
refresh();
setInterval(refresh, 2000);
