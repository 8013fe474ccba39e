"""Wall time of the pipeline's validation searches on the demo (`make demo`'s config), search by search.

Each compared method's search is timed as the pipeline runs it, cache aside: the targets' models and
validation rows loaded (`Scorer`), the method's inputs read (`load_inputs`), every candidate merged in
memory and scored (`search`). The Fishers and Grams are the demo's own stores: run `make demo` first
(its `pipeline.json` names them).

  python benchmarks/search_cost.py [--config examples/sentiment_party/pipeline.yaml]
                                   [--methods isotropic,fisher] [--json out.json]

The set-up below repeats `fishmerge.pipeline.baselines.cached_search` (scoring sizes, Scorer, candidate
pairs) without its cache; keep the two in step. Only the APIs that are unchanged since before
length-batched scoring are used (MergeConfig loading, `baselines.method_plan`, `Scorer`, `load_inputs`,
`candidates`, `search`), so the same script times an older checkout:
`PYTHONPATH=<worktree>/lib python benchmarks/search_cost.py ...`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples" / "sentiment_party" / "pipeline.yaml"))
    ap.add_argument(
        "--methods", default=None, help="comma-separated; default: the config's method and the compared ones"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import fishmerge
    import torch
    from fishmerge.merge.config import load_merge_config
    from fishmerge.pipeline import baselines
    from fishmerge.pipeline.search import Scorer, candidates, load_inputs, search

    cfg = baselines.settle_metrics(load_merge_config(args.config))
    summary = json.loads((Path(cfg.output) / "pipeline.json").read_text())
    fishers = summary["fishers"]
    methods = args.methods.split(",") if args.methods else cfg.merge_methods
    s, ev = cfg.search, cfg.evaluate
    sizes = (ev.batch_size, ev.max_length) if ev else (32, 128)
    rows = []
    total = time.perf_counter()
    for method in methods:
        t0 = time.perf_counter()
        plan = baselines.method_plan(cfg, fishers, method)
        scorer = Scorer(cfg, plan, s.split, s.limit, cfg.execution.device, *sizes, metrics=[s.metric])
        t1 = time.perf_counter()
        inputs = load_inputs(plan)
        t2 = time.perf_counter()
        pairs = plan.merge_method.search_candidates(
            plan.params, candidates(len(plan.models), s.strategy, s.points, s.seed)
        )
        found = search(
            scorer, inputs, [w for _, w in pairs], s.metric, s.workers, progress=False, params=[p for p, _ in pairs]
        )
        t3 = time.perf_counter()
        best = found["candidates"][found["best"]]
        rows.append(
            {
                "method": method,
                "candidates": len(pairs),
                "scorer_s": round(t1 - t0, 2),
                "inputs_s": round(t2 - t1, 2),
                "search_s": round(t3 - t2, 2),
                "total_s": round(t3 - t0, 2),
                "per_candidate_s": round((t3 - t2) / len(pairs), 3),
                "best": {"weights": best["weights"], "score": best["score"]},
                "scores": [c["score"] for c in found["candidates"]],
            }
        )
        print(
            f"{method:16s} {len(pairs):3d} candidates: scorer {t1 - t0:5.1f}s  inputs {t2 - t1:5.1f}s  "
            f"search {t3 - t2:6.1f}s ({(t3 - t2) / len(pairs):.2f}s/candidate)  best {best['score']:.4f}",
            flush=True,
        )
    elapsed = time.perf_counter() - total
    print(f"all searches: {elapsed:.1f}s")
    if args.json:
        out = {
            "fishmerge": getattr(fishmerge, "__file__", ""),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "rows_per_task": s.limit,
            "total_s": round(elapsed, 2),
            "searches": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
