"""``report.html``: one self-contained page (inline CSS, PNG figures as data URIs, vanilla inline JS).

Every string that comes from a checkpoint or the summary is untrusted and goes through :func:`esc`
(``html.escape(..., quote=True)``); the table is rendered as HTML rows (no data is embedded in the
script). A Content-Security-Policy allows no network access at all and only the page's own script
(by its SHA-256), so even an escaping bug could not run injected code or fetch anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io

import pandas as pd
from matplotlib.figure import Figure

from .figures import CAPTIONS
from .tables import (AT_ROUNDING, HEADLINE_NOTE, TOP_ROTATION_HEADER, clean, count_rows, fmt, headline_rows,
                     norms_preserved, number, source_line, table_columns, top_rotation_rows, versions_line,
                     warning_lists)

MAX_WARNING_ITEMS = 200
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1500px;padding:0 24px 40px;color:#1b1b1b}
h1{font-size:24px;margin:24px 0 4px}h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:14px}.sources{color:#444;margin:0}code{font:12px ui-monospace,monospace;word-break:break-all}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.headline td:first-child,.counts td:first-child{font-weight:600}.headline th,.top-rotation th{background:#f3f3f3}
.note{color:#444;font-size:13px;max-width:1100px}.top-rotation td:nth-child(2){font:12px ui-monospace,monospace;overflow-wrap:anywhere}
.warn{background:#fff5e0;border-left:4px solid #e69f00;padding:6px 12px;margin:10px 0}.ok{color:#2a7a2a}
details ul{max-height:260px;overflow:auto;margin:6px 0}figure{margin:18px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:13px;max-width:1100px}
.scroll{max-height:75vh;overflow:auto;border:1px solid #ddd}
#layer-table thead th{position:sticky;top:0;background:#f3f3f3;cursor:pointer;user-select:none;vertical-align:bottom}
#layer-table th[aria-sort=ascending]::after{content:" ▲"}#layer-table th[aria-sort=descending]::after{content:" ▼"}
#layer-table{font-size:12px}#layer-table th,#layer-table td{padding:3px 6px}
#layer-table tbody tr:nth-child(even){background:#fafafa}#layer-table td.name{font:12px ui-monospace,monospace;overflow-wrap:anywhere;min-width:240px}
tr.nonfinite{background:#fde2e2!important}tr.identical td{color:#888}
#layer-filter{font-size:14px;padding:5px 8px;width:360px;margin:6px 12px 10px 0}
footer{margin-top:40px;border-top:2px solid #ddd;padding-top:8px;font-size:13px;color:#333}
"""
# Sorting and filtering; state may also come from the URL fragment (#sort=KEY&dir=asc|desc&filter=TEXT).
SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("layer-table");
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var rows = Array.prototype.slice.call(tbody.rows);
  var input = document.getElementById("layer-filter");
  var count = document.getElementById("layer-count");
  function key(row, col, numeric) {
    var cell = row.cells[col];
    if (!numeric) { return cell.textContent.toLowerCase(); }
    var v = parseFloat(cell.getAttribute("data-v"));
    return isNaN(v) ? null : v;
  }
  function sortBy(col, dir) {
    var numeric = heads[col].classList.contains("num");
    var keyed = rows.map(function (r) { return [key(r, col, numeric), +r.getAttribute("data-i"), r]; });
    keyed.sort(function (a, b) {
      if (a[0] === b[0]) { return a[1] - b[1]; }
      if (a[0] === null) { return 1; }
      if (b[0] === null) { return -1; }
      return (a[0] < b[0] ? -1 : 1) * dir;
    });
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (k) { fragment.appendChild(k[2]); });
    tbody.appendChild(fragment);
    heads.forEach(function (h, i) {
      if (i === col) { h.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending"); }
      else { h.removeAttribute("aria-sort"); }
    });
  }
  function applyFilter() {
    var terms = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var shown = 0;
    rows.forEach(function (r) {
      var text = r.getAttribute("data-search");
      var hit = terms.every(function (t) { return text.indexOf(t) !== -1; });
      r.hidden = !hit;
      if (hit) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " layers shown";
  }
  heads.forEach(function (h, col) {
    h.addEventListener("click", function () {
      var current = h.getAttribute("aria-sort");
      var dir = current ? (current === "ascending" ? -1 : 1) : (h.classList.contains("num") ? -1 : 1);
      sortBy(col, dir);
    });
  });
  input.addEventListener("input", applyFilter);
  var params = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (part) {
    var i = part.indexOf("=");
    if (i > 0) {
      try { params[part.slice(0, i)] = decodeURIComponent(part.slice(i + 1).replace(/\\+/g, " ")); }
      catch (e) { /* malformed fragment: ignored */ }
    }
  });
  if (params.filter) { input.value = params.filter; }
  if (params.sort) {
    heads.forEach(function (h, col) {
      if (h.getAttribute("data-key") === params.sort) { sortBy(col, params.dir === "asc" ? 1 : -1); }
    });
  }
  applyFilter();
  document.body.setAttribute("data-report-ready", "1");
})();
"""


def esc(text, limit: int | None = None) -> str:
    """Untrusted text -> HTML text or attribute value (control characters removed, quotes escaped)."""
    return html.escape(clean(text, limit), quote=True)


def png_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (deterministic for the same figure)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def summary_section(summary: dict, layers: pd.DataFrame | None = None) -> str:
    """The headline table (unweighted and parameter-weighted), the paper's view then the first-order view."""
    header = ["", "mean", "std", "mean (param.-weighted)", "std (param.-weighted)"]
    return ('<section id="summary"><h2>Summary</h2><p>All-layer averages of the per-layer mean and standard '
            'deviation over rows (WaDi §1); weighted columns weight each layer by its parameter count.</p>'
            + _table(header, headline_rows(summary, layers), "headline")
            + f'<p class="note">{esc(HEADLINE_NOTE)}</p></section>')


