"""Figures (PNG, matplotlib Agg) and the HTML / Markdown evaluation report."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DISCLAIMER = (
    "Research use only; not for clinical use. These figures describe one model on one data split; "
    "they are not a clinical performance claim."
)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- figures


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "normalised by true class", "{:.2f}")):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        ax.set_xticks(range(len(classes)), classes, rotation=20)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        hi = mat.max() / 2 if mat.max() > 0 else 0.5
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center",
                        color="white" if mat[i, j] > hi else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc_pr(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], metrics: dict, roc_path: Path,
                pr_path: Path) -> tuple[Path, Path]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
    y = np.asarray(y)
    for kind, path in (("roc", roc_path), ("pr", pr_path)):
        fig, ax = plt.subplots(figsize=(5.2, 4.6))
        for i, c in enumerate(classes):
            pos = y == i
            if pos.sum() == 0 or (kind == "roc" and (~pos).sum() == 0):
                continue
            m = metrics["per_class"][c]["auc" if kind == "roc" else "ap"]
            lab = f"{c}: {'AUC' if kind == 'roc' else 'AP'} {_fmt_ci(m)}"
            if kind == "roc":
                fpr, tpr, _ = roc_curve(pos, probs[:, i])
                ax.plot(fpr, tpr, label=lab)
            else:
                prec, rec, _ = precision_recall_curve(pos, probs[:, i])
                ax.step(rec, prec, where="post", label=lab)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set_xlabel("1 - specificity (false positive rate)")
            ax.set_ylabel("sensitivity")
            ax.set_title("one-vs-rest ROC")
        else:
            ax.set_xlabel("recall (sensitivity)")
            ax.set_ylabel("precision (PPV)")
            ax.set_title("one-vs-rest precision-recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:  # a split holding one class only has no curve to label
            ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return roc_path, pr_path


def plot_reliability(calib: dict, path: Path, calib_after: dict | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for c, name, style in ((calib, "as evaluated", "o-"), (calib_after, "after temperature scaling", "s--")):
        if not c:
            continue
        pts = [(b["confidence"], b["accuracy"], b["n"]) for b in c["bins"] if b["n"]]
        if pts:
            x, yv, _ = zip(*pts)
            ax.plot(x, yv, style, label=f"{name} (ECE {c['ece']:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"reliability diagram ({calib['n_bins']} bins)")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- formatting


def _fmt_ci(m: dict | None, pct: bool = False) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    s = 100.0 if pct else 1.0
    d = 1 if pct else 3
    v = f"{m['value'] * s:.{d}f}"
    if m.get("ci_low") is None:
        return v
    # never widen or thin a CI silently: mark an exact interval and a CI resting on fewer replicates
    mark = " †" if "clopper" in str(m.get("ci_method", "")) else ""
    if m.get("n_boot") and m.get("n_replicates", m["n_boot"]) < m["n_boot"]:
        mark += f" ({m['n_replicates']}/{m['n_boot']} replicates)"
    return f"{v} [{m['ci_low'] * s:.{d}f}, {m['ci_high'] * s:.{d}f}]{mark}"


def _n(m: dict | None) -> str:
    if not m:
        return ""
    return f"{m['n_images']} img / {m['n_patients']} pat"


def _tables(r: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table of the report."""
    m = r["metrics"]
    classes = m["classes"]
    out = []
    overall = [["accuracy", _fmt_ci(m["accuracy"]), _n(m["accuracy"])],
               ["balanced accuracy (mean sensitivity)", _fmt_ci(m["balanced_accuracy"]), _n(m["balanced_accuracy"])]]
    overall += headline_rows(r)
    warn = "; ".join(w["text"] for w in (r.get("groups") or {}).get("warnings", []))
    out.append((
        "Overall",
        ["figure", "value [95% CI]", "images / patients"],
        overall,
        (f"WARNING: {warn}. " if warn else "")
        + f"decision rule: {m['decision']}; CIs: {m['bootstrap']['n_boot']} bootstrap replicates over patients, "
        "resampled within classes (the per-group figures: within (source, class) cells); † = Clopper-Pearson over "
        "patients where every replicate gave 0 or 1; (k/B replicates) = a figure defined in only k of them",
    ))
    out += group_tables(r)
    head = ["class", "sensitivity", "specificity", "PPV", "NPV", "F1", "AUC", "AP"]
    rows, nrows = [], []
    for c in classes:
        pc = m["per_class"][c]
        rows.append([c] + [_fmt_ci(pc.get(k)) for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "auc", "ap")])
        nrows.append([c] + [_n(pc.get(k)) for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "auc", "ap")])
    out.append(("Per class (one vs rest), value [95% CI]", head, rows, ""))
    out.append(("Images / patients behind each per-class figure", head, nrows,
                "sensitivity: images of the class; specificity: the others; PPV: predicted as the class; "
                "NPV: predicted as another class; F1: true or predicted as the class; AUC/AP: all"))
    cmh = ["true \\ predicted"] + classes
    out.append(("Confusion matrix (counts)", cmh,
                [[c] + [str(v) for v in row] for c, row in zip(classes, m["confusion_matrix"])], ""))
    if m.get("threshold_table"):
        pos = m["operating_point"].get("positive", "COVID-19")
        rows = [[f"{t['threshold']:.1f}", _fmt_ci(t["sensitivity"]), _fmt_ci(t["specificity"])]
                for t in m["threshold_table"]]
        op = m["operating_point"]
        note = ""
        rule = r.get("decision_rule") or {}
        if rule.get("rule") == "threshold" and pos in m["per_class"]:
            # the operating point every tool labels with: its figures are the headline ones
            rows.append([f"{rule['threshold']:.4f}: the decision rule (threshold {_provenance(rule, r)})",
                         _fmt_ci(m["per_class"][pos]["sensitivity"]), _fmt_ci(m["per_class"][pos]["specificity"])])
        if op.get("threshold") is not None:
            split = r.get("data", {}).get("split", "evaluated")
            rows.append([f"{op['threshold']:.4f}: fitted on this {split} split for sensitivity >= "
                         f"{op['target_sensitivity']:.2f} (optimistic; not used for labels)",
                         _fmt_ci(op["sensitivity"]), _fmt_ci(op["specificity"])])
            note = op.get("note", "")
        t0 = m["threshold_table"][0]
        out.append((f"{pos} vs rest: sensitivity and specificity by threshold on p({pos})",
                    ["threshold", "sensitivity", "specificity"], rows,
                    f"{_n(t0['sensitivity'])} positive, {_n(t0['specificity'])} negative. {note}"))
    cal = r["calibration"]
    crow = [["as evaluated", f"{cal['before']['ece']:.4f}", f"{cal['temperature_used']:.3f}", f"{cal['nll_before']:.4f}"]]
    if cal.get("after"):
        crow.append(["after temperature scaling (fitted on val)", f"{cal['after']['ece']:.4f}",
                     f"{cal['temperature_fitted']:.3f}", f"{cal['nll_after']:.4f}"])
    out.append(("Calibration", ["", "ECE", "temperature", "NLL"], crow, cal.get("note", "")))
    for key, title in (("by_source", "By source"), ("by_view", "By view")):
        br = r.get(key) or {}
        if not br:
            continue
        head = ["group", "images / patients", "classes", "accuracy"] + [f"sens. {c}" for c in classes] + ["AUC " + (
            m["operating_point"].get("positive", classes[-1]) if m.get("operating_point") else classes[-1])]
        pos = m["operating_point"].get("positive", classes[-1]) if m.get("operating_point") else classes[-1]
        rows = []
        for g, v in br.items():
            counts = ", ".join(f"{c} {n}" for c, n in v["class_counts"].items() if n)
            rows.append([g, f"{v['n_images']} / {v['n_patients']}", counts, _fmt_ci(v["accuracy"])]
                        + [_fmt_ci(v["per_class"][c]["sensitivity"]) for c in classes]
                        + [_fmt_ci(v["per_class"][pos]["auc"])])
        out.append((title, head, rows, "n/a: the group has no image of that class (or no negatives for AUC)"))
    return out


