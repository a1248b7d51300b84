/* weft topology page: reads the router's status model over /ws and draws it.
 *
 * Data flow: WebSocket message -> parse + validate -> normalize(status) -> model -> (graph sync,
 * summary, table, details). Everything shown comes from the latest full status; nothing is
 * accumulated from older messages, so a bad or missing message can only delay the view.
 * Peer names, nicknames, addresses and reasons come from other hosts: they are only ever put into
 * the DOM as text (textContent or escaped), never as markup.
 *
 * Test hook: window.weftGraph (see the end of this file).
 */
(function () {
  'use strict';

  // Up to this many peers labels carry the peer name too, and every edge is labelled.
  var SMALL_GRAPH = 12;
  var MAX_PEERS = 20000;           // refuse to draw absurd documents rather than hang the tab
  var RECONNECT_MIN_MS = 500, RECONNECT_MAX_MS = 10000;
  var PING_EVERY_MS = 25000, SILENCE_LIMIT_MS = 65000;
  var ROW_HEIGHT = 24, ROW_OVERSCAN = 20;
  var HOLD_MS = 5000;              // a dropped peer or link fades this long before it goes

  var PENDING_STATES = { pending: 1, connecting: 1, retrying: 1 };
  var STATE_RANK = { established: 6, degraded: 5, pending: 4, connecting: 3, retrying: 2, failed: 1 };
  var domReady = false, earlyMessage = null;

  var hook = {
    ready: false, incarnation: null, seq: -1, updates: 0, layouts: 0,
    stats: { malformed: 0, stale: 0, reconnects: 0, errors: 0 },
    timings: { start: performance.now(), firstStatus: null, drawn: null, lastApplied: null,
               lastApplyMs: null },
    view: null,
    snapshot: snapshot,
    // What the canvas shows: labels drawn in the last frame, zoom, focus (see seen()).
    seen: seen,
    screenPos: screenPos,
    // Layout positions (world coordinates), by node id.
    positions: function () {
      var v = app.view3, out = {};
      if (v && v.nodes) v.nodes.forEach(function (nd) { out[nd.id] = [nd.x, nd.y]; });
      return out;
    },
    groupBy: function (k) { setGroupBy(k); },
    focusHops: function (h) { setFocusHops(h); },
    select: function (id) { select(id, true); },
    setView: function (v) { setView(v); },
    pause: function (on) { setPaused(on); },
    // Feed a raw message as if it came from /ws (tests of malformed and stale input); applied
    // before this returns.
    receive: function (data) { onMessage(data); applyPending(); },
  };
  window.weftGraph = hook;

  var app = {
    model: null, selected: null, view: 'graph', view3: null, graphData: null,
    groupBy: storedPref('groupBy', 'partition'), focusHops: Number(storedPref('focusHops', '1')) || 0,
    sortKey: null, sortDir: 1, rows: [], filtered: [], rowHeight: 0,
    holdIncarnation: null, seenPeers: new Map(), seenEdges: new Map(), reportedBy: new Map(),
    holdTimer: null, lastStatus: null,
  };

  // ---------------------------------------------------------------------------------------
  // Small helpers

  function $(id) { return document.getElementById(id); }
  function storedPref(k, dflt) {
    try { var v = window.localStorage.getItem('weft.' + k); return v === null ? dflt : v; } catch (err) { return dflt; }
  }
  function storePref(k, v) {
    try { window.localStorage.setItem('weft.' + k, String(v)); } catch (err) { /* disabled */ }
  }
  function isObj(x) { return x !== null && typeof x === 'object' && !Array.isArray(x); }
  function arr(x) { return Array.isArray(x) ? x : []; }
  function str(x, dflt) {
    if (typeof x === 'string') return x;
    if (typeof x === 'number' && isFinite(x)) return String(x);
    return dflt === undefined ? '' : dflt;
  }
  function num(x) { return typeof x === 'number' && isFinite(x) ? x : null; }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c];
    });
  }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function encryptionOn(v) {
    if (v === true) return true;
    if (typeof v === 'string') return !/^(|off|no|none|false|disabled|plain)$/i.test(v.trim());
    if (isObj(v)) return v.enabled === true;
    return false;
  }
  function edgeKey(a, b) { return a < b ? a + '|' + b : b + '|' + a; }
  function fmtInt(n) { return n === null || n === undefined ? '' : Number(n).toLocaleString('en'); }

  // ---------------------------------------------------------------------------------------
  // Status model -> view model (tolerates any shape; missing parts become empty)

  function normalize(status) {
    var router = isObj(status.router) ? status.router : {};
    var localName = str(router.name);
    var meshEncrypted = encryptionOn(router.encryption);
    var peers = new Map();

    function addPeer(name, nickname) {
      var p = peers.get(name);
      if (!p) {
        p = { name: name, nickname: nickname || '', uid: '', version: '', shortId: '', software: '',
              reported: [], known: false, component: -1, reachable: true,
              labels: Object.create(null) };
        peers.set(name, p);
      } else if (!p.nickname && nickname) {
        p.nickname = nickname;
      }
      return p;
    }

    var rawPeers = arr(router.peers);
    if (rawPeers.length > MAX_PEERS) throw new Error('too many peers: ' + rawPeers.length);
    rawPeers.forEach(function (rp) {
      if (!isObj(rp)) return;
      var name = str(rp.name);
      if (!name) return;
      var p = addPeer(name, str(rp.nickname));
      p.known = true;
      p.nickname = str(rp.nickname) || p.nickname;
      p.uid = str(rp.uid); p.version = str(rp.version); p.shortId = str(rp.short_id);
      p.software = str(rp.software);
      // Optional labels (e.g. a Kubernetes zone): offered as a grouping.
      if (isObj(rp.labels)) {
        Object.keys(rp.labels).slice(0, 32).forEach(function (k) {
          var v = str(rp.labels[k]);
          if (k && v) p.labels[k] = v;
        });
      }
      p.reported = arr(rp.connections).filter(isObj).map(function (c) {
        return { name: str(c.name), address: str(c.address), outbound: c.outbound === true,
                 established: c.established === true,
                 datapath: str(c.datapath), encrypted: typeof c.encrypted === 'boolean' ? c.encrypted : null,
                 mtu: num(c.mtu), dataState: str(c.data_state) };
      }).filter(function (c) { return c.name && c.name !== name; });
    });
    if (localName) {
      var lp = addPeer(localName, str(router.nickname));
      if (!lp.known) {
        lp.known = true; lp.uid = str(router.uid); lp.version = str(router.version);
      }
      lp.software = str(router.software) || lp.software;
    }

    // Edges: one per unordered pair, from both records plus our own connection list.
    var edges = new Map();
    function edgeFor(a, b) {
      var k = edgeKey(a, b);
      var e = edges.get(k);
      if (!e) {
        var ab = a < b ? [a, b] : [b, a];
        e = { id: 'e:' + k, a: ab[0], b: ab[1], reports: Object.create(null), local: null };
        edges.set(k, e);
      }
      return e;
    }
    peers.forEach(function (p) {
      p.reported.forEach(function (c) {
        addPeer(c.name, '');
        edgeFor(p.name, c.name).reports[p.name] = c;
      });
    });
    var localConns = arr(router.connections).filter(isObj).map(function (c) {
      return { peer: str(c.peer), nickname: str(c.nickname), address: str(c.address),
               outbound: c.outbound === true, state: str(c.state, 'unknown') || 'unknown',
               info: str(c.info), controlEncrypted: c.encrypted === true,
               // Data-plane encryption when the overlay reports it separately.
               dataEncrypted: typeof c.data_encrypted === 'boolean' ? c.data_encrypted : null,
               datapath: str(c.datapath) || 'none', mtu: num(c.mtu), since: num(c.since) };
    });
    localConns.forEach(function (c) {
      // Without a data plane ("none") there is nothing unencrypted to warn about.
      if (c.datapath === 'none') c.dataEncrypted = null;
      c.encrypted = c.controlEncrypted && c.dataEncrypted !== false;
      if (!localName || !c.peer || c.peer === localName) return;
      addPeer(c.peer, c.nickname);
      // A peer can have several rows (a live connection and a recent failure): show the best.
      var e = edgeFor(localName, c.peer);
      if (!e.local || STATE_RANK[c.state] > STATE_RANK[e.local.state]) e.local = c;
    });

    // Partitions: peers joined by connections that both sides report (as weft/ui/metrics.py).
    var parent = new Map();
    peers.forEach(function (p) { parent.set(p.name, p.name); });
    function find(x) {
      while (parent.get(x) !== x) { parent.set(x, parent.get(parent.get(x))); x = parent.get(x); }
      return x;
    }
    edges.forEach(function (e) {
      e.symmetric = !!(e.reports[e.a] && e.reports[e.b]);
      if (e.symmetric) {
        var ra = find(e.a), rb = find(e.b);
        if (ra !== rb) parent.set(ra > rb ? ra : rb, ra > rb ? rb : ra);
      }
    });
    var groups = new Map();
    peers.forEach(function (p) {
      var r = find(p.name);
      if (!groups.has(r)) groups.set(r, []);
      groups.get(r).push(p.name);
    });
    // The local peer's part first, then by size, then by smallest name (stable across updates).
    var comps = Array.from(groups.values()).map(function (names) {
      var min = names[0];
      names.forEach(function (n) { if (n < min) min = n; });
      return { names: names, min: min, local: names.indexOf(localName) >= 0 };
    }).sort(function (x, y) {
      if (x.local !== y.local) return x.local ? -1 : 1;
      if (x.names.length !== y.names.length) return y.names.length - x.names.length;
      return x.min < y.min ? -1 : x.min > y.min ? 1 : 0;
    }).map(function (c) { return c.names; });
    comps.forEach(function (names, i) {
      names.forEach(function (n) {
        var p = peers.get(n);
        p.component = i;
        p.reachable = !localName || i === 0;
      });
    });

    // Edge state, datapath and encryption.
    edges.forEach(function (e) {
      var ra = e.reports[e.a], rb = e.reports[e.b], l = e.local;
      var report = ra || rb || {};
      if (l) {
        e.state = l.state === 'established' || l.state === 'degraded' ? l.state
          : l.state === 'failed' ? 'failed' : PENDING_STATES[l.state] ? 'pending' : l.state;
        e.datapath = l.datapath; e.encrypted = l.encrypted; e.mtu = l.mtu;
        e.controlEncrypted = l.controlEncrypted;
        e.address = l.address; e.info = l.info; e.outbound = l.outbound; e.since = l.since;
        e.encryptionDetail = l.controlEncrypted
          ? (l.dataEncrypted === false ? 'control only; data plane NOT encrypted'
             : l.dataEncrypted ? 'control and data plane' : 'control connection')
          : 'none';
      } else {
        e.state = ra && rb && ra.established && rb.established ? 'established' : 'pending';
        // The owners' data planes (gossiped, issue #17): a link they see silent is degraded.
        if (e.state === 'established' && [ra, rb].some(function (r) {
          return r.dataState === 'degraded' || r.dataState === 'failed'; })) e.state = 'degraded';
        e.datapath = (ra && ra.datapath) || (rb && rb.datapath) || 'unknown';
        var enc = ra && ra.encrypted !== null ? ra.encrypted : rb && rb.encrypted !== null ? rb.encrypted : null;
        e.encrypted = enc === null ? meshEncrypted : enc;
        e.encryptionAssumed = enc === null;
        e.mtu = (ra && ra.mtu) || (rb && rb.mtu) || null;
        e.address = report.address || ''; e.info = ''; e.outbound = null;
      }
      e.reachable = peers.get(e.a).reachable && peers.get(e.b).reachable;
    });

    var ipam = isObj(status.ipam) ? status.ipam : null;
    var ipamByPeer = new Map();
    if (ipam) {
      arr(ipam.entries).forEach(function (en) {
        if (!isObj(en) || !str(en.peer)) return;
        ipamByPeer.set(str(en.peer), {
          owned: num(en.owned), free: num(en.free), reachable: en.reachable !== false,
          ranges: arr(en.ranges).map(function (r) { return str(r); }).filter(Boolean),
          rangesMore: num(en.ranges_more) || 0,
        });
      });
    }
    var containers = Array.isArray(status.containers)
      ? status.containers.filter(isObj).map(function (c) {
          return { name: str(c.name) || str(c.netns) || str(c.id), netns: str(c.netns), mac: str(c.mac),
                   addresses: arr(c.addresses).map(function (a) { return str(a); }).filter(Boolean) };
        })
      : null;

    // The data path's "why" (the overlay switch's status): capabilities, per-connection
    // candidates and their health, the last moves between datapaths.
    var overlay = isObj(status.overlay) ? status.overlay : {};
    var sw = isObj(overlay.switch) ? overlay.switch : null;
    var datapath = {
      mode: str(overlay.datapath), note: sw ? str(sw.note) : '',
      capabilities: sw && isObj(sw.capabilities) ? sw.capabilities : null,
      running: sw ? arr(sw.datapaths).map(function (d) { return str(d); }).filter(Boolean) : [],
      conns: sw && isObj(sw.connections) ? sw.connections : {},
      history: sw ? arr(sw.history).filter(isObj) : [],
      drops: isObj(overlay.drops) ? overlay.drops : {},
    };

    return {
      localName: localName, nickname: str(router.nickname), meshEncrypted: meshEncrypted,
      datapath: datapath, failures: isObj(router.failures) ? router.failures : {},
      peers: peers, edges: edges, components: comps, localConns: localConns,
      targets: arr(router.targets).filter(isObj),
      ipam: ipam ? { range: str(ipam.range), byPeer: ipamByPeer, allocated: num(ipam.allocated),
                     error: str(ipam.error), ready: ipam.ready !== false,
                     consensus: isObj(ipam.consensus) ? ipam.consensus : null,
                     conflict: str(ipam.conflict) } : null,
      containers: containers,
    };
  }

  // ---------------------------------------------------------------------------------------
  // Graph

  function peerLabel(p, small) {
    if (!p.nickname) return p.name;
    return small ? p.nickname + '\n' + p.name : p.nickname;
  }
  // Only what is known: a failed or never-handshaken connection has no datapath and no
  // encryption to speak of, and a datapath nobody reported is not named.
  function edgeLabel(e) {
    if (e.held) return 'no longer reported';
    if (e.state === 'failed') return 'failed';
    var parts = [];
    if (e.datapath && e.datapath !== 'none' && e.datapath !== 'unknown') parts.push(e.datapath);
    if (e.state === 'established') parts.push(e.encrypted ? 'encrypted' : 'plain');
    else parts.push(e.state);
    return parts.join(' · ');
  }
  // Encryption as a word for tables and details: a row without a handshake has none yet.
  function encryptionWord(state, encrypted) {
    if (encrypted) return 'encrypted';
    return state === 'established' || state === 'pending' ? 'plain' : 'no handshake yet';
  }
  function nodeClasses(p, m) {
    var c = ['peer'];
    if (p.name === m.localName) c.push('local');
    if (!p.reachable) c.push('unreachable');
    if (p.component > 0) c.push('part' + (((p.component - 1) % 5) + 1));
    if (!p.known) c.push('unknown');
    if (p.held) c.push('held');
    return c.join(' ');
  }
  function edgeClasses(e, small) {
    var dp = { ovs: 1, fastdp: 1, vxlan: 1, sleeve: 1, none: 1 }[e.datapath] ? e.datapath : 'unknown';
    if (dp === 'fastdp') dp = 'ovs';
    var st = { established: 1, degraded: 1, pending: 1, failed: 1 }[e.state] ? e.state : 'pending';
    // Labels only where they say something: all edges of a small mesh, else our own
    // connections and those that are not established.
    var labelled = small || !!e.local || st !== 'established';
    return ['st-' + st, 'dp-' + dp, e.encrypted ? 'enc' : 'plain',
            e.reachable ? '' : 'unreachable', labelled ? 'labelled' : '',
            e.held ? 'held' : ''].join(' ').replace(/ +/g, ' ').trim();
  }

  // Big graphs: one selector per element kind, the look computed here into data fields. Matching
  // a dozen class selectors against thousands of elements was a quarter of the first draw.
  var DP_COLORS = { ovs: '#2e9e44', vxlan: '#2b6cb0', sleeve: '#dd8a1e', none: '#4a515c',
                    unknown: '#8a8f98' };
  var PART_FILLS = ['#b39ddb', '#ef9a9a', '#80cbc4', '#ffcc80', '#b0bec5'];

  function bigNodeLook(p, m) {
    var fill = p.name === m.localName ? '#1f4f8f'
      : !p.known ? '#c7cbd1'
      : p.component > 0 ? PART_FILLS[(p.component - 1) % PART_FILLS.length]
      : '#5b8fd1';
    return { fill: fill, size: p.name === m.localName ? 14 : 8, op: p.held ? 0.3 : 1 };
  }
  function bigEdgeLook(e) {
    var dp = DP_COLORS[e.datapath] ? e.datapath : e.datapath === 'fastdp' ? 'ovs' : 'unknown';
    return { color: e.state === 'failed' ? '#d0342c' : e.state === 'degraded' ? '#e0561b' : DP_COLORS[dp],
             width: e.encrypted ? 1.5 : 1,
             ls: e.state === 'failed' ? 'dotted' : e.state === 'established' ? 'solid' : 'dashed',
             op: e.held ? 0.2 : e.reachable ? 1 : 0.45 };
  }

  // Grouping: what the layout gathers peers by and, zoomed out, what links are bundled between.
  var GROUP_BASE = [['partition', 'partition'], ['datapath', 'datapath'],
                    ['encryption', 'encryption'], ['none', 'no grouping']];

  function majority(counts, dflt) {
    var best = dflt, n = 0;
    Object.keys(counts).sort().forEach(function (k) { if (counts[k] > n) { best = k; n = counts[k]; } });
    return best;
  }

  // Group key and its legend text for every peer under app.groupBy.
  function groupsOf(m) {
    var by = app.groupBy, key = new Map(), labels = {}, perPeer = new Map();
    if (by === 'datapath' || by === 'encryption') {
      m.peers.forEach(function (p, name) { perPeer.set(name, {}); });
      m.edges.forEach(function (e) {
        if (e.held) return;
        var v = by === 'datapath'
          ? (e.datapath === 'fastdp' ? 'ovs' : e.datapath === 'none' || !e.datapath ? 'unknown' : e.datapath)
          : e.state === 'established' ? (e.encrypted ? 'encrypted' : 'plain') : null;
        if (v === null || v === 'unknown') return;
        [e.a, e.b].forEach(function (n) { var c = perPeer.get(n); c[v] = (c[v] || 0) + 1; });
      });
    }
    m.peers.forEach(function (p, name) {
      var k;
      if (by === 'partition') {
        k = 'p' + p.component;
        labels[k] = p.component === 0 ? (m.localName && m.components.length > 1 ? 'reachable from here' : 'partition 1')
          : 'partition ' + (p.component + 1) + (m.localName ? ' (unreachable)' : '');
      } else if (by === 'datapath') {
        k = majority(perPeer.get(name), 'not reported');
      } else if (by === 'encryption') {
        var c = perPeer.get(name);
        k = c.plain && c.encrypted ? 'mixed' : c.plain ? 'plain' : c.encrypted ? 'encrypted' : 'no live link';
      } else if (by.indexOf('label:') === 0) {
        var lk = by.slice(6);
        k = Object.prototype.hasOwnProperty.call(p.labels, lk) ? p.labels[lk] : '(no ' + lk + ')';
      } else {
        k = 'all';
      }
      key.set(name, k);
      if (!labels[k]) labels[k] = k;
    });
    var size = new Map();
    key.forEach(function (k) { size.set(k, (size.get(k) || 0) + 1); });
    var localKey = m.localName ? key.get(m.localName) : null;
    var order = Array.from(size.keys()).sort(function (x, y) {
      if ((x === localKey) !== (y === localKey)) return x === localKey ? -1 : 1;
      return size.get(y) - size.get(x) || (x < y ? -1 : x > y ? 1 : 0);
    });
    return { key: key, labels: labels, order: order };
  }

  // The grouping choices: the fixed ones plus every label key a peer record carries.
  function syncGroupChoices(m) {
    var keys = new Set();
    m.peers.forEach(function (p) { Object.keys(p.labels).forEach(function (k) { keys.add(k); }); });
    var list = GROUP_BASE.concat(Array.from(keys).sort().map(function (k) { return ['label:' + k, 'label ' + k]; }));
    var sig = list.map(function (c) { return c[0]; }).join(',');
    var sel = $('group-by');
    if (!sel || sel.dataset.sig === sig) return;
    sel.dataset.sig = sig;
    sel.textContent = '';
    list.forEach(function (c) {
      var o = el('option', c[1]);
      o.value = c[0];
      sel.appendChild(o);
    });
    if (list.every(function (c) { return c[0] !== app.groupBy; })) app.groupBy = 'partition';
    sel.value = app.groupBy;
  }

  function ensureView() {
    if (app.view3) return app.view3;
    app.view3 = new window.WeftGraphView($('graph'), {
      onSelect: function (id) { select(id, false); },
      onDrawn: function () {
        if (!hook.ready && app.model) {
          hook.timings.drawn = performance.now();
          hook.ready = true;
          document.documentElement.dataset.weftReady = '1';
        }
      },
    });
    app.view3.focusHops = app.focusHops;
    hook.view = app.view3;
    return app.view3;
  }

  function syncGraph(m) {
    var small = m.peers.size <= SMALL_GRAPH, view = ensureView();
    syncGroupChoices(m);
    var g = groupsOf(m), nodes = [], edges = [];
    m.peers.forEach(function (p) {
      var look = bigNodeLook(p, m);
      nodes.push({ id: 'n:' + p.name, name: p.name, nickname: p.nickname, label: peerLabel(p, small),
        group: g.key.get(p.name), fill: p.reachable || p.name === m.localName ? look.fill : '#c7cbd1',
        size: look.size, op: look.op, local: p.name === m.localName, unknown: !p.known,
        unreachable: !p.reachable, classes: nodeClasses(p, m).split(' ') });
    });
    m.edges.forEach(function (e) {
      var look = bigEdgeLook(e), cls = edgeClasses(e, small);
      edges.push({ id: e.id, source: 'n:' + e.a, target: 'n:' + e.b, label: edgeLabel(e),
        state: e.state, datapath: e.datapath, encrypted: e.encrypted, classes: cls.split(' '),
        color: look.color, width: small ? (e.encrypted ? 2.5 : 1.5) : look.width, dash: look.ls,
        op: look.op, labelled: / labelled( |$)/.test(' ' + cls),
        important: e.state !== 'established' || !!e.held || e.a === m.localName || e.b === m.localName });
    });
    app.graphData = { nodes: nodes, edges: edges };
    var before = view.layouts;
    view.setData({ nodes: nodes, edges: edges, groupOrder: g.order, groupLabels: g.labels,
                   cacheKey: (m.localName || 'mesh') + '|' + app.groupBy });
    hook.layouts += view.layouts - before;
    // A selected peer or connection that disappeared stays selected: the details panel says it
    // is gone, which is news to the user, until something else is picked.
  }

  function snapshot() {
    var d = app.graphData;
    if (!d) return { nodes: [], edges: [] };
    return {
      nodes: d.nodes.map(function (n) {
        return { id: n.id, name: n.name, nickname: n.nickname, classes: n.classes.slice() };
      }),
      edges: d.edges.map(function (e) {
        return { id: e.id, source: e.source.slice(2), target: e.target.slice(2), label: e.label,
                 state: e.state, datapath: e.datapath, encrypted: e.encrypted, classes: e.classes.slice() };
      }),
    };
  }

  // What a user sees on the canvas (for tests): labels drawn in the last frame, the zoom, the
  // focus, where a peer is on screen.
  function seen() {
    var v = app.view3;
    if (!v || !v.drawn) return { labels: [], mode: '', k: 0, focus: [], frames: 0 };
    return {
      labels: v.drawn.labels.map(function (l) { return Object.assign({}, l); }),
      mode: v.drawn.mode, k: v.k, frames: v.drawn.frames, onScreen: v.drawn.onScreen,
      focus: v.focus ? v.focus.order.map(function (i) { return v.nodes[i].id; }) : [],
      focusEdges: v.focus ? Array.from(v.focus.edges).map(function (i) { return v.edges[i].id; }) : [],
      groups: v.groups.map(function (gr) { return { key: gr.key, n: gr.n }; }),
      width: v.w, height: v.h,
    };
  }
  function screenPos(id) {
    var v = app.view3, i = v ? v.byId.get(id) : undefined;
    if (i === undefined) return null;
    var p = v.screen(i), r = v.canvas.getBoundingClientRect();
    return { x: p.x + r.left, y: p.y + r.top, inView: p.x >= 0 && p.y >= 0 && p.x <= v.w && p.y <= v.h };
  }


  // ---------------------------------------------------------------------------------------
  // Summary, banner, details

  // "not reported" is not a datapath: listed only while some edge has none (an older peer's
  // record), like "none" (control only) only while some edge is carried by no data plane.
  function renderLegend(m) {
    var seen = Object.create(null);
    m.edges.forEach(function (e) { if (e.state !== 'failed') seen[e.datapath || 'unknown'] = true; });
    [['lg-unknown', 'unknown'], ['lg-none', 'none']].forEach(function (x) {
      var span = document.querySelector('#legend .' + x[0]);
      if (span) span.hidden = !seen[x[1]];
    });
  }

  function renderSummary(m) {
    $('self-name').textContent = m.localName ? (m.nickname ? m.nickname + ' (' + m.localName + ')' : m.localName) : '';
    document.title = 'weft mesh' + (m.nickname ? ' — ' + m.nickname : '');
    // Peers, not rows: a peer can have a live row and a failed redial row at once, and dials to
    // addresses whose peer is not known yet are no peer at all.
    var ownPeers = new Map();
    m.localConns.forEach(function (c) {
      if (!c.peer || c.peer === m.localName) return;
      ownPeers.set(c.peer, ownPeers.get(c.peer) || c.state === 'established');
    });
    var est = 0, total = ownPeers.size;
    ownPeers.forEach(function (up) { if (up) est += 1; });
    var unreachable = 0;
    m.peers.forEach(function (p) { if (!p.reachable) unreachable += 1; });
    var held = 0;
    m.edges.forEach(function (e) { if (e.held) held += 1; });
    $('summary').textContent = m.peers.size + ' peers · ' + (m.edges.size - held) + ' links' +
      (held ? ' (+' + held + ' dropping)' : '') + ' · ' +
      est + '/' + total + ' connected peers · ' +
      (m.meshEncrypted ? 'encrypted' : 'not encrypted');
    var banner = $('banner'), parts = m.components.length, msgs = [];
    if (parts > 1) msgs.push('Mesh partitioned into ' + parts + ' parts.');
    if (unreachable) msgs.push(unreachable + ' peer' + (unreachable > 1 ? 's' : '') + ' unreachable from here.');
    var failed = m.localConns.filter(function (c) { return c.state === 'failed'; }).length;
    if (failed) msgs.push(failed + ' connection' + (failed > 1 ? 's' : '') + ' failed.');
    var silent = m.localConns.filter(function (c) { return c.state === 'degraded'; }).length;
    if (silent) msgs.push(silent + ' connection' + (silent > 1 ? 's' : '') +
      ' degraded: the data path stopped answering heartbeats.');
    var plain = m.localName && !m.meshEncrypted;
    if (plain) msgs.push('Plaintext mesh: traffic between hosts is not encrypted and any host that' +
      ' reaches port 6783 can join. Set a password (weft launch --password) to encrypt.');
    banner.textContent = msgs.join(' ');
    banner.hidden = msgs.length === 0;
    banner.className = 'banner' + (parts > 1 || unreachable || silent || plain ? ' bad' : '');
    hook.banner = banner.hidden ? '' : banner.textContent;
  }

  function dl(pairs) {
    var d = el('dl');
    pairs.forEach(function (kv) {
      if (kv[1] === null || kv[1] === undefined || kv[1] === '') return;
      d.appendChild(el('dt', kv[0]));
      var dd = el('dd');
      if (kv[1] instanceof Node) dd.appendChild(kv[1]); else dd.textContent = String(kv[1]);
      d.appendChild(dd);
    });
    return d;
  }
  function peerLink(m, name) {
    var p = m.peers.get(name), a = el('a', p && p.nickname ? p.nickname + ' (' + name + ')' : name);
    a.addEventListener('click', function () { select('n:' + name, true); });
    return a;
  }
  function stateSpan(state) {
    return el('span', state, state === 'established' ? 'good' : state === 'failed' ? 'bad' : 'warn');
  }

  function renderDetails() {
    var box = $('details'), m = app.model, id = app.selected;
    box.textContent = '';
    if (!m || !id) { box.appendChild(el('p', 'Click a peer or a connection for details.', 'muted')); return; }
    if (id.indexOf('n:') === 0) renderPeer(box, m, id.slice(2));
    else if (id.indexOf('e:') === 0) renderEdge(box, m, m.edges.get(id.slice(2)));
    else if (id.indexOf('c:') === 0) {
      renderLocalConn(box, m, m.localConns.filter(function (c) {
        return !c.peer && c.address === id.slice(2);
      })[0]);
    }
  }

  function renderPeer(box, m, name) {
    var p = m.peers.get(name);
    if (!p) { box.appendChild(el('p', 'This peer is gone.', 'muted')); return; }
    var isLocal = name === m.localName;
    box.appendChild(el('h2', p.nickname || name));
    box.appendChild(dl([
      ['name', name], ['nickname', p.nickname], ['uid', p.uid], ['record version', p.version],
      ['software', p.software || (isLocal ? '' : 'not reported')],
      ['short id', p.shortId],
      ['status', isLocal ? 'this router' : p.reachable ? 'reachable' : 'UNREACHABLE'],
      ['partition', m.components.length > 1 ? String(p.component + 1) + ' of ' + m.components.length : ''],
      ['record', p.known ? '' : 'no record received yet'],
    ]));
    box.appendChild(el('h3', 'Connections (' + p.reported.length + ')'));
    if (p.reported.length) {
      var ul = el('ul');
      p.reported.forEach(function (c) {
        var li = el('li');
        li.appendChild(peerLink(m, c.name));
        li.appendChild(document.createTextNode(' ' + (c.outbound ? '→ ' : '← ') + (c.address || '?') + ' '));
        li.appendChild(stateSpan(c.established ? 'established' : 'pending'));
        ul.appendChild(li);
      });
      box.appendChild(ul);
    } else {
      box.appendChild(el('p', 'none reported', 'muted'));
    }
    if (m.ipam && isLocal) box.appendChild(el('p', addressSummary(m), 'muted'));
    if (m.ipam) {
      box.appendChild(el('h3', 'Address space' + (m.ipam.range ? ' (' + m.ipam.range + ')' : '')));
      var ip = m.ipam.byPeer.get(name);
      if (ip) {
        box.appendChild(dl([['owned', fmtInt(ip.owned)], ['free', fmtInt(ip.free)],
                            ['allocated here', isLocal ? fmtInt(m.ipam.allocated) : ''],
                            ['reachable', ip.reachable ? 'yes' : 'NO (reclaim with rmpeer)']]));
        if (ip.ranges.length) {
          var rl = el('ul');
          ip.ranges.slice(0, 50).forEach(function (r) { rl.appendChild(el('li', r)); });
          var more = Math.max(0, ip.ranges.length - 50) + ip.rangesMore;
          if (more) rl.appendChild(el('li', '… ' + more + ' more'));
          box.appendChild(rl);
        }
      } else {
        box.appendChild(el('p', m.ipam.error ? 'IPAM status failed: ' + m.ipam.error
                                             : 'owns no addresses', 'muted'));
      }
    }
    if (isLocal && m.localConns.length) {
      box.appendChild(el('h3', 'Our connections (' + m.localConns.length + ')'));
      var ol = el('ul');
      m.localConns.forEach(function (c) {
        var li = el('li');
        if (c.peer) li.appendChild(peerLink(m, c.peer));
        else li.appendChild(document.createTextNode(c.address || '?'));
        li.appendChild(document.createTextNode(' '));
        li.appendChild(stateSpan(c.state));
        li.appendChild(document.createTextNode(' ' + c.datapath +
          ', ' + encryptionWord(c.state, c.controlEncrypted) + (c.mtu ? ', MTU ' + c.mtu : '') +
          (c.info ? ' — ' + c.info : '')));
        ol.appendChild(li);
      });
      box.appendChild(ol);
    }
    if (isLocal) {
      box.appendChild(el('h3', 'Containers here'));
      if (m.containers === null) box.appendChild(el('p', 'not reported by this router', 'muted'));
      else if (!m.containers.length) box.appendChild(el('p', 'none', 'muted'));
      else {
        var cl = el('ul');
        m.containers.forEach(function (c) {
          cl.appendChild(el('li', c.name + (c.mac ? '  ' + c.mac : '') +
            (c.addresses.length ? '  ' + c.addresses.join(', ') : '')));
        });
        box.appendChild(cl);
      }
      renderDatapathWhy(box, m);
      if (m.targets.length) {
        box.appendChild(el('h3', 'Connection targets'));
        var tl = el('ul');
        m.targets.forEach(function (t) {
          tl.appendChild(el('li', str(t.address) + ' — ' + str(t.state) +
            (str(t.last_error) ? ' (' + str(t.last_error) + ')' : '')));
        });
        box.appendChild(tl);
      }
    }
  }

  // Why each connection is on its datapath: what the kernel offers, each candidate's health at
  // both ends, the last moves (the switch's own view; weft/switch/core.py).
  function renderDatapathWhy(box, m) {
    var dp = m.datapath;
    if (!dp.mode) return;
    box.appendChild(el('h3', 'Data path'));
    var caps = dp.capabilities, capText = '';
    if (caps) {
      capText = ['openvswitch', 'vxlan', 'esp'].map(function (k) {
        var f = isObj(caps[k]) ? caps[k] : {};
        return k + ' ' + (f.available === true ? 'yes' : 'no (' + str(f.detail, '?') + ')');
      }).join('; ');
    }
    box.appendChild(dl([
      ['mode', dp.mode], ['runs', dp.running.join(', ')], ['kernel', capText],
      ['why no fast path', dp.note],
    ]));
    var peers = Object.keys(dp.conns).sort();
    if (peers.length) {
      var ul = el('ul');
      ul.className = 'why';
      peers.slice(0, 200).forEach(function (peer) {
        var c = isObj(dp.conns[peer]) ? dp.conns[peer] : {}, li = el('li');
        li.appendChild(peerLink(m, peer));
        li.appendChild(document.createTextNode(' on ' + str(c.chosen, '?')));
        var paths = isObj(c.paths) ? c.paths : {}, pl = el('ul');
        pl.className = 'why-path';
        Object.keys(paths).forEach(function (name) {
          var ps = isObj(paths[name]) ? paths[name] : {};
          var health = ps.healthy === true
            ? (ps.peer_healthy === false ? 'healthy here, not at the peer' : 'healthy')
            : 'not healthy';
          pl.appendChild(el('li', name + ': ' + health + (str(ps.reason) && ps.healthy !== true
            ? ' — ' + str(ps.reason) : ''), ps.healthy === true && ps.peer_healthy !== false ? 'good' : 'warn'));
        });
        arr(c.notes).forEach(function (n) { pl.appendChild(el('li', str(n), 'muted')); });
        li.appendChild(pl);
        ul.appendChild(li);
      });
      box.appendChild(ul);
    }
    box.appendChild(el('h4', 'Datapath changes'));
    if (!dp.history.length) { box.appendChild(el('p', 'none since the router started', 'muted')); return; }
    var hl = el('ul');
    dp.history.slice(-10).reverse().forEach(function (h) {
      var at = num(h.at);
      hl.appendChild(el('li', (at ? new Date(at * 1000).toLocaleTimeString() + ' ' : '') +
        str(h.peer) + ': ' + str(h.from) + ' → ' + str(h.to) + ' (' + str(h.reason) + ')' +
        (str(h.info) ? ' — ' + str(h.info) : ''), h.kind === 'fallback' ? 'warn' : ''));
    });
    box.appendChild(hl);
  }

  // A CIDR's address count (IPv4; 0 when it does not parse).
  function cidrSize(range) {
    var mm = /\/(\d+)$/.exec(range || '');
    return mm && Number(mm[1]) <= 32 ? Math.pow(2, 32 - Number(mm[1])) : 0;
  }

  // The whole allocation range: owned by whom, free, nobody's yet, held by unreachable peers.
  function addressTotals(m) {
    var t = { size: cidrSize(m.ipam.range), owned: 0, free: 0, unreachable: 0, unowned: 0 };
    m.ipam.byPeer.forEach(function (ip) {
      var o = ip.owned || 0;
      t.owned += o; t.free += Math.min(ip.free || 0, o);
      if (!ip.reachable) t.unreachable += o;
    });
    t.unowned = Math.max(0, t.size - t.owned);
    return t;
  }

  function consensusWord(ipam) {
    if (ipam.ready) return 'range divided';
    if (ipam.consensus) return 'waiting for consensus (' + fmtInt(num(ipam.consensus.participants)) +
      ' peers heard of, quorum ' + fmtInt(num(ipam.consensus.quorum)) + ')';
    return 'not ready';
  }

  function addressSummary(m) {
    var t = addressTotals(m);
    return (m.ipam.range || 'range') + ': ' + fmtInt(t.size) + ' addresses · owned ' + fmtInt(t.owned) +
      ' · free ' + fmtInt(t.free) + ' · nobody\'s yet ' + fmtInt(t.unowned) +
      ' · held by unreachable peers ' + fmtInt(t.unreachable) + ' · ' + consensusWord(m.ipam) +
      (m.ipam.conflict ? ' · CONFLICT: ' + m.ipam.conflict : '');
  }

  function renderEdge(box, m, e) {
    if (!e) { box.appendChild(el('p', 'This connection is gone.', 'muted')); return; }
    var pa = m.peers.get(e.a), pb = m.peers.get(e.b);
    box.appendChild(el('h2', (pa.nickname || e.a) + ' — ' + (pb.nickname || e.b)));
    box.appendChild(dl([
      ['between', peerLink(m, e.a)], ['and', peerLink(m, e.b)],
      ['state', stateSpan(e.state)], ['address', e.address],
      ['direction', e.outbound === null ? '' : e.outbound ? 'outbound from here' : 'inbound'],
      ['datapath', e.datapath === 'unknown' ? 'not reported (a peer too old to gossip it)'
        : e.datapath === 'none' ? 'none (no data path set up)' : e.datapath],
      ['encryption', e.state === 'failed' && !e.controlEncrypted ? 'no handshake yet'
        : encryptionWord(e.state, e.encrypted) + (e.encryptionAssumed ? ' (mesh setting)'
        : e.encryptionDetail ? ' (' + e.encryptionDetail + ')' : '')],
      ['held', e.held ? 'no longer reported; kept ' + Math.round(HOLD_MS / 1000) +
        ' s before it is removed' : ''],
      ['for', e.since === null || e.since === undefined ? '' : Math.round(e.since) + ' s'],
      ['MTU', e.mtu === null ? '' : String(e.mtu)],
      ['reason', e.info],
    ]));
    var reps = [e.a, e.b].filter(function (n) { return e.reports[n]; });
    box.appendChild(el('h3', 'Reported by'));
    if (!reps.length) {
      var seen = app.reportedBy.get(edgeKey(e.a, e.b));
      box.appendChild(el('p', seen ? 'neither record reports it now (last reported ' +
        Math.max(0, Math.round((Date.now() - seen.at) / 1000)) + ' s ago by ' + seen.by + ')'
        : 'neither peer\'s record reports it (only this router\'s own connection list)', 'muted'));
    }
    else {
      var ul = el('ul');
      reps.forEach(function (n) {
        var r = e.reports[n], p = m.peers.get(n);
        ul.appendChild(el('li', (p.nickname || n) + ': ' + (r.outbound ? 'outbound' : 'inbound') +
          ' to ' + (r.address || '?') + ', ' + (r.established ? 'established' : 'not established')));
      });
      box.appendChild(ul);
      if (reps.length === 1) box.appendChild(el('p', 'Only one side reports this connection.', 'warn'));
    }
  }

  function renderLocalConn(box, m, c) {
    if (!c || c.peer) { box.appendChild(el('p', 'This connection is gone.', 'muted')); return; }
    box.appendChild(el('h2', 'Connection to ' + (c.address || '?')));
    box.appendChild(dl([
      ['state', stateSpan(c.state)], ['address', c.address],
      ['direction', c.outbound ? 'outbound from here' : 'inbound'],
      ['peer', 'not known yet'], ['reason', c.info],
      ['for', c.since === null ? '' : Math.round(c.since) + ' s'],
    ]));
  }

  function select(id, center) {
    app.selected = id;
    var v = app.view3;
    if (v) {
      v.select(id && (v.byId.has(id) || id.indexOf('e:') === 0) ? id : null);
      // From a table, the search or a details link: bring the peer and its neighbourhood into
      // view. A click on the graph leaves the view where the user put it.
      if (id && center && app.view === 'graph') v.centerOn(id);
      else if (id && center) app.pendingCenter = id;
    }
    renderDetails();
    if (app.view !== 'graph') renderTableRows();
    writeUrl();
  }

  // ---------------------------------------------------------------------------------------
  // Table view: search + sort + virtual scrolling (only visible rows are in the DOM)

  var COLUMNS = {
    peers: [
      { key: 'nickname', title: 'Nickname' }, { key: 'name', title: 'Name' },
      { key: 'status', title: 'Status' }, { key: 'partition', title: 'Part', num: true },
      { key: 'links', title: 'Links', num: true },
      { key: 'version', title: 'Record version', num: true }, { key: 'software', title: 'Software' },
      { key: 'owned', title: 'Owned IPs', num: true }, { key: 'free', title: 'Free IPs', num: true },
    ],
    connections: [
      { key: 'from', title: 'From' }, { key: 'to', title: 'To' }, { key: 'state', title: 'State' },
      { key: 'datapath', title: 'Datapath' }, { key: 'encryption', title: 'Encryption' },
      { key: 'mtu', title: 'MTU', num: true }, { key: 'address', title: 'Address' },
      { key: 'info', title: 'Reason' },
    ],
    addresses: [
      { key: 'nickname', title: 'Peer' }, { key: 'name', title: 'Name' },
      { key: 'status', title: 'Status' }, { key: 'owned', title: 'Owned', num: true },
      { key: 'free', title: 'Free', num: true }, { key: 'ranges', title: 'Ranges' },
    ],
    events: [
      { key: 'time', title: 'Time' }, { key: 'kind', title: 'Event' }, { key: 'peer', title: 'Peer' },
      { key: 'state', title: 'State' }, { key: 'datapath', title: 'Datapath' },
      { key: 'encrypted', title: 'Encrypted' }, { key: 'partition', title: 'Part', num: true },
      { key: 'reason', title: 'Reason' }, { key: 'info', title: 'Detail' },
    ],
  };

  function tableRows(m, view) {
    var rows = [];
    if (view === 'peers') {
      m.peers.forEach(function (p) {
        var ip = m.ipam ? m.ipam.byPeer.get(p.name) : null;
        var r = { id: 'n:' + p.name, nickname: p.nickname, name: p.name,
          status: p.name === m.localName ? 'local' : p.reachable ? 'reachable' : 'unreachable',
          partition: p.component + 1, links: p.reported.length, version: Number(p.version) || 0,
          software: p.software,
          owned: ip ? ip.owned : null, free: ip ? ip.free : null };
        rows.push(r);
      });
    } else if (view === 'addresses') {
      if (m.ipam) {
        m.ipam.byPeer.forEach(function (ip, name) {
          var p = m.peers.get(name);
          rows.push({ id: 'n:' + name, nickname: p ? p.nickname : '', name: name,
            status: name === m.localName ? 'local' : ip.reachable ? 'reachable' : 'unreachable',
            owned: ip.owned, free: ip.free,
            ranges: ip.ranges.slice(0, 3).join(', ') + (ip.ranges.length > 3 || ip.rangesMore
              ? ' … +' + (Math.max(0, ip.ranges.length - 3) + ip.rangesMore) : '') });
        });
      }
    } else if (view === 'events') {
      rows = eventRows(m);
    } else {
      m.edges.forEach(function (e) {
        var pa = m.peers.get(e.a), pb = m.peers.get(e.b);
        rows.push({ id: e.id, from: (pa.nickname || e.a), to: (pb.nickname || e.b), state: e.state,
          datapath: e.datapath === 'unknown' ? 'not reported' : e.datapath,
          encryption: e.state === 'failed' && !e.controlEncrypted ? 'no handshake yet'
            : encryptionWord(e.state, e.encrypted), mtu: e.mtu,
          address: e.address, info: e.held ? 'no longer reported' : e.info, _names: e.a + ' ' + e.b });
      });
      // Our connections to addresses whose peer is not known (dialling, failed handshakes).
      m.localConns.forEach(function (c) {
        if (c.peer) return;
        rows.push({ id: 'c:' + c.address, from: m.nickname || m.localName, to: c.address, state: c.state,
          datapath: c.datapath, encryption: encryptionWord(c.state, c.controlEncrypted), mtu: c.mtu,
          address: c.address, info: c.info, _names: m.localName });
      });
    }
    var cols = COLUMNS[view];
    rows.forEach(function (r) {
      r._text = cols.map(function (c) { return r[c.key] === null ? '' : String(r[c.key]); })
        .join(' ').toLowerCase() + ' ' + (r._names || '').toLowerCase();
    });
    return rows;
  }

  // What happened, newest first: datapath moves (fallbacks, recoveries), failed and degraded
  // connections (handshake and dial failures with their reason), sleeve drops by reason.
  function eventRows(m) {
    var rows = [], nowS = Date.now() / 1000;
    function peerInfo(name) {
      var p = name ? m.peers.get(name) : null;
      return { label: p ? (p.nickname || name) : name || '', part: p ? p.component + 1 : null };
    }
    m.datapath.history.forEach(function (h, i) {
      var who = peerInfo(str(h.peer)), at = num(h.at);
      var e = m.localName ? m.edges.get(edgeKey(m.localName, str(h.peer))) : null;
      rows.push({ id: 'n:' + str(h.peer), _at: at || 0, _key: 'h' + i,
        time: at ? new Date(at * 1000).toLocaleTimeString() : '', kind: str(h.kind),
        peer: who.label, state: h.kind === 'fallback' ? 'fell back' : 'recovered',
        datapath: str(h.from) + '→' + str(h.to),
        encrypted: e ? (e.encrypted ? 'yes' : 'no') : '', partition: who.part,
        reason: str(h.reason), info: str(h.info), _names: str(h.peer) });
    });
    m.localConns.forEach(function (c) {
      if (c.state !== 'failed' && c.state !== 'retrying' && c.state !== 'degraded') return;
      var who = peerInfo(c.peer), at = c.since === null ? nowS : nowS - c.since;
      rows.push({ id: c.peer ? 'n:' + c.peer : 'c:' + c.address, _at: c.state === 'degraded' ? nowS : at,
        time: c.state === 'degraded' ? 'now' : new Date(at * 1000).toLocaleTimeString(),
        kind: c.state === 'degraded' ? 'link degraded' : c.peer ? 'connection failed' : 'dial failed',
        peer: who.label || c.address, state: c.state, datapath: c.datapath,
        encrypted: c.state === 'failed' && !c.controlEncrypted ? 'no handshake yet' : c.encrypted ? 'yes' : 'no',
        partition: who.part, reason: c.info.split(':')[0], info: c.info,
        _names: (c.peer || '') + ' ' + c.address });
    });
    Object.keys(m.datapath.drops).sort().forEach(function (reason) {
      var n = num(m.datapath.drops[reason]);
      if (!n) return;
      rows.push({ id: 'n:' + m.localName, _at: -1, time: 'since start', kind: 'sleeve drops',
        peer: m.nickname || m.localName, state: 'dropped', datapath: 'sleeve', encrypted: '',
        partition: 1, reason: reason, info: fmtInt(n) + ' packets' });
    });
    rows.sort(function (a, b) { return b._at - a._at; });
    return rows;
  }

  // Search terms: plain words match anywhere in a row; "column:value" matches that column
  // (e.g. state:failed datapath:vxlan encrypted:no partition:2).
  function rowMatches(r, term) {
    var colon = term.indexOf(':');
    if (colon > 0) {
      var key = term.slice(0, colon), want = term.slice(colon + 1);
      var cols = COLUMNS[app.view] || [];
      for (var i = 0; i < cols.length; i++) {
        if (cols[i].key === key || cols[i].title.toLowerCase() === key) {
          var v = r[cols[i].key];
          return v !== null && v !== undefined && String(v).toLowerCase().indexOf(want) >= 0;
        }
      }
    }
    return r._text.indexOf(term) >= 0;
  }

  function applyFilterSort() {
    var q = $('table-search').value.trim().toLowerCase(), terms = q ? q.split(/\s+/) : [];
    var rows = terms.length ? app.rows.filter(function (r) {
      for (var i = 0; i < terms.length; i++) if (!rowMatches(r, terms[i])) return false;
      return true;
    }) : app.rows.slice();
    var key = app.sortKey, dir = app.sortDir;
    if (key) {
      rows.sort(function (a, b) {
        var x = a[key], y = b[key];
        if (x === y) return 0;
        if (x === null || x === undefined || x === '') return 1;
        if (y === null || y === undefined || y === '') return -1;
        return (typeof x === 'number' && typeof y === 'number' ? x - y
          : String(x).localeCompare(String(y), 'en', { numeric: true })) * dir;
      });
    }
    app.filtered = rows;
    $('table-count').textContent = rows.length === app.rows.length
      ? rows.length + ' rows' : rows.length + ' of ' + app.rows.length + ' rows';
    $('table-note').textContent = app.view === 'addresses' && app.model
      ? (app.model.ipam ? addressSummary(app.model) : 'IPAM is not running on this router') : '';
    renderTableRows();
  }

  function renderTableHead(view) {
    var head = $('table-head');
    head.textContent = '';
    $('table').className = 'v-' + view;
    COLUMNS[view].forEach(function (c) {
      var th = el('th', c.title);
      th.dataset.key = c.key;
      if (app.sortKey === c.key) th.className = app.sortDir > 0 ? 'sort-asc' : 'sort-desc';
      head.appendChild(th);
    });
  }

  function cellClass(key, v) {
    if (key === 'status') return v === 'unreachable' ? 'bad' : v === 'local' ? 'good' : '';
    if (key === 'state') return v === 'established' ? 'good' : v === 'failed' ? 'bad' : 'warn';
    return '';
  }

  function renderTableRows() {
    if (app.view === 'graph') return;
    var scroller = $('table-scroll'), body = $('table-body'), rows = app.filtered;
    var cols = COLUMNS[app.view], rh = app.rowHeight || ROW_HEIGHT;
    var first = Math.max(0, Math.floor(scroller.scrollTop / rh) - ROW_OVERSCAN);
    var count = Math.ceil((scroller.clientHeight || 600) / rh) + 2 * ROW_OVERSCAN;
    var last = Math.min(rows.length, first + count);
    var html = '';
    if (first > 0) html += '<tr class="spacer" data-rows="' + first + '"><td colspan="' + cols.length + '"></td></tr>';
    for (var i = first; i < last; i++) {
      var r = rows[i];
      html += '<tr class="row' + (r.id === app.selected ? ' selected' : '') + '" data-id="' + esc(r.id) + '">';
      for (var j = 0; j < cols.length; j++) {
        var k = cols[j].key, v = r[k], t = v === null || v === undefined ? '' : cols[j].num ? fmtInt(v) : String(v);
        var cc = cellClass(k, v);
        html += '<td' + (cc ? ' class="' + cc + '"' : '') + ' title="' + esc(t) + '">' + esc(t) + '</td>';
      }
      html += '</tr>';
    }
    if (last < rows.length) html += '<tr class="spacer" data-rows="' + (rows.length - last) + '"><td colspan="' + cols.length + '"></td></tr>';
    body.innerHTML = html;
    // The real row height (borders included) keeps the spacers exact; measured once.
    if (!app.rowHeight) {
      var sample = body.querySelector('tr.row');
      var h = sample ? sample.getBoundingClientRect().height : 0;
      if (h > 0) app.rowHeight = h;
    }
    rh = app.rowHeight || ROW_HEIGHT;
    // Spacer heights through the CSSOM (inline style attributes are blocked by our CSP).
    Array.prototype.forEach.call(body.querySelectorAll('tr.spacer'), function (tr) {
      tr.firstChild.style.height = Number(tr.dataset.rows) * rh + 'px';
    });
    hook.tableRows = rows.length;
  }

  function refreshTable() {
    if (app.view === 'graph' || !app.model) return;
    app.rows = tableRows(app.model, app.view);
    applyFilterSort();
  }

  function setView(view) {
    if (!COLUMNS[view] && view !== 'graph') return;
    var changed = view !== app.view;
    app.view = view;
    Array.prototype.forEach.call(document.querySelectorAll('#tabs button'), function (b) {
      var on = b.dataset.view === view;
      b.classList.toggle('active', on);
      b.setAttribute('aria-selected', on ? 'true' : 'false');
    });
    $('view-graph').hidden = view !== 'graph';
    $('view-table').hidden = view === 'graph';
    writeUrl();
    if (view === 'graph') {
      if (app.view3) { app.view3.resize(); if (app.pendingCenter) { app.view3.centerOn(app.pendingCenter); } }
      app.pendingCenter = null;
      return;
    }
    if (changed) {
      app.sortKey = null; app.sortDir = 1;
      $('table-scroll').scrollTop = 0;
      renderTableHead(view);
    }
    refreshTable();
  }

  // ---------------------------------------------------------------------------------------
  // Applying a status

  // A peer or link that vanishes from one status is held (drawn fading) for HOLD_MS before it
  // is removed: while a host is being cut off, records come and go for a few seconds and the
  // graph would otherwise flip between shapes. A new router incarnation starts afresh.
  function holdDropped(m, incarnation) {
    var now = Date.now();
    if (incarnation !== app.holdIncarnation) {
      app.holdIncarnation = incarnation;
      app.seenPeers = new Map(); app.seenEdges = new Map(); app.reportedBy = new Map();
    }
    m.peers.forEach(function (p, name) { app.seenPeers.set(name, { at: now, p: p }); });
    m.edges.forEach(function (e, k) {
      app.seenEdges.set(k, { at: now, e: e });
      var by = [e.a, e.b].filter(function (n) { return e.reports[n]; });
      if (by.length) {
        var pb = m.peers.get(by[0]);
        app.reportedBy.set(k, { at: now, by: by.length === 2 ? 'both peers' : (pb.nickname || by[0]) });
      }
    });
    var next = Infinity;
    app.seenPeers.forEach(function (s, name) {
      if (m.peers.has(name)) return;
      if (now - s.at >= HOLD_MS) { app.seenPeers.delete(name); return; }
      m.peers.set(name, Object.assign({}, s.p, { held: true }));
      next = Math.min(next, s.at + HOLD_MS);
    });
    app.seenEdges.forEach(function (s, k) {
      if (m.edges.has(k)) return;
      if (now - s.at >= HOLD_MS || !m.peers.has(s.e.a) || !m.peers.has(s.e.b)) {
        app.seenEdges.delete(k); return;
      }
      m.edges.set(k, Object.assign({}, s.e, { held: true }));
      next = Math.min(next, s.at + HOLD_MS);
    });
    clearTimeout(app.holdTimer);
    if (next < Infinity) {
      app.holdTimer = setTimeout(function () {
        try { applyStatus(app.lastStatus, app.holdIncarnation); } catch (err) {
          hook.stats.errors += 1;
          console.error('weft: cannot show this status:', err);
        }
      }, next - now + 20);
    }
  }

  function applyStatus(status, incarnation) {
    var t0 = performance.now();
    var m = normalize(status);
    app.lastStatus = status;
    holdDropped(m, incarnation || '');
    app.model = m;
    syncGraph(m);
    renderLegend(m);
    renderSummary(m);
    renderDetails();
    refreshTable();
    hook.updates += 1;
    hook.timings.lastApplied = performance.now();
    hook.timings.lastApplyMs = hook.timings.lastApplied - t0;
    document.documentElement.dataset.weftUpdates = String(hook.updates);
  }

  // uids are 64-bit: beyond 2^53 a JS number is not exact, so keep their source text (JSON.parse
  // source access; browsers without it fall back to the rounded number).
  function keepBigIntegers(key, value, context) {
    if (typeof value === 'number' && !Number.isSafeInteger(value) && Number.isInteger(value) &&
        context && typeof context.source === 'string') {
      return context.source;
    }
    return value;
  }

  function onMessage(data) {
    if (!domReady) {  // the socket can open before the document is parsed: keep the newest only
      earlyMessage = data;
      lastHeard = Date.now();
      return;
    }
    var msg;
    try {
      msg = JSON.parse(data, keepBigIntegers);
    } catch (err) {
      hook.stats.malformed += 1;
      return;
    }
    lastHeard = Date.now();
    if (!isObj(msg) || typeof msg.type !== 'string') { hook.stats.malformed += 1; return; }
    if (msg.type === 'pong') return;
    if (msg.type === 'error') { console.warn('weft /ws:', msg.error); return; }
    if (msg.type !== 'status') { hook.stats.malformed += 1; return; }
    if (!isObj(msg.status) || typeof msg.seq !== 'number') { hook.stats.malformed += 1; return; }
    var inc = typeof msg.incarnation === 'string' ? msg.incarnation : '';
    if (inc === accepted.incarnation && msg.seq <= accepted.seq) { hook.stats.stale += 1; return; }
    accepted.incarnation = inc; accepted.seq = msg.seq;
    attempt = 0;
    setConnState('live', 'live');
    // Apply on the next turn of the event loop, newest first: statuses that arrive while the
    // page is still busy drawing the previous one replace each other instead of queueing.
    pendingMsg = msg;
    if (!applyQueued) { applyQueued = true; setTimeout(applyPending, 0); }
  }

  var accepted = { incarnation: null, seq: -1 }, pendingMsg = null, applyQueued = false;

  function applyPending() {
    applyQueued = false;
    var msg = pendingMsg;
    if (msg === null) return;
    if (app.paused) { showUpdated(); return; }  // kept in pendingMsg until resumed
    pendingMsg = null;
    try {
      applyStatus(msg.status, typeof msg.incarnation === 'string' ? msg.incarnation : '');
    } catch (err) {
      hook.stats.errors += 1;
      console.error('weft: cannot show this status:', err);
      return;
    }
    hook.incarnation = typeof msg.incarnation === 'string' ? msg.incarnation : '';
    hook.seq = msg.seq;
    app.updatedAt = new Date();
    showUpdated();
    if (app.urlSelection) {  // a shared link's selection, once its peer or link is known
      var want = app.urlSelection;
      if (app.model && (app.model.peers.has(want.slice(2)) || app.model.edges.has(want.slice(2)))) {
        app.urlSelection = null;
        select(want, true);
      }
    }
    if (hook.timings.firstStatus === null) hook.timings.firstStatus = performance.now();
  }

  function showUpdated() {
    var t = app.updatedAt ? app.updatedAt.toLocaleTimeString() : '—';
    $('updated').textContent = app.paused
      ? 'paused at ' + t + (pendingMsg ? ' · newer status waiting' : '')
      : 'updated ' + t;
    var b = $('btn-pause');
    b.textContent = app.paused ? 'Resume' : 'Pause';
    b.classList.toggle('on', app.paused);
    b.setAttribute('aria-pressed', app.paused ? 'true' : 'false');
  }

  function setPaused(on) {
    app.paused = !!on;
    hook.paused = app.paused;
    if (!app.paused && pendingMsg !== null) applyPending();
    showUpdated();
  }

  // The view, the selection and the table search live in the URL's fragment, so a link shows
  // someone else the same thing: #view=events&sel=n:<peer>&q=state:failed
  function writeUrl() {
    if (!domReady) return;
    var h = new URLSearchParams();
    if (app.view !== 'graph') h.set('view', app.view);
    var sel = app.selected || app.urlSelection;  // a shared selection not applied yet stays
    if (sel) h.set('sel', sel);
    var q = $('table-search').value.trim();
    if (q) h.set('q', q);
    var text = h.toString();
    if (text !== window.location.hash.replace(/^#/, '')) {
      history.replaceState(null, '', text ? '#' + text : window.location.pathname + window.location.search);
    }
  }

  function readUrl() {
    var h = new URLSearchParams(window.location.hash.replace(/^#/, ''));
    if (h.get('q')) $('table-search').value = h.get('q');
    var sel = h.get('sel');
    if (sel && /^[nec]:/.test(sel)) app.urlSelection = sel;
    var view = h.get('view');
    if (view && COLUMNS[view]) setView(view);
  }

  // ---------------------------------------------------------------------------------------
  // WebSocket with reconnection (exponential backoff with jitter) and a silence watchdog

  var ws = null, attempt = 0, lastHeard = 0, retryTimer = null;

  function setConnState(cls, text) {
    var p = $('conn-state');
    p.className = 'pill pill-' + cls;
    p.textContent = text;
    hook.connection = cls;
  }

  function wsUrl() {
    var u = new URL('../ws', window.location.href);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    return u.toString();
  }

  function connect() {
    retryTimer = null;
    var sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    setConnState('wait', attempt ? 'reconnecting…' : 'connecting…');
    sock.onopen = function () { lastHeard = Date.now(); };
    sock.onmessage = function (ev) { if (ws === sock) onMessage(ev.data); };
    sock.onclose = function () { if (ws === sock) { ws = null; scheduleReconnect(); } };
    sock.onerror = function () { /* onclose follows */ };
  }

  function scheduleReconnect() {
    if (retryTimer !== null) return;
    var delay = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * Math.pow(2, attempt)) * (0.5 + Math.random());
    attempt = Math.min(attempt + 1, 10);
    hook.stats.reconnects += 1;
    setConnState('down', 'disconnected — retrying in ' + Math.ceil(delay / 1000) + ' s');
    retryTimer = setTimeout(connect, delay);
  }

  setInterval(function () {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > SILENCE_LIMIT_MS) { ws.close(); return; }  // half-open socket
    try { ws.send('{"type":"ping"}'); } catch (err) { /* closing */ }
  }, PING_EVERY_MS);

  // ---------------------------------------------------------------------------------------
  // Wiring

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll('#tabs button'), function (b) {
      b.addEventListener('click', function () { setView(b.dataset.view); });
    });
    $('btn-fit').addEventListener('click', function () { if (app.view3) app.view3.fit(); });
    $('btn-layout').addEventListener('click', function () { if (app.view3) app.view3.relayout(); });
    $('btn-zoom-in').addEventListener('click', function () { if (app.view3) app.view3.zoomAt(1.6); });
    $('btn-zoom-out').addEventListener('click', function () { if (app.view3) app.view3.zoomAt(1 / 1.6); });
    $('group-by').addEventListener('change', function () { setGroupBy(this.value); });
    $('focus-hops').value = String(app.focusHops);
    $('focus-hops').addEventListener('change', function () { setFocusHops(Number(this.value)); });
    var searchTimer = null;
    $('table-search').addEventListener('input', function () {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(function () {
        $('table-scroll').scrollTop = 0; applyFilterSort(); writeUrl();
      }, 60);
    });
    var graphSearchTimer = null;
    $('graph-search').addEventListener('input', function () {
      var input = this;
      clearTimeout(graphSearchTimer);
      graphSearchTimer = setTimeout(function () { graphSearch(input.value); }, 60);
    });
    $('table-head').addEventListener('click', function (ev) {
      var th = ev.target.closest('th');
      if (!th) return;
      var key = th.dataset.key;
      if (app.sortKey === key) app.sortDir = -app.sortDir; else { app.sortKey = key; app.sortDir = 1; }
      renderTableHead(app.view);
      applyFilterSort();
    });
    $('table-body').addEventListener('click', function (ev) {
      var tr = ev.target.closest('tr.row');
      if (tr) select(tr.dataset.id, false);
    });
    var scrollQueued = false;
    $('table-scroll').addEventListener('scroll', function () {
      if (scrollQueued) return;
      scrollQueued = true;
      requestAnimationFrame(function () { scrollQueued = false; renderTableRows(); });
    });
    window.addEventListener('resize', function () { if (app.view !== 'graph') renderTableRows(); });
    if (typeof window.WeftGraphView !== 'function') {
      $('graph').textContent = 'The graph script did not load; the tables still work.';
      window.WeftGraphView = StubView;
    }
    $('btn-pause').addEventListener('click', function () { setPaused(!app.paused); });
    domReady = true;
    readUrl();
    showUpdated();
    if (earlyMessage !== null) {
      var data = earlyMessage;
      earlyMessage = null;
      onMessage(data);
    }
  }

  // Keeps the tables usable without the graph script: a graph that draws nothing.
  function StubView(container, opts) {
    this.opts = opts; this.layouts = 0; this.byId = new Map(); this.nodes = []; this.edges = [];
    this.groups = []; this.focus = null; this.k = 1; this.w = 0; this.h = 0;
    this.drawn = { labels: [], mode: '', frames: 0 };
    this.canvas = container;
  }
  StubView.prototype.setData = function () {
    var o = this.opts;
    setTimeout(function () { o.onDrawn(); }, 0);
  };
  ['select', 'centerOn', 'fit', 'relayout', 'zoomAt', 'resize', 'setMatches', 'setFocusHops']
    .forEach(function (f) { StubView.prototype[f] = function () {}; });

  function graphSearch(value) {
    var q = value.trim().toLowerCase(), v = app.view3, d = app.graphData;
    if (!v || !d) return;
    if (!q) { v.setMatches(null); return; }
    var hits = d.nodes.filter(function (n) {
      return (n.name + ' ' + n.nickname).toLowerCase().indexOf(q) >= 0;
    }).map(function (n) { return n.id; });
    v.setMatches(hits.slice(0, 200));
    if (hits.length === 1) select(hits[0], true);
  }

  function setGroupBy(k) {
    if (k === app.groupBy) return;
    app.groupBy = k;
    storePref('groupBy', k);
    if ($('group-by').value !== k) $('group-by').value = k;
    if (app.model) { syncGraph(app.model); if (app.view3) app.view3.fit(); }
  }

  function setFocusHops(h) {
    app.focusHops = h;
    storePref('focusHops', h);
    if ($('focus-hops').value !== String(h)) $('focus-hops').value = String(h);
    if (app.view3) app.view3.setFocusHops(h);
  }

  // The socket opens at once, so the status transfer overlaps the parsing of the rest of the
  // page; the page itself is wired once the document is complete.
  connect();
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
