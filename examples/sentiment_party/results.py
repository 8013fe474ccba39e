"""Reproduce docs/results_sentiment_party.md: the whole example (preparation + pipeline) over several seeds.

For each seed: fine-tune both tasks from the pretrained MiniLM with that seed
(`prepare.py --seed S`), run the pipeline config with paths pointed at that seed's inputs (no
registration: results only), and collect each task's test accuracy for the fine-tuned model
alone, isotropic merging (best λ), Fisher merging (best λ) and output ensembling. Writes
docs/results_sentiment_party.md (table: mean ± std over seeds, per-seed gaps), docs/results_lambda.png,
docs/results_raw.json, and docs/results_variants.md (every Fisher variant run so far under the
root). Each seed runs in its own processes; reruns come from the caches. Usage:

    .venv/bin/python examples/sentiment_party/results.py --seeds 0 1 2
    .venv/bin/python examples/sentiment_party/results.py --variant normalize empirical  # investigations
    .venv/bin/python examples/sentiment_party/results.py --variant default normalize --report-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

DOC = "results_sentiment_party.md"  # docs/results.md is the method comparison's (examples/method_comparison)
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VARIANTS = {  # fisher-block overrides for investigations (never tuned on the test split)
    "default": {},
    "normalize": {"normalize": True},
    "examples2048": {"examples": 2048},
    "empirical": {"estimator": "empirical"},
    "floor1e-8": {"floor": 1.0e-8},
    "no_favor": {"favor_target": False},
}


def run_seed(seed: int, variant: str, root: Path) -> dict:
    """Prepare (cached per seed) and run the pipeline for one seed; returns pipeline.json."""
    from fishmerge.merge.config import load_merge_config

    inputs = root / f"seed{seed}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "prepare.py"), "--out", str(inputs), "--seed", str(seed)], check=True)
    prep_s = time.perf_counter() - t0
    cfg = yaml.safe_load((HERE / "pipeline.yaml").read_text())
    # this study is Fisher against isotropic merging (the demo's config merges by regmean and compares more)
    cfg.update(method="fisher")
    for key in ("base", "regmean"):
        cfg.pop(key, None)
    cfg["fisher"].pop("statistics", None)
    cfg["evaluate"]["baselines"] = ["originals", "isotropic", "ensemble"]
    for m in cfg["models"]:
        m["path"] = str(inputs / "models" / m["name"])
        m["data"]["path"] = str(inputs / "data" / m["name"])
    cfg["fisher"].update(VARIANTS[variant])
    cfg["name"] = f"{cfg['name']}-results-{variant}"
    cfg["output"] = str(root / f"merged-{variant}-seed{seed}")
    cfg["register"] = None
    cfg["mlflow"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    path = root / f"pipeline-{variant}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t1 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fishmerge.flows.cli", "run", str(path), "--no-progress"], check=True, cwd=REPO
    )
    out = json.loads((Path(cfg["output"]) / "pipeline.json").read_text())
    out["seconds"] = {"prepare": round(prep_s, 1), "pipeline": round(time.perf_counter() - t1, 1)}
    out["fisher"] = load_merge_config(str(path)).fisher.model_dump()  # with the defaults (seed, …)
    out["diagnostics"] = diagnostics(path, out)
    return out


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: list[float]) -> list[float]:
    order = np.argsort(values)
    cum = np.cumsum(weights[order], dtype=np.float64)
    return [float(values[order][np.searchsorted(cum, q * cum[-1])]) for q in qs]


def diagnostics(config: Path, run: dict) -> dict:
    """Why Fisher merging can (or cannot) differ from isotropic merging on these two models.

    All at the uniform λ (a point fixed in advance, the same for every seed and variant; no search):
    - `log_fisher_corr`: correlation of log10 Fisher between the two models over the merged (body)
      entries where both are > 0; near 1 means both tasks weight the same parameters.
    - `below_floor`: per model, fraction of the non-embedding body entries whose Fisher is below the
      floor (with favor_target only the target's Fisher is raised to it).
    - `effective_lambda_q10/50/90`: per entry, where the Fisher merge puts the target-0 output
      between the two models (1 = model 0, 0 = model 1), quantiles weighted by the squared difference
      of the models; isotropic merging puts every entry at 0.5.
    - `distance_to_isotropic`: ‖θ_Fisher − θ_iso‖ / ‖θ_0 − θ_1‖ (target 0).
    - `uniform_lambda_test_accuracy`: Fisher and isotropic merging on the test split.
    """
    from fishmerge.merge.config import load_merge_config
    from fishmerge.merge.plan import plan_from_config
    from fishmerge.pipeline.baselines import reference_plan
    from fishmerge.pipeline.search import Scorer, load_inputs, merge_in_memory, score_candidate

    names = run["searches"]["fisher"]["names"]
    if len(names) != 2:
        raise SystemExit(f"diagnostics are for two models; this run merges {len(names)}")
    uniform = [0.5, 0.5]
    cfg = load_merge_config(str(config))
    plan = plan_from_config(str(config), run["fishers"], weights=uniform, check_output=False)
    inputs = load_inputs(plan)
    keys = list(plan.shared)
    flat = lambda d, ks=keys: np.concatenate([d[k].ravel() for k in ks])  # noqa: E731
    f = [flat(d) for d in inputs.fishers]
    both = (f[0] > 0) & (f[1] > 0)
    corr = float(np.corrcoef(np.log10(f[0][both]), np.log10(f[1][both]))[0, 1])
    body = [k for k in keys if "embeddings" not in k]
    below = [round(float((flat(d, body) < plan.params.floor).mean()), 3) for d in inputs.fishers]
    t0, t1 = (flat(d) for d in inputs.thetas)
    fm = flat(merge_in_memory(plan, inputs, uniform, 0))
    iso = flat(merge_in_memory(reference_plan(plan), inputs, uniform, 0))
    diff = t0.astype(np.float64) - t1
    moved = np.abs(diff) > 1e-6
    eff = (fm[moved] - t1[moved]) / diff[moved]
    q = weighted_quantiles(eff, diff[moved] ** 2, [0.1, 0.5, 0.9])
    ev = cfg.evaluate
    scorer = Scorer(cfg, plan, ev.split, ev.limit, cfg.execution.device, ev.batch_size, ev.max_length)
    at_uniform: dict[str, dict[str, float]] = {}
    for label, p in (("fisher", plan), ("isotropic", reference_plan(plan))):
        scorer.plan = p  # the same models and rows, scored with each method's merge in turn
        at_uniform[label] = score_candidate(scorer, inputs, uniform, "accuracy")["per_task"]
    return {
        "at_lambda": uniform,
        "uniform_lambda_test_accuracy": at_uniform,
        "log_fisher_corr": round(corr, 3),
        "fisher_mean": [float(x.mean()) for x in f],
        "below_floor": below,
        "effective_lambda_q10": round(q[0], 3),
        "effective_lambda_q50": round(q[1], 3),
        "effective_lambda_q90": round(q[2], 3),
        "distance_to_isotropic": round(float(np.linalg.norm(fm - iso) / np.linalg.norm(diff)), 3),
    }


def summarise(runs: dict[int, dict], variant: str) -> tuple[str, dict]:
    tasks = sorted({k.split("/")[0] for k in next(iter(runs.values()))["results"]["merged"]})
    kinds = [
        ("originals", "fine-tuned alone"),
        ("isotropic", "isotropic (best λ)"),
        ("merged", "Fisher (best λ)"),
        ("ensemble", "output ensemble"),
    ]
    acc = {kind: {t: [r["results"][kind][f"{t}/accuracy"] for r in runs.values()] for t in tasks} for kind, _ in kinds}
    lines = ["| task | " + " | ".join(label for _, label in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for t in [*tasks, "mean"]:
        cells = []
        for kind, _ in kinds:
            vals = np.array(acc[kind][t]) if t != "mean" else np.mean([acc[kind][x] for x in tasks], axis=0)
            cells.append(f"{vals.mean():.3f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    mean_f = np.mean([acc["merged"][t] for t in tasks], axis=0)
    mean_i = np.mean([acc["isotropic"][t] for t in tasks], axis=0)
    gaps = mean_f - mean_i
    stats = {
        "gap_per_seed": [round(float(g), 4) for g in gaps],
        "gap_mean": float(gaps.mean()),
        "gap_std": float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0,
        "fisher_std": float(mean_f.std(ddof=1)) if len(gaps) > 1 else 0.0,
        "iso_std": float(mean_i.std(ddof=1)) if len(gaps) > 1 else 0.0,
        "fisher_wins": int((gaps > 0).sum()),
    }
    return "\n".join(lines), stats


def plot(runs: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False, sharey=True)
    for ax, (seed, r) in zip(axes[0], sorted(runs.items())):
        names = r["searches"]["fisher"]["names"]  # model order (pipeline.json sorts dict keys)
        for label, s in r["searches"].items():
            xs = [c["weights"][0] for c in s["candidates"]]
            ax.plot(xs, [c["score"] for c in s["candidates"]], marker="o", label=label)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel(f"λ of {names[0]}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean validation accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(runs: dict[int, dict], table: str, stats: dict, argv: str) -> str:
    """docs/results_sentiment_party.md: the table, the plain verdict, the plot, the settings and timings."""
    first = next(iter(runs.values()))
    n, wins, gap = len(runs), stats["fisher_wins"], stats["gap_mean"]
    per_seed = ", ".join(f"{g:+.3f}" for g in stats["gap_per_seed"])
    if n == 1:
        verdict = f"Fisher − isotropic mean test accuracy: {gap:+.3f}, one seed: no spread to judge it against."
    else:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.975, n - 1)) * stats["gap_std"] / np.sqrt(n)  # paired over seeds
        interval = f"95 % interval of the paired gap over {n} seeds: {gap - half:+.3f} … {gap + half:+.3f}"
        if gap - half > 0:
            claim = f"Fisher merging beat isotropic merging on mean test accuracy by {gap:+.3f}"
        elif gap + half < 0:
            claim = f"Isotropic merging beat Fisher merging on mean test accuracy by {-gap:+.3f}"
        else:
            claim = (
                f"Fisher merging did not clearly beat isotropic merging: mean gap {gap:+.3f}, "
                f"Fisher ahead in {wins} of {n} seeds"
            )
        verdict = (
            f"{claim} (gap per seed {per_seed}; {interval}). Seed spread: std over seeds of the mean "
            f"accuracy, Fisher {stats['fisher_std']:.3f}, isotropic {stats['iso_std']:.3f}; std of the paired "
            f"gap {stats['gap_std']:.3f}. The seeds share the data splits, so this spread leaves out the "
            f"sampling noise of the test rows."
        )
    timing = "\n".join(
        f"| {s} | {r['seconds']['prepare']} | {r['seconds']['pipeline']} | "
        f"{'yes' if all(x.get('cached') for x in r['searches'].values()) else 'no'} |"
        for s, r in sorted(runs.items())
    )

    def best(r: dict, label: str) -> str:
        s = r["searches"][label]
        return ", ".join(f"{n}={w:.2f}" for n, w in zip(s["names"], s["candidates"][s["best"]]["weights"]))

    lam = "\n".join(f"| {s} | {best(r, 'fisher')} | {best(r, 'isotropic')} |" for s, r in sorted(runs.items()))
    f = first["fisher"]
    diags = [r["diagnostics"] for r in runs.values() if "at_lambda" in (r.get("diagnostics") or {})]
    diag = (
        f"correlation of log Fisher between the two models {np.mean([d['log_fisher_corr'] for d in diags]):.2f}; "
        f"at the uniform λ, effective per-entry λ of {first['searches']['fisher']['names'][0]} (10–90 % quantiles) "
        f"{np.mean([d['effective_lambda_q10'] for d in diags]):.2f}–"
        f"{np.mean([d['effective_lambda_q90'] for d in diags]):.2f} where isotropic merging has 0.5 everywhere, and "
        f"‖θ_Fisher − θ_iso‖ = {np.mean([d['distance_to_isotropic'] for d in diags]):.2f} × ‖θ_0 − θ_1‖."
        if diags
        else "not computed."
    )
    uniform = [
        r["diagnostics"]["uniform_lambda_test_accuracy"]
        for r in runs.values()
        if "uniform_lambda_test_accuracy" in (r.get("diagnostics") or {})
    ]
    if uniform:
        means = {k: [np.mean(list(u[k].values())) for u in uniform] for k in ("fisher", "isotropic")}
        gaps = np.array(means["fisher"]) - np.array(means["isotropic"])
        untuned = (
            f"At the uniform λ (the config's default weights, no search), mean test accuracy: Fisher "
            f"{np.mean(means['fisher']):.3f}, isotropic {np.mean(means['isotropic']):.3f} (gap per seed "
            f"{', '.join(f'{g:+.3f}' for g in gaps)})."
        )
    else:
        untuned = ""
    return f"""# Results: merging real fine-tuned MiniLM models (sentiment + debate party)

Produced by `python examples/sentiment_party/results.py {argv}` (the whole preparation and pipeline
per seed; seeds {", ".join(map(str, sorted(runs)))}). The seed drives the fine-tuning (initialisation of the
heads, order of examples); data splits are fixed. Test accuracy per task, mean ± std over seeds.
λ is chosen on the validation split (11-point grid); the test split is used only for these numbers.

{table}

**Verdict.** {verdict}

{untuned}

Fisher examples: {f["examples"]} rows of each task's **train** split (never validation or test), the same
rows for every seed (drawn with `fisher.seed` {f.get("seed", 0)}, `fishmerge.io.data.select_indices`), truncated to
{f["max_length"]} tokens; estimator `{f["estimator"]}` (the expectation over the model's own predicted
label distribution, per example), floor {f["floor"]}, favor_target {f["favor_target"]}, normalize
{f["normalize"]}. Output ensemble: equal weights over both bodies under each target's head.

What the Fisher did to the merge (seed mean; definitions in `results.py:diagnostics`): {diag}
Other Fisher settings (normalisation, more examples, the empirical estimator, another floor,
no favour for the target) against the same isotropic baseline: [results_variants.md](results_variants.md).

![λ curves](results_lambda.png)

Chosen λ per seed (Fisher | isotropic):

| seed | Fisher | isotropic |
|---|---|---|
{lam}

Timings of this invocation (seconds, this machine, 2 cores; a rerun finds the fine-tuned models,
Fishers, searches and evaluations in its caches):

| seed | prepare | pipeline | searches from cache |
|---|---|---|---|
{timing}

Raw numbers: `docs/results_raw.json`. Notes on these numbers: `docs/results_notes.md` (hand-written).
"""


def inner_mean(search: dict) -> float:
    """Mean search score over the candidates with every λ strictly between 0 and 1."""
    return float(np.mean([c["score"] for c in search["candidates"] if 0 < min(c["weights"]) and max(c["weights"]) < 1]))


def variants_markdown(all_runs: dict[str, dict[int, dict]]) -> str:
    """docs/results_variants.md: each Fisher variant against the same isotropic baseline, same seeds."""
    rows = []
    for variant, runs in all_runs.items():
        _, stats = summarise(runs, variant)
        tasks = sorted({k.split("/")[0] for k in next(iter(runs.values()))["results"]["merged"]})
        test = [np.mean([r["results"]["merged"][f"{t}/accuracy"] for t in tasks]) for r in runs.values()]
        val = [r["searches"]["fisher"]["candidates"][r["searches"]["fisher"]["best"]]["score"] for r in runs.values()]
        iso_val = [
            r["searches"]["isotropic"]["candidates"][r["searches"]["isotropic"]["best"]]["score"] for r in runs.values()
        ]
        inner = {
            label: np.mean([inner_mean(r["searches"][label]) for r in runs.values()])
            for label in ("fisher", "isotropic")
        }
        diag = [r["diagnostics"] for r in runs.values() if "at_lambda" in (r.get("diagnostics") or {})]
        u = [
            np.mean(list(x["uniform_lambda_test_accuracy"]["fisher"].values()))
            - np.mean(list(x["uniform_lambda_test_accuracy"]["isotropic"].values()))
            for x in diag
        ]
        d = (
            f"{np.mean(u):+.3f} | "
            f"{np.mean([x['effective_lambda_q10'] for x in diag]):.2f}–{np.mean([x['effective_lambda_q90'] for x in diag]):.2f}"
            f" | {np.mean([x['distance_to_isotropic'] for x in diag]):.2f}"
            f" | {np.mean([x['log_fisher_corr'] for x in diag]):.2f}"
            if diag
            else "– | – | – | –"
        )
        rows.append(
            f"| {variant} | {json.dumps(VARIANTS[variant]) if VARIANTS[variant] else 'pipeline.yaml as is'}"
            f" | {', '.join(map(str, sorted(runs)))} | {np.mean(val):.3f} | {np.mean(iso_val):.3f}"
            f" | {inner['fisher']:.3f} | {inner['isotropic']:.3f}"
            f" | {np.mean(test):.3f} | {stats['gap_mean']:+.3f} ± {stats['gap_std']:.3f}"
            f" | {stats['fisher_wins']}/{len(runs)} | {d} |"
        )
    return (
        "# Fisher variants on the sentiment + debate example\n\n"
        "Produced by `examples/sentiment_party/results.py --variant …` (the variants saved for these seeds).\n"
        "Each variant changes only the `fisher:` block of `examples/sentiment_party/pipeline.yaml`; the\n"
        "fine-tuned models, the data, the λ grid (on validation) and the isotropic baseline are the same\n"
        "(the isotropic search and baselines come from one cache). Columns: mean over tasks of accuracy;\n"
        "val = best λ-search score on the validation split (500 rows per task), test = at that λ;\n"
        "λ-mean = the validation score averaged over the inner grid points (λ in 0.1 … 0.9): how good the\n"
        "merge is when λ is not tuned;\n"
        "gap = Fisher − isotropic mean test accuracy, mean ± std over seeds; effective λ = where the\n"
        "Fisher merge puts each entry between the two models at the uniform λ (weighted 10 %–90 %\n"
        "quantiles; isotropic merging puts all at 0.5); distance = ‖θ_Fisher − θ_iso‖ / ‖θ_0 − θ_1‖ at the\n"
        "uniform λ; uniform-λ gap = Fisher − isotropic mean test accuracy, both at the uniform λ (no\n"
        "search); corr = correlation of log Fisher of the two models.\n\n"
        "| variant | fisher overrides | seeds | Fisher val | isotropic val | Fisher val, λ-mean | isotropic val, λ-mean"
        " | Fisher test | gap vs isotropic | Fisher ahead | uniform-λ gap | effective λ 10–90 % | distance to iso"
        " | corr |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def saved_runs(root: Path, variant: str, seeds: list[int]) -> dict[int, dict]:
    """The saved runs of a variant for these seeds; a clear exit when any is missing."""
    saved = root / f"runs-{variant}.json"
    if not saved.exists():
        raise SystemExit(f"no saved runs for variant '{variant}' under {root}: run it without --report-only first")
    found = {int(s): r for s, r in json.loads(saved.read_text()).items()}
    missing = [s for s in seeds if s not in found]
    if missing:
        raise SystemExit(f"variant '{variant}' has no saved run for seeds {missing}: run them without --report-only")
    return {s: found[s] for s in seeds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", choices=list(VARIANTS), nargs="+", default=["default"])
    ap.add_argument("--root", default=str(REPO / ".fishmerge" / "results"))
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the docs from the saved runs-*.json")
    ap.add_argument("--diagnose", action="store_true", help="with --report-only: recompute the diagnostics")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for variant in args.variant:
        saved = root / f"runs-{variant}.json"
        if args.report_only:
            runs = saved_runs(root, variant, args.seeds)
            if args.diagnose:
                for s, r in runs.items():
                    r["diagnostics"] = diagnostics(root / f"pipeline-{variant}-seed{s}.yaml", r)
                everything = {int(k): v for k, v in json.loads(saved.read_text()).items()}
                saved.write_text(json.dumps({**everything, **runs}, indent=1))
        else:
            runs = {s: run_seed(s, variant, root) for s in args.seeds}
            saved.write_text(json.dumps(runs, indent=1))
        table, stats = summarise(runs, variant)
        print(f"variant {variant}:\n{table}\n{json.dumps(stats, indent=1)}")
        if variant == "default":
            plot(runs, Path(args.out) / "results_lambda.png")
            (Path(args.out) / DOC).write_text(results_markdown(runs, table, stats, " ".join(sys.argv[1:])))
            keep = ("weights", "results", "seconds", "fisher", "diagnostics")
            (Path(args.out) / "results_raw.json").write_text(
                json.dumps({s: {k: r.get(k) for k in keep} for s, r in runs.items()}, indent=1)
            )
        found = [v for v in VARIANTS if (root / f"runs-{v}.json").exists()]
        all_runs = {}
        for v in found:  # the variants saved for exactly these seeds
            try:
                all_runs[v] = saved_runs(root, v, args.seeds)
            except SystemExit:
                continue
        (Path(args.out) / "results_variants.md").write_text(variants_markdown(all_runs))


if __name__ == "__main__":
    main()