def headline_rows(r: dict) -> list[list[str]]:
    """COVID-19 AUC, worst-group sensitivity and non-dominant-source specificity: [figure, value, n]."""
    m = r["metrics"]
    g = r.get("groups") or {}
    pos = (g.get("non_dominant_specificity") or {}).get("positive", "COVID-19")
    rows = []
    auc = m["per_class"].get(pos, {}).get("auc")
    if auc is not None:
        rows.append([f"{pos} AUC (vs rest)", _fmt_ci(auc), _n(auc)])
    if not g.get("available"):
        return rows
    wg = g["worst_group_sensitivity"]
    where = f" ({wg['cell']})" if wg.get("cell") else f" ({wg.get('note', '')})"
    rows.append([f"worst-group sensitivity: lowest over (source, class) cells of >= {wg['min_images']} images{where}",
                 _fmt_ci(wg), _n(wg) if wg.get("value") is not None else ""])
    nd = g.get("non_dominant_specificity")
    if nd:
        doms = ", ".join(f"{c}: {s}" for c, s in nd.get("dominant", {}).items())
        rows.append([f"non-dominant-source specificity: {', '.join(nd.get('per_class', {})) or 'non-' + pos} films "
                     f"from other than the dominant source ({doms or 'none'}; from {nd.get('dominant_from', '?')}) "
                     f"not called {pos}", _fmt_ci(nd), _n(nd) if nd.get("value") is not None else nd.get("note", "")])
    return rows


