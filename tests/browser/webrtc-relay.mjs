#!/usr/bin/env node
// Headless-Chromium proof that a STUN/TURN server works for a real browser.
//
//   node webrtc-relay.mjs --stun stun:127.0.0.1:P [--turn URL]... \
//        --username U --credential C [--timeout-ms N] [--check-timeout-ms N]
//
// Checks (each only when its URL is given):
//   srflx  one RTCPeerConnection with the STUN server must gather a srflx candidate.
//   relay  per --turn URL: two RTCPeerConnections (iceTransportPolicy 'relay') in
//          one page connect through the TURN server, exchange N data-channel
//          messages each way, and the selected candidate pair must be relay/relay.
//
// stdout: one JSON line per check. stderr: progress and a summary line.
// Exit code: 0 all requested checks passed, 1 any failed, 2 bad usage.
// See README.md for the Chromium quirks this works around.

import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const USAGE = `usage: node webrtc-relay.mjs [--stun stun:HOST:PORT] [--turn URL]... \\
         [--username U --credential C] [--timeout-ms N] [--check-timeout-ms N] \\
         [--messages N] [--gap-ms N] [--chromium PATH]
  --stun URL            STUN URL for the srflx check (stun: or stuns:)
  --turn URL            TURN URL for a relay check (turn: or turns:); repeatable
  --username/--credential  long-term credentials for the TURN URLs (required with --turn)
  --timeout-ms N        overall deadline for the whole script (default 60000)
  --check-timeout-ms N  deadline for one check (default: the remaining time shared
                        evenly among the remaining checks)
  --messages N          data-channel messages sent each way per relay check (default 20)
  --gap-ms N            milliseconds between two messages of one side (default 0: all at once),
                        to keep a channel relaying for a while (e.g. across a server takeover)
  --chromium PATH       browser binary (default /usr/bin/chromium)`;

function usage(msg) {
  if (msg) process.stderr.write(`webrtc-relay: ${msg}\n`);
  process.stderr.write(USAGE + '\n');
  process.exit(msg ? 2 : 0);
}

// ---------------------------------------------------------------- arguments
let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      stun: { type: 'string' },
      turn: { type: 'string', multiple: true, default: [] },
      username: { type: 'string' },
      credential: { type: 'string' },
      'timeout-ms': { type: 'string', default: '60000' },
      'check-timeout-ms': { type: 'string' },
      messages: { type: 'string', default: '20' },
      'gap-ms': { type: 'string', default: '0' },
      chromium: { type: 'string', default: '/usr/bin/chromium' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  }));
} catch (e) {
  usage(e.message);
}
if (opts.help) usage();

function posInt(name, s) {
  if (s === undefined) return undefined;
  if (!/^\d+$/.test(s) || Number(s) <= 0) usage(`--${name} must be a positive integer, got ${JSON.stringify(s)}`);
  return Number(s);
}
const overallMs = posInt('timeout-ms', opts['timeout-ms']);
const checkMsOpt = posInt('check-timeout-ms', opts['check-timeout-ms']);
const nMessages = posInt('messages', opts.messages);
const gapMs = opts['gap-ms'] === '0' ? 0 : posInt('gap-ms', opts['gap-ms']);

// Parses stun:/stuns:/turn:/turns: URLs (RFC 7064/7065) enough to validate them
// and to learn the host name and the relay protocol we expect.
function parseIceUrl(url, schemes) {
  const m = /^([a-z]+):(\[[0-9a-fA-F:.]+\]|[^:?\[\]]+)(?::(\d+))?(?:\?transport=(udp|tcp))?$/.exec(url);
  if (!m || !schemes.includes(m[1])) return null;
  const [, scheme, host, port, transport] = m;
  if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) return null;
  let relayProtocol;
  if (scheme === 'turns') relayProtocol = 'tls';
  else if (scheme === 'turn') relayProtocol = transport === 'tcp' ? 'tcp' : 'udp';
  return { scheme, host: host.replace(/^\[|\]$/g, ''), port, transport, relayProtocol };
}