def top_rotation_section(summary: dict, layers: pd.DataFrame) -> str:
    """The layers that rotate most (``top_rotation_layers``), full names."""
    rows = top_rotation_rows(summary, layers)
    if not rows:
        return ""
    return (f'<section id="top-rotation"><h2>Top {len(rows)} layers by rotation</h2><p>Largest per-layer mean '
            'direction change 100·(1 − cos), with the mean angle, the tangential (rotation) part and the norm change.</p>'
            + _table(TOP_ROTATION_HEADER, rows, "top-rotation") + "</section>")


def counts_section(summary: dict, layers: pd.DataFrame) -> str:
    """Counts, then one warning box per non-empty list (missing keys, shape mismatches, non-finite)."""
    parts = ['<section id="counts"><h2>Counts and warnings</h2>',
             _table(["", ""], [list(r) for r in count_rows(summary)], "counts")]
    warnings = warning_lists(summary, layers)
    for title, items in warnings:
        shown = "".join(f"<li><code>{esc(item)}</code></li>" for item in items[:MAX_WARNING_ITEMS])
        more = f"<li>… and {len(items) - MAX_WARNING_ITEMS} more</li>" if len(items) > MAX_WARNING_ITEMS else ""
        parts.append(f'<div class="warn"><details><summary><strong>{esc(title)}: {len(items)}</strong></summary>'
                     f"<ul>{shown}{more}</ul></details></div>")
    if not warnings:
        parts.append('<p class="ok">No missing keys, shape mismatches or non-finite layers.</p>')
    return "".join(parts) + "</section>"


