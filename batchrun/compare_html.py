"""The comparison as one self-contained HTML page: inline SVG charts, no script, no network.

It opens from disk (a mail attachment, a CI artifact): answer-length histograms of both runs,
latency quantiles, failures by type, and a sample of the changed answers side by side.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from batchrun.compare import CompareReport, Threshold, format_report, quantile

__all__ = ["write_compare_html"]

COLOURS = ("#4c78a8", "#f58518")  # run A, run B
BINS = 12


def _histogram(values_a: list[int], values_b: list[int], *, title: str, unit: str) -> str:
    """Two runs' value distributions as grouped bars over shared bins."""
    values = values_a + values_b
    if not values:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p>no rows</p></figure>"
    low, high = min(values), max(values)
    width = max(1.0, (high - low) / BINS)
    counts: list[list[float]] = [[0.0] * BINS, [0.0] * BINS]
    for series, run in ((0, values_a), (1, values_b)):
        for value in run:
            counts[series][min(BINS - 1, int((value - low) / width))] += 1
    labels = [f"{low + i * width:.0f}" for i in range(BINS)]
    return _bars(title, labels, counts, unit=unit)


def _bars(title: str, labels: list[str], series: list[list[float]], *, unit: str = "") -> str:
    """A grouped bar chart (one group per label, one bar per run) as inline SVG."""
    w, h, pad = 560, 220, 30
    top = max([v for s in series for v in s] + [1e-9])
    group = (w - 2 * pad) / max(1, len(labels))
    bar = group / (len(series) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 40}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#888"/>']
    for i, label in enumerate(labels):
        for k, values in enumerate(series):
            value = values[i]
            height = (h - pad) * value / top
            x = pad + i * group + k * bar + bar / 2
            parts.append(f'<rect x="{x:.1f}" y="{h - height:.1f}" width="{bar:.1f}" height="{height:.1f}" '
                         f'fill="{COLOURS[k % 2]}"><title>{"AB"[k % 2]} {html.escape(label)}: {value:g}'
                         f'{html.escape(unit)}</title></rect>')
        parts.append(f'<text x="{pad + i * group + group / 2:.1f}" y="{h + 14}" font-size="10" '
                     f'text-anchor="middle">{html.escape(label)}</text>')
    parts.append(f'<text x="{pad}" y="{h + 34}" font-size="11">{html.escape(unit)}</text></svg>')
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def _changed_rows(report: CompareReport) -> str:
    if not report.changed_rows:
        return "<p>No answer changed.</p>"
    rows = ["<table class=side><tr><th>id</th><th>run A</th><th>run B</th><th>similarity</th></tr>"]
    for key, text_a, text_b, ratio in report.changed_rows:
        rows.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(text_a)}</td>"
                    f"<td>{html.escape(text_b)}</td><td>{ratio:.2f}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def render_compare_html(report: CompareReport, thresholds: list[Threshold] | None = None) -> str:
    """The page's text."""
    data: dict[str, Any] = report.to_dict()
    verdict = report.verdict(thresholds)
    la, lb = report.a.latencies(), report.b.latencies()
    latency = _bars("Latency (seconds)", ["p50", "p95", "max"],
                    [[quantile(la, 0.5) or 0, quantile(la, 0.95) or 0, la[-1] if la else 0],
                     [quantile(lb, 0.5) or 0, quantile(lb, 0.95) or 0, lb[-1] if lb else 0]], unit="s")
    types = sorted(set(data["runs"]["a"]["failures_by_type"]) | set(data["runs"]["b"]["failures_by_type"]))
    failures = (_bars("Failures by type", types, [[data["runs"][r]["failures_by_type"].get(t, 0) for t in types]
                                                  for r in ("a", "b")])
                if types else "<figure><figcaption>Failures by type</figcaption><p>no failures</p></figure>")
    lengths = _histogram(report.a.lengths(), report.b.lengths(), title="Answer length (characters)", unit="chars")
    legend = "".join(f'<span style="color:{c}">&#9632;</span> run {n} &nbsp;' for c, n in zip(COLOURS, "AB",
                                                                                               strict=True))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchrun compare</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
pre {{ background: #f6f6f6; padding: 12px; white-space: pre-wrap; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 16px; }}
figure {{ margin: 0; }} figcaption {{ font-weight: 600; }}
table.side {{ border-collapse: collapse; width: 100%; }}
table.side td, table.side th {{ border: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }}
.verdict {{ font-size: 18px; font-weight: 600; }}
</style></head><body>
<h1>batchrun compare</h1>
<p class=verdict id=verdict>{html.escape(verdict['verdict'])}</p>
<p>{legend}</p>
<pre id=report>{html.escape(format_report(report, thresholds))}</pre>
<div class=charts>{lengths}{latency}{failures}</div>
<h2>Changed answers (a sample of {len(report.changed_rows)})</h2>
{_changed_rows(report)}
</body></html>
"""


def write_compare_html(report: CompareReport, path: str | Path, thresholds: list[Threshold] | None = None) -> Path:
    """Write the page to ``path``; returns it."""
    from batchrun.compare import CompareError

    target = Path(path)
    try:
        target.write_text(render_compare_html(report, thresholds), encoding="utf-8")
    except OSError as exc:
        raise CompareError(f"cannot write the report {target}: {exc.strerror or exc}") from None
    return target