const checks = [];
if (opts.stun !== undefined) {
  const p = parseIceUrl(opts.stun, ['stun', 'stuns']);
  if (!p) usage(`--stun must be a stun: or stuns: URL, got ${JSON.stringify(opts.stun)}`);
  checks.push({ check: 'srflx', url: opts.stun, parsed: p });
}
for (const url of opts.turn) {
  const p = parseIceUrl(url, ['turn', 'turns']);
  if (!p) usage(`--turn must be a turn: or turns: URL, got ${JSON.stringify(url)}`);
  checks.push({ check: 'relay', url, parsed: p });
}
if (checks.length === 0) usage('nothing to check: give --stun and/or --turn');
if (opts.turn.length > 0 && (opts.username === undefined || opts.credential === undefined)) {
  usage('--turn needs --username and --credential');
}

// ---------------------------------------------------------------- output
const results = [];
const t0 = Date.now();
const log = (msg) => process.stderr.write(`[webrtc-relay +${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}\n`);
function emit(result) {
  results.push(result);
  process.stdout.write(JSON.stringify(result) + '\n');
}

let browser = null;
let finished = false;

async function closeBrowser(graceMs) {
  const b = browser;
  browser = null;
  if (!b) return;
  // browser.close() should be quick; never let it hang the script. If it does,
  // process.exit() still kills Chromium: playwright-core kills the browsers it
  // launched in a process 'exit' handler.
  await Promise.race([b.close().catch(() => {}), new Promise((r) => setTimeout(r, graceMs).unref())]);
}

async function finish(reason, graceMs = 5000) {
  if (finished) return;
  finished = true;
  // Every requested check gets a line, even one that never ran.
  for (const c of checks) {
    if (!c.reported) {
      c.reported = true;
      emit({ check: c.check, url: c.url, ok: false, error: reason || 'not run' });
    }
  }
  await closeBrowser(graceMs);
  const passed = results.filter((r) => r.ok).length;
  const failed = results.length - passed;
  const secs = ((Date.now() - t0) / 1000).toFixed(1);
  const failedNames = results.filter((r) => !r.ok).map((r) => `${r.check} ${r.url}`);
  log(`finished in ${secs}s` + (failedNames.length ? `; failed: ${failedNames.join('; ')}` : ''));
  process.stderr.write(`webrtc-relay: ${passed} passed, ${failed} failed\n`);
  process.exit(failed === 0 ? 0 : 1);
}

// Last-resort guard: whatever hangs (launch, evaluate, close), stop at the deadline.
const hardTimer = setTimeout(() => {
  log(`overall timeout of ${overallMs} ms reached`);
  finish(`overall timeout of ${overallMs} ms reached before this check finished`, 1000);
}, overallMs);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => finish(`interrupted by ${sig}`, 1000));
}

// ---------------------------------------------------------------- in-page code
// These functions are serialised by playwright and run inside the page; they
// must be self-contained. Each one enforces its own deadline and always resolves
// with a result object (never rejects), so failures carry diagnostics.

async function pageSrflx({ url, timeoutMs }) {
  const start = performance.now();
  const ms = () => Math.round(performance.now() - start);
  const candidates = [];
  const errors = [];
  const states = [];
  let pc;
  try {
    pc = new RTCPeerConnection({ iceServers: [{ urls: url }] });
  } catch (e) {
    return { ok: false, error: `RTCPeerConnection constructor failed: ${e}` };
  }
  const result = await new Promise((resolve) => {
    const done = (r) => resolve(r);
    const timer = setTimeout(
      () => done({ ok: false, error: `no srflx candidate within ${timeoutMs} ms` }),
      timeoutMs,
    );
    pc.onicegatheringstatechange = () => states.push(`${ms()}ms gathering=${pc.iceGatheringState}`);
    pc.onicecandidateerror = (e) =>
      errors.push({ errorCode: e.errorCode, errorText: e.errorText, url: e.url, address: e.address, port: e.port });
    pc.onicecandidate = (e) => {
      if (!e.candidate) {
        states.push(`${ms()}ms end-of-candidates`);
        clearTimeout(timer);
        done({ ok: false, error: 'ICE gathering completed without a srflx candidate' });
        return;
      }
      if (!e.candidate.candidate) return;
      candidates.push(e.candidate.candidate);
      if (e.candidate.type === 'srflx') {
        clearTimeout(timer);
        done({ ok: true, candidate: e.candidate.candidate, address: e.candidate.address, port: e.candidate.port });
      }
    };
    pc.createDataChannel('gather');
    pc.setLocalDescription().catch((e) => {
      clearTimeout(timer);
      done({ ok: false, error: `setLocalDescription failed: ${e}` });
    });
  });
  try { pc.close(); } catch {}
  if (!result.ok && errors.length === 0 && /^no srflx/.test(result.error)) {
    result.error += ' (no answer and no icecandidateerror yet: is the server up? Chromium reports a UDP STUN timeout only after ~40 s)';
  }
  result.elapsedMs = ms();
  if (!result.ok) Object.assign(result, { candidates, iceCandidateErrors: errors, stateHistory: states });
  return result;
}

