"""``fp-monitor report``: the history ``fp-monitor check --record`` keeps in ``ops/monitor_checks``
as one self-contained HTML page: a line chart over time per kind of measure (lag per topic,
staleness per view, dead-letter rate per topic, online p99 per job), each with its title, axis
labels, legend and thresholds, and the latest check's breaches as a table.

The charts are SVG written here, inline in the page: no script, no stylesheet or font to fetch,
no plotting library (the page opens from a mail attachment or an artifact store as it is, and
the report runs wherever ``fp-monitor check`` runs). Nothing here needs Spark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Any

from pipelines.monitor.check import format_figure, read_window

#: The columns of ``ops/monitor_checks`` the report reads (every version of the table has them).
HISTORY_COLUMNS = ["checked_at", "check", "subject", "value", "threshold", "breached", "detail"]


@dataclass(frozen=True)
class PlotKind:
    """One chart of the report: the measures of one ``check`` over time."""

    check: str
    title: str
    y_label: str
    unit: str  # the measure's unit (:func:`pipelines.monitor.check.format_figure`)
    scale: float = 1.0  # plotted value = measured value * scale (a share plotted in %)


#: The charts, in page order; a check not named here (none today) is left out of the plots.
PLOTS = (
    PlotKind("lag", "Lag per topic", "records behind the broker", "records"),
    PlotKind("staleness", "Staleness per view", "seconds since the newest event", "s"),
    PlotKind("dead_letter_rate", "Dead-letter rate per topic", "dead letters, % of the window's records", "share", 100.0),
    PlotKind("online_p99", "Online latency p99 per job", "p99 of the latest interval (s)", "s"),
)

#: Series colours (Okabe-Ito, distinguishable with colour-blindness), reused after the eighth.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

# Chart geometry (SVG user units): the plotting area and the margins for the axes and legend.
WIDTH, HEIGHT = 860, 340
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 44, 56


def read_history(path: str, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """The rows of ``ops/monitor_checks`` at ``path`` checked in ``[since, until]``, oldest first
    (then by check and subject); empty when the table does not exist. A null ``value`` is a
    measure that had nothing to measure (a view with no row yet, a window without records)."""
    rows = read_window(path, HISTORY_COLUMNS, "checked_at", since, until)
    return sorted([] if rows is None else rows.to_pylist(), key=lambda r: (r["checked_at"], r["check"], r["subject"]))


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Ticks from 0 to at least ``top`` (> 0), about ``count`` of them, spaced 1, 2 or 5 times a
    power of ten."""
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def tick_label(value: float) -> str:
    """A tick's number: thousands separated, at most three decimals, no trailing zeros."""
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def line_chart(kind: PlotKind, rows: Sequence[Mapping[str, Any]]) -> str:
    """An inline ``<svg class="plot">`` of ``rows`` (history rows of one check): one line with
    markers per subject over ``checked_at`` (broken where a value is null), breached points
    ringed in red, a dashed line per distinct latest threshold, the title, both axis labels and a
    legend. The x axis spans the rows' first to last check (a single check: a minute either
    side); the y axis starts at 0 and reaches past the highest value and threshold."""
    times = [r["checked_at"] for r in rows]
    start, end = min(times), max(times)
    if start == end:
        start, end = start - timedelta(minutes=1), end + timedelta(minutes=1)
    series: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        series.setdefault(row["subject"], []).append(row)
    # The thresholds in force at each subject's latest check (the online jobs' may differ).
    thresholds = sorted({points[-1]["threshold"] * kind.scale for points in series.values()
                         if points[-1]["threshold"] is not None})
    values = [r["value"] * kind.scale for r in rows if r["value"] is not None]
    top = max([*values, *thresholds, 0.0])
    ticks = nice_ticks(top * 1.05 if top > 0 else 1.0)
    y_max = ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = (end - start).total_seconds()

    def x(moment: datetime) -> float:
        return LEFT + (moment - start).total_seconds() / span * plot_w

    def y(value: float) -> float:
        return TOP + plot_h - value / y_max * plot_h

    parts = [
        f'<svg class="plot" data-check="{escape(kind.check)}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{escape(kind.title)}">',
        f"<title>{escape(kind.title)}</title>",
        f'<text class="plot-title" x="{LEFT + plot_w / 2:.1f}" y="24" text-anchor="middle">{escape(kind.title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>',
    ]
    for tick in ticks:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text class="y-tick" x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick_label(tick)}</text>')
    for i in range(5):
        moment = start + (end - start) * (i / 4)
        parts.append(f'<line x1="{x(moment):.1f}" x2="{x(moment):.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 5}" stroke="#999"/>')
        parts.append(f'<text class="x-tick" x="{x(moment):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">'
                     f'{moment.astimezone(timezone.utc):%m-%d %H:%M}</text>')
    parts.append(f'<text class="x-label" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">'
                 "time of the check (UTC)</text>")
    parts.append(f'<text class="y-label" x="16" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {TOP + plot_h / 2:.1f})">{escape(kind.y_label)}</text>')
    for threshold in thresholds:
        parts.append(f'<line class="threshold" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(threshold):.1f}" '
                     f'y2="{y(threshold):.1f}" stroke="#c00" stroke-dasharray="6 4"/>')
    legend = []
    for index, (subject, points) in enumerate(sorted(series.items())):
        colour = PALETTE[index % len(PALETTE)]
        # A null value (nothing measured) breaks the line instead of joining across it.
        runs: list[list[str]] = [[]]
        for point in points:
            if point["value"] is None:
                runs.append([])
                continue
            runs[-1].append(f"{x(point['checked_at']):.1f},{y(point['value'] * kind.scale):.1f}")
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(run)}"/>')
        for point in points:
            if point["value"] is None:
                continue
            cx, cy = x(point["checked_at"]), y(point["value"] * kind.scale)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>')
            if point["breached"]:
                parts.append(f'<circle class="breach" cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="none" stroke="#c00"/>')
        legend.append((colour, subject if any(p["value"] is not None for p in points) else f"{subject} (no value)"))
    legend_x, legend_y = WIDTH - RIGHT + 16, TOP + 8
    parts.append(f'<g class="legend"><rect x="{legend_x - 8}" y="{TOP}" width="{RIGHT - 16}" '
                 f'height="{(len(legend) + len(thresholds)) * 18 + 12}" fill="#fff" stroke="#ccc"/>')
    for i, (colour, label) in enumerate(legend):
        row_y = legend_y + i * 18
        parts.append(f'<rect x="{legend_x}" y="{row_y}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text class="legend-entry" x="{legend_x + 18}" y="{row_y + 10}">{escape(label)}</text>')
    for i, threshold in enumerate(thresholds):
        row_y = legend_y + (len(legend) + i) * 18
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 12}" y1="{row_y + 6}" y2="{row_y + 6}" stroke="#c00" '
                     'stroke-dasharray="4 2"/>')
        label = format_figure(threshold / kind.scale, kind.unit)
        parts.append(f'<text class="legend-entry" x="{legend_x + 18}" y="{row_y + 10}">threshold {escape(label)}</text>')
    parts.append("</g></svg>")
    return "\n".join(parts)


