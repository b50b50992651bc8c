// factfind's circuit explorer (factfind/report/explorer.py explains what a reader can do).
// Each div.ffx holds its graph as JSON (a script element of type application/json): nodes
// and edges as columns, edges sorted by |effect| descending, so "the strongest k edges" and
// "the edges above a threshold" are both a prefix of one list. d3 (vendored, inlined before
// this script) does the zoom, the shapes and the data joins.
(() => {
  "use strict";
  if (typeof d3 === "undefined") return;
  const POS = "#2563eb", NEG = "#dc2626", ZERO = "#9ca3af";
  // Layout units are screen pixels of the first view: a layer column gets the width's share
  // (at least 10 px), so 4 layers fill the width as well as 80 do, and zoom does the rest
  const STEP = 16;        // px between two nodes of one cell, at most
  const MIN_STEP = 3;     // px between two nodes of one cell, at least (zoom in to read them)
  const MAX_H = 900;      // px: the first view is at most this tall; a taller graph zooms
  const WIDEN = 8;        // a dense layer's column is at most this many times the others'
  const LABEL_STEP = 14;  // px: node labels need this much room under each node
  const GUTTER = 96;      // px for the lane labels at the left
  const AXIS = 24;        // px for the layer labels at the top
  const SLIDER = 1000;    // slider positions
  const LABELS_UP_TO = 160;  // nodes: name every node below this, else only the chosen ones
  const KIND_ORDER = ["embed", "resid", "attn", "head", "mlp", "neuron", "feature", "error",
                      "logits"];
  const KIND_NAME = {embed: "embeddings", resid: "residual stream", attn: "attention",
                     head: "head", mlp: "MLP", neuron: "neuron", feature: "feature",
                     error: "dictionary error", logits: "logits", group: "supernode"};
  const hexagon = {draw(ctx, size) {  // d3 has no hexagon; area = size like its symbols
    const r = Math.sqrt(size / (1.5 * Math.sqrt(3)));
    for (let i = 0; i < 6; i++) {
      const a = Math.PI / 3 * i + Math.PI / 6;
      i ? ctx.lineTo(r * Math.cos(a), r * Math.sin(a)) : ctx.moveTo(r * Math.cos(a), r * Math.sin(a));
    }
    ctx.closePath();
  }};
  const SYMBOL = {head: d3.symbolCircle, attn: d3.symbolTriangle, mlp: d3.symbolSquare,
                  neuron: d3.symbolDiamond, resid: d3.symbolCross, embed: d3.symbolWye,
                  logits: d3.symbolStar, feature: hexagon, error: d3.symbolSquare2,
                  group: d3.symbolCircle};
  // unit shapes (radius ~1); a node scales its kind's shape by its radius
  const SHAPE = Object.fromEntries(Object.entries(SYMBOL).map(
    ([k, s]) => [k, d3.symbol(s, Math.PI)()]));
  const shapeOf = (kind) => SHAPE[kind] || SHAPE.head;
  const color = (v) => (v > 0 ? POS : v < 0 ? NEG : ZERO);
  const fmt = (v) => (v === null || v === undefined ? "" : typeof v === "number"
    ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v));
  const signed = (v) => (v > 0 ? "+" : "") + fmt(v);
  const el = (parent, tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  };
  const SVGNS = "http://www.w3.org/2000/svg";
  const svgEl = (parent, tag, attrs) => {
    const e = document.createElementNS(SVGNS, tag);
    Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
    parent.appendChild(e);
    return e;
  };

  // where a node sits inside its layer: the stream, then attention, then the MLP
  const stageOf = (kind, dict) => {
    if (kind === "resid") return 0;
    if (kind === "attn" || kind === "head") return 1;
    if (kind === "feature" || kind === "error") {
      return {att: 1, rpre: 0, res: 3}[dict] ?? 2;
    }
    return 2;
  };
  const shortName = (id) => id.replace(/^L\d+\./, "").split("@")[0];

  // The layout. Columns are layers and share the width that the drawing is given, whatever
  // the depth (a column is at least 10 px: 80 layers overflow and the first view scales
  // down); a column with a dense cell is wider, by sqrt(its size), at most WIDEN. Inside a column, a slot per stage; a (slot, lane) cell holds its nodes as a grid of
  // `step`-px pitch, as many across as the slot holds and as many rows as they need, the
  // strongest by |score| nearest the cell's centre. One pitch serves the whole graph (sizes
  // stay comparable across cells): the largest, up to STEP, at which the lanes fit in MAX_H;
  // where even MIN_STEP does not, the drawing runs taller and the reader zooms.
  function gridOf(n, w, step) {  // [across, rows] of a cell of n nodes, w px wide
    const fit = Math.max(1, Math.floor(w * 0.94 / step));
    const rows = Math.ceil(n / Math.min(n, fit));
    return [Math.ceil(n / rows), rows];
  }
  function centreOut(across, rows, n) {  // grid offsets (in steps), nearest the centre first
    const out = [];
    for (let row = 0; row < rows; row++) {
      for (let col = 0; col < across; col++) out.push([col - (across - 1) / 2, row - (rows - 1) / 2]);
    }
    out.sort((a, b) => (a[0] * a[0] + a[1] * a[1]) - (b[0] * b[0] + b[1] * b[1])
      || Math.abs(a[1]) - Math.abs(b[1]) || a[1] - b[1] || a[0] - b[0]);
    return out.slice(0, n);
  }

  function layout(data, avail) {
    const N = data.nodes.id.length, nodes = data.nodes;
    const endpoint = (i) => nodes.kind[i] === "embed" || nodes.kind[i] === "logits";
    const layers = nodes.layer.filter((l, i) => l !== null && !endpoint(i));
    const first = layers.length ? Math.min(...layers) : 0;
    const last = layers.length ? Math.max(...layers) : -1;
    const nl = Math.max(data.n_layers, last + 1);
    const colOf = (i) => (nodes.kind[i] === "embed" ? 0 : nodes.kind[i] === "logits"
      ? nl - first + 1 : nodes.layer[i] - first + 1);
    const dictOf = (i) => (data.extra[i] || {}).dictionary;
    const stages = [...new Set(d3.range(N).filter((i) => !endpoint(i))
      .map((i) => stageOf(nodes.kind[i], dictOf(i))))].sort();
    const columns = nl - first + 2;
    const slots = Math.max(1, stages.length);
    const slotOf = (i) => (endpoint(i) ? -1 : stages.indexOf(stageOf(nodes.kind[i], dictOf(i))));
    // a column widens with the square root of its densest cell (up to WIDEN times), so that
    // tens of features of one layer and token form a squarish block, not a thin tall column
    const densest = new Float64Array(columns), count = new Map();
    for (let i = 0; i < N; i++) {
      const key = `${colOf(i)}|${slotOf(i)}|${nodes.lane[i]}`, n = (count.get(key) || 0) + 1;
      count.set(key, n);
      densest[colOf(i)] = Math.max(densest[colOf(i)], n);
    }
    const weight = Array.from(densest, (n) => Math.max(1, Math.min(WIDEN, Math.sqrt(n))));
    const unit = Math.max(10, avail / d3.sum(weight));
    const colW = weight.map((w) => w * unit), colLeft = [0];
    colW.forEach((w, c) => colLeft.push(colLeft[c] + w));
    const colMid = (c) => colLeft[c] + colW[c] / 2;
    const slotX = (i) => {
      const c = colOf(i), COL = colW[c], slotW = COL * 0.86 / slots;
      if (endpoint(i)) return [colMid(c), COL * 0.8];
      return [colLeft[c] + COL * 0.07 + slotW * (slotOf(i) + 0.5), slotW];
    };
    const cells = new Map();
    const order = d3.range(N).sort((a, b) => (Math.abs(nodes.score[b]) - Math.abs(nodes.score[a]))
      || (KIND_ORDER.indexOf(nodes.kind[a]) - KIND_ORDER.indexOf(nodes.kind[b]))
      || ((nodes.index[a] ?? -1) - (nodes.index[b] ?? -1)) || d3.ascending(nodes.id[a], nodes.id[b]));
    order.forEach((i) => {
      const [x, w] = slotX(i);
      const key = `${x}|${nodes.lane[i]}`;
      if (!cells.has(key)) cells.set(key, {x, w, lane: nodes.lane[i], members: []});
      cells.get(key).members.push(i);  // strongest first
    });
    const lanes = data.lanes.length;
    // layout px per screen px of the first view, so that MAX_H is screen pixels
    const shrink = Math.max(1, colLeft[columns] / avail);
    const room = (MAX_H - AXIS - 24) * shrink;
    const minLane = Math.max(20, Math.min(60, room / lanes));
    const pad = Math.min(28, minLane * 0.45);
    const laneHeights = (step) => {
      const rows = new Array(lanes).fill(0);
      cells.forEach((c) => { rows[c.lane] = Math.max(rows[c.lane], gridOf(c.members.length, c.w, step)[1]); });
      return rows.map((r) => Math.max(minLane, r * step + pad));
    };
    let step = STEP, laneH = laneHeights(step);
    for (let s = STEP - 0.5; d3.sum(laneH) > room && s >= MIN_STEP; s -= 0.5) {
      step = s;
      laneH = laneHeights(s);
    }
    const laneTop = [0];
    laneH.forEach((h, i) => laneTop.push(laneTop[i] + h));
    const x = new Float64Array(N), y = new Float64Array(N), r = new Float64Array(N);
    const maxAbs = d3.max(d3.range(N).filter((i) => !endpoint(i)), (i) => Math.abs(nodes.score[i])) || 1;
    cells.forEach((c) => {
      const [across, rows] = gridOf(c.members.length, c.w, step);
      const spots = centreOut(across, rows, c.members.length);
      // a node stays inside its slot and its grid cell, so no two ever overlap
      const cap = Math.min(step, c.w) * 0.45;
      const cy = laneTop[c.lane] + laneH[c.lane] / 2;
      c.members.forEach((i, k) => {
        x[i] = c.x + spots[k][0] * step;
        y[i] = cy + spots[k][1] * step;
        r[i] = endpoint(i) ? Math.min(step * 0.4, colW[colOf(i)] * 0.3)
          : cap * (0.4 + 0.6 * Math.sqrt(Math.abs(nodes.score[i]) / maxAbs));
      });
    });
    const colLabel = (c) => (c === 0 ? "embed" : c === columns - 1 ? "logits" : `L${c - 1 + first}`);
    return {x, y, r, laneTop, laneH, width: colLeft[columns], height: laneTop[lanes],
            columns, colLabel, colMid, colW, COL: unit, step};
  }

  function init(root) {
    root.dataset.init = "1";
    const data = JSON.parse(root.querySelector("script.ffx-data").textContent);
    const nodes = data.nodes, N = nodes.id.length;
    const E = data.edges.effect.length;
    const extra = (i) => data.extra[i] || {};
    const label = (i) => extra(i).label ?? shortName(nodes.id[i]);
    const byId = new Map(nodes.id.map((id, i) => [id, i]));
    const holder = root.querySelector(".ffx-canvas");
    const L = layout(data, Math.max(320, holder.clientWidth || 760) - GUTTER - 12);
    const COL = L.COL;
    const $ = (sel) => root.querySelector(sel);
    const panel = $(".ffx-panel"), countEl = $(".ffx-count");
    const slider = $(".ffx-threshold"), thrOut = $(".ffx-threshold-value");
    const topkIn = $(".ffx-topk"), search = $(".ffx-search"), searchCount = $(".ffx-search-count");

    // ------------------------------------------------------------------ state
    const pinned = new Set();       // node indexes
    const groups = [];              // {key, name, members: [node indexes]}
    let groupOf = new Int32Array(N).fill(-1);
    let selected = null;            // a display key: "n<i>" or "g<j>"
    let matches = new Set();
    let pinnedOnly = false;
    // display edges: [senderKey, receiverKey, effect, edgeIndex | -1] sorted by |effect| desc
    let shown = [];
    let absSorted = null;
    const keyOf = (i) => (groupOf[i] >= 0 ? `g${groupOf[i]}` : `n${i}`);

    function displayEdges() {
      if (!groups.length) {
        return d3.range(E).map((k) => [`n${data.edges.sender[k]}`, `n${data.edges.receiver[k]}`,
                                       data.edges.effect[k], k]);
      }
      const sum = new Map();
      for (let k = 0; k < E; k++) {
        const a = keyOf(data.edges.sender[k]), b = keyOf(data.edges.receiver[k]);
        if (a === b) continue;  // inside one supernode
        const key = `${a}|${b}`;
        const hit = sum.get(key);
        if (hit) { hit[2] += data.edges.effect[k]; hit[3] = -1; } else sum.set(key, [a, b, data.edges.effect[k], k]);
      }
      return [...sum.values()].sort((p, q) => Math.abs(q[2]) - Math.abs(p[2]));
    }
    function displayNodes() {
      const out = [];
      for (let i = 0; i < N; i++) if (groupOf[i] < 0) out.push(`n${i}`);
      groups.forEach((g) => out.push(g.key));
      return out;
    }
    const pos = (key) => {
      if (key[0] === "n") { const i = +key.slice(1); return [L.x[i], L.y[i], L.r[i]]; }
      const g = groups[+key.slice(1)];
      return [d3.mean(g.members, (i) => L.x[i]), d3.mean(g.members, (i) => L.y[i]),
              Math.max(4, Math.min(L.step * 0.62, COL * 0.4))];
    };
    const scoreOf = (key) => (key[0] === "n" ? nodes.score[+key.slice(1)]
      : d3.sum(groups[+key.slice(1)].members, (i) => nodes.score[i]));
    const kindOf = (key) => (key[0] === "n" ? nodes.kind[+key.slice(1)] : "group");
    const idOf = (key) => (key[0] === "n" ? nodes.id[+key.slice(1)] : groups[+key.slice(1)].name);
    const isPinned = (key) => (key[0] === "n" ? pinned.has(+key.slice(1))
      : groups[+key.slice(1)].members.every((i) => pinned.has(i)));

    // ------------------------------------------------------------------ thresholds
    let lo = 0, hi = 0;
    function rescale() {
      shown = displayEdges();
      absSorted = Float64Array.from(shown, (e) => Math.abs(e[2]));
      const nonzero = absSorted.filter((v) => v > 0);
      hi = nonzero.length ? nonzero[0] : 0;
      lo = nonzero.length ? nonzero[nonzero.length - 1] : 0;
    }
    const thresholdAt = (p) => (p <= 0 || hi === 0 ? 0 : hi === lo ? hi
      : lo * Math.pow(hi / lo, p / SLIDER));
    const positionOf = (t) => (t <= 0 || hi === 0 ? 0 : hi === lo ? SLIDER
      : Math.max(0, Math.min(SLIDER, Math.floor(SLIDER * Math.log(t / lo) / Math.log(hi / lo)))));
    const countAbove = (t) => {  // edges with |effect| >= t: absSorted is descending
      let a = 0, b = absSorted.length;
      while (a < b) { const m = (a + b) >> 1; if (absSorted[m] >= t) a = m + 1; else b = m; }
      return a;
    };
    rescale();
    slider.max = String(SLIDER);
    slider.value = String(E > data.initial_edges ? positionOf(absSorted[data.initial_edges - 1]) : 0);
    // ties (a node-score graph's structural edges all have effect 0) pass any threshold: then
    // the first view caps them with top-k instead
    if (countAbove(thresholdAt(+slider.value)) > 2 * data.initial_edges) {
      topkIn.value = String(data.initial_edges);
    }

    // ------------------------------------------------------------------ the drawing
    const svg = d3.select(holder).append("svg").attr("class", "graph ffx-svg")
      .attr("role", "img").attr("aria-label",
        `Circuit explorer: ${N} nodes and ${E} edges; x is the layer, y the token lane`);
    const view = svg.append("g").attr("class", "ffx-view");
    const laneG = view.append("g").attr("class", "ffx-lanes");
    const edgeG = view.append("g").attr("class", "ffx-edges");
    const nodeG = view.append("g").attr("class", "ffx-nodes");
    const textG = view.append("g").attr("class", "ffx-labels");
    const axisG = svg.append("g").attr("class", "ffx-axis");
    const laneAxis = svg.append("g").attr("class", "ffx-lane-axis");
    data.lanes.forEach((name, i) => {
      laneG.append("rect").attr("class", `lane${i % 2 ? " odd" : ""}`).attr("x", 0)
        .attr("y", L.laneTop[i]).attr("width", L.width).attr("height", L.laneH[i]);
    });
    const axisBg = axisG.append("rect").attr("class", "ffx-axis-bg").attr("height", AXIS);
    const colLabels = d3.range(L.columns).map((c) => axisG.append("text")
      .attr("class", "layer-label").attr("y", AXIS - 8).text(L.colLabel(c)).node());
    const laneBg = laneAxis.append("rect").attr("class", "ffx-axis-bg").attr("width", GUTTER);
    const laneLabels = data.lanes.map((name) => laneAxis.append("text").attr("class", "lane-label")
      .attr("x", GUTTER - 8).text(data.lane_kind === "position" ? `pos ${name}` : name).node());
    const corner = svg.append("rect").attr("class", "ffx-axis-bg").attr("width", GUTTER)
      .attr("height", AXIS);
    let width = 0, height = 0, transform = d3.zoomIdentity;

    // label widths, estimated once (11 px text): no layout reads on every zoom event
    const labelW = colLabels.map((node) => 6.5 * node.textContent.length + 4);
    function drawAxes(t) {
      // name the embeddings and the logits, then each layer whose column is wider than its
      // label (a dense one), then every step-th layer, each only where its label keeps clear of
      // the labels already placed, so that 18, 30 and 80 layers all stay legible
      const colPx = L.width / L.columns * t.k;  // a mean column
      const step = [1, 2, 5, 10, 20, 50].find((s) => colPx * s >= 34) || 100;
      const last = L.columns - 1;
      const spans = colLabels.map((_, c) => {
        const x = t.applyX(L.colMid(c)), w = labelW[c];
        // the end labels lean inwards so that the gutter and the edge never cut them
        if (c === 0) return [Math.max(x - w / 2, GUTTER + 2), "start"];
        if (c === last) return [Math.min(x + w / 2, width - 2), "end"];
        return [x, "middle"];
      });
      const extent = (c) => {
        const [x, anchor] = spans[c];
        const w = labelW[c];
        return anchor === "start" ? [x, x + w] : anchor === "end" ? [x - w, x] : [x - w / 2, x + w / 2];
      };
      const inView = (c) => { const [a, b] = extent(c); return a >= GUTTER && b <= width; };
      const shown = new Set([0, last].filter(inView)), placed = [...shown].map(extent);
      const inner = d3.range(1, last);
      [...inner.filter((c) => L.colW[c] * t.k >= labelW[c] + 8),
       ...inner.filter((c) => (c - 1) % step === 0)].forEach((c) => {
        if (shown.has(c) || !inView(c)) return;
        const [a, b] = extent(c);
        if (placed.every(([p, q]) => b + 6 <= p || a >= q + 6)) { placed.push([a, b]); shown.add(c); }
      });
      colLabels.forEach((node, c) => {
        const show = shown.has(c);
        node.setAttribute("x", spans[c][0].toFixed(1));
        node.setAttribute("text-anchor", spans[c][1]);
        node.style.display = show ? "" : "none";
      });
      let lastY = -Infinity;
      laneLabels.forEach((node, i) => {
        const y = t.applyY(L.laneTop[i] + L.laneH[i] / 2);
        node.setAttribute("y", (y + 4).toFixed(1));
        const show = y > AXIS + 6 && y < height - 4 && y - lastY >= 14;
        if (show) lastY = y;
        node.style.display = show ? "" : "none";
      });
    }
    const zoom = d3.zoom().on("zoom", (event) => {
      transform = event.transform;
      view.attr("transform", transform);
      drawAxes(transform);
    });
    svg.call(zoom).on("dblclick.zoom", null);
    function fit(animate) {
      width = Math.max(320, holder.clientWidth || 760);
      // the whole width, and as tall as the drawing is then, within 260 px and MAX_H
      const kw = (width - GUTTER - 12) / L.width;
      height = Math.round(Math.max(260, Math.min(MAX_H, L.height * kw + AXIS + 24)));
      svg.attr("width", width).attr("height", height);
      axisBg.attr("width", width);
      laneBg.attr("height", height);
      const k = Math.min(kw, (height - AXIS - 12) / L.height);
      zoom.scaleExtent([k / 2, Math.max(k * 64, 8)]);
      const t = d3.zoomIdentity.translate(GUTTER + (width - GUTTER - L.width * k) / 2,
                                          AXIS + (height - AXIS - L.height * k) / 2).scale(k);
      (animate ? svg.transition().duration(300) : svg).call(zoom.transform, t);
    }

    function edgePath(a, b) {
      const [x1, y1] = pos(a), [x2, y2] = pos(b);
      const dx = Math.max(10, Math.abs(x2 - x1) * 0.4);
      return `M${x1.toFixed(1)},${y1.toFixed(1)}C${(x1 + dx).toFixed(1)},${y1.toFixed(1)} `
        + `${(x2 - dx).toFixed(1)},${y2.toFixed(1)} ${x2.toFixed(1)},${y2.toFixed(1)}`;
    }

    function visibleEdges() {
      const t = thresholdAt(+slider.value);
      let n = countAbove(t);
      const k = topkIn.value === "" ? Infinity : Math.max(0, Math.floor(+topkIn.value));
      let list = shown;
      if (pinnedOnly) list = list.filter((e) => isPinned(e[0]) && isPinned(e[1]));
      if (pinnedOnly) n = list.filter((e) => Math.abs(e[2]) >= t).length;
      return {t, list: list.slice(0, Math.min(n, k))};
    }

    // nodes are joined only when the set changes (groups, "pinned only"); a selection, a pin
    // or a search restyles just the nodes it touches, so a click on a 10k-node graph is cheap
    const nodeEls = new Map();
    let nodesDirty = true;
    const nodeClass = (k) => `node kind-${kindOf(k)}${isPinned(k) ? " pinned" : ""}`
      + `${matches.has(k) ? " match" : ""}${k === selected ? " active" : ""}`;
    function renderNodes() {
      const keys = displayNodes().filter((k) => !pinnedOnly || isPinned(k));
      const maxN = d3.max(keys, (k) => (kindOf(k) === "embed" || kindOf(k) === "logits" ? 0
        : Math.abs(scoreOf(k)))) || 1;
      nodeEls.clear();
      nodeG.selectAll("path.node").data(keys, (k) => k).join("path")
        .attr("class", nodeClass)
        .attr("d", (k) => shapeOf(kindOf(k)))
        .attr("transform", (k) => { const [x, y, r] = pos(k); return `translate(${x.toFixed(1)},${y.toFixed(1)}) scale(${r.toFixed(2)})`; })
        .attr("fill", (k) => (kindOf(k) === "group" ? "#fff" : color(scoreOf(k))))
        .attr("fill-opacity", (k) => (0.35 + 0.65 * Math.min(1, Math.abs(scoreOf(k)) / maxN)).toFixed(2))
        .attr("stroke", (k) => color(scoreOf(k)))
        .attr("data-id", (k) => idOf(k))
        .each(function (k) { nodeEls.set(k, this); });
      nodesDirty = false;
      return keys.length;
    }
    const exists = (k) => (k[0] === "n" ? groupOf[+k.slice(1)] < 0 : +k.slice(1) < groups.length);
    function restyle(keys) {
      keys.forEach((k) => {
        const e = nodeEls.get(k);
        if (e && exists(k)) e.setAttribute("class", nodeClass(k));
      });
    }

    function render() {
      const {t, list} = visibleEdges();
      thrOut.textContent = fmt(t);
      thrOut.dataset.value = String(t);
      if (nodesDirty) renderNodes();
      const maxE = d3.max(list, (e) => Math.abs(e[2])) || 1;
      const hl = selected ? new Set(list.filter((e) => e[0] === selected || e[1] === selected)) : null;
      edgeG.selectAll("path.edge").data(list, (e) => `${e[0]}|${e[1]}`).join("path")
        .attr("class", (e) => (hl && hl.has(e) ? "edge hl" : "edge"))
        .attr("d", (e) => edgePath(e[0], e[1]))
        .attr("stroke", (e) => color(e[2]))
        .attr("stroke-width", (e) => (0.6 + 3.4 * Math.abs(e[2]) / maxE).toFixed(2))
        .attr("data-sender", (e) => idOf(e[0])).attr("data-receiver", (e) => idOf(e[1]))
        .attr("data-effect", (e) => e[2]);
      svg.classed("focus", !!hl);
      const keys = [...nodeEls.keys()];
      const named = keys.length <= LABELS_UP_TO && L.step >= LABEL_STEP ? keys
        : keys.filter((k) => k === selected || matches.has(k) || k[0] === "g");
      textG.selectAll("text").data(named, (k) => k).join("text").attr("class", "node-label")
        .attr("x", (k) => pos(k)[0]).attr("y", (k) => pos(k)[1] + pos(k)[2] + 8.5)
        .text((k) => (k[0] === "g" ? idOf(k) : label(+k.slice(1))));
      countEl.textContent = `${keys.length.toLocaleString("en")} nodes · `
        + `${list.length.toLocaleString("en")} of ${shown.length.toLocaleString("en")} edges`
        + (data.edges_total > E ? ` (the strongest ${E.toLocaleString("en")} of `
           + `${data.edges_total.toLocaleString("en")} in the graph)` : "");
      countEl.dataset.nodes = String(keys.length);
      countEl.dataset.edges = String(list.length);
      renderPins();
    }

    // ------------------------------------------------------------------ the panel
    function strip(parent, ev) {
      const w = 232, h = 54, pad = 8;
      const vals = ev.values;
      const ext = d3.extent([...vals, ev.ci_low ?? ev.mean, ev.ci_high ?? ev.mean, 0]);
      const x = d3.scaleLinear().domain(ext).nice().range([pad, w - pad]);
      const s = svgEl(parent, "svg", {class: "ffx-strip", width: w, height: h, role: "img",
        "aria-label": `${vals.length} per-prompt values, mean ${fmt(ev.mean)}`});
      if (ev.ci_low !== null && ev.ci_high !== null) {
        svgEl(s, "rect", {class: "ci", x: x(ev.ci_low), y: 6, height: h - 22,
                          width: Math.max(1, x(ev.ci_high) - x(ev.ci_low))});
      }
      svgEl(s, "line", {class: "zero", x1: x(0), x2: x(0), y1: 2, y2: h - 14});
      vals.forEach((v, k) => svgEl(s, "circle", {class: "dot", cx: x(v), r: 2.6,
        cy: 10 + ((k * 7919) % 23) * (h - 30) / 23, fill: color(v)}));
      svgEl(s, "line", {class: "mean", x1: x(ev.mean), x2: x(ev.mean), y1: 3, y2: h - 14});
      x.ticks(4).forEach((tk) => {
        const tx = svgEl(s, "text", {class: "tick", x: x(tk), y: h - 2});
        tx.textContent = d3.format("~g")(tk);
      });
    }
    function edgeList(title, items) {
      if (!items.length) return;
      el(panel, "h4", title);
      const ul = el(panel, "ul", null, "ffx-links");
      items.slice(0, 8).forEach(([other, v]) => {
        const b = el(el(ul, "li"), "button", null, "ffx-goto");
        b.type = "button";
        b.dataset.key = other;
        el(b, "span", idOf(other), "id");
        el(b, "span", signed(v), `v ${v >= 0 ? "pos" : "neg"}`);
      });
    }
    function show(key) {
      panel.replaceChildren();
      if (key === null) {
        el(panel, "p", "Hover over or click a node to see its scores; search, filter and "
           + "pin above.", "hint");
        return;
      }
      const kind = kindOf(key);
      el(panel, "h3", idOf(key));
      const dl = el(panel, "dl");
      const row = (k, v) => { if (v === null || v === undefined || v === "") return;
                              el(dl, "dt", k); el(dl, "dd", fmt(v)); };
      if (kind === "group") {
        const g = groups[+key.slice(1)];
        row("kind", `supernode of ${g.members.length}`);
        row("score (sum)", scoreOf(key));
        el(panel, "h4", "Members");
        const ul = el(panel, "ul", null, "ffx-links");
        g.members.forEach((i) => {
          const b = el(el(ul, "li"), "button", null, "ffx-goto");
          b.type = "button"; b.dataset.key = `n${i}`;
          el(b, "span", nodes.id[i], "id"); el(b, "span", signed(nodes.score[i]), "v");
        });
        const ub = el(panel, "button", "Ungroup", "ffx-ungroup");
        ub.type = "button"; ub.dataset.group = key.slice(1);
      } else {
        const i = +key.slice(1);
        row("kind", KIND_NAME[kind] || kind);
        row("layer", kind === "embed" || kind === "logits" ? null : nodes.layer[i]);
        row("index", nodes.index[i]);
        row(data.lane_kind === "position" ? "position" : "role",
            data.lanes[nodes.lane[i]]);
        row("score", nodes.score[i]);
        row("method", nodes.method ? nodes.method[i] : data.node_method);
        Object.entries(extra(i)).forEach(([k, v]) => row(k, v));
        const ev = data.evidence[i];
        if (ev) {
          el(panel, "h4", `Per prompt: ${ev.method}`);
          const edl = el(panel, "dl");
          [["mean", ev.mean], ["95% interval", ev.ci_low === null ? null
            : `[${fmt(ev.ci_low)}, ${fmt(ev.ci_high)}]`], ["n", ev.n]].forEach(([k, v]) => {
            if (v !== null) { el(edl, "dt", k); el(edl, "dd", fmt(v)); }
          });
          strip(panel, ev);
        }
      }
      const pb = el(panel, "button", isPinned(key) ? "Unpin" : "Pin", "ffx-pin");
      pb.type = "button"; pb.dataset.key = key;
      const ins = shown.filter((e) => e[1] === key).map((e) => [e[0], e[2]]);
      const outs = shown.filter((e) => e[0] === key).map((e) => [e[1], e[2]]);
      edgeList(`Strongest inputs (${ins.length})`, ins);
      edgeList(`Strongest outputs (${outs.length})`, outs);
    }
    function showEdge(e) {
      panel.replaceChildren();
      el(panel, "h3", `${idOf(e[0])} → ${idOf(e[1])}`);
      const dl = el(panel, "dl");
      [["sender", idOf(e[0])], ["receiver", idOf(e[1])], ["effect", e[2]],
       ["method", e[3] >= 0 ? (data.edges.method ? data.edges.method[e[3]] : data.edge_method)
         : "sum over a supernode"]].forEach(([k, v]) => { el(dl, "dt", k); el(dl, "dd", fmt(v)); });
    }
    function select(key, centre) {
      const before = selected;
      selected = key;
      restyle([before, key].filter((k) => k));
      show(key);
      render();
      if (centre && key) {
        const [x, y] = pos(key);
        const k = Math.max(transform.k, zoom.scaleExtent()[0] * 4);
        svg.transition().duration(250).call(zoom.transform,
          d3.zoomIdentity.translate((GUTTER + width) / 2 - x * k, (AXIS + height) / 2 - y * k).scale(k));
      }
    }

    // ------------------------------------------------------------------ pins and groups
    const pinCount = $(".ffx-pin-count"), pinList = $(".ffx-pin-list");
    function renderPins() {
      pinCount.textContent = `${pinned.size} pinned`;
      pinCount.dataset.count = String(pinned.size);
      pinList.replaceChildren();
      [...pinned].sort((a, b) => a - b).slice(0, 200).forEach((i) => {
        const b = el(el(pinList, "li"), "button", nodes.id[i], "ffx-goto");
        b.type = "button"; b.dataset.key = keyOf(i);
      });
      groups.forEach((g) => {
        const b = el(el(pinList, "li", null, "group"), "button", `${g.name} (${g.members.length})`,
                     "ffx-goto");
        b.type = "button"; b.dataset.key = g.key;
      });
    }
    function togglePin(key) {
      const members = key[0] === "n" ? [+key.slice(1)] : groups[+key.slice(1)].members;
      const on = !isPinned(key);
      members.forEach((i) => (on ? pinned.add(i) : pinned.delete(i)));
      if (pinnedOnly) nodesDirty = true;
      restyle([key, ...members.map(keyOf)]);
      render();
      if (selected === key) show(key);
    }
    function regroup() {
      groupOf = new Int32Array(N).fill(-1);
      groups.forEach((g, j) => { g.key = `g${j}`; g.members.forEach((i) => { groupOf[i] = j; }); });
      rescale();
      nodesDirty = true;
    }
    function group() {
      const members = [...pinned].filter((i) => groupOf[i] < 0).sort((a, b) => a - b);
      if (members.length < 2) { $(".ffx-note").textContent = "Pin two or more nodes to group them."; return; }
      const input = $(".ffx-group-name");
      const name = input.value.trim() || `group ${groups.length + 1}`;
      groups.push({key: "", name, members});
      input.value = "";
      regroup();
      $(".ffx-note").textContent = `${name}: ${members.length} nodes; its edges are their sums.`;
      select(`g${groups.length - 1}`, false);
    }
    function ungroup(j) {
      selected = null;
      groups.splice(j, 1);
      regroup();
      select(null, false);
    }
    function exportPinned() {
      const keep = [...pinned].sort((a, b) => a - b);
      const inSet = new Set(keep);
      const graph = Object.assign({}, data.graph);
      const sup = {};
      groups.forEach((g) => { const m = g.members.filter((i) => inSet.has(i));
                              if (m.length) sup[g.name] = m.map((i) => nodes.id[i]); });
      if (Object.keys(sup).length) graph.supernodes = sup;
      const out = {directed: true, multigraph: false, graph, nodes: keep.map((i) => {
        const s = nodes.score[i];
        return Object.assign({id: nodes.id[i], kind: nodes.kind[i], layer: nodes.layer[i],
          index: nodes.index[i], role: nodes.role[i], score: s, abs_score: Math.abs(s),
          sign: Math.sign(s), method: nodes.method ? nodes.method[i] : data.node_method},
          extra(i));
      }), edges: []};
      for (let k = 0; k < E; k++) {
        const a = data.edges.sender[k], b = data.edges.receiver[k];
        if (!inSet.has(a) || !inSet.has(b)) continue;
        const s = data.edges.effect[k];
        out.edges.push({source: nodes.id[a], target: nodes.id[b], score: s,
          abs_score: Math.abs(s), sign: Math.sign(s),
          method: data.edges.method ? data.edges.method[k] : data.edge_method});
      }
      const text = JSON.stringify(out, null, 1);
      const area = $(".ffx-export-text");
      area.value = text;
      area.hidden = false;
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
      a.download = "pinned-subgraph.json";
      root.appendChild(a);
      a.click();
      a.remove();
      $(".ffx-note").textContent = `Exported ${out.nodes.length} nodes and ${out.edges.length} `
        + "edges as node-link JSON (factfind.graph.read_json loads it).";
    }

    // ------------------------------------------------------------------ events
    const keyFrom = (target) => {
      const n = target.closest && target.closest(".node");
      if (!n) return null;
      const d = d3.select(n).datum();
      return typeof d === "string" ? d : null;
    };
    nodeG.on("mouseover", (event) => { const k = keyFrom(event.target); if (k) show(k); });
    nodeG.on("click", (event) => {
      const k = keyFrom(event.target);
      if (!k) return;
      if (event.shiftKey) togglePin(k); else select(k, false);
    });
    edgeG.on("mouseover", (event) => {
      if (event.target.classList.contains("edge")) showEdge(d3.select(event.target).datum());
    });
    svg.on("mouseleave", () => show(selected));
    panel.addEventListener("click", (event) => {
      const b = event.target.closest("button");
      if (!b) return;
      if (b.classList.contains("ffx-goto")) select(b.dataset.key, true);
      else if (b.classList.contains("ffx-pin")) togglePin(b.dataset.key);
      else if (b.classList.contains("ffx-ungroup")) ungroup(+b.dataset.group);
    });
    pinList.addEventListener("click", (event) => {
      const b = event.target.closest("button.ffx-goto");
      if (b) select(b.dataset.key, true);
    });
    slider.addEventListener("input", render);
    topkIn.addEventListener("input", render);
    search.addEventListener("input", () => {
      const q = search.value.trim().toLowerCase();
      const before = matches;
      matches = new Set(q ? displayNodes().filter((k) => idOf(k).toLowerCase().includes(q)
        || (k[0] === "n" && String(label(+k.slice(1))).toLowerCase().includes(q))) : []);
      searchCount.textContent = q ? `${matches.size} match${matches.size === 1 ? "" : "es"}` : "";
      restyle([...before, ...matches]);
      render();
    });
    search.addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault();
      const q = search.value.trim().toLowerCase();
      const exact = byId.has(search.value.trim()) ? keyOf(byId.get(search.value.trim())) : null;
      const hit = exact || [...matches][0];
      if (hit) select(hit, true);
      else searchCount.textContent = q ? "no match" : "";
    });
    $(".ffx-fit").addEventListener("click", () => fit(true));
    $(".ffx-pinned-only").addEventListener("change", (event) => {
      pinnedOnly = event.target.checked;
      nodesDirty = true;
      render();
    });
    $(".ffx-group").addEventListener("click", group);
    $(".ffx-export").addEventListener("click", exportPinned);
    $(".ffx-clear").addEventListener("click", () => {
      const was = [...pinned].map(keyOf);
      pinned.clear();
      nodesDirty = pinnedOnly;
      restyle(was);
      render();
      show(selected);
    });
    window.addEventListener("resize", () => { fit(false); });

    // kinds on the legend: the shapes this graph uses
    const legend = $(".ffx-kinds");
    [...new Set(nodes.kind)].sort((a, b) => KIND_ORDER.indexOf(a) - KIND_ORDER.indexOf(b))
      .forEach((kind) => {
        const item = el(legend, "span", null, "ffx-kind");
        const s = svgEl(item, "svg", {width: 14, height: 14, viewBox: "-1.3 -1.3 2.6 2.6"});
        svgEl(s, "path", {d: shapeOf(kind), fill: "#6b7280"});
        el(item, "span", ` ${KIND_NAME[kind] || kind}`);
      });

    fit(false);
    render();
    show(null);
    // interactive: the first frame after this one has been painted
    requestAnimationFrame(() => setTimeout(() => {
      root.dataset.readyMs = performance.now().toFixed(1);
      root.dataset.ready = "1";
    }, 0));
  }

  document.querySelectorAll(".ffx:not([data-init])").forEach((root) => {
    try {
      init(root);
    } catch (err) {
      root.dataset.error = String(err);
      throw err;
    }
  });
})();
