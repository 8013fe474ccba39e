"""The reports: the merge's (plan, timings, outputs) and the pipeline's (a markdown summary, the
plots ops look at: λ curve, per-task bars, Fisher mass per layer, and pipeline.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fishmerge.io import storage  # noqa: E402
from fishmerge.merge.config import MergeConfig  # noqa: E402
from fishmerge.pipeline.baselines import directions  # noqa: E402
from fishmerge.pipeline.metrics import BUILTIN  # noqa: E402
from fishmerge.pipeline.search import searches_lambda, varied_params  # noqa: E402


def kinds_of(results: dict[str, dict[str, float]]) -> list[str]:
    """The evaluated kinds in their order (the merge, then `evaluate.baselines`), those with values only."""
    return [k for k in results if results.get(k)]


def higher_is_better(name: str, higher: dict[str, bool] | None) -> bool:
    """A metric's direction: the config's (`higher`: {metric name: higher is better}), else the built-in's."""
    return (higher or {}).get(name, BUILTIN[name].higher_is_better if name in BUILTIN else True)


def plot_lambda_curve(searches: dict[str, dict], model_names: list[str], path: Path) -> Path:
    """Search metric against λ of the first model (2 models) or per candidate (more); a search over a
    method's parameters (task arithmetic's scale, TIES's density × scale) per candidate."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, s in searches.items():
        cands = s["candidates"]
        if not searches_lambda(s):
            varied = varied_params(s)
            xs = list(range(len(cands)))
            ax.plot(
                xs, [c["score"] for c in cands], marker="s", linestyle=":", label=f"{label} (by {', '.join(varied)})"
            )
            ax.scatter([s["best"]], [cands[s["best"]]["score"]], s=120, facecolors="none", edgecolors="black")
        elif len(model_names) == 2:
            xs = [c["weights"][0] for c in cands]
            ax.plot(xs, [c["score"] for c in cands], marker="o", label=label)
            best = cands[s["best"]]
            ax.scatter([best["weights"][0]], [best["score"]], s=120, facecolors="none", edgecolors="black")
            ax.set_xlabel(f"λ of {model_names[0]} (λ of {model_names[1]} = 1 − λ)")
        else:
            ax.plot(range(len(cands)), [c["score"] for c in cands], marker="o", linestyle="", label=label)
            ax.set_xlabel("candidate (0 = uniform λ)")
    first = next(iter(searches.values()))
    arrow = "higher" if first.get("higher_is_better", True) else "lower"
    ax.set_ylabel(f"mean {first['metric']} (search split; {arrow} is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task_bars(
    results: dict[str, dict[str, float]], metric: str, path: Path, higher_is_better: bool = True
) -> Path:
    """One group of bars per task: merged against each baseline, on `metric`."""
    kinds = kinds_of(results)
    tasks = sorted({key.split("/")[0] for key in results["merged"]})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.6))
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        values = [results[kind].get(f"{t}/{metric}", float("nan")) for t in tasks]
        bars = ax.bar([x + i * width for x in range(len(tasks))], values, width, label=kind)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    if metric in BUILTIN and BUILTIN[metric].bounded:
        ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=len(kinds), loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_table(
    results: dict[str, dict[str, float]], higher: dict[str, bool] | None = None, method: str | None = None
) -> str:
    """Markdown table: each task/metric × merged and baselines, the best of each row in bold by the
    metric's direction (`higher`: {metric name: higher is better}); a note when nothing was evaluated."""
    if not results.get("merged"):
        return "Not evaluated (the config has no `evaluate:`)."
    higher = higher or {}
    kinds = kinds_of(results)
    keys = sorted(results["merged"])
    labels = [f"merged ({method})" if k == "merged" and method else k for k in kinds]
    lines = ["| task/metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(kinds)]
    for key in keys:
        up = higher_is_better(key.rsplit("/", 1)[-1], higher)
        values = [results[k][key] for k in kinds if key in results[k]]
        best = (max if up else min)(values)
        cells = [
            (
                "—"
                if key not in results[k]
                else f"**{results[k][key]:.4f}**"
                if results[k][key] == best
                else f"{results[k][key]:.4f}"
            )
            for k in kinds
        ]
        arrow = "↑" if up else "↓"
        lines.append(f"| {key} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n↑ higher is better, ↓ lower is better; the best of each row in bold."


def candidates_table(search: dict, model_names: list[str]) -> str:
    """Markdown table of a search's candidates: λ per model, the parameters that vary, the score."""
    varied = varied_params(search)
    cols = [f"λ {n}" for n in model_names] + varied
    arrow = "↑" if search.get("higher_is_better", True) else "↓"
    lines = ["| # | " + " | ".join(cols) + f" | {search['metric']} {arrow} |", "|---" * (len(cols) + 2) + "|"]
    for i, c in enumerate(search["candidates"]):
        mark = " **best**" if i == search["best"] else ""
        cells = [f"{w:.3f}" for w in c["weights"]] + [f"{c['params'][n]:g}" for n in varied]
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {c['score']:.4f}{mark} |")
    return "\n".join(lines)


def choice_text(search: dict, model_names: list[str]) -> str:
    """A search's chosen candidate as people read it: λ when the search varied λ, and the parameters it varied."""
    best = search["candidates"][search["best"]]
    parts = [", ".join(f"{n}={w:.2f}" for n, w in zip(model_names, best["weights"]))] if searches_lambda(search) else []
    parts += [f"{n}={best['params'][n]:g}" for n in varied_params(search)]
    return "; ".join(parts) or "as configured"


def methods_table(
    method: str,
    results: dict[str, dict[str, float]],
    searches: dict[str, dict],
    model_names: list[str],
    higher: dict[str, bool] | None = None,
) -> str:
    """Every evaluated kind side by side on the first evaluated metric: the mean over the targets, the
    gap to the merge, each method's validation choice and score."""
    if not results.get("merged"):
        return ""
    metric = next(iter(higher)) if higher else sorted(results["merged"])[0].rsplit("/", 1)[-1]
    up = higher_is_better(metric, higher)
    keys = [k for k in results["merged"] if k.rsplit("/", 1)[-1] == metric]
    mean = {k: float(np.mean([results[k][x] for x in keys if x in results[k]])) for k in kinds_of(results)}
    lines = [
        f"| | mean {metric} {'↑' if up else '↓'} | vs merged | chosen on validation | validation score |",
        "|---|---|---|---|---|",
    ]
    for kind in kinds_of(results):
        label = f"**merged ({method})**" if kind == "merged" else kind
        s = searches.get(method if kind == "merged" else kind)
        chosen = choice_text(s, model_names) if s else "—"
        score = f"{s['candidates'][s['best']]['score']:.4f}" if s else "—"
        gap = "" if kind == "merged" else f"{mean[kind] - mean['merged']:+.4f}"
        lines.append(f"| {label} | {mean[kind]:.4f} | {gap} | {chosen} | {score} |")
    return "\n".join(lines) + f"\n\nMean over the targets' {metric} on the evaluation split."


def report_markdown(
    name: str,
    method: str,
    model_names: list[str],
    weights: list[float],
    results: dict[str, dict[str, float]],
    searches: dict[str, dict],
    decisions: dict[str, dict],
    outputs: dict[str, str],
    plots: list[str],
    higher: dict[str, bool] | None = None,
    inline_plots: bool = False,
) -> str:
    """The pipeline run as one page: chosen λ, the results table, promotion decisions, candidates, the
    plots (by file name for report.md beside them; inline for the Prefect artifact)."""
    from fishmerge.fisher.report import MAX_INLINE_PNGS, png_markdown

    lam = ", ".join(f"{n}={w:.3f}" for n, w in zip(model_names, weights))
    if method in searches and varied_params(searches[method]):
        best = searches[method]["candidates"][searches[method]["best"]]
        lam += " (" + ", ".join(f"{n}={best['params'][n]:g}" for n in varied_params(searches[method])) + ")"
    decision_rows = (
        "\n".join(
            f"| {model} | v{d.get('version')} | {d.get('decision')} | {d.get('reason')} |"
            for model, d in decisions.items()
        )
        or "| — | — | not registered | — |"
    )
    out_rows = "\n".join(f"| {t} | `{p}` |" for t, p in outputs.items())
    cand = "\n\n".join(f"### {label}\n{candidates_table(s, model_names)}" for label, s in searches.items())
    pictures, budget = [], MAX_INLINE_PNGS  # inline plots share one budget: the artifact stays bounded
    for p in plots:
        pictures.append(png_markdown(p, Path(p).stem.replace("_", " "), inline_plots, max(budget, 0)))
        budget -= len(pictures[-1]) * 3 // 4  # base64 carries 3 bytes in 4 characters
    pics = "\n\n".join(pictures)
    return f"""# fishmerge pipeline: {name}

Method **{method}**, chosen λ: {lam}.

## Methods side by side
{methods_table(method, results, searches, model_names, higher)}

## Results
{results_table(results, higher, method)}

## Registry and promotion
| registered model | version | decision | reason |
|---|---|---|---|
{decision_rows}

## Merged models
| target | folder |
|---|---|
{out_rows}

## Search candidates
{cand}

## Plots
{pics}
"""


def merge_report_markdown(plan_text: str, summary: dict, fishers: dict[str, str]) -> str:
    """The merge as one page: output folders, timings, the Fishers estimated or reused, the plan."""
    rows = "\n".join(f"| {t} | `{p}` |" for t, p in summary["targets"].items())
    fisher_rows = "\n".join(f"| {n} | `{u}` |" for n, u in fishers.items()) or "| — | — |"
    return f"""# Merge {summary["plan_id"]} ({summary["method"]})

## Outputs
| target | folder |
|---|---|
{rows}

## Timings
| step | seconds |
|---|---|
| pre-passes (norms, thresholds) | {summary["precompute_s"]} |
| merge | {summary["merge_s"]} |
| total | {summary["wall_s"]} |

Blocks run: {summary["blocks"]}; resumed from an interrupted run: {summary["blocks_resumed"]};
bytes written: {summary["bytes_written"]:,}.

## Fishers estimated or reused for this merge
| model | store |
|---|---|
{fisher_rows}

## Plan
```
{plan_text}
```
"""


def candidate_rows(search: dict, model_names: list[str]) -> list[dict]:
    """One row per λ candidate of a search: its λ, its score, whether it won (a table artifact)."""
    return [
        {
            "candidate": i,
            **{f"lambda_{n}": round(w, 4) for n, w in zip(model_names, c["weights"])},
            **{n: c["params"][n] for n in varied_params(search)},
            search["metric"]: round(c["score"], 4),
            "best": i == search["best"],
        }
        for i, c in enumerate(search["candidates"])
    ]


def write_pipeline_report(
    cfg: MergeConfig,
    fishers: dict[str, str],
    weights: list[float],
    searches: dict[str, dict],
    results: dict[str, dict[str, float]],
    tracked: dict,
    merged_dirs: dict[str, str],
) -> dict:
    """report.md, the plots and pipeline.json beside the merged folders.

    Returns {'report': path, 'plots': [paths], 'markdown': report.md's text, 'artifact_markdown': the same
    with the plots inline, 'tables': {search label: candidate rows}}.
    """
    from fishmerge.fisher.report import plot_layer_mass, tensor_stats

    out = Path(cfg.output)
    names = [m.name for m in cfg.models]
    plots = []
    if searches:
        plots.append(str(plot_lambda_curve(searches, names, out / "lambda_curve.png")))
    higher = directions(cfg)
    metric = next(iter(higher), "accuracy")
    if results.get("merged"):
        plots.append(str(plot_task_bars(results, metric, out / "tasks.png", higher.get(metric, True))))
    for name, uri in fishers.items():
        plots.append(plot_layer_mass(tensor_stats(uri), f"Fisher of {name}", str(out / f"fisher_mass_{name}.png")))
    decisions = tracked.get("decisions", {})
    args = (cfg.name, cfg.method, names, weights, results, searches, decisions, merged_dirs, plots, higher)
    md = report_markdown(*args)
    (out / "report.md").write_text(md)
    summary = {
        "name": cfg.name,
        "method": cfg.method,
        "weights": dict(zip(names, weights)),
        "results": results,
        "searches": searches,
        "decisions": decisions,
        "fishers": fishers,
        "run_id": tracked.get("run_id"),
    }
    storage.write_json(str(out / "pipeline.json"), summary)
    return {
        "report": str(out / "report.md"),
        "plots": plots,
        "markdown": md,
        "artifact_markdown": report_markdown(*args, inline_plots=True),
        "tables": {label: candidate_rows(s, names) for label, s in searches.items()},
    }
