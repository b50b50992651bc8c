"use strict";
{ // a block of its own: the explorer's code follows in the same script element
// Long tables (data-preview="20"): show the top rows, and a button that shows all and back. The
// rows past the preview are hidden by position, so after a sort the top rows of the new order
// show. Without this script every row is shown.
const fold = (wrap) => {
  const n = Number(wrap.dataset.preview);
  const button = wrap.querySelector(":scope > button.table-more");
  const open = button.getAttribute("aria-expanded") === "true";
  const rows = wrap.querySelector("table").tBodies[0].rows;
  Array.from(rows).forEach((row, i) => { row.hidden = !open && i >= n; });
  button.textContent = open ? `Show the top ${n} rows` : `Show all ${rows.length} rows`;
};
document.querySelectorAll(".table-wrap[data-preview]").forEach((wrap) => {
  const button = wrap.querySelector(":scope > button.table-more");
  button.setAttribute("aria-controls", wrap.id);
  button.setAttribute("aria-expanded", "false");
  button.hidden = false;
  button.addEventListener("click", () => {
    const open = button.getAttribute("aria-expanded") === "true";
    button.setAttribute("aria-expanded", open ? "false" : "true");
    fold(wrap);
  });
  fold(wrap);
});
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
      const wrap = table.closest(".table-wrap[data-preview]");
      if (wrap) fold(wrap);
    });
  });
});
}
