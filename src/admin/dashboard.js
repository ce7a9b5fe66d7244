// cogrelay dashboard: polls the admin API every 2 s. Every value that comes from
// a job is put on the page with textContent, never as HTML, so a payload holding
// markup or script is shown, not run.
'use strict';
const $ = (sel) => document.querySelector(sel);
const LIMIT = 20;
let offset = 0;
let token = sessionStorage.getItem('cogrelay-admin-token') || '';
let lastDelivered = null;
const history = [];

async function api(path, method = 'GET') {
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const r = await fetch(path, { method, headers });
  if (r.status === 401) {
    $('#auth').style.display = 'block';
    throw new Error('the admin API wants the token (ADMIN_TOKEN)');
  }
  const body = await r.json().catch(() => ({}));
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

async function deliveredTotal() {
  const text = await (await fetch('/metrics')).text();
  const m = text.match(/^cogrelay_deliveries_total\{outcome="delivered"\} (\d+)/m);
  return m ? Number(m[1]) : 0;
}

function drawSparkline() {
  const max = Math.max(1, ...history);
  const step = 600 / 149;
  const points = history.map((v, i) => (i * step).toFixed(1) + ',' + (58 - (v / max) * 56).toFixed(1));
  $('#spark-line').setAttribute('points', points.join(' '));
  const last = history.length ? history[history.length - 1] : 0;
  $('#rate').textContent = (last / 2).toFixed(1) + ' delivered/s now, peak ' + (max / 2).toFixed(1) + '/s';
}

async function refresh() {
  try {
    const c = await api('/admin/queue');
    for (const k of ['waiting', 'active', 'delayed', 'completed', 'failed']) $('#count-' + k).textContent = String(c[k]);
    const delivered = await deliveredTotal();
    if (lastDelivered !== null) {
      history.push(Math.max(0, delivered - lastDelivered));
      if (history.length > 150) history.shift();
    }
    lastDelivered = delivered;
    drawSparkline();
    const page = await api('/admin/jobs?state=failed&offset=' + offset + '&limit=' + LIMIT);
    const tbody = $('#failed-table tbody');
    tbody.replaceChildren();
    for (const job of page.items) {
      const tr = document.createElement('tr');
      tr.dataset.id = job.id;
      cell(tr, job.id);
      cell(tr, job.eventKey);
      cell(tr, String(job.attemptsMade));
      cell(tr, lastAnswer(job));
      cell(tr, job.failedReason || '', 'reason');
      const actions = cell(tr, '');
      actions.appendChild(button('Show', 'show', () => show(job.id)));
      actions.appendChild(button('Retry', 'retry', () => act('/admin/jobs/' + encodeURIComponent(job.id) + '/retry', 'POST')));
      actions.appendChild(button('Remove', 'remove', () => act('/admin/jobs/' + encodeURIComponent(job.id), 'DELETE')));
      tbody.appendChild(tr);
    }
    const to = Math.min(offset + page.items.length, page.total);
    $('#page').textContent = page.total ? (offset + 1) + '–' + to + ' of ' + page.total : 'no failed jobs';
    $('#prev').disabled = offset === 0;
    $('#next').disabled = to >= page.total;
    $('#status').textContent = 'updated ' + new Date().toLocaleTimeString();
    $('#error').textContent = '';
  } catch (e) {
    $('#error').textContent = String(e.message || e);
  }
}

async function act(path, method) {
  try {
    await api(path, method);
  } catch (e) {
    $('#error').textContent = String(e.message || e);
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
    $('#error').textContent = String(e.message || e);
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
