"use strict";
// Sortable tables: click a header to sort by that column (numbers numerically, empty cells last).
document.querySelectorAll("table.sortable").forEach((table) => {
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach((th, col) => {
    th.querySelector("button").addEventListener("click", () => {
      const dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
      headers.forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", dir);
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = (row) => row.cells[col].dataset.sort;
      const numeric = rows.every((r) => key(r) === "" || !Number.isNaN(Number(key(r))));
      const sign = dir === "ascending" ? 1 : -1;
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === "" || y === "") return (x === "") - (y === "");
        const c = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, { numeric: true });
        return sign * c;
      });
      body.append(...rows);
    });
  });
});

// Circuit graph views: show a node's or an edge's attributes in the details panel.
document.querySelectorAll(".graph-view").forEach((view) => {
  const panel = view.querySelector(".graph-details");
  const svg = view.querySelector("svg.graph");
  const clear = () => {
    svg.classList.remove("focus");
    view.querySelectorAll(".active, .hl").forEach((x) => x.classList.remove("active", "hl"));
  };
  const edges = Array.from(view.querySelectorAll(".edge"));
  const fmt = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));
  const add = (parent, tag, text) => {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  };
  const links = (title, list, other) => {
    if (!list.length) return;
    add(panel, "h4", title);
    const ul = add(panel, "ul");
    list.map((e) => [e.dataset[other], JSON.parse(e.dataset.info).score])
      .sort((a, b) => Math.abs(b[1] ?? 0) - Math.abs(a[1] ?? 0)).slice(0, 8)
      .forEach(([id, score]) => add(ul, "li", `${id}  ${fmt(score ?? "")}`));
  };
  const show = (el) => {
    const info = JSON.parse(el.dataset.info);
    const heading = info.node ?? info.edge;
    panel.replaceChildren();
    add(panel, "h3", heading);
    const dl = add(panel, "dl");
    Object.entries(info).forEach(([k, v]) => {
      if (k === "node" || k === "edge" || v === null) return;
      add(dl, "dt", k);
      add(dl, "dd", fmt(v));
    });
    clear();
    el.classList.add("active");
    if (el.classList.contains("node")) {
      svg.classList.add("focus");  // dim the edges that do not touch this node
      const id = el.dataset.id;
      const incoming = edges.filter((e) => e.dataset.target === id);
      const outgoing = edges.filter((e) => e.dataset.source === id);
      incoming.concat(outgoing).forEach((e) => e.classList.add("hl"));
      links("Inputs", incoming, "source");
      links("Outputs", outgoing, "target");
    }
  };
  view.querySelectorAll(".node, .edge").forEach((el) => {
    ["mouseover", "focus", "click"].forEach((type) => el.addEventListener(type, () => show(el)));
  });
  svg.addEventListener("mouseleave", clear);  // the panel keeps the last item shown
});
