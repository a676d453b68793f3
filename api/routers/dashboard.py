"""Browser dashboard: GET /ui (job list: status, stage, progress; refreshes every few seconds) and
GET /ui/jobs/{id} (job status, each variant of a sweep spread over workers with its own progress,
certificate summary, downloads, a signed report link that opens without a key, the embedded report).

Plain HTML + a small inline script, no build step. The pages themselves hold no data: the script
calls the JSON API with `Authorization: Bearer <key>`, the key pasted once into the page (or given
as `#key=...` in the URL, which never reaches the server) and kept in localStorage. Everything
from the API is inserted with textContent (never as HTML), except the report fragment, which the
server renders with every value escaped."""

from __future__ import annotations

import html
import json
import re

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from api.errors import ApiProblem

router = APIRouter(prefix="/ui", tags=["dashboard"], include_in_schema=False)

REFRESH_MS = 3000
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3a5f;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}main{padding:16px 20px;max-width:1250px}
#keybox{display:flex;gap:6px;align-items:center;margin-left:auto;font-size:13px}
input,select,button{font:inherit;padding:3px 6px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e3e3e3;padding:6px 8px;text-align:left;font-size:14px}th{background:#f0f2f5}
.label{display:inline-block;margin:1px 2px;padding:0 6px;border:1px solid #c9d3e0;border-radius:8px}
.badge{padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;background:#888}
.queued{background:#7a7a7a}.running{background:#1f6fd1}.succeeded{background:#1d8a3a}
.failed{background:#c0392b}.cancelled{background:#b9770e}progress{width:140px}
#msg{color:#c0392b;margin:8px 0;min-height:1.2em}.mono{font-family:ui-monospace,monospace;font-size:13px}
.card{background:#fff;border:1px solid #e3e3e3;padding:12px 16px;margin-bottom:14px;border-radius:6px}
dl{display:grid;grid-template-columns:160px auto;gap:4px 12px;margin:0}dt{color:#666}
"""

COMMON_JS = """
const KEY = 'carcert_api_key';
(function takeKeyFromHash() {
  const m = location.hash.match(/[#&]key=([^&]+)/);
  if (m) { localStorage.setItem(KEY, decodeURIComponent(m[1]));
           history.replaceState(null, '', location.pathname + location.search); }
})();
function apiKey() { return localStorage.getItem(KEY) || ''; }
function say(text) { document.getElementById('msg').textContent = text || ''; }
async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({'Accept': 'application/json'}, opts.headers || {});
  if (apiKey()) headers['Authorization'] = 'Bearer ' + apiKey();
  const r = await fetch(path, Object.assign({}, opts, {headers}));
  if (!r.ok) {
    let p = {}; try { p = await r.json(); } catch (e) {}
    const err = new Error((p.title || r.statusText) + (p.detail ? ': ' + p.detail : ''));
    err.status = r.status; throw err;
  }
  return r;
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? '' : String(k)));
  return e;
}
function labelChips(labels) {
  return Object.entries(labels || {}).map(([k, v]) => el('span', {'class': 'label'}, k + '=' + v));
}
function badge(status) { return el('span', {'class': 'badge ' + status}, status); }
function pct(p) { return Math.round(100 * (p || 0)) + '%'; }
function fmt(v, d) {
  if (v == null) return '-';
  return typeof v === 'number' ? v.toFixed(d == null ? 4 : d) : String(v);
}
function setupKeyBox(onChange) {
  const input = document.getElementById('key');
  input.value = apiKey() ? '\\u2022'.repeat(8) : '';
  document.getElementById('savekey').addEventListener('click', () => {
    if (input.value && !input.value.startsWith('\\u2022')) localStorage.setItem(KEY, input.value.trim());
    input.value = apiKey() ? '\\u2022'.repeat(8) : ''; onChange();
  });
  document.getElementById('forget').addEventListener('click', () => {
    localStorage.removeItem(KEY); input.value = ''; onChange();
  });
}
function dl(label, path, filename) { return el('button', {onclick: () => download(path, filename)}, label); }
async function download(path, filename) {
  try {
    const r = await api(path, {headers: {'Accept': '*/*'}});
    const url = URL.createObjectURL(await r.blob());
    const a = el('a', {href: url, download: filename}); document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { say(e.message); }
}
"""

LIST_JS = """
let timer = null;
async function refresh() {
  const status = document.getElementById('status').value;
  const q = new URLSearchParams({limit: '100'}); if (status) q.set('status', status);
  for (const lab of document.getElementById('label').value.split(/[\\s,]+/)) if (lab) q.append('label', lab);
  try {
    const page = await (await api('/jobs?' + q)).json();
    const body = document.getElementById('jobs'); body.replaceChildren();
    for (const j of page.items) {
      const actions = el('td');
      if (j.status === 'queued' || j.status === 'running') {
        const cancel = async () => {
          try { await api('/jobs/' + j.id + '/cancel', {method: 'POST'}); refresh(); }
          catch (e) { say(e.message); }
        };
        actions.append(el('button', {onclick: cancel}, j.cancel_requested ? 'cancelling' : 'cancel'));
      }
      const vs = (j.summary && j.summary.variants) || [];
      const variants = vs.map(v => v.name).join(', ');
      body.append(el('tr', {'class': 'job', 'data-id': j.id, 'data-status': j.status},
        el('td', {'class': 'mono'}, el('a', {href: '/ui/jobs/' + encodeURIComponent(j.id)}, j.id)),
        el('td', {'class': 'name'}, j.name || '-', ' ', ...labelChips(j.labels)),
        el('td', {}, j.kind), el('td', {}, badge(j.status)), el('td', {}, j.stage || '-'),
        el('td', {}, el('progress', {max: '1', value: String(j.progress || 0)}), ' ', pct(j.progress)),
        el('td', {}, variants), el('td', {}, (j.created_at || '').replace('T', ' ').slice(0, 19)), actions));
    }
    const more = page.next_cursor ? '+' : '';
    document.getElementById('count').textContent = page.items.length + more + ' jobs';
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    say('');
  } catch (e) {
    say(e.status === 401 ? 'Paste your API key above (Authorization: Bearer ...).' : e.message);
  }
}
function start() { clearInterval(timer); refresh(); timer = setInterval(refresh, REFRESH_MS); }
setupKeyBox(start);
document.getElementById('status').addEventListener('change', start);
document.getElementById('label').addEventListener('change', start);
start();
"""

JOB_JS = """
let timer = null;
function certs(doc, job) {
  if (doc.certificates) return doc.certificates;
  const v = ((job.summary || {}).variants || [])[0] || {};
  return [{name: v.name || 'result', single: true, certificate: doc}];
}
async function showResults(job) {
  const doc = await (await api('/jobs/' + JOB_ID + '/certificate')).json();
  const box = document.getElementById('certs'); box.replaceChildren();
  const heads = ['variant', 'accuracy (certified samples)', 'PCA', 'certified', 'sparsity',
    'failure probability', 'n / l / alpha / epsilon', 'files'];
  const table = el('table', {}, el('tr', {}, ...heads.map(h => el('th', {}, h))));
  for (const c of certs(doc, job)) {
    const cert = c.certificate || {}; const s = cert.samples || []; const p = cert.params || {};
    const variant = c.single ? '' : '?variant=' + encodeURIComponent(c.name);
    const base = '/jobs/' + JOB_ID + '/', prefix = JOB_ID + '-' + c.name + '-';
    const files = el('td', {}, dl('model', base + 'model' + variant, prefix + 'model.safetensors'), ' ',
      dl('mask', base + 'mask' + variant, prefix + 'mask.safetensors'));
    table.append(el('tr', {'class': 'cert'}, el('td', {}, c.name), el('td', {}, fmt(cert.accuracy)),
      el('td', {}, fmt(cert.pca)), el('td', {}, s.filter(x => x.certified).length + '/' + s.length),
      el('td', {}, fmt((cert.model || {}).sparsity)), el('td', {}, fmt(cert.failure_probability, 8)),
      el('td', {}, [p.n, p.l, p.alpha, p.epsilon].join(' / ')), files));
  }
  box.append(table, el('p', {},
    dl('certificate JSON', '/jobs/' + JOB_ID + '/certificate', JOB_ID + '-certificate.json'), ' ',
    dl('report PDF', '/jobs/' + JOB_ID + '/report.pdf', JOB_ID + '-report.pdf')),
    el('p', {}, 'Report link: ', el('span', {id: 'share-box'}, '...')));
  await shareLink();
  const html = {headers: {'Accept': 'text/html'}};
  const rep = await (await api('/jobs/' + JOB_ID + '/report?embed=1', html)).text();
  document.getElementById('report').innerHTML = rep;  // server-rendered, every value escaped
}
async function shareLink() {
  try {
    const link = await (await api('/jobs/' + JOB_ID + '/report/link', {method: 'POST'})).json();
    const a = el('a', {id: 'share-link', href: link.url, target: '_blank', rel: 'noreferrer'}, 'open');
    document.getElementById('share-box').replaceChildren(a, ' (opens without an API key; valid until ',
      link.expires_at.replace('T', ' ').slice(0, 19) + ' UTC)');
  } catch (e) { say(e.message); }
}
async function refresh() {
  try {
    const j = await (await api('/jobs/' + JOB_ID)).json();
    const info = document.getElementById('info'); info.replaceChildren();
    const hook = j.webhook ? j.webhook.state + ' (' + j.webhook.attempts + ' attempts' +
      (j.webhook.error ? ', last: ' + j.webhook.error : '') + ')' : '-';
    const rows = [['name', j.name || '-'], ['labels', el('span', {}, ...labelChips(j.labels))],
      ['status', badge(j.status)], ['kind', j.kind], ['stage', j.stage || '-'], ['webhook', hook],
      ['progress', el('span', {}, el('progress', {max: '1', value: String(j.progress || 0)}), ' ',
                      pct(j.progress))],
      ['created', j.created_at], ['started', j.started_at || '-'], ['finished', j.finished_at || '-'],
      ['attempts', j.attempts]];
    if (j.error) rows.push(['error', (j.error.title || '') + ': ' + (j.error.detail || '')]);
    for (const u of (j.units || [])) {  // a sweep spread over workers: each variant's own progress
      rows.push(['unit-' + u.name, el('span', {}, badge(u.status), ' ', u.stage || '-', ' ',
        el('progress', {max: '1', value: String(u.progress || 0)}), ' ', pct(u.progress))]);
    }
    for (const [k, v] of rows) info.append(el('dt', {}, k), el('dd', {'id': 'job-' + k}, v));
    document.getElementById('spec').textContent = JSON.stringify(j.spec, null, 2);
    document.getElementById('job').setAttribute('data-status', j.status);
    say('');
    if (['succeeded', 'failed', 'cancelled'].includes(j.status)) {
      clearInterval(timer);
      const shown = document.getElementById('report').childElementCount;
      if (j.status === 'succeeded' && !shown) await showResults(j);
    }
  } catch (e) {
    say(e.status === 401 ? 'Paste your API key above (Authorization: Bearer ...).' : e.message);
  }
}
function start() { clearInterval(timer); refresh(); timer = setInterval(refresh, REFRESH_MS); }
setupKeyBox(start);
start();
"""


def _page(title: str, body: str, script: str, extra_js: str = "") -> HTMLResponse:
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<header><a href="/ui">carcert</a><span>{html.escape(title)}</span>
<span id="keybox"><label for="key">API key</label><input id="key" type="password" size="24"
 placeholder="cc_..." autocomplete="off"><button id="savekey">save</button>
<button id="forget">forget</button></span></header>
<main><div id="msg" role="status"></div>{body}</main>
<script>const REFRESH_MS = {REFRESH_MS};{extra_js}
{COMMON_JS}
{script}</script>
</body></html>"""
    return HTMLResponse(doc, headers=HEADERS)


@router.get("", response_class=HTMLResponse)
def jobs_page() -> HTMLResponse:
    options = "".join(
        f'<option value="{s}">{s}</option>' for s in ("queued", "running", "succeeded", "failed", "cancelled")
    )
    body = f"""<p><label>status <select id="status"><option value="">all</option>{options}</select></label>
 <label>labels <input id="label" placeholder="key:value key:value" size="24"></label>
 <span id="count"></span> <small id="updated"></small></p>
<table><thead><tr><th>job</th><th>name / labels</th><th>kind</th><th>status</th><th>stage</th>
<th>progress</th>
<th>variants</th><th>created (UTC)</th><th></th></tr></thead><tbody id="jobs"></tbody></table>"""
    return _page("jobs", body, LIST_JS)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> HTMLResponse:
    if not JOB_ID.match(job_id):
        raise ApiProblem(404, "not-found", "no such job", title="Not Found")
    safe = html.escape(job_id)
    body = f"""<div id="job" class="card" data-id="{safe}"><h2 class="mono">job {safe}</h2><dl id="info"></dl>
<details><summary>job spec</summary><pre id="spec" class="mono"></pre></details></div>
<div class="card"><h2>Certificates</h2><div id="certs"><p>Shown once the job has succeeded.</p></div></div>
<div class="card" id="report"></div>"""
    return _page(f"job {job_id}", body, JOB_JS, f"const JOB_ID = {json.dumps(job_id)};")
