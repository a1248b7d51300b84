/* weft graph view: draws the mesh on one <canvas>, readable from 3 to 5,000+ peers.
 *
 * - Layout (weftLayout): computed from the topology, deterministic (seeded from peer names), by
 *   group: each group (partition, datapath, a peer label…) gets its own force layout, groups are
 *   packed around the first one. Known peers keep their place when others come or go; positions
 *   are cached in localStorage so a reload shows the same picture.
 * - Level of detail: a peer's label is drawn only where it hides no other peer and no other
 *   label, so zooming in reveals more of them; text keeps its size on screen at every zoom.
 *   Edge labels are placed last and skipped where they would cover a peer or its label.
 * - Zoomed out, links inside a group are thinned and links between groups are bundled into one
 *   line per pair of groups (with a count); failed/degraded/pending links are always drawn.
 * - Focus: a selected peer and its 1 (or 2) hop neighbourhood are drawn and labelled on top of
 *   a dimmed mesh.
 *
 * Pure drawing: it knows nothing of the status model; app.js gives it nodes and edges.
 */
(function () {
  'use strict';

  var L = 40;                 // ideal link length, world units
  var NODE_R = 5;             // peer radius, world units (clamped on screen)
  var FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
  var FONT_SMALL = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
  var LINE_H = 14;
  var LABEL_CAP = 500;        // labels drawn per frame at most
  var LABEL_TRIES = 4000;     // candidates tried per frame at most
  var OVERVIEW_PX = 16;       // mean on-screen link length under which links are thinned/bundled
  var MIN_K = 0.005, MAX_K = 8;
  var CACHE_VERSION = 1;

  // -------------------------------------------------------------------------------------
  // Deterministic layout

  function hash32(s) {  // FNV-1a
    var h = 0x811c9dc5;
    for (var i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 0x01000193); }
    return h >>> 0;
  }
  function unit2(s) {  // two numbers in [0, 1) from a name (mulberry32 seeded by its hash)
    var a = hash32(s);
    function next() {
      a = (a + 0x6D2B79F5) | 0;
      var t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    }
    return [next(), next()];
  }

  // Fruchterman-Reingold on one group. x, y: positions (in place); fixed[i] = 1 keeps node i
  // where it is; adj: pairs of local indices. Repulsion is cut off at 2L and found through a
  // grid, so an iteration is O(n + edges).
  function relax(x, y, fixed, pairs, iters) {
    var n = x.length, dx = new Float64Array(n), dy = new Float64Array(n);
    // Few movers among many fixed peers (a peer joined): forces only on the movers.
    var movers = [];
    for (var mv = 0; mv < n; mv++) if (!fixed[mv]) movers.push(mv);
    var sparse = movers.length * 4 < n;
    var cs = 2 * L, allPairs = n <= 250;
    var t0 = L * Math.max(1, Math.sqrt(n)) * 0.15;
    var grav = (allPairs ? 0.6 : 0.06) / Math.max(1, Math.sqrt(n));
    var moving = 0;
    for (var q = 0; q < n; q++) if (!fixed[q]) moving += 1;
    if (!moving) return;
    for (var it = 0; it < iters; it++) {
      dx.fill(0); dy.fill(0);
      var i, j, ddx, ddy, d2, f;
      if (allPairs) {
        for (i = 0; i < n; i++) {
          for (j = i + 1; j < n; j++) {
            ddx = x[i] - x[j]; ddy = y[i] - y[j]; d2 = ddx * ddx + ddy * ddy;
            if (d2 < 0.01) { ddx = 0.1 * ((i * 7 + j) % 5 - 2); ddy = 0.1; d2 = ddx * ddx + ddy * ddy; }
            f = L * L / d2;
            dx[i] += ddx * f; dy[i] += ddy * f; dx[j] -= ddx * f; dy[j] -= ddy * f;
          }
        }
      } else {
        var cells = new Map();
        for (i = 0; i < n; i++) {
          var key = (Math.floor(x[i] / cs) + 32768) * 65536 + (Math.floor(y[i] / cs) + 32768);
          var c = cells.get(key);
          if (c) c.push(i); else cells.set(key, [i]);
        }
        var lim = cs * cs;
        for (var mi = 0; mi < (sparse ? movers.length : n); mi++) {
          i = sparse ? movers[mi] : mi;
          var gx = Math.floor(x[i] / cs) + 32768, gy = Math.floor(y[i] / cs) + 32768;
          for (var ox = -1; ox <= 1; ox++) {
            for (var oy = -1; oy <= 1; oy++) {
              var cell = cells.get((gx + ox) * 65536 + gy + oy);
              if (!cell) continue;
              for (var m = 0; m < cell.length; m++) {
                j = cell[m];
                if (sparse ? j === i : j <= i) continue;
                ddx = x[i] - x[j]; ddy = y[i] - y[j]; d2 = ddx * ddx + ddy * ddy;
                if (d2 >= lim) continue;
                if (d2 < 0.01) { ddx = 0.1 * ((i * 7 + j) % 5 - 2); ddy = 0.1; d2 = ddx * ddx + ddy * ddy; }
                f = L * L / d2;
                dx[i] += ddx * f; dy[i] += ddy * f;
                if (!sparse) { dx[j] -= ddx * f; dy[j] -= ddy * f; }
              }
            }
          }
        }
      }
      for (var e = 0; e < pairs.length; e += 2) {
        i = pairs[e]; j = pairs[e + 1];
        ddx = x[i] - x[j]; ddy = y[i] - y[j];
        var d = Math.sqrt(ddx * ddx + ddy * ddy) || 0.01;
        // |force| = d^2 / L up to 2L, then linear: the long links of a random mesh would
        // otherwise crush it into a dense ball.
        f = n > 250 ? 2 * L * Math.log(1 + d / L) / d : Math.min(d / L, 2);
        dx[i] -= ddx * f; dy[i] -= ddy * f; dx[j] += ddx * f; dy[j] += ddy * f;
      }
      var temp = t0 * (1 - it / iters) + 0.5;
      for (i = 0; i < n; i++) {
        if (fixed[i]) continue;
        dx[i] -= x[i] * grav * L / 10; dy[i] -= y[i] * grav * L / 10;
        var len = Math.sqrt(dx[i] * dx[i] + dy[i] * dy[i]);
        if (len > temp) { dx[i] *= temp / len; dy[i] *= temp / len; }
        x[i] += dx[i]; y[i] += dy[i];
      }
    }
  }

  function iterationsFor(n) { return n <= 60 ? 400 : n <= 300 ? 200 : n <= 1500 ? 90 : 40; }

  /* nodes: [{name, group}] sorted by name; edges: flat [i, j, ...] over node indices;
   * groupOrder: the group keys, first placed in the middle; prev: Map name -> {group, x, y}
   * relative to its group's centre (kept where the group matches). Returns
   * {x, y (absolute), rel: Map name -> {group, x, y}, groups: [{key, cx, cy, r, n}]}. */
  function layout(nodes, edges, groupOrder, prev) {
    var n = nodes.length, X = new Float64Array(n), Y = new Float64Array(n);
    var members = new Map();
    groupOrder.forEach(function (g) { members.set(g, []); });
    nodes.forEach(function (nd, i) {
      if (!members.has(nd.group)) { members.set(nd.group, []); groupOrder.push(nd.group); }
      members.get(nd.group).push(i);
    });
    var local = new Int32Array(n);  // node index -> index inside its group
    members.forEach(function (idx) { idx.forEach(function (i, k) { local[i] = k; }); });
    var nbrs = [];
    for (var q = 0; q < n; q++) nbrs.push([]);
    for (var e = 0; e < edges.length; e += 2) { nbrs[edges[e]].push(edges[e + 1]); nbrs[edges[e + 1]].push(edges[e]); }
    var rel = new Map(), groups = [];
    groupOrder.forEach(function (g) {
      var idx = members.get(g);
      if (!idx.length) return;
      var m = idx.length, x = new Float64Array(m), y = new Float64Array(m), fixed = new Uint8Array(m);
      var R = L * 0.7 * Math.sqrt(m), kept = 0;
      idx.forEach(function (i, k) {
        var p = prev && prev.get(nodes[i].name);
        if (p && p.group === g && isFinite(p.x) && isFinite(p.y)) { x[k] = p.x; y[k] = p.y; fixed[k] = 1; kept += 1; }
      });
      idx.forEach(function (i, k) {
        if (fixed[k]) return;
        var u = unit2(nodes[i].name), sx = 0, sy = 0, c = 0;
        if (kept) {  // next to its already placed neighbours in this group
          nbrs[i].forEach(function (j) {
            if (nodes[j].group === g && fixed[local[j]]) { sx += x[local[j]]; sy += y[local[j]]; c += 1; }
          });
        }
        if (c) { x[k] = sx / c + (u[0] - 0.5) * L; y[k] = sy / c + (u[1] - 0.5) * L; }
        else {
          var a = 2 * Math.PI * u[0], r = R * Math.sqrt(u[1]);
          x[k] = r * Math.cos(a); y[k] = r * Math.sin(a);
        }
      });
      var pairs = [];
      idx.forEach(function (i, k) {
        nbrs[i].forEach(function (j) { if (j > i && nodes[j].group === g) pairs.push(k, local[j]); });
      });
      relax(x, y, fixed, pairs, kept ? Math.min(60, iterationsFor(m)) : iterationsFor(m));
      var cx = 0, cy = 0;
      if (!kept) {  // a fresh group is centred on its centroid
        for (var a = 0; a < m; a++) { cx += x[a]; cy += y[a]; }
        cx /= m; cy /= m;
        for (a = 0; a < m; a++) { x[a] -= cx; y[a] -= cy; }
      }
      var r2 = 0;
      idx.forEach(function (i, k) {
        rel.set(nodes[i].name, { group: g, x: x[k], y: y[k] });
        r2 = Math.max(r2, x[k] * x[k] + y[k] * y[k]);
      });
      groups.push({ key: g, idx: idx, lx: x, ly: y, r: Math.sqrt(r2) + L * 0.8, n: m, cx: 0, cy: 0 });
    });
    // Pack the groups: the first in the middle, each next one at the nearest free spot on rings
    // around it (24 directions per ring), in a fixed order.
    var placed = [];
    groups.forEach(function (gr, gi) {
      if (gi === 0) { gr.cx = 0; gr.cy = 0; placed.push(gr); return; }
      var gap = Math.max(L * 3, gr.r * 0.3), d = placed[0].r + gr.r + gap, found = false;
      for (var ring = 0; ring < 400 && !found; ring++, d += gr.r * 0.5 + gap) {
        for (var s = 0; s < 24 && !found; s++) {
          var ang = -Math.PI / 2 + (s * 2 * Math.PI) / 24 + ring * 0.13;
          var cx = d * Math.cos(ang), cy = d * Math.sin(ang), ok = true;
          for (var p = 0; p < placed.length && ok; p++) {
            var o = placed[p], ddx = cx - o.cx, ddy = cy - o.cy, min = o.r + gr.r + gap;
            if (ddx * ddx + ddy * ddy < min * min) ok = false;
          }
          if (ok) { gr.cx = cx; gr.cy = cy; found = true; }
        }
      }
      placed.push(gr);
    });
    groups.forEach(function (gr) {
      gr.idx.forEach(function (i, k) { X[i] = gr.cx + gr.lx[k]; Y[i] = gr.cy + gr.ly[k]; });
    });
    return { x: X, y: Y, rel: rel,
             groups: groups.map(function (g) { return { key: g.key, cx: g.cx, cy: g.cy, r: g.r, n: g.n }; }) };
  }

  // -------------------------------------------------------------------------------------
  // Collision grid for labels (screen space)

  function Grid(cell) { this.cell = cell; this.map = new Map(); }
  Grid.prototype.keys = function (r, f) {
    var c = this.cell;
    for (var gx = Math.floor(r.x0 / c); gx <= Math.floor(r.x1 / c); gx++) {
      for (var gy = Math.floor(r.y0 / c); gy <= Math.floor(r.y1 / c); gy++) {
        if (f((gx + 4096) * 8192 + gy + 4096)) return true;
      }
    }
    return false;
  };
  Grid.prototype.hits = function (r, ignore, labelsOnly) {
    var map = this.map;
    return this.keys(r, function (k) {
      var list = map.get(k);
      if (!list) return false;
      for (var i = 0; i < list.length; i++) {
        var o = list[i];
        if (o.owner === ignore && ignore !== undefined) continue;
        if (labelsOnly && o.disk) continue;
        if (o.x0 < r.x1 && o.x1 > r.x0 && o.y0 < r.y1 && o.y1 > r.y0) return true;
      }
      return false;
    });
  };
  Grid.prototype.add = function (r) {
    var map = this.map;
    this.keys(r, function (k) {
      var list = map.get(k);
      if (list) list.push(r); else map.set(k, [r]);
      return false;
    });
  };

  // -------------------------------------------------------------------------------------
  // The view

  function View(container, opts) {
    this.container = container;
    this.opts = opts || {};
    this.canvas = document.createElement('canvas');
    this.canvas.setAttribute('aria-label', 'mesh topology');
    this.canvas.tabIndex = 0;
    container.textContent = '';
    container.appendChild(this.canvas);
    this.ctx = this.canvas.getContext('2d');
    this.nodes = []; this.edges = []; this.byId = new Map(); this.groups = []; this.bundles = [];
    this.adj = [];
    this.k = 1; this.tx = 0; this.ty = 0; this.w = 0; this.h = 0; this.ratio = 1;
    this.selected = null; this.focusHops = 1; this.focus = null; this.hover = -1;
    this.matches = null; this.layoutSig = null; this.rel = null; this.cacheKey = null;
    this.drawn = { labels: [], mode: '', frames: 0 };
    this.layouts = 0; this.queued = false; this.fitted = false;
    this.bind();
    this.resize();
  }

  View.prototype.bind = function () {
    var self = this, cv = this.canvas, down = null;
    cv.addEventListener('pointerdown', function (ev) {
      down = { x: ev.clientX, y: ev.clientY, tx: self.tx, ty: self.ty, moved: false };
      try { cv.setPointerCapture(ev.pointerId); } catch (err) { /* synthetic event */ }
    });
    cv.addEventListener('pointermove', function (ev) {
      if (down) {
        var dx = ev.clientX - down.x, dy = ev.clientY - down.y;
        if (Math.abs(dx) + Math.abs(dy) > 4) down.moved = true;
        if (down.moved) { self.tx = down.tx + dx; self.ty = down.ty + dy; self.draw(); }
        return;
      }
      var p = self.local(ev), hit = self.nodeAt(p.x, p.y);
      if (hit !== self.hover) {
        self.hover = hit;
        cv.style.cursor = hit >= 0 || self.edgeAt(p.x, p.y) >= 0 ? 'pointer' : '';
        self.draw();
      }
    });
    cv.addEventListener('pointerup', function (ev) {
      var d = down;
      down = null;
      if (!d || d.moved) return;
      var p = self.local(ev), i = self.nodeAt(p.x, p.y), id = null;
      if (i >= 0) id = self.nodes[i].id;
      else {
        var e = self.edgeAt(p.x, p.y);
        if (e >= 0) id = self.edges[e].id;
      }
      if (self.opts.onSelect) self.opts.onSelect(id);
    });
    cv.addEventListener('pointerleave', function () {
      if (self.hover >= 0) { self.hover = -1; self.draw(); }
    });
    cv.addEventListener('wheel', function (ev) {
      ev.preventDefault();
      var p = self.local(ev);
      self.zoomAt(Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015)), p.x, p.y);
    }, { passive: false });
    cv.addEventListener('dblclick', function (ev) {
      var p = self.local(ev);
      self.zoomAt(2, p.x, p.y);
    });
    if (typeof ResizeObserver === 'function') {
      new ResizeObserver(function () { self.resize(); }).observe(this.container);
    }
  };

  View.prototype.local = function (ev) {
    var r = this.canvas.getBoundingClientRect();
    return { x: ev.clientX - r.left, y: ev.clientY - r.top };
  };

  View.prototype.resize = function () {
    var w = this.container.clientWidth, h = this.container.clientHeight;
    if (!w || !h) return;  // hidden (another tab): keep the last size
    if (w === this.w && h === this.h) return;
    var keepCentre = this.w && this.h;
    if (keepCentre) { this.tx += (w - this.w) / 2; this.ty += (h - this.h) / 2; }
    this.w = w; this.h = h;
    // Big meshes at device ratio 1: four times fewer pixels to fill on a HiDPI screen.
    this.ratio = this.nodes.length > 1500 ? 1 : Math.min(window.devicePixelRatio || 1, 2);
    this.canvas.width = Math.round(w * this.ratio);
    this.canvas.height = Math.round(h * this.ratio);
    this.canvas.style.width = w + 'px';
    this.canvas.style.height = h + 'px';
    if (!this.fitted && this.nodes.length) this.fit();
    this.draw();
  };

  /* data: {nodes: [{id, name, label, group, fill, size, op, local, unknown, unreachable, held}],
   *        edges: [{id, source, target, label, color, width, dash, op, important, labelled}],
   *        groupOrder: [keys], groupLabels: {key: text}, cacheKey: string} */
  View.prototype.setData = function (data) {
    var self = this, nodes = data.nodes.slice().sort(function (a, b) {
      return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
    });
    var byId = new Map();
    nodes.forEach(function (nd, i) { byId.set(nd.id, i); });
    var edges = [], flat = [];
    data.edges.forEach(function (e) {
      var s = byId.get(e.source), t = byId.get(e.target);
      if (s === undefined || t === undefined) return;
      edges.push(Object.assign({ s: s, t: t }, e));
      flat.push(s, t);
    });
    var adj = nodes.map(function () { return []; });
    edges.forEach(function (e, i) { adj[e.s].push(i); adj[e.t].push(i); });
    var sig = data.cacheKey + '#' + nodes.map(function (nd) { return nd.name + '@' + nd.group; }).join(',') +
      '#' + flat.length;
    var prevPos = new Map();
    this.nodes.forEach(function (nd) { prevPos.set(nd.name, nd); });
    nodes.forEach(function (nd) {
      var p = prevPos.get(nd.name);
      nd.x = p ? p.x : 0; nd.y = p ? p.y : 0;
      nd.tw = p && p.label === nd.label ? p.tw : -1;
    });
    this.nodes = nodes; this.edges = edges; this.byId = byId; this.adj = adj;
    this.groupLabels = data.groupLabels || {};
    var topoSig = data.cacheKey + '#' + nodes.map(function (nd) { return nd.name + '@' + nd.group; }).join(',');
    if (topoSig !== this.layoutSig) {
      // Peers or their groups changed: lay out, keeping every peer that stays in its group where
      // it was (in this page, else in the cache of an earlier visit).
      if (data.cacheKey !== this.cacheKey) { this.rel = this.loadCache(data.cacheKey); this.cacheKey = data.cacheKey; }
      this.runLayout(nodes, flat, data.groupOrder.slice(), this.rel);
      this.layoutSig = topoSig;
    } else if (sig !== this.edgeSig) {
      this.rebundle();
    }
    this.edgeSig = sig;
    this.refocus();
    if (!this.fitted && this.w) this.fit();
    this.draw();
    void self;
  };

  View.prototype.runLayout = function (nodes, flat, groupOrder, prev) {
    var res = layout(nodes.map(function (nd) { return { name: nd.name, group: nd.group }; }), flat, groupOrder, prev);
    nodes.forEach(function (nd, i) { nd.x = res.x[i]; nd.y = res.y[i]; });
    this.rel = res.rel;
    this.groups = res.groups;
    this.layouts += 1;
    this.rebundle();
    this.saveCache();
  };

  View.prototype.relayout = function () {
    if (!this.nodes.length) return;
    var flat = [];
    this.edges.forEach(function (e) { flat.push(e.s, e.t); });
    this.runLayout(this.nodes, flat, this.groups.map(function (g) { return g.key; }), null);
    this.fit();
  };

  // Links between groups, one bundle per pair of groups.
  View.prototype.rebundle = function () {
    var gi = new Map(), nodes = this.nodes, b = new Map();
    this.groups.forEach(function (g, i) { gi.set(g.key, i); });
    this.edges.forEach(function (e) {
      var a = gi.get(nodes[e.s].group), c = gi.get(nodes[e.t].group);
      e.cross = a !== c;
      if (!e.cross) return;
      var k = a < c ? a + '|' + c : c + '|' + a, x = b.get(k);
      if (!x) b.set(k, x = { a: Math.min(a, c), b: Math.max(a, c), n: 0 });
      x.n += 1;
    });
    this.bundles = Array.from(b.values());
  };

  View.prototype.loadCache = function (key) {
    try {
      var raw = window.localStorage && window.localStorage.getItem('weft.layout.' + key);
      if (!raw) return null;
      var doc = JSON.parse(raw);
      if (!doc || doc.v !== CACHE_VERSION || typeof doc.p !== 'object') return null;
      var m = new Map();
      Object.keys(doc.p).forEach(function (name) {
        var e = doc.p[name];
        if (Array.isArray(e) && e.length === 3) m.set(name, { x: +e[0], y: +e[1], group: String(e[2]) });
      });
      return m;
    } catch (err) { return null; }
  };

  View.prototype.saveCache = function () {
    var self = this;
    clearTimeout(this.saveTimer);
    this.saveTimer = setTimeout(function () {
      if (!self.rel || !self.cacheKey) return;
      var p = {};
      self.rel.forEach(function (v, name) { p[name] = [Math.round(v.x * 10) / 10, Math.round(v.y * 10) / 10, v.group]; });
      try {
        window.localStorage.setItem('weft.layout.' + self.cacheKey, JSON.stringify({ v: CACHE_VERSION, p: p }));
      } catch (err) { /* full or disabled: positions are still deterministic */ }
    }, 500);
  };

  // ---- viewport

  View.prototype.bounds = function (idx) {
    var x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity, nodes = this.nodes;
    (idx || nodes.map(function (_, i) { return i; })).forEach(function (i) {
      var nd = nodes[i];
      if (nd.x < x0) x0 = nd.x; if (nd.x > x1) x1 = nd.x;
      if (nd.y < y0) y0 = nd.y; if (nd.y > y1) y1 = nd.y;
    });
    return { x0: x0, y0: y0, x1: x1, y1: y1 };
  };

  View.prototype.fitBounds = function (b, maxK) {
    if (!isFinite(b.x0) || !this.w) return;
    var pad = 40, w = Math.max(L, b.x1 - b.x0), h = Math.max(L, b.y1 - b.y0);
    var k = Math.min((this.w - 2 * pad) / w, (this.h - 2 * pad - LINE_H) / h, maxK || 2.5);
    this.k = Math.max(MIN_K, Math.min(MAX_K, k));
    this.tx = this.w / 2 - this.k * (b.x0 + b.x1) / 2;
    this.ty = this.h / 2 - this.k * (b.y0 + b.y1) / 2;
  };

  View.prototype.fit = function () {
    if (!this.nodes.length || !this.w) return;
    var b = this.bounds();
    if (this.groups.length > 1) {  // the group discs and their names too
      this.groups.forEach(function (g) {
        b.x0 = Math.min(b.x0, g.cx - g.r); b.x1 = Math.max(b.x1, g.cx + g.r);
        b.y0 = Math.min(b.y0, g.cy - g.r - L * 0.8); b.y1 = Math.max(b.y1, g.cy + g.r);
      });
    }
    this.fitBounds(b, this.nodes.length <= 40 ? 4 : 2.5);
    this.fitted = true;
    this.draw();
  };

  View.prototype.zoomAt = function (f, px, py) {
    var k = Math.max(MIN_K, Math.min(MAX_K, this.k * f));
    if (px === undefined) { px = this.w / 2; py = this.h / 2; }
    this.tx = px - (px - this.tx) * (k / this.k);
    this.ty = py - (py - this.ty) * (k / this.k);
    this.k = k;
    this.draw();
  };

  View.prototype.centerOn = function (id) {
    var i = this.byId.get(id);
    if (i === undefined) {
      var e = this.edgeIndex(id);
      if (e < 0) return;
      i = this.edges[e].s;
    }
    var idx = this.focus ? this.focus.order : [i];
    this.fitBounds(this.bounds(idx), Math.max(this.k, 1.5));
    this.draw();
  };

  View.prototype.screen = function (i) {
    var nd = this.nodes[i];
    return { x: nd.x * this.k + this.tx, y: nd.y * this.k + this.ty };
  };

  // ---- selection and focus

  View.prototype.edgeIndex = function (id) {
    for (var i = 0; i < this.edges.length; i++) if (this.edges[i].id === id) return i;
    return -1;
  };

  View.prototype.select = function (id) {
    this.selected = id;
    this.refocus();
    this.draw();
  };

  View.prototype.setFocusHops = function (h) { this.focusHops = h; this.refocus(); this.draw(); };

  View.prototype.setMatches = function (ids) {
    var self = this;
    this.matches = ids && ids.length ? new Set(ids.map(function (id) { return self.byId.get(id); })) : null;
    this.draw();
  };

  View.prototype.refocus = function () {
    this.focus = null;
    if (!this.selected || !this.focusHops) return;
    var nodes = new Map(), edges = new Set(), self = this;
    var i = this.byId.get(this.selected);
    if (i !== undefined) {
      nodes.set(i, 0);
      var frontier = [i];
      for (var hop = 1; hop <= this.focusHops; hop++) {
        var next = [];
        frontier.forEach(function (a) {
          self.adj[a].forEach(function (ei) {
            var e = self.edges[ei], b = e.s === a ? e.t : e.s;
            if (!nodes.has(b)) { nodes.set(b, hop); next.push(b); }
          });
        });
        frontier = next;
      }
      // The links among the neighbourhood (all of them: a peer's links and those between
      // its neighbours show how it is embedded).
      nodes.forEach(function (_, a) {
        self.adj[a].forEach(function (ei) {
          var e = self.edges[ei];
          if (nodes.has(e.s) && nodes.has(e.t) && (nodes.get(e.s) < self.focusHops || nodes.get(e.t) < self.focusHops)) edges.add(ei);
        });
      });
    } else {
      var ei = this.edgeIndex(this.selected);
      if (ei < 0) return;
      nodes.set(this.edges[ei].s, 0); nodes.set(this.edges[ei].t, 0); edges.add(ei);
    }
    var order = Array.from(nodes.keys()).sort(function (a, b) { return nodes.get(a) - nodes.get(b); });
    this.focus = { nodes: nodes, edges: edges, order: order };
  };

  // ---- hit testing (screen coordinates)

  View.prototype.radius = function (nd) {
    var r = Math.max(2.5, Math.min(9, NODE_R * this.k * (nd.size || 8) / 8));
    return nd.local ? r + 3 : r;
  };

  View.prototype.nodeAt = function (px, py) {
    var best = -1, bestD = Infinity;
    for (var i = 0; i < this.nodes.length; i++) {
      var nd = this.nodes[i], sx = nd.x * this.k + this.tx, sy = nd.y * this.k + this.ty;
      var r = Math.max(6, this.radius(nd) + 2), dx = sx - px, dy = sy - py, d = dx * dx + dy * dy;
      if (d <= r * r && d < bestD) { best = i; bestD = d; }
    }
    return best;
  };

  View.prototype.edgeAt = function (px, py) {
    var best = -1, bestD = 16, k = this.k, tx = this.tx, ty = this.ty, nodes = this.nodes;
    var overview = this.mode() === 'overview';
    for (var i = 0; i < this.edges.length; i++) {
      var e = this.edges[i];
      if (overview && e.cross && !e.important) continue;
      var a = nodes[e.s], b = nodes[e.t];
      var ax = a.x * k + tx, ay = a.y * k + ty, bx = b.x * k + tx, by = b.y * k + ty;
      var vx = bx - ax, vy = by - ay, l2 = vx * vx + vy * vy;
      var t = l2 ? Math.max(0, Math.min(1, ((px - ax) * vx + (py - ay) * vy) / l2)) : 0;
      var dx = ax + t * vx - px, dy = ay + t * vy - py, d = dx * dx + dy * dy;
      if (d < bestD) { best = i; bestD = d; }
    }
    return best;
  };

  // ---- drawing

  View.prototype.mode = function () {
    return this.nodes.length > 40 && L * this.k < OVERVIEW_PX ? 'overview' : 'detail';
  };

  View.prototype.draw = function () {
    if (this.queued) return;
    this.queued = true;
    var self = this;
    requestAnimationFrame(function () { self.queued = false; self.paint(); });
  };

  function dashFor(ctx, dash, w) {
    ctx.setLineDash(dash === 'dashed' ? [6, 4] : dash === 'dotted' ? [Math.max(1, w), 3] : []);
  }

  View.prototype.paint = function () {
    var ctx = this.ctx, k = this.k, tx = this.tx, ty = this.ty, W = this.w, H = this.h;
    if (!W || !H) return;
    var t0 = performance.now();
    ctx.setTransform(this.ratio, 0, 0, this.ratio, 0, 0);
    ctx.clearRect(0, 0, W, H);
    var nodes = this.nodes, edges = this.edges, focus = this.focus, mode = this.mode();
    var self = this, many = this.groups.length > 1;
    var margin = 20;
    function sx(nd) { return nd.x * k + tx; }
    function sy(nd) { return nd.y * k + ty; }
    function visible(x, y) { return x > -margin && x < W + margin && y > -margin && y < H + margin; }

    // Groups: a light disc each, when there are several.
    if (many) {
      ctx.lineWidth = 1;
      this.groups.forEach(function (g) {
        ctx.beginPath();
        ctx.arc(g.cx * k + tx, g.cy * k + ty, g.r * k, 0, 2 * Math.PI);
        ctx.fillStyle = 'rgba(43,108,176,0.04)';
        ctx.fill();
        ctx.strokeStyle = 'rgba(43,108,176,0.25)';
        ctx.stroke();
      });
    }

    // Links. Batched by look: one path per (colour, width, dash, alpha).
    // Ordinary links fade as the mesh gets denser on screen (full strength once zoomed in to
    // about 60 px per link); links that tell something (not established, ours) never fade.
    var thin = nodes.length <= 40 ? 1 : Math.max(0.06, Math.min(1, Math.pow(L * k / 60, 2)));
    var batches = new Map();
    var lw = Math.max(0.6, Math.min(1.6, k * 1.5));
    function addEdge(e, alpha) {
      var a = nodes[e.s], b = nodes[e.t];
      var ax = sx(a), ay = sy(a), bx = sx(b), by = sy(b);
      if ((ax < 0 && bx < 0) || (ax > W && bx > W) || (ay < 0 && by < 0) || (ay > H && by > H)) return;
      var w = e.width * lw;
      var key = e.color + '|' + w.toFixed(2) + '|' + e.dash + '|' + alpha.toFixed(2);
      var bt = batches.get(key);
      if (!bt) batches.set(key, bt = { color: e.color, w: w, dash: e.dash, alpha: alpha, segs: [] });
      bt.segs.push(ax, ay, bx, by);
    }
    var focusEdges = focus ? focus.edges : null;
    for (var i = 0; i < edges.length; i++) {
      var e = edges[i];
      if (focusEdges && focusEdges.has(i)) continue;
      var alpha = e.op;
      if (focusEdges) alpha *= 0.12;
      else if (!e.important) {
        if (mode === 'overview' && e.cross && many) continue;  // bundled below
        alpha *= thin;
      }
      if (alpha < 0.02) continue;
      addEdge(e, alpha);
    }
    function flush() {
      batches.forEach(function (bt) {
        ctx.globalAlpha = bt.alpha;
        ctx.strokeStyle = bt.color;
        ctx.lineWidth = bt.w;
        dashFor(ctx, bt.dash, bt.w);
        ctx.beginPath();
        var s = bt.segs;
        for (var q = 0; q < s.length; q += 4) { ctx.moveTo(s[q], s[q + 1]); ctx.lineTo(s[q + 2], s[q + 3]); }
        ctx.stroke();
      });
      batches = new Map();
      ctx.globalAlpha = 1;
      ctx.setLineDash([]);
    }
    flush();

    // Bundles between groups (zoomed out): one line per pair, as thick as the log of its count.
    var bundleLabels = [];
    if (many && mode === 'overview' && !focus) {
      ctx.strokeStyle = '#5b6575';
      this.bundles.forEach(function (bd) {
        var ga = self.groups[bd.a], gb = self.groups[bd.b];
        var ax = ga.cx * k + tx, ay = ga.cy * k + ty, bx = gb.cx * k + tx, by = gb.cy * k + ty;
        var dx = bx - ax, dy = by - ay, d = Math.sqrt(dx * dx + dy * dy) || 1;
        var ux = dx / d, uy = dy / d, ra = ga.r * k, rb = gb.r * k;
        if (d <= ra + rb) return;
        ctx.globalAlpha = 0.55;
        ctx.lineWidth = 1 + Math.log2(1 + bd.n);
        ctx.beginPath();
        ctx.moveTo(ax + ux * ra, ay + uy * ra);
        ctx.lineTo(bx - ux * rb, by - uy * rb);
        ctx.stroke();
        bundleLabels.push({ x: (ax + ux * ra + bx - ux * rb) / 2, y: (ay + uy * ra + by - uy * rb) / 2,
                            text: bd.n + (bd.n === 1 ? ' link' : ' links') });
      });
      ctx.globalAlpha = 1;
    }

    // Focus links on top, full strength.
    if (focusEdges) {
      focusEdges.forEach(function (ei) { addEdge(edges[ei], Math.max(0.5, edges[ei].op)); });
      flush();
    }

    // Peers, batched by fill.
    var fills = new Map(), special = [];
    var focusNodes = focus ? focus.nodes : null;
    var onScreen = [];
    for (i = 0; i < nodes.length; i++) {
      var nd = nodes[i], x = sx(nd), y = sy(nd);
      if (!visible(x, y)) continue;
      onScreen.push(i);
      if (nd.local || nd.unknown || nd.unreachable || (this.matches && this.matches.has(i)) ||
          (focusNodes && focusNodes.has(i)) || nd.id === this.selected || i === this.hover) {
        special.push(i);
        continue;
      }
      var fa = (focusNodes ? 0.18 : 1) * nd.op;
      var fk = nd.fill + '|' + fa.toFixed(2), f = fills.get(fk);
      if (!f) fills.set(fk, f = { fill: nd.fill, alpha: fa, pts: [] });
      f.pts.push(x, y, this.radius(nd));
    }
    fills.forEach(function (f) {
      ctx.globalAlpha = f.alpha;
      ctx.fillStyle = f.fill;
      ctx.beginPath();
      for (var q = 0; q < f.pts.length; q += 3) {
        ctx.moveTo(f.pts[q] + f.pts[q + 2], f.pts[q + 1]);
        ctx.arc(f.pts[q], f.pts[q + 1], f.pts[q + 2], 0, 2 * Math.PI);
      }
      ctx.fill();
    });
    ctx.globalAlpha = 1;
    special.forEach(function (i) { self.paintNode(nodes[i], sx(nodes[i]), sy(nodes[i]), focusNodes && !focusNodes.has(i)); });

    // Labels: group names, then peers by priority, then link labels; each only where it covers
    // nothing already placed (peers count as placed).
    var grid = new Grid(48), drawnLabels = [];
    var dense = onScreen.length <= 3000;
    if (dense) {
      onScreen.forEach(function (i) {
        var x = sx(nodes[i]), y = sy(nodes[i]), r = self.radius(nodes[i]);
        grid.add({ x0: x - r, y0: y - r, x1: x + r, y1: y + r, owner: i, disk: true });
      });
    }
    ctx.font = FONT;
    ctx.textBaseline = 'top';
    ctx.lineJoin = 'round';
    function text(t, x, y, color, font) {
      ctx.font = font || FONT;
      ctx.lineWidth = 3;
      ctx.strokeStyle = 'rgba(255,255,255,0.92)';
      ctx.strokeText(t, x, y);
      ctx.fillStyle = color;
      ctx.fillText(t, x, y);
    }
    if (many) {
      this.groups.forEach(function (g) {
        var t = (self.groupLabels[g.key] || g.key) + ' · ' + g.n + (g.n === 1 ? ' peer' : ' peers');
        var w = ctx.measureText(t).width, x = g.cx * k + tx - w / 2, y = (g.cy - g.r) * k + ty - LINE_H - 4;
        if (!visible(x + w / 2, y)) return;
        var r = { x0: x - 2, y0: y - 1, x1: x + w + 2, y1: y + LINE_H };
        grid.add(r);
        text(t, x, y, '#2b4f7a');
        drawnLabels.push({ kind: 'group', id: g.key, text: t, x0: r.x0, y0: r.y0, x1: r.x1, y1: r.y1 });
      });
    }
    // Candidates: forced ones first (selection, hover, its direct neighbours, matches, this router).
    var forced = [], seen = new Set();
    function want(i, force) {
      if (i < 0 || seen.has(i)) return;
      seen.add(i);
      forced.push({ i: i, force: force });
    }
    if (this.hover >= 0) want(this.hover, true);
    if (focus) focus.order.forEach(function (i) { want(i, focus.nodes.get(i) <= 1); });
    if (this.matches) this.matches.forEach(function (i) { want(i, true); });
    nodes.forEach(function (nd, i) { if (nd.local) want(i, true); });
    var placedCount = 0, tries = 0;
    function placeLabel(i, force) {
      var nd = nodes[i], x = sx(nd), y = sy(nd);
      if (!visible(x, y)) return;
      if (nd.tw < 0 || !nd.lines) {
        ctx.font = FONT;
        nd.lines = nd.label.split('\n');
        nd.tw = 0;
        nd.lines.forEach(function (ln) { nd.tw = Math.max(nd.tw, ctx.measureText(ln).width); });
      }
      var lines = nd.lines, w = nd.tw, h = LINE_H * lines.length, r = self.radius(nd);
      var spots = [[x - w / 2, y + r + 2], [x - w / 2, y - r - 2 - h], [x + r + 3, y - h / 2], [x - r - 3 - w, y - h / 2]];
      var chosen = null;
      for (var s = 0; s < spots.length; s++) {
        var rc = { x0: spots[s][0] - 1, y0: spots[s][1], x1: spots[s][0] + w + 1, y1: spots[s][1] + h, owner: i };
        if (!grid.hits(rc, i)) { chosen = rc; break; }
        if (!force && nodes.length > 40) break;  // in a big mesh ordinary labels go below their peer only
      }
      if (!chosen && force) {  // a label that must show: further out, still avoiding labels
        for (var j = 1; j <= 6 && !chosen; j++) {
          [1, -1].forEach(function (sgn) {
            var yy = sgn > 0 ? spots[0][1] + j * LINE_H : spots[1][1] - j * LINE_H;
            var rr = { x0: spots[0][0] - 1, y0: yy, x1: spots[0][0] + w + 1, y1: yy + h, owner: i };
            if (!chosen && !grid.hits(rr, i, true)) chosen = rr;
          });
        }
      }
      if (!chosen) {
        if (!force) return;
        chosen = { x0: spots[0][0] - 1, y0: spots[0][1], x1: spots[0][0] + w + 1, y1: spots[0][1] + h, owner: i };
      }
      grid.add(chosen);
      var dim = focusNodes && !focusNodes.has(i);
      lines.forEach(function (ln, li) {
        text(ln, chosen.x0 + 1, chosen.y0 + li * LINE_H, dim ? 'rgba(28,35,48,0.35)' : nd.unreachable ? '#6b7380' : '#1c2330');
      });
      placedCount += 1;
      drawnLabels.push({ kind: 'node', id: nd.id, text: nd.label, x0: chosen.x0, y0: chosen.y0, x1: chosen.x1, y1: chosen.y1, forced: !!force });
    }
    forced.forEach(function (c) { placeLabel(c.i, c.force); });
    // Then everyone else on screen, best connected first (hubs are the landmarks), while the
    // spacing allows; in focus mode the dimmed rest stays unlabelled.
    if (!focus && dense) {
      var order = this.labelOrder(onScreen);
      for (var o = 0; o < order.length && placedCount < LABEL_CAP && tries < LABEL_TRIES; o++) {
        if (seen.has(order[o])) continue;
        tries += 1;
        placeLabel(order[o], false);
      }
    }
    // Link labels: zoomed in only, the link long enough to carry one, never over a peer label.
    if (mode === 'detail') {
      ctx.font = FONT_SMALL;
      for (i = 0; i < edges.length && drawnLabels.length < LABEL_CAP * 2; i++) {
        e = edges[i];
        if (!e.label || !(e.labelled || (focusEdges && focusEdges.has(i)))) continue;
        if (focusEdges && !focusEdges.has(i)) continue;
        var a = nodes[e.s], b = nodes[e.t], mx = (sx(a) + sx(b)) / 2, my = (sy(a) + sy(b)) / 2;
        if (!visible(mx, my)) continue;
        var len = Math.hypot(sx(a) - sx(b), sy(a) - sy(b));
        var tw = ctx.measureText(e.label).width;
        if (len < tw + 24) continue;
        var rc = { x0: mx - tw / 2 - 2, y0: my - 7, x1: mx + tw / 2 + 2, y1: my + 6 };
        if (grid.hits(rc)) continue;
        grid.add(rc);
        ctx.fillStyle = 'rgba(255,255,255,0.85)';
        ctx.fillRect(rc.x0, rc.y0, rc.x1 - rc.x0, rc.y1 - rc.y0);
        ctx.fillStyle = '#4a515c';
        ctx.fillText(e.label, mx - tw / 2, my - 6);
        drawnLabels.push({ kind: 'edge', id: e.id, text: e.label, x0: rc.x0, y0: rc.y0, x1: rc.x1, y1: rc.y1 });
      }
    }
    // Bundle counts last: they give way to everything else.
    ctx.font = FONT_SMALL;
    bundleLabels.forEach(function (bl) {
      var tw = ctx.measureText(bl.text).width;
      var rc = { x0: bl.x - tw / 2 - 2, y0: bl.y - 7, x1: bl.x + tw / 2 + 2, y1: bl.y + 6 };
      if (grid.hits(rc, undefined, true)) return;  // over a peer dot is fine, over a label not
      grid.add(rc);
      text(bl.text, bl.x - tw / 2, bl.y - 6, '#3d4654', FONT_SMALL);
      drawnLabels.push({ kind: 'bundle', id: bl.text, text: bl.text, x0: rc.x0, y0: rc.y0, x1: rc.x1, y1: rc.y1 });
    });
    this.drawn = { labels: drawnLabels, mode: mode, frames: this.drawn.frames + 1,
                   ms: performance.now() - t0, onScreen: onScreen.length };
    if (this.opts.onDrawn) this.opts.onDrawn();
  };

  View.prototype.labelOrder = function (onScreen) {
    var adj = this.adj, nodes = this.nodes;
    return onScreen.slice().sort(function (a, b) {
      return adj[b].length - adj[a].length || (nodes[a].name < nodes[b].name ? -1 : 1);
    });
  };

  View.prototype.paintNode = function (nd, x, y, dim) {
    var ctx = this.ctx, r = this.radius(nd), i = this.byId.get(nd.id);
    ctx.globalAlpha = (dim ? 0.18 : 1) * nd.op;
    ctx.beginPath();
    if (nd.unknown) {  // no record received yet: a diamond
      ctx.moveTo(x, y - r - 1); ctx.lineTo(x + r + 1, y); ctx.lineTo(x, y + r + 1); ctx.lineTo(x - r - 1, y);
      ctx.closePath();
    } else {
      ctx.arc(x, y, r, 0, 2 * Math.PI);
    }
    ctx.fillStyle = nd.fill;
    ctx.fill();
    if (nd.local) { ctx.lineWidth = 3; ctx.strokeStyle = '#f2b600'; ctx.stroke(); }
    if (nd.unreachable && r >= 4) { ctx.lineWidth = 1.5; ctx.setLineDash([3, 2]); ctx.strokeStyle = '#7d838c'; ctx.stroke(); ctx.setLineDash([]); }
    if (this.matches && this.matches.has(i)) {
      ctx.lineWidth = 3; ctx.strokeStyle = '#e74c3c';
      ctx.beginPath(); ctx.arc(x, y, r + 3, 0, 2 * Math.PI); ctx.stroke();
    }
    if (nd.id === this.selected) {
      ctx.lineWidth = 3; ctx.strokeStyle = 'rgba(43,108,176,0.6)';
      ctx.beginPath(); ctx.arc(x, y, r + 5, 0, 2 * Math.PI); ctx.stroke();
    }
    ctx.globalAlpha = 1;
  };

  var root = typeof window !== 'undefined' ? window : globalThis;
  root.weftLayout = layout;
  root.WeftGraphView = View;
  if (typeof module === 'object' && module.exports) module.exports = { layout: layout };
})();
