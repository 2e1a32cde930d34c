// metanode cluster dashboard: polls GET /v1/dashboard/stats on the node that served
// the page, once a second, and draws what it answers. Plain JavaScript, no
// dependencies, nothing fetched from anywhere else.
//
// The embedded statuses may come in two shapes (both are read):
//   * metanode's first one: "voters"/"non_voters" lists of ids, "replication" values
//     {"index": I}, "endpoint" {"addr","port"}, "leader" {"id","endpoint"};
//   * databend-meta's MetaNodeStatus: "voters"/"non_voters" lists of Node records
//     {"name","endpoint":{"addr","port"},"grpc_api_advertise_address"}, "replication"
//     values log ids {"leader_id":{"term","node_id"},"index"}, "endpoint" "host:port",
//     "leader" a Node record (with "name").
'use strict';

(function () {
  const POLL_MS = 1000;
  const WINDOW_MS = 5 * 60 * 1000;
  const FETCH_TIMEOUT_MS = 2500;
  const PEER_FRESH_MS = 3500;
  const LAG_FULL = 100000;  // entries behind at which the lag bar is full (log scale)
  const LAG_WARN = 1000;
  const NO_ADDRESS = 'no client address';

  const state = {
    data: null,         // the last good answer
    series: [],         // points of the last WINDOW_MS, merged across polls
    startedMs: null,    // the server's sampler start: a change means it restarted
    okAt: null,         // browser clock of the last good answer
    failingSince: null, // browser clock of the first failure in a row
    error: null,
  };

  // ------------------------------------------------------------------ helpers
  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.setAttribute('class', v);
      else if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(el, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function replace(el, ...children) {
    el.replaceChildren();
    append(el, children);
  }

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

  function fmtInt(v) {
    return isNum(v) ? Math.round(v).toLocaleString('en-US') : '—';
  }

  function fmtRate(v) {
    if (!isNum(v)) return '—';
    if (v >= 100) return Math.round(v).toLocaleString('en-US');
    if (v >= 10) return v.toFixed(1);
    if (v === 0) return '0';
    return v.toFixed(2);
  }

  function fmtMs(v) {
    if (!isNum(v)) return '—';
    if (v >= 100) return Math.round(v).toLocaleString('en-US');
    if (v >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  const pad = (n) => String(n).padStart(2, '0');
  function fmtTime(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtAgo(ms) {
    if (!isNum(ms)) return '';
    const sec = Math.max(0, ms / 1000);
    if (sec < 10) return `${sec.toFixed(1)} s ago`;
    if (sec < 120) return `${Math.round(sec)} s ago`;
    return `${Math.round(sec / 60)} min ago`;
  }

  function listIds(ids) {
    if (ids.length === 1) return `Node ${ids[0]}`;
    return `Nodes ${ids.slice(0, -1).join(', ')} and ${ids[ids.length - 1]}`;
  }

  // ------------------------------------------------------- status, either shape
  function nodeIdOf(v) {
    if (typeof v === 'number' && Number.isInteger(v)) return v;
    if (v && typeof v === 'object') {
      if (typeof v.id === 'number') return v.id;
      if (typeof v.name === 'string' && /^\d+$/.test(v.name)) return Number(v.name);
    }
    return null;
  }

  function indexOf(v) {
    if (typeof v === 'number') return v;
    if (v && typeof v === 'object' && typeof v.index === 'number') return v.index;
    return null;
  }

  function endpointText(e) {
    if (typeof e === 'string' && e) return e;
    if (e && typeof e === 'object' && e.addr !== undefined && e.addr !== null) return `${e.addr}:${e.port}`;
    return null;
  }

  function roleOf(raw) {
    if (raw.is_leader === true) return 'leader';
    const st = String(raw.state || '').toLowerCase();
    if (st === 'precandidate') return 'candidate';
    return ['leader', 'follower', 'learner', 'candidate'].includes(st) ? st : 'unknown';
  }

  function ids(list) {
    if (!Array.isArray(list)) return [];
    return list.map(nodeIdOf).filter((i) => i !== null).sort((a, b) => a - b);
  }

  function normStatus(raw) {
    if (!raw || typeof raw !== 'object') return null;
    const records = new Map();
    for (const v of [].concat(raw.voters || [], raw.non_voters || [])) {
      if (v && typeof v === 'object') {
        const id = nodeIdOf(v);
        if (id !== null) records.set(id, v);
      }
    }
    let replication = null;
    if (raw.replication && typeof raw.replication === 'object') {
      replication = new Map();
      for (const [k, v] of Object.entries(raw.replication)) {
        if (/^\d+$/.test(k)) replication.set(Number(k), indexOf(v));
      }
    }
    return {
      id: nodeIdOf(raw),
      role: roleOf(raw),
      isLeader: raw.is_leader === true,
      term: isNum(raw.current_term) ? raw.current_term : null,
      lastLog: isNum(raw.last_log_index) ? raw.last_log_index : null,
      applied: indexOf(raw.last_applied),
      snapshot: indexOf(raw.snapshot_last_log_id),
      purged: indexOf(raw.purged),
      leaderId: nodeIdOf(raw.leader),
      leaderEndpoint: raw.leader ? endpointText(raw.leader.endpoint) : null,
      endpoint: endpointText(raw.endpoint),
      replication,
      voters: ids(raw.voters),
      learners: ids(raw.non_voters),
      records,
      clusterId: typeof raw.cluster_id === 'string' ? raw.cluster_id : null,
    };
  }

  // ------------------------------------------------------------------ the model
  function buildModel(d) {
    const me = normStatus(d.status);
    const peers = new Map(Object.entries(d.peers || {}).map(([k, v]) => [Number(k), v]));
    const links = new Map(Object.entries(d.links || {}).map(([k, v]) => [Number(k), v]));
    const records = new Map();
    for (const r of Array.isArray(d.nodes) ? d.nodes : []) {
      const id = nodeIdOf(r);
      if (id !== null) records.set(id, r);
    }
    for (const [id, r] of me.records) if (!records.has(id)) records.set(id, r);

    const fresh = (id) => {
      const p = peers.get(id);
      if (!p || !p.status || p.error || !isNum(p.age_ms) || p.age_ms > PEER_FRESH_MS) return null;
      return normStatus(p.status);
    };

    const memberIds = new Set([...me.voters, ...me.learners]);
    if (me.id !== null) memberIds.add(me.id);
    if (me.leaderId !== null) memberIds.add(me.leaderId);

    // The leader's view: this node's if it leads, else the leader's own status.
    let leaderView = null;
    if (me.isLeader) leaderView = me;
    else if (me.leaderId !== null) {
      const ls = fresh(me.leaderId);
      if (ls && ls.isLeader) leaderView = ls;
    }

    const members = [...memberIds].sort((a, b) => a - b).map((id) => {
      const rec = records.get(id) || null;
      const m = {
        id,
        name: rec && typeof rec.name === 'string' ? rec.name : String(id),
        endpoint: endpointText(rec && rec.endpoint) || (id === me.id ? me.endpoint : null),
        self: id === me.id,
        voter: me.voters.includes(id),
        learner: me.learners.includes(id),
        member: me.voters.includes(id) || me.learners.includes(id),
        st: null,
        role: 'unknown',
        why: '',
        detail: '',
        lag: null,
      };
      const p = peers.get(id);
      const link = links.get(id);
      const linkDown = link && link.connected === false;
      if (m.self) {
        m.st = me;
        m.role = me.role;
      } else {
        const ps = fresh(id);
        if (ps) {
          m.st = ps;
          m.role = ps.role;
        } else if (p && p.error && !(link && link.connected === true)) {
          m.role = 'down';
          m.why = isNum(p.failing_since_ms) ? `no answer since ${fmtTime(p.failing_since_ms)}` : 'no answer';
          m.detail = p.error;
        } else if (linkDown) {
          m.role = 'down';
          m.why = `node ${me.id}'s raft link to it is down`;
        } else if (id === me.leaderId) {
          m.role = 'leader';
          m.why = `as node ${me.id} sees it`;
        } else if (me.isLeader && me.replication && me.replication.has(id) && link && link.connected) {
          m.role = m.learner ? 'learner' : 'follower';
          m.why = 'replicating from this leader';
        } else if (p && p.error) {
          m.why = 'its client API does not answer';
          m.detail = p.error;
        } else if (p) {
          m.why = 'asking for its status…';
        } else {
          m.why = rec && rec.grpc_api_advertise_address ? 'not asked yet' : NO_ADDRESS;
          if (m.learner) m.why = `learner · ${m.why}`;
        }
      }
      if (leaderView && leaderView.replication) {
        if (id === leaderView.id) m.lag = { leader: true };
        else if (leaderView.replication.has(id)) {
          const matched = leaderView.replication.get(id);
          const st = me.isLeader && link ? link.replication_state || null : null;
          const behind = isNum(matched) && isNum(leaderView.lastLog) ? Math.max(0, leaderView.lastLog - matched) : null;
          m.lag = { matched, behind, state: st };
        }
      }
      return m;
    });

    return { me, members, leaderView, records };
  }

  // --------------------------------------------------------------------- polling
  async function poll() {
    const started = performance.now();
    const last = state.series.length ? state.series[state.series.length - 1].t : null;
    const url = '/v1/dashboard/stats' + (last !== null ? `?since=${last}` : '');
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(url, { cache: 'no-store', signal: ctrl.signal });
      let body = null;
      try { body = await r.json(); } catch (e) { body = null; }
      if (!r.ok) {
        const msg = body && body.error ? body.error : r.statusText;
        throw new Error(`HTTP ${r.status}: ${msg}`);
      }
      if (!body || typeof body !== 'object' || !body.status) throw new Error('malformed answer');
      accept(body);
    } catch (e) {
      const msg = e && e.name === 'AbortError' ? `no answer within ${FETCH_TIMEOUT_MS / 1000} s` :
        (e && e.message === 'Failed to fetch' ? 'connection refused or lost' : String(e && e.message || e));
      state.error = msg;
      if (state.failingSince === null) state.failingSince = Date.now();
    } finally {
      clearTimeout(timer);
    }
    try {
      render();
    } catch (e) {
      console.error(e);
    }
    setTimeout(poll, Math.max(50, POLL_MS - (performance.now() - started)));
  }

  function accept(d) {
    if (state.startedMs !== d.started_ms) {
      state.series = [];
      state.startedMs = d.started_ms;
    }
    const last = state.series.length ? state.series[state.series.length - 1].t : -Infinity;
    for (const p of d.series || []) if (p.t > last) state.series.push(p);
    const from = d.now_ms - WINDOW_MS;
    while (state.series.length && state.series[0].t < from) state.series.shift();
    state.data = d;
    state.okAt = Date.now();
    state.failingSince = null;
    state.error = null;
  }

  // --------------------------------------------------------------------- render
  function render() {
    const d = state.data;
    const down = state.error !== null;
    document.body.dataset.state = down ? 'down' : (d ? 'live' : 'loading');
    renderConn(down);
    if (!d) {
      renderAlerts(null, down);
      return;
    }
    const model = buildModel(d);
    document.body.dataset.leaderId = model.me.leaderId === null ? '' : String(model.me.leaderId);
    renderHeader(d, model);
    renderAlerts(model, down);
    renderTiles(d, model);
    renderMembers(d, model);
    renderCharts(d);
    renderTimeline(d, model);
  }

  function renderConn(down) {
    const el = $('conn');
    if (down) {
      el.dataset.state = 'down';
      const since = state.okAt ? `last data ${fmtAgo(Date.now() - state.okAt)}` : 'no data yet';
      $('conn-text').textContent = `not answering · ${since}`;
    } else if (state.data) {
      el.dataset.state = 'live';
      $('conn-text').textContent = `live · ${fmtTime(state.data.now_ms)}`;
    }
  }

  function renderHeader(d, model) {
    $('cluster-name').textContent = d.cluster_name || '—';
    const cid = model.me.clusterId;
    $('cluster-id').textContent = cid ? `id ${cid}` : '';
    $('cluster-id').title = cid ? `cluster id ${cid}` : '';
    replace($('served-by'), `node ${model.me.id}`, h('span', { class: 'muted', text: ` · ${location.host}` }));
    document.title = `${d.cluster_name || 'metanode'} · node ${model.me.id} · metanode`;
  }

  function renderAlerts(model, down) {
    const box = $('alerts');
    const alerts = [];
    if (down) {
      const who = model ? `Node ${model.me.id}` : 'The node serving this page';
      const where = location.host;
      const since = state.okAt ? ` The data below is from ${fmtTime(state.data.now_ms)} (${fmtAgo(Date.now() - state.okAt)}).` : '';
      alerts.push(h('div', { class: 'alert down', id: 'alert-server-down' },
        h('strong', { text: `${who} is not answering` }), ` (this page's server, ${where}): ${state.error}.${since} Retrying every second.`));
    }
    if (model && !down) {
      const me = model.me;
      if (me.leaderId === null) {
        alerts.push(h('div', { class: 'alert warn', id: 'alert-no-leader' },
          h('strong', { text: 'No leader.' }),
          ` Node ${me.id} sees no leader at term ${fmtInt(me.term)}: an election is under way, or a quorum of voters cannot be reached. Writes and linearizable reads wait until there is one.`));
      }
      const downIds = model.members.filter((m) => m.role === 'down').map((m) => m.id);
      if (downIds.length) {
        const verb = downIds.length === 1 ? 'is' : 'are';
        const voters = model.members.filter((m) => m.voter);
        const upVoters = voters.filter((m) => m.role !== 'down').length;
        const quorum = Math.floor(voters.length / 2) + 1;
        const q = voters.length ? ` ${upVoters} of ${voters.length} voters answer; a quorum needs ${quorum}.` : '';
        alerts.push(h('div', { class: 'alert down', id: 'alert-members-down' },
          h('strong', { text: `${listIds(downIds)} ${verb} down` }), ` (seen from node ${me.id}).${q}`));
      }
    }
    replace(box, alerts);
  }

  function leaderSince(d, model) {
    const me = model.me;
    let since = null;
    for (const e of d.events || []) {
      if (e.leader === me.leaderId && e.term === me.term) { if (since === null) since = e; }
      else since = null;
    }
    return since;
  }

  function renderTiles(d, model) {
    const me = model.me;
    const leaderEl = $('leader');
    leaderEl.dataset.leaderId = me.leaderId === null ? '' : String(me.leaderId);
    if (me.leaderId === null) {
      leaderEl.className = 'value none';
      leaderEl.textContent = 'none';
      $('leader-sub').textContent = `term ${fmtInt(me.term)}`;
      $('leader-sub2').textContent = 'an election, or no quorum';
    } else {
      leaderEl.className = 'value leader';
      const lead = model.members.find((m) => m.id === me.leaderId);
      replace(leaderEl, `node ${me.leaderId}`, me.leaderId === me.id ? h('span', { class: 'unit', text: '  this node' }) : null);
      const since = leaderSince(d, model);
      const when = since && since.kind !== 'start' ? ` · since ${fmtTime(since.t)}` : '';
      $('leader-sub').textContent = `term ${fmtInt(me.term)}${when}`;
      $('leader-sub2').textContent = lead && lead.endpoint ? `raft ${lead.endpoint}` : '';
    }

    const voters = model.members.filter((m) => m.voter);
    const learners = model.members.filter((m) => m.learner);
    replace($('members-count'), `${voters.length}`, h('span', { class: 'unit', text: voters.length === 1 ? ' voter' : ' voters' }),
      learners.length ? h('span', { class: 'unit', text: ` · ${learners.length} learner${learners.length === 1 ? '' : 's'}` }) : null);
    const members = model.members.filter((m) => m.member);
    const nDown = members.filter((m) => m.role === 'down').length;
    const nUnknown = members.filter((m) => m.role === 'unknown').length;
    const nUp = members.length - nDown - nUnknown;
    const parts = [`${nUp} up`];
    if (nDown) parts.push(`${nDown} down`);
    if (nUnknown) parts.push(`${nUnknown} not seen from here`);
    $('members-sub').textContent = parts.join(' · ');
    const quorum = Math.floor(voters.length / 2) + 1;
    $('members-sub2').textContent = voters.length ? `a quorum is ${quorum} of ${voters.length} voters` : '';

    replace($('log-last'), fmtInt(me.lastLog), h('span', { class: 'unit', text: ' last index' }));
    $('log-sub').textContent = `applied ${fmtInt(me.applied)}`;
    $('log-sub2').textContent = `snapshot ${fmtInt(me.snapshot)} · purged ${fmtInt(me.purged)}`;

    const p = state.series.length ? state.series[state.series.length - 1] : null;
    replace($('rate-now'), p ? fmtRate(p.applied_per_s) : '—', h('span', { class: 'unit', text: ' writes/s' }));
    $('rate-sub').textContent = p ? `reads at this node ${fmtRate(p.reads_per_s)}/s` : 'waiting for the first second';
    let lat = '';
    if (p && (isNum(p.write_p99_ms) || isNum(p.read_p99_ms))) {
      lat = `p99 write ${fmtMs(p.write_p99_ms)} ms · read ${fmtMs(p.read_p99_ms)} ms`;
    } else if (p) lat = 'no client requests at this node';
    $('rate-sub2').textContent = lat;
  }

  function cell(value, cls) {
    const known = isNum(value);
    return h('td', { class: `num${known ? '' : ' unknown'}${cls ? ' ' + cls : ''}`, text: fmtInt(value) });
  }

  function lagCell(m) {
    if (!m.lag) {
      return h('td', null, h('div', { class: 'lag none' }, h('span', { class: 'text', text: m.member ? '—' : 'not a member' })));
    }
    if (m.lag.leader) {
      return h('td', null, h('div', { class: 'lag none' }, h('span', { class: 'text', text: 'leader' })));
    }
    const { behind, matched, state: rs } = m.lag;
    const down = m.role === 'down';
    let width = 0;
    if (isNum(behind) && behind > 0) width = Math.max(0.03, Math.min(1, Math.log10(1 + behind) / Math.log10(1 + LAG_FULL)));
    if (down && !isNum(behind)) width = 1;
    const warn = !down && ((isNum(behind) && behind >= LAG_WARN) || (rs && rs !== 'replicate' && behind > 0));
    const label = !isNum(behind) ? 'no match yet' : (behind === 0 ? 'in sync' : `${fmtInt(behind)} behind`);
    const extra = [];
    if (isNum(matched)) extra.push(`matched ${fmtInt(matched)}`);
    if (rs === 'snapshot') extra.push('sending a snapshot');
    else if (rs === 'probe' && !down) extra.push('probing');
    const fill = h('div', { class: `fill ${down ? 'down' : (warn ? 'warn' : '')}` });
    fill.style.width = `${(width * 100).toFixed(1)}%`;
    return h('td', { title: `the leader's view: ${label}${extra.length ? ', ' + extra.join(', ') : ''}` },
      h('div', { class: 'lag', 'data-behind': isNum(behind) ? behind : '' },
        h('div', { class: 'track' }, fill),
        h('span', { class: `text ${warn ? 'warn' : ''}`, text: label }),
        extra.length ? h('span', { class: 'muted', text: extra.join(' · ') }) : null));
  }

  function renderMembers(d, model) {
    const rows = model.members.map((m) => {
      const st = m.st;
      const tags = [];
      if (m.self) tags.push(h('span', { class: 'tag', text: 'this node' }));
      if (!m.member) tags.push(h('span', { class: 'tag', text: 'not a member' }));
      const roleText = m.role === 'unknown' ? 'unknown' : m.role;
      const tr = h('tr', { 'data-node-id': m.id, 'data-role': m.role, class: m.role === 'leader' ? 'is-leader' : null },
        h('td', null, h('span', { class: 'node-id', text: m.name === String(m.id) ? `${m.id}` : `${m.id} · ${m.name}` }), tags),
        h('td', { class: 'mono', text: m.endpoint || '—' }),
        h('td', { class: 'c-role', title: [m.why, m.detail].filter(Boolean).join(': ') || null },
          h('span', { class: `role ${m.role}`, text: roleText }),
          m.why && !st ? h('span', { class: 'why', text: m.why }) : null),
        cell(st && st.term), cell(st && st.lastLog), cell(st && st.applied), cell(st && st.snapshot), cell(st && st.purged),
        lagCell(m));
      return tr;
    });
    replace($('members-body'), rows);

    const me = model.me;
    const polled = model.members.filter((m) => !m.self && m.st).length;
    const others = model.members.filter((m) => !m.self).length;
    let view = `as node ${me.id} sees it`;
    if (others) view += polled === others ? ' · every member reports its own numbers' : ` · ${polled} of ${others} other members report their own numbers`;
    $('members-view').textContent = view;
    const notes = [];
    if (model.members.some((m) => !m.self && !m.st && m.why.endsWith(NO_ADDRESS))) {
      notes.push('A member that publishes no client address (grpc_api_advertise_host) is shown only as this node sees it: its own term and indexes are unknown here.');
    }
    if (!model.leaderView) {
      notes.push(me.leaderId === null
        ? 'Replication lag needs a leader.'
        : `Replication lag is the leader's view: node ${me.leaderId}'s status is not reachable from here.`);
    } else {
      notes.push(`Lag = node ${model.leaderView.id}'s last log index minus the index it has matched on each member (log scale, full bar = ${fmtInt(LAG_FULL)} entries).`);
    }
    $('members-note').textContent = notes.join(' ');
  }

  // --------------------------------------------------------------------- charts
  function niceMax(v) {
    if (!isNum(v) || v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function axisLabel(v) {
    if (v >= 1000) return `${(v / 1000).toLocaleString('en-US', { maximumFractionDigits: 1 })}k`;
    if (v >= 10 || Number.isInteger(v)) return String(Math.round(v));
    if (v >= 0.1) return String(Number(v.toFixed(1)));
    return String(Number(v.toPrecision(1)));
  }

  // A linear axis from 0 (rates), or a logarithmic one by decades (latencies: p50
  // and p99 differ by orders of magnitude, and one slow second must not flatten the rest).
  function yScale(values, log, top, bottom) {
    if (!log) {
      const ymax = niceMax(Math.max(0, ...values));
      return { Y: (v) => top + (1 - v / ymax) * (bottom - top), ticks: [0, ymax / 2, ymax] };
    }
    const pos = values.filter((v) => v > 0);
    let lo = pos.length ? Math.floor(Math.log10(Math.min(...pos))) : -1;
    let hi = pos.length ? Math.ceil(Math.log10(Math.max(...pos))) : 1;
    lo = Math.max(-2, Math.min(lo, hi - 1));
    if (hi <= lo) hi = lo + 1;
    const ticks = [];
    const step = hi - lo > 4 ? 2 : 1;
    for (let e = lo; e <= hi; e += step) ticks.push(Math.pow(10, e));
    const Y = (v) => top + (1 - (Math.log10(Math.max(v, Math.pow(10, lo))) - lo) / (hi - lo)) * (bottom - top);
    return { Y, ticks };
  }

  function drawChart(fig, nowMs, lines, nowText, log) {
    const W = 280, H = 118, L = 30, R = 6, T = 8, B = 18;
    const pts = state.series;
    const x0 = nowMs - WINDOW_MS;
    const X = (t) => L + ((t - x0) / WINDOW_MS) * (W - L - R);
    const values = [];
    for (const ln of lines) for (const p of pts) if (isNum(p[ln.key]) && p.t >= x0) values.push(p[ln.key]);
    const { Y, ticks } = yScale(values, !!log, T, H - B);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': fig.querySelector('figcaption span').textContent });
    for (const v of ticks) {
      const y = Y(v);
      svg.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: y, y2: y }));
      svg.append(s('text', { class: 'axis', x: L - 4, y: y + 3.5, 'text-anchor': 'end', text: axisLabel(v) }));
    }
    for (const [i, label] of [[0, '−5 min'], [2.5, '−2.5'], [5, 'now']]) {
      const x = X(x0 + i * 60000);
      svg.append(s('text', { class: 'axis', x, y: H - 4, 'text-anchor': i === 0 ? 'start' : (i === 5 ? 'end' : 'middle'), text: label }));
    }
    const maxGap = ((state.data && state.data.sample_s) || 1) * 2500;
    let any = false;
    for (const ln of lines.slice().reverse()) {
      let d = '';
      let prev = null;
      for (const p of pts) {
        const v = p[ln.key];
        if (!isNum(v) || p.t < x0) { prev = null; continue; }
        const cmd = prev !== null && p.t - prev <= maxGap ? 'L' : 'M';
        d += `${cmd}${X(p.t).toFixed(1)},${Y(v).toFixed(1)}`;
        prev = p.t;
        any = true;
      }
      if (d) svg.append(s('path', { class: ln.cls, d }));
    }
    if (!any) {
      svg.append(s('text', { class: 'empty', x: (L + W - R) / 2, y: (T + H - B) / 2 + 4, 'text-anchor': 'middle', text: 'no samples yet' }));
    }
    replace(fig.querySelector('.plot'), svg);
    fig.querySelector('.now').textContent = nowText;
    replace(fig.querySelector('.legend'), lines.map((ln) =>
      h('span', null, h('span', { class: `key ${ln.cls}` }), ln.label)));
  }

  function renderCharts(d) {
    const now = d.now_ms;
    const p = state.series.length ? state.series[state.series.length - 1] : {};
    drawChart($('chart-writes'), now, [
      { key: 'applied_per_s', cls: 's1', label: 'log entries committed (cluster)' },
      { key: 'writes_per_s', cls: 's2', label: 'client writes at this node' },
    ], fmtRate(p.applied_per_s));
    drawChart($('chart-reads'), now, [
      { key: 'reads_per_s', cls: 's1', label: 'client reads at this node' },
    ], fmtRate(p.reads_per_s));
    drawChart($('chart-wlat'), now, [
      { key: 'write_p50_ms', cls: 's1', label: 'p50' },
      { key: 'write_p99_ms', cls: 's2 dash', label: 'p99 · writes at this node, log scale' },
    ], `${fmtMs(p.write_p50_ms)} / ${fmtMs(p.write_p99_ms)}`, true);
    drawChart($('chart-rlat'), now, [
      { key: 'read_p50_ms', cls: 's1', label: 'p50' },
      { key: 'read_p99_ms', cls: 's2 dash', label: 'p99 · reads at this node, log scale' },
    ], `${fmtMs(p.read_p50_ms)} / ${fmtMs(p.read_p99_ms)}`, true);
  }

  // ------------------------------------------------------------------- timeline
  function renderTimeline(d, model) {
    const events = (d.events || []).slice().sort((a, b) => a.t - b.t);
    const now = d.now_ms;
    const x0 = now - WINDOW_MS;
    const strip = $('tenure');
    const segs = [];
    // Who led when: each event carries the leader this node saw at that moment.
    let cur = { t: x0, leader: undefined, term: null };
    for (const e of events) {
      if (e.t <= x0) { cur = { t: x0, leader: e.leader, term: e.term }; continue; }
      if (e.leader !== cur.leader || e.term !== cur.term) {
        segs.push({ from: cur.t, to: e.t, leader: cur.leader, term: cur.term });
        cur = { t: e.t, leader: e.leader, term: e.term };
      }
    }
    segs.push({ from: cur.t, to: now, leader: cur.leader, term: cur.term, last: true });
    const width = strip.clientWidth || 1000;
    const items = [];
    for (const g of segs) {
      const left = ((g.from - x0) / WINDOW_MS) * 100;
      const w = ((g.to - g.from) / WINDOW_MS) * 100;
      if (w <= 0) continue;
      let cls = 'seg';
      let label;
      let title;
      if (g.leader === undefined) {
        cls += ' unknown'; label = 'not sampled'; title = 'this node\'s admin API was not sampling yet';
      } else if (g.leader === null) {
        cls += ' none'; label = 'no leader'; title = `no leader at term ${g.term}`;
      } else {
        if (g.last) cls += ' current';
        label = `node ${g.leader} · term ${g.term}`;
        title = `node ${g.leader} led at term ${g.term}, ${fmtTime(g.from)}–${g.last ? 'now' : fmtTime(g.to)}`;
      }
      const px = (w / 100) * width;
      items.push(h('div', { class: cls, style: null, title, 'data-leader': g.leader ?? '' }, px > 56 ? label : (px > 22 && g.leader ? String(g.leader) : '')));
      const el = items[items.length - 1];
      el.style.left = `${left}%`;
      el.style.width = `calc(${w}% - 2px)`;
    }
    for (let i = 0; i <= 5; i++) {
      const t = h('div', { class: `tick${i === 0 ? ' first' : ''}${i === 5 ? ' last' : ''}`, text: i === 5 ? 'now' : `−${5 - i} min` });
      t.style.left = `${i * 20}%`;
      items.push(t);
    }
    replace(strip, items);

    const list = $('events');
    const recent = events.slice(-12).reverse();
    if (!recent.length) {
      replace(list, h('li', { class: 'empty', text: 'nothing observed yet' }));
    } else {
      replace(list, recent.map((e) => {
        let kind = e.kind;
        let cls = e.kind;
        if (e.kind === 'leader') {
          kind = e.leader === null ? 'no leader' : 'leader';
          cls = e.leader === null ? 'noleader' : 'leader';
        } else if (e.kind === 'member') {
          kind = e.up ? 'link up' : 'link down';
          cls = e.up ? 'linkup' : 'linkdown';
        } else if (e.kind === 'start') {
          kind = 'started';
        }
        return h('li', { class: cls }, h('span', { class: 'when', text: fmtTime(e.t) }), h('span', { class: 'kind', text: kind }), h('span', { class: 'text', text: e.text }));
      }));
    }
    const first = events.length ? events[0].t : null;
    $('events-view').textContent = first !== null
      ? `what node ${model.me.id} observed since ${fmtTime(d.started_ms)} · last 5 minutes above, newest first below`
      : '';
  }

  poll();
})();
