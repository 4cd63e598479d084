"""The HTML pages advbench writes (the leaderboard site, a run's report.html): one template, one
style, and a small column-sorting script for tables marked ``sortable`` (readable without it).
Markdown is converted by Python-Markdown (its ``tables`` extension), not by hand."""

from __future__ import annotations

import html
import re

import markdown as _markdown

esc = html.escape

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.3em .6em;text-align:right}
th{background:#f0f0f0}th[data-sort]{cursor:pointer}th[data-sort]:after{content:" \\2195";color:#999}
td.l,th.l{text-align:left}code,pre{background:#f6f6f6}pre{padding:.6em;overflow:auto}
.flag{color:#a00}.muted{color:#777}nav a{margin-right:1em}td a,td code{white-space:nowrap}"""

SORT_JS = """document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th[data-sort]').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var index = Array.prototype.indexOf.call(th.parentNode.children, th);
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute('data-dir') === 'asc' ? -1 : 1;
      var numeric = th.getAttribute('data-sort') === 'num';
      rows.sort(function (a, b) {
        var x = a.cells[index].getAttribute('data-value'), y = b.cells[index].getAttribute('data-value');
        if (x === null) x = a.cells[index].textContent;
        if (y === null) y = b.cells[index].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        if (numeric || (!isNaN(nx) && !isNaN(ny))) { x = isNaN(nx) ? -Infinity : nx; y = isNaN(ny) ? -Infinity : ny; }
        return x < y ? -dir : x > y ? dir : 0;
      });
      rows.forEach(function (r) { body.appendChild(r); });
      th.parentNode.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', dir === 1 ? 'asc' : 'desc');
    });
  });
});"""


def page(title: str, body: str, depth: int = 0, links: str = "") -> str:
    """A page: the shared style, a link back to the index (``depth`` folders below it, with
    ``links`` beside it), the title, ``body`` and the column-sorting script."""
    up = "../" * depth
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n"
            + (f"<nav><a href=\"{up}index.html\">all rankings</a>{links}</nav>\n" if depth else "")
            + f"<h1>{esc(title)}</h1>\n{body}\n"
            f"<script>{SORT_JS}</script>\n</body>\n</html>\n")




def from_markdown(text: str, title: str) -> str:
    """A Markdown document (report.md) as a page of its own: the same template and style; a
    leading ``# heading`` becomes the page's title (else ``title``)."""
    first, _, rest = text.partition("\n")
    if first.startswith("# "):
        title, text = first[2:].strip(), rest
    body = _markdown.markdown(text, extensions=["tables"], output_format="html")
    body = body.replace("<table>", '<table class="sortable">').replace("<th>", '<th data-sort="text">')
    body = re.sub(r"<td>(?![-+]?[0-9.]+(?:e[-+]?[0-9]+)?%?</td>)", '<td class="l">', body)  # text left, numbers right
    return page(title, body)
