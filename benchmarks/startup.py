"""Start-up cost of small jobs: `fishmerge plan` / `merge` / `fisher` against `mergekit-yaml`, same inputs.

Inputs (cached under `.fishmerge/bench/startup/`): three Llama-shaped fp32 checkpoints of about 10 MB
(hidden 256, 3 layers, vocabulary 1000, untied), each with a word-level tokenizer, and 16 short texts.
Every command is a fresh process, timed by wall clock and by the CPU time of the process and its
children; each runs `--reps` times in a rotating order after one untimed warm-up each, and the median
is reported. Commands:

  python -c "import torch"          the floor every tool pays (both import torch)
  floor of fisher                   torch, prefect and datasets imported and the model loaded by transformers
  mergekit-yaml (linear, fp32)      mergekit 0.1.5 in its own venv (/work/.mergekit-venv)
  fishmerge --version               the CLI's own imports
  fishmerge plan                    every check, no flow
  fishmerge merge / fisher          flows, with Prefect's temporary server (no PREFECT_API_URL)
  fishmerge plan / merge / fisher, shared
                                    with `fishmerge server start` running (timed once): forked from its
                                    warm runner, and in their own process (FISHMERGE_NO_WARM=1)

PREFECT_HOME and FISHMERGE_HOME point into the cache folder: the user's Prefect database and any
shared server of theirs are left alone; the shared server is stopped at the end.

  python benchmarks/startup.py [--reps 3] [--json docs/benchmarks_startup_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".fishmerge" / "bench" / "startup"
BIN = ROOT / ".venv" / "bin"
MERGEKIT = Path(os.environ.get("MERGEKIT_YAML", "/work/.mergekit-venv/bin/mergekit-yaml"))
WORDS = [f"w{i}" for i in range(990)]


def build_inputs() -> dict[str, Path]:
    """Three ~10 MB Llama checkpoints with tokenizers, a 16-row CSV, the configs (cached)."""
    inputs = BENCH / "inputs"  # only this folder is rebuilt: BENCH also holds the shared server's record
    marker = inputs / "inputs.json"
    if marker.exists():
        return {k: Path(v) for k, v in json.loads(marker.read_text()).items()}
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    paths = {}
    for i in range(3):
        torch.manual_seed(i)
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(vocab),
            tie_word_embeddings=False,
            pad_token_id=0,
        )
        d = inputs / f"m{i}"
        LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
        fast.save_pretrained(d)
        paths[f"m{i}"] = d
    rows = ["text"] + [" ".join(WORDS[(7 * r + j) % len(WORDS)] for j in range(12)) for r in range(16)]
    paths["data"] = inputs / "texts.csv"
    paths["data"].write_text("\n".join(rows) + "\n")
    models = [{"name": f"m{i}", "path": str(paths[f"m{i}"]), "weight": 1.0} for i in range(3)]
    fm = {"name": "startup", "method": "isotropic", "models": models, "targets": ["m0"], "output": "out"}
    paths["fishmerge_cfg"] = inputs / "fishmerge.yaml"
    paths["fishmerge_cfg"].write_text(json.dumps(fm))
    mk = {
        "merge_method": "linear",
        "models": [{"model": str(paths[f"m{i}"]), "parameters": {"weight": 1.0}} for i in range(3)],
        "dtype": "float32",
    }
    paths["mergekit_cfg"] = inputs / "mergekit.yaml"
    paths["mergekit_cfg"].write_text(json.dumps(mk))
    marker.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def runner_children_cpu(env: dict) -> float:
    """CPU seconds of the commands the shared server's warm runner forked and reaped so far (its cutime +
    cstime): a command served by the runner spends its CPU there, not in the `fishmerge` process timed here."""
    try:
        state = json.loads((Path(env["FISHMERGE_HOME"]) / "prefect-server.json").read_text())
        fields = Path(f"/proc/{state['runner']['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, KeyError, ValueError):
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Wall and CPU (user + system of the finished children, the warm runner's forks included) seconds of one
    command; fails loudly."""
    before, runner_before = resource.getrusage(resource.RUSAGE_CHILDREN), runner_children_cpu(env)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    wall = time.perf_counter() - t0
    after, runner_after = resource.getrusage(resource.RUSAGE_CHILDREN), runner_children_cpu(env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu + runner_after - runner_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not MERGEKIT.exists():
        sys.exit(
            f"{MERGEKIT} not found: python3 -m venv /work/.mergekit-venv && "
            "/work/.mergekit-venv/bin/pip install -c constraints.txt torch==2.13.0 mergekit==0.1.5"
        )
    p = build_inputs()
    work = BENCH / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(BENCH / "prefect-home"),
        "FISHMERGE_HOME": str(BENCH / "fishmerge-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    fm = str(BIN / "fishmerge")
    counter = iter(range(10**6))

    def fresh(prefix: str) -> str:
        return str(work / f"{prefix}-{next(counter)}")

    def fresh_config() -> str:
        """The merge config with a new output folder: every run merges (an identical output is reused)."""
        cfg = json.loads(p["fishmerge_cfg"].read_text()) | {"output": fresh("fm")}
        path = Path(fresh("cfg") + ".yaml")
        path.write_text(json.dumps(cfg))
        return str(path)

    commands = {
        "python -c 'import torch'": lambda: [str(BIN / "python"), "-c", "import torch"],
        "mergekit-yaml (linear)": lambda: [str(MERGEKIT), str(p["mergekit_cfg"]), fresh("mk")],
        # What `fisher` cannot do without (it loads a transformers model, runs a flow and reads the data
        # with `datasets`): the floor under its start-up, no fishmerge code.
        "floor of fisher: import torch, prefect, datasets + load the model": lambda: [
            str(BIN / "python"),
            "-c",
            "import torch, prefect, datasets\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(p['m0'])!r})",
        ],
        "fishmerge --version": lambda: [fm, "--version"],
        "fishmerge plan": lambda: [fm, "plan", str(p["fishmerge_cfg"])],
        "fishmerge merge": lambda: [fm, "merge", fresh_config(), "--no-progress"],
        "fishmerge fisher": lambda: [
            fm,
            "fisher",
            "--model",
            str(p["m0"]),
            "--data",
            str(p["data"]),
            "--examples",
            "16",
            "--store",
            fresh("fisher") + ".zarr",
            "--no-progress",
        ],
    }
    own = ["/usr/bin/env", "FISHMERGE_NO_WARM=1"]  # the shared server without its warm runner
    commands |= {
        "fishmerge plan, own process": lambda: [*own, *commands["fishmerge plan"]()],
        "fishmerge merge, own process": lambda: [*own, *commands["fishmerge merge"]()],
        "fishmerge fisher, own process": lambda: [*own, *commands["fishmerge fisher"]()],
    }
    shared_names = [
        "fishmerge plan",
        "fishmerge merge",
        "fishmerge fisher",
        "fishmerge plan, own process",
        "fishmerge merge, own process",
        "fishmerge fisher, own process",
    ]

    def rounds(names: list[str]) -> dict[str, list[dict]]:
        out = {n: [] for n in names}
        for n in names:  # warm-up: page cache, Prefect's database, bytecode
            timed(commands[n](), env, work)
        for r in range(args.reps):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                out[n].append(timed(commands[n](), env, work))
                print(f"rep {r + 1}: {n}: {out[n][-1]['wall_s']:.2f} s", file=sys.stderr)
        return out

    subprocess.run([fm, "server", "stop"], env=env, capture_output=True)
    results = rounds([n for n in commands if n not in shared_names[3:]])
    start = timed([fm, "server", "start"], env, work)
    try:
        shared = rounds(shared_names)
    finally:
        subprocess.run([fm, "server", "stop"], env=env, capture_output=True)
    results |= {f"{n}, shared server": v for n, v in shared.items()}

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    mk = med(results["mergekit-yaml (linear)"], "wall_s")
    rows = {
        n: {
            "wall_s": med(v, "wall_s"),
            "cpu_s": med(v, "cpu_s"),
            "walls": [r["wall_s"] for r in v],
            "ratio_to_mergekit": med(v, "wall_s") / mk,
        }
        for n, v in results.items()
    }
    model_mb = sum(f.stat().st_size for i in range(3) for f in p[f"m{i}"].glob("*.safetensors")) / 3e6
    print(f"\n## Start-up, three Llama-shaped fp32 models of {model_mb:.1f} MB, median of {args.reps}")
    print("| command | wall s (runs) | CPU s | ÷ mergekit-yaml wall |\n|---|---|---|---|")
    for n, r in rows.items():
        runs = ", ".join(f"{w:.2f}" for w in r["walls"])
        print(f"| {n} | {r['wall_s']:.2f} ({runs}) | {r['cpu_s']:.2f} | {r['ratio_to_mergekit']:.2f} |")
    print(f"| `fishmerge server start` (once) | {start['wall_s']:.2f} | {start['cpu_s']:.2f} | |")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nmachine: {cpu}, nproc {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpu": cpu, "nproc": os.cpu_count(), "platform": platform.machine()},
            "model_mb": model_mb,
            "reps": args.reps,
            "results": rows,
            "server_start": start,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