def figures_section(figures: dict[str, Figure]) -> str:
    """Every figure as an inline PNG with its caption."""
    parts = ['<section id="figures"><h2>Figures</h2>']
    for name, fig in figures.items():
        caption = CAPTIONS.get(name, name)
        parts.append(f'<figure id="fig-{esc(name)}"><img src="{png_data_uri(fig)}" alt="{esc(caption)}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    return "".join(parts) + "</section>"


def _cell(value, numeric: bool, column: str) -> str:
    if not numeric:
        # <wbr> after dots: long names wrap at their dots, not mid-word (added after escaping).
        return f'<td class="name">{esc(value).replace(".", ".<wbr>")}</td>' if column == "name" else f"<td>{esc(value)}</td>"
    x = number(value)
    text = fmt(x) if column not in ("rows", "residual_rank_90") or x is None else f"{x:.0f}"
    return f'<td class="num" data-v="{"" if x is None else repr(x)}">{esc(text)}</td>'


def layers_section(layers: pd.DataFrame) -> str:
    """The sortable (click a header) and filterable layer table, one ``<tr>`` per layer."""
    columns = table_columns(layers)
    head = "".join(f'<th data-key="{esc(c)}" title="{esc(c)}"{" class=num" if n else ""}>{esc(h)}</th>'
                   for c, h, n in columns)
    search_columns = [c for c in ("name", "block", "role", "group", "kind") if c in layers.columns]
    records = layers.to_dict("records")
    body = []
    for i, record in enumerate(records):
        search = " ".join(str(record.get(c, "")) for c in search_columns).lower()
        status = record.get("status", "")
        cls = f' class="{esc(status)}"' if status in ("nonfinite", "identical") else ""
        cells = "".join(_cell(record.get(c), n, c) for c, _, n in columns)
        body.append(f'<tr data-i="{i}" data-search="{esc(search)}"{cls}>{cells}</tr>')
    return ('<section id="layers"><h2>Layers</h2>'
            '<p>Click a header to sort (again to reverse); type to filter by name, block, role or group '
            '(all words must match). The URL fragment <code>#sort=direction_change_mean&amp;dir=desc&amp;filter=attn2</code> '
            'sets both on load.</p>'
            '<input id="layer-filter" type="search" placeholder="filter: e.g. up_blocks attn2" aria-label="filter layers">'
            f'<span id="layer-count">{len(records)} layers</span>'
            f'<div class="scroll"><table id="layer-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>')


def footer(summary: dict) -> str:
    """The exact command, the versions and both checkpoint paths."""
    command = summary.get("command")
    return ("<footer>"
            f"<p><strong>Command:</strong> <code>{esc(command) if command else 'n/a (not run from the CLI)'}</code></p>"
            f"<p><strong>Teacher:</strong> <code>{esc(source_line(summary, 'teacher'))}</code><br>"
            f"<strong>Student:</strong> <code>{esc(source_line(summary, 'student'))}</code></p>"
            f"<p><strong>Versions:</strong> {esc(versions_line(summary))}; precision {esc(summary.get('precision', 'n/a'))}</p>"
            "</footer>")


def render_html(layers: pd.DataFrame, summary: dict, figures: dict[str, Figure]) -> str:
    """The whole report page as a string."""
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    policy = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; "
              "base-uri 'none'; form-action 'none'")
    n = summary.get("n_layers", len(layers))
    ratio = number(summary.get("direction_to_norm_mean_ratio"))
    first_order = number(summary.get("angle_to_norm_mean_ratio"))
    if norms_preserved(summary, layers):
        lead = f"{esc(n)} layers; {AT_ROUNDING}: the student only rotates rows"
    else:
        lead = f"{esc(n)} layers" + (f"; direction change 1 − cos is {fmt(ratio, 3)}× the norm change on average" if ratio else "")
        lead += f" (first order: the angle is {fmt(first_order, 3)}× the relative norm change)" if first_order else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>WaDi weight-change report</title><style>{CSS}</style></head><body>"
            "<header><h1>WaDi weight-change report: teacher vs student</h1>"
            f'<p class="sources">Teacher: <code>{esc(source_line(summary, "teacher"))}</code> · '
            f'Student: <code>{esc(source_line(summary, "student"))}</code></p><p>{lead}.</p>'
            '<nav><a href="#summary">Summary</a><a href="#top-rotation">Top rotation</a>'
            '<a href="#counts">Counts and warnings</a><a href="#figures">Figures</a><a href="#layers">Layers</a></nav></header>'
            + summary_section(summary, layers) + top_rotation_section(summary, layers) + counts_section(summary, layers)
            + figures_section(figures)
            + layers_section(layers) + footer(summary) + f"<script>{SCRIPT}</script></body></html>\n")