def breaches_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A line on the latest check (the rows with the newest ``checked_at``) and its breaches as an
    HTML table (check, subject, value, threshold, detail), in the charts' order then by subject;
    the line alone when nothing breached."""
    latest = max(r["checked_at"] for r in rows)
    measured = [r for r in rows if r["checked_at"] == latest]
    order = [kind.check for kind in PLOTS]
    breached = sorted((r for r in measured if r["breached"]),
                      key=lambda r: (order.index(r["check"]) if r["check"] in order else len(order), r["subject"]))
    units = {kind.check: kind.unit for kind in PLOTS}
    head = (f'<p class="latest">Latest check: {latest.astimezone(timezone.utc).isoformat()}, '
            f"{len(breached)} breach{'es' if len(breached) != 1 else ''} of {len(measured)} measures.</p>")
    if not breached:
        return head
    lines = ["<table class=\"breaches\"><thead><tr><th>check</th><th>subject</th><th>value</th><th>threshold</th>"
             "<th>detail</th></tr></thead><tbody>"]
    for r in breached:
        unit = units.get(r["check"], "")
        # A breach without a value is one with nothing measured yet (e.g. a view with no row).
        value = format_figure(math.inf if r["value"] is None else r["value"], unit)
        lines.append(f"<tr><td>{escape(r['check'])}</td><td>{escape(r['subject'])}</td><td>{escape(value)}</td>"
                     f"<td>{escape(format_figure(r['threshold'], unit))}</td><td>{escape(r['detail'] or '')}</td></tr>")
    lines.append("</tbody></table>")
    return head + "\n" + "\n".join(lines)


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
svg.plot { display: block; margin: 1.5em 0; font-size: 12px; }
svg.plot .plot-title { font-size: 15px; font-weight: bold; }
table.breaches { border-collapse: collapse; }
table.breaches th, table.breaches td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
table.breaches td { vertical-align: top; }
"""


def render_report(rows: Sequence[Mapping[str, Any]], since: datetime, generated_at: datetime) -> str:
    """The report page of ``rows`` (:func:`read_history`'s, checked since ``since``): a chart per
    kind of measure in :data:`PLOTS` that has rows (a kind without any says so in a line), then
    the latest check's breaches. No rows: a page saying there is no recorded check since then."""
    window = f"{since.astimezone(timezone.utc).isoformat()} to {generated_at.astimezone(timezone.utc).isoformat()}"
    body = [f"<h1>fp-monitor report</h1>\n<p class=\"window\">Checks recorded from {escape(window)} "
            "(<code>fp-monitor check --record</code>, table <code>ops/monitor_checks</code>).</p>"]
    if not rows:
        body.append('<p class="empty">There are no recorded checks in this window.</p>')
    else:
        body.append("<h2>Breaches of the latest check</h2>")
        body.append(breaches_table(rows))
        body.append("<h2>Measures over time</h2>")
        for kind in PLOTS:
            of_kind = [r for r in rows if r["check"] == kind.check]
            if of_kind:
                body.append(line_chart(kind, of_kind))
            else:
                body.append(f'<p class="no-plot">{escape(kind.title)}: no measure recorded in this window.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<title>fp-monitor report</title>\n<style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
