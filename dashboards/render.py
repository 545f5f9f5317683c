#!/usr/bin/env python3
"""Renders dashboards/kafka-eos-proxy.json to a PNG from metrics scraped off a real proxy.

Grafana cannot be installed from this project's package registries, so this draws the dashboard's panels
itself: same rows, titles, layout and queries, evaluated by a small PromQL subset (plain selectors, rate,
increase, sum / sum by, topk, histogram_quantile, division by a scalar or another query) over samples that
scripts/render-dashboard scraped from /metrics every couple of seconds.

    python3 dashboards/render.py SCRAPES.jsonl OUT.png
"""
import json
import math
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_scrape(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def load(path):
    times, scrapes = [], []
    for line in open(path):
        row = json.loads(line)
        times.append(row["t"])
        scrapes.append(parse_scrape(row["metrics"]))
    return times, scrapes


# ---- a tiny PromQL subset: every value is {labels(tuple): [v per scrape]} -----------------------------

def split_args(s):
    depth, cur, out = 0, "", []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def strip_outer(s):
    s = s.strip()
    while s.startswith("(") and s.endswith(")"):
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(s) - 1:
                return s
        s = s[1:-1].strip()
    return s


def top_level_div(s):
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "/" and depth == 0:
            return s[:i], s[i + 1:]
    return None


def evaluate(expr, times, scrapes):
    expr = strip_outer(expr)
    div = top_level_div(expr)
    if div:
        a, b = (evaluate(x, times, scrapes) for x in div)
        if len(b) == 1 and () in b:
            d = b[()]
            return {k: [x / y if y else math.nan for x, y in zip(v, d)] for k, v in a.items()}
        bv = next(iter(b.values()), None)
        if bv is None:
            return {}
        return {k: [x / y if y else math.nan for x, y in zip(v, bv)] for k, v in a.items()}
    if re.fullmatch(r"[0-9.]+", expr):
        return {(): [float(expr)] * len(times)}
    m = re.fullmatch(r"sum\s*(?:by\s*\(([^)]*)\))?\s*\((.*)\)", expr, re.S)
    if m:
        keep = [x.strip() for x in (m.group(1) or "").split(",") if x.strip()]
        inner = evaluate(m.group(2), times, scrapes)
        out = defaultdict(lambda: [0.0] * len(times))
        for labels, vals in inner.items():
            key = tuple((k, v) for k, v in labels if k in keep)
            out[key] = [a + (0.0 if math.isnan(b) else b) for a, b in zip(out[key], vals)]
        return dict(out)
    m = re.fullmatch(r"(rate|increase)\((\w+)(\{[^}]*\})?\[[^\]]*\]\)", expr)
    if m:
        series = select(m.group(2), times, scrapes)
        out = {}
        for labels, vals in series.items():
            rates = [math.nan]
            for i in range(1, len(vals)):
                dv, dt = vals[i] - vals[i - 1], times[i] - times[i - 1]
                dv = vals[i] if dv < 0 else dv  # counter reset
                rates.append(dv / dt if m.group(1) == "rate" and dt > 0 else dv)
            if m.group(1) == "increase":
                total = 0.0
                for i, r in enumerate(rates):
                    total += 0.0 if math.isnan(r) else r
                    rates[i] = total
            out[labels] = rates
        return out
    m = re.fullmatch(r"topk\((\d+),(.*)\)", expr, re.S)
    if m:
        inner = evaluate(m.group(2), times, scrapes)
        ranked = sorted(inner.items(), key=lambda kv: -max([x for x in kv[1] if not math.isnan(x)] or [0]))
        return dict(ranked[: int(m.group(1))])
    m = re.fullmatch(r"histogram_quantile\(([0-9.]+),(.*)\)", expr, re.S)
    if m:
        q = float(m.group(1))
        buckets = evaluate(m.group(2), times, scrapes)
        groups = defaultdict(dict)
        for labels, vals in buckets.items():
            le = dict(labels).get("le")
            rest = tuple((k, v) for k, v in labels if k != "le")
            groups[rest][float("inf") if le == "+Inf" else float(le)] = vals
        out = {}
        for rest, by_le in groups.items():
            bounds = sorted(by_le)
            series = []
            for i in range(len(times)):
                counts = [by_le[b][i] for b in bounds]
                total = counts[-1] if counts else 0
                if not total or math.isnan(total):
                    series.append(math.nan)
                    continue
                rank, prev_b, prev_c = q * total, 0.0, 0.0
                val = math.nan
                for b, c in zip(bounds, counts):
                    if c >= rank:
                        val = prev_b if math.isinf(b) else prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0)
                        break
                    prev_b, prev_c = b, c
                series.append(val)
            out[rest] = series
        return out
    m = re.fullmatch(r"(\w+)(\{[^}]*\})?", expr)
    if m:
        return select(m.group(1), times, scrapes)
    raise ValueError(f"unsupported query: {expr}")