def group_tables(r: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The source x class table (or one line saying why it is missing) and the non-dominant breakdown."""
    g = r.get("groups") or {}
    if not g:
        return []
    if not g.get("available"):
        return [("Source x class", ["note"], [[g.get("note", "not available")]], "")]
    rows = [[c["source"], c["class"], f"{c['n_images']} / {c['n_patients']}", f"{c['n_correct']}",
             _fmt_ci(c["sensitivity"]), "yes" if c["eligible"] else "no"] for c in g["table"]]
    st = g["settings"]
    out = [("Source x class: sensitivity at the decision rule, value [95% CI]",
            ["source", "class", "images / patients", "called their class", "sensitivity",
             f">= {st['min_images']} images (worst-group)"], rows,
            "sensitivity = share of the cell's images labelled as their true class by the decision rule; CIs: "
            f"{st['n_boot']} patient-bootstrap replicates, each patient resampled within the (source, class) cell "
            "holding most of their images")]
    nd = g.get("non_dominant_specificity")
    if nd and nd.get("per_class"):
        rows = [[c, v.get("dominant_source") or "none", _fmt_ci(v), _n(v) if v.get("value") is not None else "none"]
                for c, v in nd["per_class"].items()]
        rows.append(["all", "", _fmt_ci(nd), _n(nd) if nd.get("value") is not None else "none"])
        out.append((f"Non-dominant-source specificity (not called {nd['positive']})",
                    ["true class", "dominant source (excluded)", "share not called " + nd["positive"],
                     "images / patients"], rows, nd["definition"]))
    return out


def summary_lines(r: dict) -> list[str]:
    """The per-group lines ``covidcxr evaluate`` prints under the per-class figures."""
    g = r.get("groups") or {}
    if not g:
        return []
    if not g.get("available"):
        return [g.get("note", "no source x class table")]
    lines = [f"{name}: {value}" + (f" ({n})" if n else "") for name, value, n in headline_rows(r)
             if not name.endswith("AUC (vs rest)")]  # the per-class lines above print the AUC
    lines += [f"WARNING: {w['text']}" for w in g.get("warnings", [])]
    lines.append("source x class sensitivity:")
    for c in g["table"]:
        lines.append(f"  {c['source']:>12} {c['class']:>10}: n {c['n_images']:>4}  {_fmt_ci(c['sensitivity'])}")
    return lines


def _provenance(rule: dict, r: dict) -> str:
    text = rule.get("text", "")
    return text[text.index("(threshold ") + 11 : -1] if "(threshold " in text else "stored in the checkpoint"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _header_lines(r: dict) -> list[str]:
    m = r["metrics"]
    return [
        f"model: {r['model']['path']} (arch {r['model']['arch']}, preset {r['model']['preset']})",
        f"data: {r['data']['manifest']} (sha256 {r['data']['sha256'][:12]}), split: {r['data']['split']}",
        f"{m['n_images']} images from {m['n_patients']} patients; classes: "
        + ", ".join(f"{c} {n}" for c, n in m["class_counts"].items()),
        f"unreadable images skipped: {len(r.get('failures', []))}",
        "decision rule: " + (r.get("decision_rule") or {}).get("text", m.get("decision", "argmax")),
    ]


def write_markdown(r: dict, out: Path, figures: dict[str, str]) -> Path:
    parts = ["# Evaluation report", "", f"> {DISCLAIMER}", ""]
    parts += [f"- {h}" for h in _header_lines(r)] + [""]
    for title, head, rows, note in _tables(r):
        parts += [f"## {title}", "", _md_table(head, rows), ""]
        if note:
            parts += [f"_{note}_", ""]
    parts += ["## Figures", ""]
    for name, f in figures.items():
        parts += [f"![{name}]({f})", ""]
    if r.get("failures"):
        parts += ["## Skipped images", ""] + [f"- {f['error']}" for f in r["failures"]] + [""]
    p = out / "report.md"
    p.write_text("\n".join(parts), encoding="utf-8")
    return p


def write_html(r: dict, out: Path, figures: dict[str, str]) -> Path:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>covidcxr evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;"
        "font-size:13px;text-align:left}th{background:#eee}.note{color:#555;font-size:12px}"
        ".warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36a}img{max-width:100%}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f"<p class='warn'>{e(DISCLAIMER)}</p><ul>",
    ]
    parts += [f"<li>{e(h)}</li>" for h in _header_lines(r)] + ["</ul>"]
    for title, head, rows, note in _tables(r):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if note:
            parts.append(f"<p class='note'>{e(note)}</p>")
    parts.append("<h2>Figures</h2>")
    for name, f in figures.items():
        parts.append(f"<figure><img src='{e(f)}' alt='{e(name)}'><figcaption>{e(name)}</figcaption></figure>")
    if r.get("failures"):
        parts.append("<h2>Skipped images</h2><ul>" + "".join(f"<li>{e(f['error'])}</li>" for f in r["failures"]) + "</ul>")
    parts.append("</body></html>")
    p = out / "report.html"
    p.write_text("\n".join(parts), encoding="utf-8")
    return p


def write_report(result: dict[str, Any], y: np.ndarray, probs: np.ndarray, out: str | Path) -> dict[str, Path]:
    """Write the PNG figures, report.html and report.md for an :func:`evaluate_predictions` result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = result["metrics"]
    classes = m["classes"]
    figs = {
        "confusion matrix": plot_confusion(m["confusion_matrix"], classes, out / "confusion_matrix.png").name,
    }
    roc, pr = plot_roc_pr(y, probs, classes, m, out / "roc.png", out / "pr.png")
    figs["ROC curves (one vs rest)"] = roc.name
    figs["precision-recall curves (one vs rest)"] = pr.name
    cal = result["calibration"]
    figs["reliability diagram"] = plot_reliability(cal["before"], out / "reliability.png", cal.get("after")).name
    return {
        "html": write_html(result, out, figs),
        "md": write_markdown(result, out, figs),
        **{k: out / v for k, v in figs.items()},
    }


def is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