async function pageRelay({ url, username, credential, timeoutMs, nMessages, gapMs, expectedRelayProtocol }) {
  const start = performance.now();
  const ms = () => Math.round(performance.now() - start);
  const history = [];
  const note = (s) => history.push(`${ms()}ms ${s}`);
  const cfg = { iceServers: [{ urls: url, username, credential }], iceTransportPolicy: 'relay' };
  const side = {};
  for (const name of ['a', 'b']) {
    side[name] = { candidates: [], errors: [], gathered: false, pendingRemote: [], remoteSet: false, received: [] };
  }
  let settle;
  const settled = new Promise((r) => { settle = r; });
  let outcome = null;
  const fail = (error) => { if (!outcome) { outcome = { ok: false, error }; settle(); } };
  const timer = setTimeout(() => fail(`timed out after ${timeoutMs} ms`), timeoutMs);

  try {
    side.a.pc = new RTCPeerConnection(cfg);
    side.b.pc = new RTCPeerConnection(cfg);
  } catch (e) {
    clearTimeout(timer);
    return { ok: false, error: `RTCPeerConnection constructor failed: ${e}` };
  }

  const addRemote = (name, cand) => {
    side[name].pc.addIceCandidate(cand).catch((e) => note(`${name}: addIceCandidate failed: ${e}`));
  };
  for (const [name, peer] of [['a', 'b'], ['b', 'a']]) {
    const s = side[name];
    const pc = s.pc;
    pc.onicecandidate = (e) => {
      if (!e.candidate) {
        s.gathered = true;
        note(`${name}: end-of-candidates`);
        if (!s.candidates.some((c) => / typ relay /.test(c))) {
          fail(`peer ${name} finished ICE gathering without a relay candidate`);
        }
        return;
      }
      if (!e.candidate.candidate) return; // end-of-generation marker
      s.candidates.push(e.candidate.candidate);
      const init = e.candidate.toJSON();
      if (side[peer].remoteSet) addRemote(peer, init);
      else side[peer].pendingRemote.push(init);
    };
    pc.onicecandidateerror = (e) => {
      s.errors.push({ errorCode: e.errorCode, errorText: e.errorText, url: e.url, address: e.address, port: e.port });
    };
    pc.onicegatheringstatechange = () => note(`${name}: gathering=${pc.iceGatheringState}`);
    pc.oniceconnectionstatechange = () => {
      note(`${name}: ice=${pc.iceConnectionState}`);
      if (pc.iceConnectionState === 'failed') fail(`peer ${name}: ICE connection failed`);
    };
    pc.onconnectionstatechange = () => {
      note(`${name}: connection=${pc.connectionState}`);
      if (pc.connectionState === 'failed') fail(`peer ${name}: connection failed`);
    };
  }

  const setRemote = async (name, desc) => {
    await side[name].pc.setRemoteDescription(desc);
    side[name].remoteSet = true;
    for (const c of side[name].pendingRemote.splice(0)) addRemote(name, c);
  };

  // Data channel: each side sends nMessages and checks that exactly the
  // expected messages arrive in order. The creator ('a') sends when its
  // channel opens; the answerer ('b') only once a message from 'a' arrived.
  // Chromium fires ondatachannel (readyState 'open') before its native
  // channel is open, and drops a send() made in that window silently (no
  // exception, no error event): about 1 run in 50 lost all of b's messages
  // that way, against any TURN server. Received data is held until the
  // native channel is open, so a delivered message proves b can send.
  const expected = (from) => Array.from({ length: nMessages }, (_, i) => `${from}->${from === 'a' ? 'b' : 'a'} #${i} ${'x'.repeat(i)}`);
  const channels = {};
  const maybeDone = () => {
    if (side.a.received.length === nMessages && side.b.received.length === nMessages && !outcome) {
      outcome = { ok: true };
      settle();
    }
  };
  const sent = {};
  const sendAll = (n) => {
    if (sent[n]) return;
    sent[n] = true;
    const all = expected(n);
    if (!gapMs) {
      for (const m of all) channels[n].send(m);
      return;
    }
    let i = 0;
    const next = () => {
      if (i >= all.length || outcome) return;
      channels[n].send(all[i++]);
      setTimeout(next, gapMs);
    };
    next();
  };
  const wire = (name, dc) => {
    channels[name] = dc;
    const want = expected(name === 'a' ? 'b' : 'a');
    dc.onmessage = (e) => {
      const got = side[name].received;
      const i = got.length;
      got.push(e.data);
      if (name === 'b' && i === 0) sendAll('b');
      if (e.data !== want[i]) {
        fail(`peer ${name} message #${i}: expected ${JSON.stringify(want[i])}, got ${JSON.stringify(e.data)}`);
      }
      maybeDone();
    };
    dc.onerror = (e) => note(`${name}: datachannel error: ${e.error || e}`);
    dc.onclose = () => note(`${name}: datachannel closed`);
    const onOpen = () => {
      note(`${name}: datachannel open`);
      if (name === 'a') sendAll('a');
    };
    if (dc.readyState === 'open') onOpen();
    else dc.onopen = onOpen;
  };
  wire('a', side.a.pc.createDataChannel('relay-test', { ordered: true }));
  side.b.pc.ondatachannel = (e) => wire('b', e.channel);

  (async () => {
    await side.a.pc.setLocalDescription();
    await setRemote('b', side.a.pc.localDescription);
    await side.b.pc.setLocalDescription();
    await setRemote('a', side.b.pc.localDescription);
    note('offer/answer exchanged');
  })().catch((e) => fail(`signaling failed: ${e}`));

  await settled;
  clearTimeout(timer);

  // Selected pair from getStats(), for both peers.
  const selected = async (pc) => {
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((r) => {
      if (r.type === 'transport' && r.selectedCandidatePairId && stats.get(r.selectedCandidatePairId)) {
        pair = stats.get(r.selectedCandidatePairId);
      }
    });
    if (!pair) {
      stats.forEach((r) => {
        if (!pair && r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pair = r;
      });
    }
    if (!pair) return null;
    const l = stats.get(pair.localCandidateId) || {};
    const rc = stats.get(pair.remoteCandidateId) || {};
    return {
      state: pair.state,
      nominated: pair.nominated,
      local: { candidateType: l.candidateType, address: l.address, port: l.port, protocol: l.protocol, relayProtocol: l.relayProtocol, url: l.url },
      remote: { candidateType: rc.candidateType, address: rc.address, port: rc.port, protocol: rc.protocol },
    };
  };
  // Chromium can report the selected pair as 'in-progress' for a moment after
  // data already flows over it (seen in ~1 of 20 runs), so poll briefly.
  let pairs = {};
  const pollUntil = Math.min(performance.now() + 5000, start + timeoutMs);
  try {
    for (;;) {
      pairs = { a: await selected(side.a.pc), b: await selected(side.b.pc) };
      const good = (q) => q && q.state === 'succeeded';
      if (!outcome.ok || (good(pairs.a) && good(pairs.b)) || performance.now() >= pollUntil) break;
      await new Promise((r) => setTimeout(r, 50));
    }
  } catch (e) {
    if (outcome.ok) outcome = { ok: false, error: `getStats failed: ${e}` };
  }

  const result = outcome;
  if (!result.ok && /^timed out/.test(result.error) && !side.a.candidates.length && !side.b.candidates.length &&
      !side.a.errors.length && !side.b.errors.length) {
    result.error += ' with no relay candidate and no icecandidateerror: no answer from the TURN server? ' +
      '(Chromium reports a UDP allocate timeout only after ~40 s)';
  }
  if (result.ok) {
    const p = pairs.a;
    if (!p) {
      Object.assign(result, { ok: false, error: 'data channel worked but getStats() shows no selected succeeded candidate pair' });
    } else {
      Object.assign(result, {
        localType: p.local.candidateType,
        remoteType: p.remote.candidateType,
        relayProtocol: p.local.relayProtocol,
        expectedRelayProtocol,
        messages: nMessages,
        selectedPair: pairs,
      });
      const problems = [];
      for (const n of ['a', 'b']) {
        const q = pairs[n];
        if (!q) { problems.push(`peer ${n}: no selected pair`); continue; }
        if (q.state !== 'succeeded') problems.push(`peer ${n}: selected pair state ${q.state}`);
        if (q.local.candidateType !== 'relay') problems.push(`peer ${n}: local candidate type ${q.local.candidateType}`);
        if (q.remote.candidateType !== 'relay') problems.push(`peer ${n}: remote candidate type ${q.remote.candidateType}`);
        if (q.local.relayProtocol !== expectedRelayProtocol) {
          problems.push(`peer ${n}: relayProtocol ${q.local.relayProtocol}, expected ${expectedRelayProtocol}`);
        }
      }
      if (problems.length) Object.assign(result, { ok: false, error: problems.join('; ') });
    }
  }
  for (const n of ['a', 'b']) { try { channels[n]?.close(); side[n].pc.close(); } catch {} }
  result.elapsedMs = ms();
  if (!result.ok) {
    Object.assign(result, {
      candidates: { a: side.a.candidates, b: side.b.candidates },
      iceCandidateErrors: { a: side.a.errors, b: side.b.errors },
      stateHistory: history,
      received: { a: side.a.received.length, b: side.b.received.length },
      selectedPair: pairs,
    });
  }
  return result;
}

// ---------------------------------------------------------------- main
// The --disable-features list that playwright-core 1.65.1 passes
// (chromiumSwitches.ts); several of these stop Google requests at startup.
const PLAYWRIGHT_DISABLED_FEATURES = [
  'AvoidUnnecessaryBeforeUnloadCheckSync', 'DestroyProfileOnBrowserClose', 'HttpsUpgrades',
  'HttpsFirstBalancedModeAutoEnable', 'LensOverlay', 'MediaRouter', 'PaintHolding',
  'ThirdPartyStoragePartitioning', 'AvoidCorsURLLoaderRestartOnRedirect', 'TcpPortRandomizationWin',
  'OptimizationHints', 'NetworkTimeServiceQuerying', 'AimEnabled', 'PreconnectToSearch',
  'msForceBrowserSignIn', 'msEdgeUpdateLaunchServicesPreferredVersion',
];

// Condense the diagnostics into the one-line `error` string; the structured
// fields are emitted alongside it.
function shortCandidate(c) {
  // candidate:<foundation> <component> <proto> <prio> <addr> <port> typ <type> ...
  const f = c.replace(/^candidate:/, '').split(' ');
  const rp = / tcptype (\S+)/.exec(c);
  return `${f[7]} ${f[4]}:${f[5]}/${f[2]}${rp ? ' ' + rp[1] : ''}`;
}
function shortErrors(list) {
  const counts = new Map();
  for (const e of list) {
    const k = `${e.errorCode} ${JSON.stringify(e.errorText)} url=${e.url}${e.address ? ` local=${e.address}` : ''}`;
    counts.set(k, (counts.get(k) || 0) + 1);
  }
  return [...counts].map(([k, n]) => (n > 1 ? `${k} (x${n})` : k)).join(', ') || 'none';
}
function describeFailure(r) {
  const parts = [r.error];
  const bySide = (v, f) => (Array.isArray(v) ? f(v) : Object.entries(v).map(([k, x]) => `${k}: ${f(x)}`).join('; '));
  if (r.candidates !== undefined) {
    parts.push(`candidates: ${bySide(r.candidates, (l) => (l.length ? l.map(shortCandidate).join(', ') : 'none'))}`);
  }
  if (r.iceCandidateErrors !== undefined) parts.push(`icecandidateerror: ${bySide(r.iceCandidateErrors, shortErrors)}`);
  if (r.received !== undefined) parts.push(`messages received: a=${r.received.a} b=${r.received.b}`);
  if (r.stateHistory !== undefined) parts.push(`states: ${r.stateHistory.join(', ') || 'none'}`);
  return parts.join(' | ');
}

async function main() {
  const deadline = t0 + overallMs;
  // Keep Chromium's host resolver off the network: every name but the hosts
  // of the given URLs resolves to "not found" (Chromium otherwise sends DNS
  // queries for Google hosts even with --disable-background-networking).
  // Quirks: the rules also apply to IP literals (a TCP/TLS TURN connection to
  // 127.0.0.1 is never attempted unless 127.0.0.1 is excluded), and WebRTC's
  // UDP path resolves "name." with a trailing dot, so exclude that form too.
  const hosts = new Set(['localhost', '127.0.0.1', '::1', '[::1]']);
  for (const c of checks) {
    const h = c.parsed.host;
    hosts.add(h);
    if (h.includes(':')) hosts.add(`[${h}]`);
  }
  const excludes = [];
  for (const h of hosts) {
    excludes.push(`EXCLUDE ${h}`);
    if (!/^[\d.]+$|:/.test(h)) excludes.push(`EXCLUDE ${h}.`);
  }
  const resolverRules = ['MAP * ~NOTFOUND', ...excludes].join(', ');
  const args = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--ignore-certificate-errors',
    // Without this Chromium gathers nothing at all on a host with only a
    // loopback interface (e.g. a fresh network namespace).
    '--allow-loopback-in-peer-connection',
    // mDNS host-candidate obfuscation multicasts announcements on every
    // interface (224.0.0.251:5353); real IPs in host candidates are fine here.
    // Chromium honours only the last --disable-features, and playwright-core
    // passes its own list before ours, so repeat that list here.
    `--disable-features=${[...PLAYWRIGHT_DISABLED_FEATURES, 'WebRtcHideLocalIpsWithMdns'].join(',')}`,
    `--host-resolver-rules=${resolverRules}`,
  ];
  log(`launching ${opts.chromium} (resolver rules: ${resolverRules})`);
  browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    args,
    timeout: Math.max(1000, Math.min(30000, deadline - Date.now() - 1000)),
    // We handle signals ourselves so every check still gets its line.
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  });
  log(`chromium ${browser.version()} up`);

  for (let i = 0; i < checks.length; i++) {
    if (finished) return;
    const c = checks[i];
    const remaining = deadline - Date.now() - 2500; // keep time to close the browser
    const share = Math.floor(remaining / (checks.length - i));
    const timeoutMs = Math.max(500, checkMsOpt ? Math.min(checkMsOpt, remaining) : share);
    log(`${c.check} ${c.url}: running (timeout ${timeoutMs} ms)`);
    let r;
    let page = null;
    try {
      page = await browser.newPage();
      const arg = c.check === 'srflx'
        ? { url: c.url, timeoutMs }
        : { url: c.url, username: opts.username, credential: opts.credential, timeoutMs, nMessages, gapMs, expectedRelayProtocol: c.parsed.relayProtocol };
      const fn = c.check === 'srflx' ? pageSrflx : pageRelay;
      let guard;
      r = await Promise.race([
        page.evaluate(fn, arg),
        new Promise((_, rej) => { guard = setTimeout(() => rej(new Error(`page did not answer within ${timeoutMs + 2000} ms`)), timeoutMs + 2000); }),
      ]).finally(() => clearTimeout(guard));
    } catch (e) {
      r = { ok: false, error: `${e.message || e}`.split('\n')[0] };
    }
    if (page) page.close().catch(() => {});
    if (finished) return;
    c.reported = true;
    let out;
    if (r.ok) {
      out = c.check === 'srflx'
        ? { check: 'srflx', url: c.url, ok: true, candidate: r.candidate, elapsedMs: r.elapsedMs }
        : {
            check: 'relay', url: c.url, ok: true,
            localType: r.localType, remoteType: r.remoteType,
            relayProtocol: r.relayProtocol, messages: r.messages,
            pairState: r.selectedPair?.a?.state,
            local: r.selectedPair?.a?.local, remote: r.selectedPair?.a?.remote,
            elapsedMs: r.elapsedMs,
          };
    } else {
      out = { check: c.check, url: c.url, ok: false, error: describeFailure(r) };
      for (const k of ['candidates', 'iceCandidateErrors', 'stateHistory', 'received', 'selectedPair', 'elapsedMs']) {
        if (r[k] !== undefined) out[k] = r[k];
      }
    }
    emit(out);
    log(`${c.check} ${c.url}: ${out.ok ? 'ok' : 'FAILED'}${out.ok ? '' : ': ' + r.error}`);
  }
}

main().then(
  () => finish(),
  (e) => {
    log(`error: ${e.stack || e}`);
    finish(`script error: ${`${e.message || e}`.split('\n')[0]}`);
  },
);
