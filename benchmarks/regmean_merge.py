"""RegMean merge of three ~1.1 GB Llama-shaped models out of core: time and memory against the budget.

Inputs: the synthetic `LlamaForCausalLM` checkpoints of `merge_throughput.py` (random bf16, untied
lm_head; built here if absent, cached under `.fishmerge/bench/merge/`), each with a synthetic Gram
store (format v2, Grams only): for every distinct Linear input (q/k/v share one, gate/up share one,
o_proj, down_proj, lm_head) G = T·(U Uᵀ/r + diag(d)) with U of rank r = 32 and d > 0, float32, as
a sum over T = 4096 tokens — positive definite, so the closed form is solvable. (Real Grams from
real data cost a forward pass per token; the merge, which this measures, reads and solves the same
shapes either way.) Then `fishmerge merge` method regmean (rest: isotropic, memory_limit 2GB, one
target) runs as a subprocess, timed, with its peak anonymous memory sampled every 50 ms, next to
the isotropic merge of the same models for scale. The result goes to
`docs/benchmarks_regmean_cpu.json` and a section of `docs/benchmarks.md`.

  python benchmarks/regmean_merge.py [--size-gb 1.1] [--models 3] [--threads 1] [--memory-limit 2GB]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_throughput as mt  # noqa: E402  (the shared inputs and measurement)

ROOT = mt.ROOT
JSON_OUT = ROOT / "docs" / "benchmarks_regmean_cpu.json"
DOC_BEGIN, DOC_END = "<!-- regmean_merge:begin -->", "<!-- regmean_merge:end -->"
TOKENS = 4096
RANK = 32


def gram_inputs(config) -> dict[str, tuple[list[str], int]]:
    """First weight key -> (every weight reading that input, its width), as the engine groups them."""
    out = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.q_proj.weight"] = (
            [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"],
            config.hidden_size,
        )
        out[f"{p}.self_attn.o_proj.weight"] = ([f"{p}.self_attn.o_proj.weight"], config.hidden_size)
        out[f"{p}.mlp.gate_proj.weight"] = (
            [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"],
            config.hidden_size,
        )
        out[f"{p}.mlp.down_proj.weight"] = ([f"{p}.mlp.down_proj.weight"], config.intermediate_size)
    out["lm_head.weight"] = (["lm_head.weight"], config.hidden_size)
    return out


def write_gram_store(uri: Path, model_dir: Path, config, seed: int) -> None:
    """A v2 store holding synthetic positive definite Grams (sums over TOKENS rows) for `model_dir`."""
    from fishmerge.fisher.store import abort_store, begin_store, commit_store, create_fisher_array, gram_path
    from fishmerge.io.checkpoint import cached_model_fingerprint

    rng = np.random.default_rng(seed)
    staging, group = begin_store(str(uri))
    try:
        gram_map = {}
        for first, (weights, width) in gram_inputs(config).items():
            u = rng.standard_normal((width, RANK), dtype=np.float32)
            g = (u @ u.T) / RANK
            g[np.diag_indices(width)] += rng.uniform(0.5, 1.5, width).astype(np.float32)
            g *= TOKENS
            create_fisher_array(group, gram_path(first), g.shape)[...] = g
            for w in weights:
                gram_map[w] = {"array": gram_path(first), "tokens": TOKENS, "layout": "out_in"}
        attrs = {
            "estimator": "synthetic",
            "n_examples": 1,
            "model_fingerprint": cached_model_fingerprint(model_dir),
            "data_fingerprint": "synthetic",
            "statistics": ["gram"],
            "grams": gram_map,
        }
        commit_store(staging, str(uri), group, attrs)
    except BaseException:
        abort_store(staging)
        raise


def make_inputs(size_gb: float, k: int) -> tuple[list[Path], list[Path], dict]:
    config = mt.llama_config(size_gb)
    base = mt.BENCH_DIR / f"llama-h{config.hidden_size}-l{config.num_hidden_layers}-v{mt.VOCAB}"
    base.mkdir(parents=True, exist_ok=True)
    models, stores = [], []
    for i in range(k):
        m, s = base / f"m{i}", base / f"m{i}.grams.zarr"
        if not (base / f"m{i}.model.done").exists():
            print(f"[inputs] writing {m} …", file=sys.stderr, flush=True)
            mt.write_model(m, config, seed=i)
            (base / f"m{i}.model.done").write_text("ok")
        if not (base / f"m{i}.grams.done").exists():
            print(f"[inputs] writing {s} …", file=sys.stderr, flush=True)
            write_gram_store(s, m, config, seed=2000 + i)
            (base / f"m{i}.grams.done").write_text("ok")
        models.append(m)
        stores.append(s)
    shape = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    return models, stores, shape


def merge_config(models, stores, method: str, out: Path, memory_limit: str, path: Path) -> Path:
    import yaml

    cfg = {
        "name": f"bench-{method}",
        "method": method,
        "models": [
            {"name": m.name, "path": str(m), "weight": 1.0, **({"fisher": str(s)} if method == "regmean" else {})}
            for m, s in zip(models, stores)
        ],
        "regmean": {"alpha": 1.0, "rest": "isotropic"},
        "targets": [models[0].name],
        "output": str(out),
        "memory_limit": memory_limit,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def planned(cfg: Path, threads: int) -> dict:
    from fishmerge.merge.config import load_merge_config
    from fishmerge.merge.plan import build_plan

    plan = build_plan(load_merge_config(cfg), threads=threads, overwrite=True)
    return {
        "peak_memory_estimate_gb": plan.peak_memory / mt.GB,
        "bytes_read_gb": plan.bytes_read / mt.GB,
        "gram_merged_tensors": len(plan.gram_layouts),
        "threads": plan.threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.1)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--warm-cache", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from fishmerge.sizes import parse_size

    args.memory_limit_bytes = parse_size(args.memory_limit)
    models, stores, shape = make_inputs(args.size_gb, args.models)
    work, outdir = mt.BENCH_DIR / "work", mt.BENCH_DIR / "out"
    work.mkdir(parents=True, exist_ok=True)
    outdir.mkdir(parents=True, exist_ok=True)
    result = {
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/regmean_merge.py " + " ".join(sys.argv[1:]),
        "machine": mt.machine(),
        "load_avg_start": os.getloadavg(),
        "memory_limit": args.memory_limit,
        "inputs": {
            "models": len(models),
            "llama": shape,
            "model_gb_each": sum(f.stat().st_size for f in models[0].glob("*.safetensors")) / mt.GB,
            "gram_store_gb_each": mt.tree_bytes(stores[0]) / mt.GB,
            "grams_per_model": len(gram_inputs(mt.llama_config(args.size_gb))),
        },
        "runs": {},
    }
    with contextlib.ExitStack() as stack:
        env = mt.prefect_env(stack)
        for method in ("isotropic", "regmean"):
            out = outdir / f"bench-{method}"
            cfg = merge_config(models, stores, method, out, args.memory_limit, work / f"{method}.yml")
            plan = planned(cfg, args.threads)
            cmd = [str(mt.FISHMERGE), "merge", str(cfg), "--overwrite", "--threads", str(args.threads), "--no-progress"]
            inputs = models + (stores if method == "regmean" else [])
            t0 = time.perf_counter()
            res = mt.one_step(f"fishmerge_{method}", cmd, inputs=inputs, output=out, work=work, args=args, env=env)
            res["plan"] = plan
            res["wall_s_outer"] = time.perf_counter() - t0
            result["runs"][method] = res
    result["load_avg_end"] = os.getloadavg()
    JSON_OUT.write_text(json.dumps(result, indent=2, default=str))
    write_doc(result)
    print(
        json.dumps(
            {k: {x: v.get(x) for x in ("wall_s", "cpu_s", "peak_rss_anon_gb", "rc")} for k, v in result["runs"].items()}
        )
    )


def write_doc(r: dict) -> None:
    i, runs = r["inputs"], r["runs"]
    lines = [
        DOC_BEGIN,
        f"Command: `{r['command']}` ({r['date']}, {r['machine'].get('cpu', '?')}, "
        f"{r['machine'].get('cores', '?')} cores; load {r['load_avg_start'][0]:.2f} → {r['load_avg_end'][0]:.2f}).",
        f"Inputs: {i['models']} synthetic Llama checkpoints (hidden {i['llama']['hidden_size']}, intermediate "
        f"{i['llama']['intermediate_size']}, {i['llama']['num_hidden_layers']} layers, vocabulary "
        f"{i['llama']['vocab_size']}), {i['model_gb_each']:.2f} GB bf16 each, with a Gram-only v2 store of "
        f"{i['gram_store_gb_each']:.2f} GB each ({i['grams_per_model']} Grams). One target, "
        f"`memory_limit: {r['memory_limit']}`, `--threads {runs['regmean']['plan']['threads']}`, cold page cache.",
        "",
        "| merge | wall s | CPU s | peak RssAnon GB | planner's peak estimate GB | read GB (planned) | rc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        p = run["plan"]
        lines.append(
            f"| {name} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['peak_rss_anon_gb']:.2f} | "
            f"{p['peak_memory_estimate_gb']:.2f} | {p['bytes_read_gb']:.2f} | {run['rc']} |"
        )
    lines.append(DOC_END)
    doc = mt.DOC.read_text()
    block = "\n".join(lines)
    if DOC_BEGIN in doc:
        doc = doc[: doc.index(DOC_BEGIN)] + block + doc[doc.index(DOC_END) + len(DOC_END) :]
    else:
        doc += "\n\n## RegMean merge out of core (3 × 1.1 GB Llama-shaped)\n\n" + block + "\n"
    mt.DOC.write_text(doc)


if __name__ == "__main__":
    main()