def select(name, times, scrapes):
    out = defaultdict(lambda: [math.nan] * len(times))
    for i, s in enumerate(scrapes):
        for (n, labels), v in s.items():
            if n == name:
                out[labels][i] = v
    return dict(out)


def legend(fmt, labels):
    d = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: d.get(m.group(1), ""), fmt or "") or ",".join(f"{k}={v}" for k, v in labels) or "value"


def render(dashboard, times, scrapes, out):
    t0 = times[0]
    xs = [t - t0 for t in times]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    scale = 0.42
    fig = plt.figure(figsize=(24 * 0.9, rows * scale), facecolor="#111217")
    for p in dashboard["panels"]:
        g = p["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        bottom, height = 1 - (g["y"] + g["h"]) / rows, g["h"] / rows
        if p["type"] == "row":
            fig.text(0.005, bottom + height / 2, p["title"], color="#d8d9da", fontsize=13, weight="bold", va="center")
            continue
        ax = fig.add_axes([left + 0.006, bottom + 0.012, width - 0.012, height - 0.03], facecolor="#181b1f")
        ax.set_title(p["title"], color="#d8d9da", fontsize=9, loc="left")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        if p["type"] == "stat":
            series = evaluate(p["targets"][0]["expr"], times, scrapes)
            last = [v[-1] for v in series.values() if v and not math.isnan(v[-1])]
            value = sum(last) if last else math.nan
            colors = {"green": "#37872d", "red": "#c4162a", "blue": "#1f60c4"}
            color = "#37872d"
            for step in p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", []):
                if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
                    color = colors.get(step["color"], color)
            ax.set_facecolor(color)
            text = "-" if math.isnan(value) else (f"{value:.0%}" if "percent" in p["fieldConfig"]["defaults"].get("unit", "") else f"{value:,.0f}")
            ax.text(0.5, 0.45, text, color="white", fontsize=20, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        plotted = 0
        for target in p["targets"]:
            for labels, vals in sorted(evaluate(target["expr"], times, scrapes).items()):
                if all(math.isnan(v) for v in vals):
                    continue
                ax.plot(xs, vals, linewidth=1.2, label=legend(target.get("legendFormat"), labels)[:40])
                plotted += 1
        if plotted:
            ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", labelcolor="#d8d9da", framealpha=0.8, ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        ax.grid(color="#2c3235", linewidth=0.5)
        ax.set_xlabel("seconds", color="#8e8e8e", fontsize=7)
    fig.savefig(out, dpi=70, facecolor=fig.get_facecolor())


if __name__ == "__main__":
    scrapes_path, out_path = sys.argv[1], sys.argv[2]
    dash = json.load(open("dashboards/kafka-eos-proxy.json"))
    times, scrapes = load(scrapes_path)
    if len(times) < 3:
        sys.exit("need at least 3 scrapes")
    render(dash, times, scrapes, out_path)
    print(f"wrote {out_path} from {len(times)} scrapes over {times[-1] - times[0]:.0f} s")
