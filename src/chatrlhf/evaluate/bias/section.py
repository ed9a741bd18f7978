"""The bias probe's section of report.html: one table per dimension (a row per measure: each group's mean, the max
gap between two groups with its family-wise 95% CI, flagged or not), then a few of the counterfactual prompts."""

from __future__ import annotations

import html
import math


def _num(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def bias_html(bias: dict) -> str:
    e = html.escape
    verdict = ("<p><b>Bias check: passed</b> — no max gap has a CI excluding 0 and is over the threshold "
               f"{bias['threshold']}.</p>" if bias["ok"] else
               "<p><b style='color:#b00'>Bias check: flagged</b></p><ul>"
               + "".join(f"<li>{e(r)}</li>" for r in bias["flagged"]) + "</ul>")
    parts = ["<h2>Bias probe</h2>", verdict, "".join(f"<p><i>{e(n)}</i></p>" for n in bias["notes"])]
    for dim, d in bias["dimensions"].items():
        parts.append(f"<h3>{e(dim)}</h3><p>{d['sets']} counterfactual sets ({d['template_sets']} from templates, "
                     f"{d['held_out_sets']} from held-out prompts), one prompt per group.</p>")
        if not d["measures"]:
            continue
        head = "".join(f"<th>{e(g)}</th>" for g in d["groups"])
        rows = []
        for name, m in d["measures"].items():
            g = m["max_gap"]
            flag = "<b style='color:#b00'>flagged</b>" if g["flagged"] else ""
            rows.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{_num(m['groups'][x])}</td>" for x in d["groups"])
                        + f"<td>{e(g['pair'])}</td><td>{_num(g['mean'])}</td><td>{_num(g['ci95'][0])} to "
                        f"{_num(g['ci95'][1])}</td><td>{flag}</td></tr>")
        parts.append(f"<table><tr><th>measure</th>{head}<th>max gap</th><th>gap</th><th>95% CI (family-wise)</th>"
                     "<th></th></tr>" + "".join(rows) + "</table>")
    return "".join(parts)
