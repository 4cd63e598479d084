"""The leaderboard as a static site (plain HTML and a little JavaScript, readable without it),
and its Markdown twin; written by ``advbench leaderboard build``:

    index.html                  every ranking, linked
    rankings/<ranking>.html     one ranking (data set, split, threat model), sortable columns
    models/<entry>.html         an entry: numbers with intervals, per-attack numbers, flags, curve,
                                provenance, RobustBench form (and RobustBench's published numbers
                                where a model-info file is at hand)
    README.md                   every ranking as a Markdown table
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from advbench.files import atomic_write_text
from advbench.leaderboard.entries import entry_name, load_entries, ranking_key, threat_id
from advbench.leaderboard.gate import DEFAULT_TOLERANCE
from advbench.leaderboard.rankings import Ranking, rankings
from advbench.leaderboard.robustbench import export, load_published, published_for, to_robustbench
from advbench.report.html import page as _page

esc = html.escape

def _p(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _ci(e: dict[str, Any], field: str) -> str:
    lo, hi = e["intervals"][field] if field in e.get("intervals", {}) else (None, None)
    return f"{_p(e[field])} [{_p(lo)}, {_p(hi)}]" if lo is not None else _p(e[field])


def _autoattack(e: dict[str, Any]) -> float | None:
    rb = to_robustbench(e)
    return None if rb["autoattack_acc"] is None else float(rb["autoattack_acc"]) / 100


def _cell(text: str, value: Any, left: bool = False) -> str:
    cls = ' class="l"' if left else ""
    return f"<td{cls} data-value=\"{esc(str(value))}\">{text}</td>"


def _flag_text(e: dict[str, Any]) -> str:
    """The flags of the ranked evaluation, then those of the naive attacks only, marked so."""
    naive = e.get("naive_flags") or []
    return ", ".join([*(e.get("flags") or []), *(f"{f} (naive)" for f in naive)])


def ranking_page(r: Ranking) -> str:
    head = [("#", "num", False), ("model", "text", True), ("defense", "text", True),
            ("robust % [95% CI]", "num", False), ("naive robust %", "num", False), ("AutoAttack %", "num", False),
            ("clean % [95% CI]", "num", False), ("vs next", "text", True), ("flags", "text", True),
            ("n", "num", False), ("weights", "text", True)]
    ths = "".join(f'<th data-sort="{kind}" class="{"l" if left else ""}">{esc(h)}</th>' for h, kind, left in head)
    rows = []
    for i, e in enumerate(r.entries):
        comp = r.comparisons[i] if i < len(r.comparisons) else None
        name = entry_name(e)
        aa = _autoattack(e)
        flags = _flag_text(e)
        cells = [
            _cell(str(i + 1), i + 1),
            _cell(f'<a href="../models/{esc(name)}.html">{esc(e["model"])}</a>', e["model"], True),
            _cell(esc(e["defense"]), e["defense"], True),
            _cell(_ci(e, "robust_accuracy"), e["robust_accuracy"]),
            _cell(_p(e.get("naive_robust_accuracy")), e.get("naive_robust_accuracy") or ""),
            _cell(_p(aa), "" if aa is None else aa),
            _cell(_ci(e, "clean_accuracy"), e["clean_accuracy"]),
            _cell(esc(comp.text()) if comp else "", comp.difference if comp else "", True),
            _cell(f'<span class="flag">{esc(flags)}</span>' if flags else "", flags, True),
            _cell(str(e["n"]), e["n"]),
            _cell(f"<code>{esc(str(e.get('model_digest') or ''))[:12]}</code>", e.get("model_digest") or "", True),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ("Every neighbour pair is separated: the order is resolved." if r.resolved() else
            "Some neighbours are not separated (see <em>vs next</em>): their order is within the noise of "
            f"{r.entries[0]['n']} examples.")
    body = (f"<p>Data set <code>{esc(r.dataset)}</code> ({esc(r.split)}), threat model <code>{esc(r.threat)}</code>. "
            "Ranked by robust accuracy: the per-example worst case over every attack the suite ran, the adaptive "
            "(BPDA / EoT) views included; the naive number (without them) is beside it where the model was "
            f"attacked adaptively. Intervals are exact binomial (Clopper-Pearson) 95% intervals; <em>vs next</em> "
            f"is the difference to the entry below with a paired bootstrap interval over the same examples. {note} "
            "Click a column header to sort.</p>\n"
            f'<table class="sortable"><thead><tr>{ths}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>")
    return _page(f"{r.dataset} ({r.split}) / {r.threat}", body, depth=1)


def _curve_svg(points: list[tuple[float, float]], norm: str) -> str:
    """Robust accuracy against eps as an inline SVG (points: (eps, accuracy)), drawn only with two or more."""
    w, h, m = 420, 240, 40
    xs = [p[0] for p in points]
    lo, hi = min(xs), max(xs)

    def x(v: float) -> float:
        return m + (v - lo) / (hi - lo) * (w - 2 * m)

    def y(v: float) -> float:
        return h - m - v * (h - 2 * m)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x(a):.1f},{y(b):.1f}" for i, (a, b) in enumerate(points))
    dots = "".join(f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="3"><title>eps {a:g}: {100 * b:.1f}%</title></circle>'
                   for a, b in points)
    ticks = "".join(f'<text x="{x(a):.1f}" y="{h - m + 16}" font-size="11" text-anchor="middle">{a:g}</text>' for a in xs)
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="robust accuracy against eps">'
            f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#999"/>'
            f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#999"/>'
            f'<text x="{m - 6}" y="{y(1):.1f}" font-size="11" text-anchor="end">100%</text>'
            f'<text x="{m - 6}" y="{y(0):.1f}" font-size="11" text-anchor="end">0%</text>'
            f'<text x="{w / 2}" y="{h - 6}" font-size="12" text-anchor="middle">eps ({esc(norm)})</text>'
            f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>{dots}{ticks}</svg>')


def model_page(e: dict[str, Any], siblings: list[dict[str, Any]], published: dict[str, Any] | None) -> str:
    rows = "".join(f"<tr><td class=\"l\">{esc(a)}</td><td>{_p(v)}</td><td>"
                   f"{'' if a not in e.get('intervals', {}).get('attacks', {}) else '[%s, %s]' % tuple(_p(t) for t in e['intervals']['attacks'][a])}"
                   "</td></tr>" for a, v in sorted(e["attacks"].items(), key=lambda kv: kv[1]))
    curve_points = sorted({(s["threat"]["eps"], s["robust_accuracy"]) for s in siblings})
    curve = (_curve_svg(curve_points, e["threat"]["norm"]) if len(curve_points) >= 2 else
             f"<p class=\"muted\">The suites measure this model at one {esc(e['threat']['norm'])} budget only: no "
             "robustness curve is drawn (a curve needs two or more).</p>")
    flags = e.get("flags") or []
    flag_text = ", ".join(f'<span class="flag">{esc(f)}</span>' for f in flags) if flags else "none raised"
    naive_flags = e.get("naive_flags") or []
    naive_text = ", ".join(f'<span class="flag">{esc(f)}</span>' for f in naive_flags)
    details = e.get("flag_details") or []
    flag_table = ("<h2>Flags: what was seen, what to try</h2>"
                  + ("<p>Flags marked <em>naive</em> were raised on the naive attacks only: they say why the "
                     "naive number is wrong; the ranked number includes the adaptive attacks, which passed "
                     "those checks.</p>" if naive_flags else "")
                  + "<table><thead><tr><th class=\"l\">code</th><th class=\"l\">attacks</th>"
                  "<th class=\"l\">seen</th><th class=\"l\">try</th></tr></thead><tbody>"
                  + "".join(f"<tr><td class=\"l flag\">{esc(d['code'])}</td>"
                            f"<td class=\"l\">{'naive' if d.get('naive') else 'ranked'}</td>"
                            f"<td class=\"l\">{esc(d['seen'])}</td>"
                            f"<td class=\"l\">{esc(d['try'])}</td></tr>" for d in details)
                  + "</tbody></table>\n") if details else ""
    pub = ""
    if published is not None:
        pub = ("<h2>RobustBench's published numbers</h2><p>From <code>" + esc(published["file"]) + "</code>: clean "
               f"{esc(str(published.get('clean_acc')))}%, AutoAttack {esc(str(published.get('autoattack_acc')))}%"
               + (f", external {esc(str(published['external']))}%" if published.get("external") else "") + ".</p>")
    prov = {k: e.get(k) for k in ("config_hash", "seed", "date", "model_digest", "source", "examples_digest", "versions")}
    body = (
        f"<p>{esc(e['model'])} with defense <code>{esc(e['defense'])}</code> on {esc(str(e['dataset']['name']))} "
        f"({esc(str(e['dataset']['split']))}), threat model <code>{esc(threat_id(e['threat']))}</code>, n = {e['n']}. "
        f"Architecture: {esc(str(e.get('architecture') or 'not recorded'))}.</p>\n"
        f"<table><tr><th class=\"l\">clean accuracy</th><td>{_ci(e, 'clean_accuracy')} %</td></tr>"
        f"<tr><th class=\"l\">robust accuracy (worst case)</th><td>{_ci(e, 'robust_accuracy')} %</td></tr>"
        + (f"<tr><th class=\"l\">naive robust accuracy</th><td>{_p(e['naive_robust_accuracy'])} %</td></tr>"
           if e.get("naive_robust_accuracy") is not None else "")
        + f"<tr><th class=\"l\">flags</th><td class=\"l\">{flag_text}</td></tr>"
        + (f"<tr><th class=\"l\">flags of the naive attacks</th><td class=\"l\">{naive_text}</td></tr>"
           if naive_flags else "")
        + "</table>\n"
        f"<h2>Per attack</h2><table><thead><tr><th class=\"l\">attack</th><th>robust %</th><th>95% CI</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>\n{flag_table}<h2>Robustness curve</h2>{curve}\n{pub}"
        f"<h2>Provenance</h2><pre>{esc(json.dumps(prov, indent=1))}</pre>\n"
        f"<p>The suite config and every number: <a href=\"../entries/{esc(entry_name(e))}.json\">the entry</a>.</p>\n"
        f"<h2>RobustBench model-info form</h2><pre>{esc(json.dumps(to_robustbench(e), indent=1))}</pre>"
    )
    slug = str(e.get("ranking") or ranking_key(e)).replace("/", "__")
    return _page(f"{e['model']} / {e['defense']} / {threat_id(e['threat'])}", body, depth=1,
                 links=f'<a href="../rankings/{esc(slug)}.html">its ranking</a>')


def index_page(rs: list[Ranking], tolerance: float) -> str:
    rows = []
    for r in rs:
        top = r.entries[0]
        rows.append("<tr>" + "".join([
            _cell(esc(r.dataset), r.dataset, True), _cell(esc(r.split), r.split, True),
            _cell(f'<a href="rankings/{esc(r.slug)}.html">{esc(r.threat)}</a>', r.threat, True),
            _cell(str(len(r.entries)), len(r.entries)),
            _cell(f"{esc(top['model'])} / {esc(top['defense'])}", top["model"], True),
            _cell(_ci(top, "robust_accuracy"), top["robust_accuracy"]),
            _cell("yes" if r.resolved() else "no", int(r.resolved())),
        ]) + "</tr>")
    head = "".join(f'<th data-sort="{k}" class="{c}">{esc(h)}</th>' for h, k, c in [
        ("data set", "text", "l"), ("split", "text", "l"), ("threat model", "text", "l"), ("entries", "num", ""),
        ("first", "text", "l"), ("its robust % [95% CI]", "num", ""), ("order resolved", "num", "")])
    body = (
        "<p>One ranking per data set and threat model: an L2 number is never ranked against an L-inf one. Each "
        "entry is measured by a fixed suite (<code>suite*.yaml</code>) on a model whose weights digest it records, "
        "or added from a user's run of the same suite (<code>advbench leaderboard add RUN_DIR</code>). Robust "
        "accuracy is the per-example worst case over the suite's attacks, adaptive views included. "
        f"<code>advbench leaderboard check</code> reruns the suites in CI and fails when a number moves by more "
        f"than {tolerance:g}.</p>\n"
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"
    )
    return _page("advbench leaderboard", body)


def markdown(rs: list[Ranking], tolerance: float) -> str:
    lines = ["# Leaderboard", "",
             "Generated by `advbench leaderboard build` from `entries/*.json`; do not edit by hand. One ranking per "
             "(data set, threat model); robust accuracy is the per-example worst case over the suite's attacks "
             "(adaptive views included), with exact binomial 95% intervals; *vs next* is the paired bootstrap "
             f"difference to the entry below. `advbench leaderboard check` fails when a number moves by more than "
             f"{tolerance:g}. The browsable form: `index.html`.", ""]
    for r in rs:
        lines += [f"## {r.dataset} ({r.split}), {r.threat}", "",
                  "| # | model | defense | robust % [95% CI] | naive % | AutoAttack % | clean % [95% CI] | vs next | flags | n |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
        for i, e in enumerate(r.entries):
            comp = r.comparisons[i] if i < len(r.comparisons) else None
            lines.append(f"| {i + 1} | {e['model']} | {e['defense']} | {_ci(e, 'robust_accuracy')} | "
                         f"{_p(e.get('naive_robust_accuracy'))} | {_p(_autoattack(e))} | {_ci(e, 'clean_accuracy')} | "
                         f"{comp.text() if comp else ''} | {_flag_text(e)} | {e['n']} |")
        lines.append("")
    if not rs:
        lines.append("(no entries yet: run `advbench leaderboard update`)")
    return "\n".join(lines) + "\n"


def build(folder: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> list[Path]:
    """Write the site, the Markdown and the RobustBench export from ``folder``'s entries."""
    folder = Path(folder)
    entries = load_entries(folder)
    published = load_published(folder)
    rs = rankings(entries)
    paths = []

    def put(rel: str, text: str) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        paths.append(path)

    for stale in [*folder.glob("rankings/*.html"), *folder.glob("models/*.html")]:
        stale.unlink()
    put("README.md", markdown(rs, tolerance))
    put("index.html", index_page(rs, tolerance))
    for r in rs:
        put(f"rankings/{r.slug}.html", ranking_page(r))
    for e in entries.values():
        siblings = [s for s in entries.values() if (s["model"], s["defense"], s["threat"]["norm"],
                    s["threat"].get("targeting"), s["threat"].get("knowledge"), s["threat"].get("constraints"),
                    s.get("dataset")) ==
                    (e["model"], e["defense"], e["threat"]["norm"], e["threat"].get("targeting"),
                     e["threat"].get("knowledge"), e["threat"].get("constraints"), e.get("dataset"))]
        put(f"models/{entry_name(e)}.html", model_page(e, siblings, published_for(e, published)))
    paths += export(folder, entries)
    return paths
