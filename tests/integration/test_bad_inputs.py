"""The fault suite's bad-input part: one table of bad inputs, one contract for all of them.

Every case builds its inputs in a fresh workspace (copies of tiny models, their Fisher stores, a
CSV dataset, an MLflow registry), snapshots every file in it (relative path -> sha256, and every
folder), runs one `fishmerge` command (in process, or as a subprocess with a timeout where a
corrupt input could make it hang) and checks THE CONTRACT:

- exit code 2;
- stderr has exactly one line starting with `fishmerge: error:` and no `Traceback`;
- that error (its line and the indented lines that continue it) names the problem: the case's
  needles, case-insensitive (a tuple means any one of them; `Not(...)` must be absent);
- every file and folder that existed before is still there and byte-identical;
- nothing new at the output path, and no new hidden leftovers anywhere (`.*.tmp-*`, `.*.old-*`,
  `.*.staging-*`, `*.partials`, `.fishmerge-probe-*`); a `.fishmerge/` cache folder is allowed;
- it finishes in seconds.

105 table cases over `fisher`, `plan`, `merge`, `run`, `inspect`, `promote` and `history`: 39 for
the defects users found (stores and outputs over user folders and inputs, corrupt checkpoints that
hung, NaN numbers and tensors, missing tokenizers, tracebacks, lax validation) and 66 more mistakes
a new user plausibly makes. Plus `test_max_length_above_the_model_limit_is_clamped_with_a_notice`:
a `--max-length` above the model's position limit is clamped with a one-line notice, not fatal.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from fishmerge.flows.cli import main

from tests.conftest import save_model_dir, sentences, write_csv
from tests.integration.test_merge_cli import write_fisher

REPO = Path(__file__).resolve().parents[2]
QUERY = "bert.encoder.layer.0.attention.self.query.weight"
LEFTOVERS = (".*.tmp-*", ".*.old-*", ".*.staging-*", "*.partials", ".fishmerge-probe-*")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
IN_PROCESS_LIMIT_S = 60  # an in-process case that hangs fails instead of stalling the suite
SUBPROCESS_LIMIT_S = 90


class Not(str):
    """A needle that must NOT appear in the error."""


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Built once: every input a case may need, copied into each case's workspace."""
    import transformers as tf
    from mlflow import MlflowClient

    from tests.tiny_models import _bert_cfg

    root = tmp_path_factory.mktemp("bad-inputs-src")
    models = root / "models"
    a = save_model_dir(models / "a", "bert-cls", seed=1)
    b = save_model_dir(models / "b", "bert-cls2", seed=2)
    save_model_dir(models / "pre", "bert-cls", seed=3)  # a "pretrained" base for task_arithmetic / ties
    save_model_dir(models / "gpt2", "gpt2-cls", seed=4)
    save_model_dir(models / "llama", "llama-lm", seed=5)
    write_fisher(a, 1)
    write_fisher(b, 2)
    for name, change in (("wide", {"hidden_size": 40}), ("vocab", {"vocab_size": 120})):
        config = _bert_cfg(num_labels=3)
        for k, v in change.items():
            setattr(config, k, v)
        tf.BertForSequenceClassification(config).save_pretrained(models / name)
    rows = sentences(12)
    for r in rows:
        r["label"] %= 2  # valid for both heads (3 and 2 labels)
    write_csv(root / "data.csv", rows)
    (root / "notes.txt").write_text("a user's notes: never to be touched\n")
    user = root / "mydocs"
    user.mkdir()
    (user / "letter.txt").write_text("dear fishmerge\n")
    (user / "photo.bin").write_bytes(os.urandom(2048))
    # A registry with one registered model and no versions (for promote / history).
    (root / "registry").mkdir()
    MlflowClient(f"sqlite:///{root / 'registry' / 'mlflow.db'}").create_registered_model("reg")
    return root


# ---------------------------------------------------------------- the contract


@dataclass
class Ctx:
    """A case's workspace and what the case may change around the command."""

    ws: Path
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def models(self) -> Path:
        return self.ws / "models"


def snapshot(ws: Path) -> tuple[dict[str, str], set[str]]:
    files, dirs = {}, set()
    for root, dnames, fnames in os.walk(ws):
        r = Path(root)
        for d in dnames:
            dirs.add((r / d).relative_to(ws).as_posix())
        for f in fnames:
            p = r / f
            if p.is_symlink() or not p.is_file():
                files[p.relative_to(ws).as_posix()] = "special"
            else:
                files[p.relative_to(ws).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files, dirs


def error_text(err: str) -> str:
    """The `fishmerge: error:` line and the indented lines that continue it (one error, several problems)."""
    lines = err.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("fishmerge: error:"))
    out = [lines[at]]
    for ln in lines[at + 1 :]:
        if not ln.startswith((" ", "\t")):
            break
        out.append(ln)
    return "\n".join(out)


def _timeout(signum, frame):
    raise TimeoutError(f"the command did not finish within {IN_PROCESS_LIMIT_S} s (hang?)")


def run_in_process(argv: list[str], ctx: Ctx, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(ctx.ws)
    for k, v in ctx.env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(IN_PROCESS_LIMIT_S)
    tb = ""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:  # what the console script would print: a traceback, exit 1
        code, tb = 1, traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err + tb


def run_subprocess(argv: list[str], ctx: Ctx) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k, v in ctx.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fishmerge.flows.cli", *argv],
            cwd=ctx.ws,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_LIMIT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"fishmerge {' '.join(argv[:1])} hung: no answer after {SUBPROCESS_LIMIT_S} s ({exc.stderr!r})")
    return done.returncode, done.stderr


def check_contract(
    argv: list[str], needles: list, output: Path | None, ctx: Ctx, *, sub: bool, capsys, monkeypatch
) -> None:
    """Run one bad-input command and assert the contract (module docstring); every breach is listed."""
    ws = ctx.ws
    files, dirs = snapshot(ws)
    if sub:
        code, err = run_subprocess(argv, ctx)
    else:
        code, err = run_in_process(argv, ctx, capsys, monkeypatch)
    broken = []
    after, after_dirs = snapshot(ws)
    gone = sorted(set(files) - set(after)) + sorted(dirs - after_dirs)
    if gone:
        broken.append(f"user files or folders removed: {gone[:10]}")
    changed = sorted(k for k in files if k in after and after[k] != files[k])
    if changed:
        broken.append(f"user files modified: {changed[:10]}")
    new = sorted((set(after) - set(files)) | (after_dirs - dirs))
    if output is not None:
        rel = output.relative_to(ws).as_posix()
        at_output = [p for p in new if p == rel or p.startswith(rel + "/")]
        if at_output:
            broken.append(f"written at the output path {output}: {at_output[:10]}")
    leftovers = [
        p
        for p in new
        if not p.startswith(".fishmerge/") and any(fnmatch.fnmatch(Path(p).name, pat) for pat in LEFTOVERS)
    ]
    if leftovers:
        broken.append(f"hidden leftovers: {leftovers[:10]}")
    if code != 2:
        broken.append(f"exit code {code}, expected 2")
    if "Traceback" in err:
        broken.append("a traceback on stderr")
    lines = [ln for ln in err.splitlines() if ln.startswith("fishmerge: error:")]
    if len(lines) != 1:
        broken.append(f"{len(lines)} `fishmerge: error:` lines, expected 1")
    else:
        message = error_text(err)
        low = message.lower()
        for n in needles:
            if isinstance(n, Not):
                if n.lower() in low:
                    broken.append(f"the error should not say {str(n)!r}: {message}")
            elif isinstance(n, tuple):
                if not any(x.lower() in low for x in n):
                    broken.append(f"the error names none of {n}: {message}")
            elif n.lower() not in low:
                broken.append(f"the error does not name {n!r}: {message}")
    assert not broken, "\n".join(broken) + f"\n--- stderr (tail):\n{err[-3000:]}"


# ---------------------------------------------------------------- building inputs


def two_models(ctx: Ctx, fisher: bool = True, **over) -> list[dict]:
    models = [
        {"name": "a", "path": str(ctx.models / "a"), "weight": 0.6},
        {"name": "b", "path": str(ctx.models / "b"), "weight": 0.4},
    ]
    if fisher:
        for m in models:
            m["fisher"] = f"{m['path']}.fisher.zarr"
    for m in models:
        m.update(over.get(m["name"], {}))
    return models


def config(ctx: Ctx, models: list[dict] | None = None, file: str = "cfg.yaml", **extra) -> Path:
    """A merge config (YAML, so `.nan` and `.inf` are real floats)."""
    cfg = {"name": "t", "method": "fisher", "models": two_models(ctx) if models is None else models}
    cfg["output"] = str(ctx.ws / "out")
    cfg.update(extra)
    path = ctx.ws / file
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pipeline_config(ctx: Ctx, **extra) -> Path:
    """A `fishmerge run` config: data per model, search, evaluate, register, a SQLite MLflow in the workspace."""
    data = {"path": str(ctx.ws / "data.csv"), "fisher_split": "train", "eval_split": "train"}
    models = [{"name": n, "path": str(ctx.models / n), "weight": 0.5, "data": dict(data)} for n in ("a", "b")]
    cfg = {
        "name": "t",
        "method": "fisher",
        "models": models,
        "fisher": {"examples": 4, "max_length": 16, "batch_size": 4, "store_root": str(ctx.ws / "fishers")},
        "output": str(ctx.ws / "out"),
        "search": {"points": 2, "limit": 4, "split": "train"},
        "evaluate": {"split": "train", "limit": 4, "batch_size": 4, "max_length": 16},
        "register": {"name": "bad-inputs", "promote": {"metric": "a/accuracy"}},
        "mlflow": {"tracking_uri": f"sqlite:///{ctx.ws / 'mlflow.db'}"},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = ctx.ws / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fisher_argv(ctx: Ctx, *extra: str, model: str = "a", store: str | None = "store.zarr") -> list[str]:
    argv = ["fisher", "--no-progress", "--model", str(ctx.models / model), "--data", str(ctx.ws / "data.csv")]
    argv += ["--examples", "4", "--max-length", "16", "--batch-size", "4"]
    if store:
        argv += ["--store", str(ctx.ws / store)]
    return [*argv, *extra]


def st_read(path: Path) -> tuple[dict, bytes]:
    """(header with __metadata__, tensor bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write(path: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def poke_value(model_dir: Path, key: str, value: float) -> None:
    """Overwrite the first element of an F32 tensor in place (the header stays as it is)."""
    f = model_dir / "model.safetensors"
    header, _ = st_read(f)
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    assert header[key]["dtype"] == "F32"
    with open(f, "r+b") as fh:
        fh.seek(8 + n + header[key]["data_offsets"][0])
        fh.write(np.float32(value).tobytes())


def drop_fingerprint_cache(model_dir: Path) -> None:
    (model_dir / ".fishmerge-fingerprint.json").unlink(missing_ok=True)


def truncate_half(model_dir: Path) -> None:
    f = model_dir / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def offsets_past_end(model_dir: Path) -> None:
    """The header claims more bytes than the file has: the last tensor grows by 64 rows (shape and offsets)."""
    f = model_dir / "model.safetensors"
    header, data = st_read(f)
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    t = header[key]
    row = (t["data_offsets"][1] - t["data_offsets"][0]) // t["shape"][0]
    t["shape"][0] += 64
    t["data_offsets"][1] += 64 * row
    st_write(f, header, data)


def shape_beyond_offsets(model_dir: Path) -> None:
    """One tensor's shape asks for twice the bytes its data_offsets hold (the file is otherwise intact)."""
    f = model_dir / "model.safetensors"
    header, data = st_read(f)
    header["bert.pooler.dense.weight"]["shape"] = [64, 32]  # 32x32 F32 in the file
    st_write(f, header, data)


S3_ENV = {
    **{k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")},
    "AWS_ENDPOINT_URL": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",  # offline: no instance-metadata lookups
    "FISHMERGE_S3_ENDPOINT_URL": "http://127.0.0.1:9",
}


# ---------------------------------------------------------------- the cases
# Each builder gets the case's context (workspace with copies of every input) and returns
# (argv, needles, output path or None).


# 1. `fisher --store` over folders that are not Fisher stores
def store_is_user_folder(c: Ctx):
    return fisher_argv(c, store="mydocs"), ["not a fisher store", "mydocs"], c.ws / "mydocs"


def store_is_the_model(c: Ctx):
    return fisher_argv(c, store="models/a"), ["model"], c.models / "a"


def store_inside_the_model(c: Ctx):
    return fisher_argv(c, store="models/a/fisher.zarr"), ["model"], c.models / "a" / "fisher.zarr"


def store_contains_the_model(c: Ctx):
    return fisher_argv(c, store="models"), ["model"], c.models


# 2. merge outputs over inputs and user folders
def merge_overwrite_output_is_an_input(c: Ctx):
    return ["merge", str(config(c, output=str(c.models / "a"))), "--no-progress", "--overwrite"], ["input"], None


def merge_overwrite_output_is_the_inputs_parent(c: Ctx):
    return ["merge", str(config(c, output=str(c.models))), "--no-progress", "--overwrite"], ["input"], None


def merge_output_inside_an_input(c: Ctx):
    out = c.models / "a" / "merged"
    return ["merge", str(config(c, output=str(out))), "--no-progress"], ["input"], out


def merge_output_is_a_user_folder(c: Ctx):
    out = c.ws / "mydocs"
    return ["merge", str(config(c, output=str(out))), "--no-progress"], ["mydocs", Not("--overwrite")], out


def merge_overwrite_user_folder(c: Ctx):
    out = c.ws / "mydocs"
    return (
        ["merge", str(config(c, output=str(out))), "--no-progress", "--overwrite"],
        ["not a fishmerge output"],
        out,
    )


# 3. corrupt checkpoints that made the fingerprint loop spin at EOF (subprocess, timeout)
TRUNC = [("truncated", "corrupt")]


def _corrupt_a(c: Ctx, how: Callable[[Path], None]) -> None:
    drop_fingerprint_cache(c.models / "a")
    how(c.models / "a")


def truncated_fisher(c: Ctx):
    _corrupt_a(c, truncate_half)
    return fisher_argv(c), TRUNC, c.ws / "store.zarr"


def truncated_plan(c: Ctx):
    _corrupt_a(c, truncate_half)
    return ["plan", str(config(c))], TRUNC, c.ws / "out"


def truncated_merge(c: Ctx):
    _corrupt_a(c, truncate_half)
    return (
        ["merge", str(config(c, method="isotropic", models=two_models(c, fisher=False))), "--no-progress"],
        (TRUNC),
        c.ws / "out",
    )


def truncated_run(c: Ctx):
    _corrupt_a(c, truncate_half)
    return ["run", str(pipeline_config(c)), "--no-progress"], TRUNC, c.ws / "out"


def offsets_past_end_fisher(c: Ctx):
    _corrupt_a(c, offsets_past_end)
    return fisher_argv(c), TRUNC, c.ws / "store.zarr"


def offsets_past_end_plan(c: Ctx):
    _corrupt_a(c, offsets_past_end)
    return ["plan", str(config(c))], TRUNC, c.ws / "out"


def offsets_past_end_merge(c: Ctx):
    _corrupt_a(c, offsets_past_end)
    return (
        ["merge", str(config(c, method="isotropic", models=two_models(c, fisher=False))), "--no-progress"],
        (TRUNC),
        c.ws / "out",
    )


def offsets_past_end_run(c: Ctx):
    _corrupt_a(c, offsets_past_end)
    return ["run", str(pipeline_config(c)), "--no-progress"], TRUNC, c.ws / "out"


# 4. NaN and out-of-range numbers
def scale_nan(c: Ctx):
    cfg = config(c, method="task_arithmetic", base=str(c.models / "pre"), scale=math.nan)
    return ["merge", str(cfg), "--no-progress"], ["scale"], c.ws / "out"


def nan_in_a_model_tensor(c: Ctx):
    drop_fingerprint_cache(c.models / "b")
    poke_value(c.models / "b", QUERY, math.nan)
    cfg = config(c, models=two_models(c, fisher=False), method="isotropic")
    return ["merge", str(cfg), "--no-progress"], [QUERY], c.ws / "out"


def floor_nan(c: Ctx):
    return ["merge", str(config(c, fisher={"floor": math.nan})), "--no-progress"], ["floor"], c.ws / "out"


def floor_negative(c: Ctx):
    return ["merge", str(config(c, fisher={"floor": -1})), "--no-progress"], ["floor"], c.ws / "out"


# 6. a model without its tokenizer
def model_without_tokenizer(c: Ctx):
    for name in TOKENIZER_FILES:
        (c.models / "a" / name).unlink(missing_ok=True)
    return fisher_argv(c), ["tokenizer"], c.ws / "store.zarr"


# 7. `--store` naming a user's regular file
def store_is_a_regular_file(c: Ctx):
    return fisher_argv(c, store="notes.txt"), [("file", "notes.txt")], c.ws / "notes.txt"


# 8. inputs that raised tracebacks
def safetensors_random_bytes(c: Ctx):
    f = c.models / "a" / "model.safetensors"
    drop_fingerprint_cache(c.models / "a")
    f.write_bytes(os.urandom(f.stat().st_size))
    return ["plan", str(config(c))], ["model.safetensors"], c.ws / "out"


def safetensors_huge_header_length(c: Ctx):
    f = c.models / "a" / "model.safetensors"
    drop_fingerprint_cache(c.models / "a")
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", 2**60)
    f.write_bytes(bytes(raw))
    return ["plan", str(config(c))], ["model.safetensors"], c.ws / "out"


def config_json_is_a_list(c: Ctx):
    (c.models / "a" / "config.json").write_text("[1, 2]")
    return ["plan", str(config(c))], ["config.json"], c.ws / "out"


def merge_config_is_binary(c: Ctx):
    cfg = c.ws / "cfg.bin"
    cfg.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    return ["merge", str(cfg), "--no-progress"], ["cfg.bin"], c.ws / "out"


def merge_config_is_a_folder(c: Ctx):
    return ["merge", str(c.ws / "mydocs"), "--no-progress"], ["mydocs"], c.ws / "out"


def plan_shard_size_lots(c: Ctx):
    return ["plan", str(config(c)), "--shard-size", "lots"], [("shard-size", "lots")], c.ws / "out"


def inspect_s3_without_credentials(c: Ctx):
    c.env.update(S3_ENV)
    return ["inspect", "s3://bucket/x.zarr"], ["s3"], None


# 9. raw exceptions under Prefect tracebacks
def fisher_shape_beyond_offsets(c: Ctx):
    _corrupt_a(c, shape_beyond_offsets)
    return fisher_argv(c), TRUNC, c.ws / "store.zarr"


def run_s3_store_root_without_credentials(c: Ctx):
    c.env.update(S3_ENV)
    cfg = pipeline_config(c, fisher={"store_root": "s3://bucket/prefix"})
    return ["run", str(cfg), "--no-progress"], ["s3"], c.ws / "out"


def merge_read_only_output(c: Ctx):
    ro = c.ws / "ro"
    ro.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=16m", "tmpfs", str(ro)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    c.cleanup.append(lambda: subprocess.run(["umount", str(ro)], capture_output=True))
    out = ro / "out"
    return ["merge", str(config(c, output=str(out))), "--no-progress"], ["writ"], out


# 10. a store whose values were corrupted after it was written
def inspect_nan_values(c: Ctx):
    import zarr

    store = c.models / "a.fisher.zarr"
    arr = zarr.open_group(str(store), mode="r+")[QUERY]
    values = arr[...]
    values.reshape(-1)[0] = np.nan
    arr[...] = values
    return ["inspect", str(store)], ["nan"], None


# 12. lax validation
def merge_threads_zero(c: Ctx):
    return ["merge", str(config(c)), "--no-progress", "--threads", "0"], ["threads"], c.ws / "out"


def merge_threads_negative(c: Ctx):
    return ["merge", str(config(c)), "--no-progress", "--threads", "-3"], ["threads"], c.ws / "out"


def shard_size_zero(c: Ctx):
    return ["merge", str(config(c, shard_size=0)), "--no-progress"], ["shard_size"], c.ws / "out"


def memory_limit_negative(c: Ctx):
    cfg = config(c, memory_limit=-5)  # not "too small for this merge": not a size at all
    return ["merge", str(cfg), "--no-progress"], ["memory_limit", "-5", Not("too small")], c.ws / "out"


def history_unknown_tracking_scheme(c: Ctx):
    return ["history", "reg", "--tracking-uri", "foo://bar"], ["foo://bar", Not("no registered model")], None


# More bad inputs a new user would plausibly make.
def weight_negative(c: Ctx):
    return ["plan", str(config(c, two_models(c, a={"weight": -1.0})))], ["weight"], c.ws / "out"


def weights_sum_to_zero(c: Ctx):
    models = two_models(c, a={"weight": 0.0}, b={"weight": 0.0})
    return ["merge", str(config(c, models)), "--no-progress"], ["weight"], c.ws / "out"


def weight_infinite(c: Ctx):
    return ["merge", str(config(c, two_models(c, a={"weight": math.inf}))), "--no-progress"], ["weight"], c.ws / "out"


def weight_nan(c: Ctx):
    return ["merge", str(config(c, two_models(c, b={"weight": math.nan}))), "--no-progress"], ["weight"], c.ws / "out"


def _ties(c: Ctx, density: float) -> Path:
    return config(c, two_models(c, fisher=False), method="ties", base=str(c.models / "pre"), density=density)


def density_zero(c: Ctx):
    return ["merge", str(_ties(c, 0.0)), "--no-progress"], ["density"], c.ws / "out"


def density_above_one(c: Ctx):
    return ["merge", str(_ties(c, 1.5)), "--no-progress"], ["density"], c.ws / "out"


def density_nan(c: Ctx):
    return ["merge", str(_ties(c, math.nan)), "--no-progress"], ["density"], c.ws / "out"


def scale_infinite(c: Ctx):
    cfg = config(c, two_models(c, fisher=False), method="task_arithmetic", base=str(c.models / "pre"), scale=math.inf)
    return ["merge", str(cfg), "--no-progress"], ["scale"], c.ws / "out"


def duplicate_model_names(c: Ctx):
    models = two_models(c, b={"name": "a"})
    return ["merge", str(config(c, models)), "--no-progress"], ["unique", "['a']"], c.ws / "out"


def target_not_a_model(c: Ctx):
    return ["merge", str(config(c, targets=["c"])), "--no-progress"], ["targets", "'c'"], c.ws / "out"


def unknown_method(c: Ctx):
    return ["merge", str(config(c, method="fishr")), "--no-progress"], ["fishr", "fisher"], c.ws / "out"


def unknown_top_level_key(c: Ctx):
    return ["merge", str(config(c, ouput="elsewhere")), "--no-progress"], ["ouput", "output"], c.ws / "out"


def unknown_model_key(c: Ctx):
    models = two_models(c)
    models[0]["wieght"] = models[0].pop("weight")
    return ["merge", str(config(c, models)), "--no-progress"], ["wieght", "'weight'"], c.ws / "out"


def unknown_fisher_key(c: Ctx):
    return ["merge", str(config(c, fisher={"flor": 1e-6})), "--no-progress"], ["flor", "'floor'"], c.ws / "out"


def task_arithmetic_without_base(c: Ctx):
    cfg = config(c, two_models(c, fisher=False), method="task_arithmetic")
    return ["merge", str(cfg), "--no-progress"], ["base"], c.ws / "out"


def base_of_another_shape(c: Ctx):
    cfg = config(c, two_models(c, fisher=False), method="task_arithmetic", base=str(c.models / "wide"))
    return ["merge", str(cfg), "--no-progress"], ["base", "shape"], c.ws / "out"


def base_does_not_exist(c: Ctx):
    cfg = config(c, two_models(c, fisher=False), method="ties", base=str(c.models / "nope"))
    return ["merge", str(cfg), "--no-progress"], ["nope"], c.ws / "out"


def fisher_store_of_another_model(c: Ctx):
    models = two_models(c, b={"fisher": str(c.models / "a.fisher.zarr")})
    return ["merge", str(config(c, models)), "--no-progress"], ["another model", "'b'"], c.ws / "out"


def fisher_path_does_not_exist(c: Ctx):
    models = two_models(c, a={"fisher": str(c.ws / "nope.zarr")})
    return ["merge", str(config(c, models)), "--no-progress"], ["nope.zarr"], c.ws / "out"


def fisher_path_is_a_plain_folder(c: Ctx):
    models = two_models(c, a={"fisher": str(c.ws / "mydocs")})
    return ["merge", str(config(c, models)), "--no-progress"], ["mydocs"], c.ws / "out"


def nan_in_fisher_values(c: Ctx):
    import zarr

    arr = zarr.open_group(str(c.models / "b.fisher.zarr"), mode="r+")[QUERY]
    values = arr[...]
    values.reshape(-1)[3] = np.nan
    arr[...] = values
    return ["merge", str(config(c)), "--no-progress"], ["nan", QUERY], c.ws / "out"


def inf_in_the_base_model(c: Ctx):
    drop_fingerprint_cache(c.models / "pre")
    poke_value(c.models / "pre", QUERY, math.inf)
    cfg = config(c, two_models(c, fisher=False), method="task_arithmetic", base=str(c.models / "pre"))
    return ["merge", str(cfg), "--no-progress"], [QUERY], c.ws / "out"


def values_overflow_float16(c: Ctx):
    drop_fingerprint_cache(c.models / "b")
    poke_value(c.models / "b", QUERY, 1.0e6)  # finite in float32, Inf as float16
    cfg = config(c, models=two_models(c, fisher=False), method="isotropic", dtype="float16")
    return ["merge", str(cfg), "--no-progress"], [QUERY, "float32"], c.ws / "out"


def architectures_differ(c: Ctx):
    models = two_models(c, fisher=False, b={"path": str(c.models / "gpt2")})
    return ["plan", str(config(c, models, method="isotropic"))], ["architectures", "gpt2"], c.ws / "out"


def vocabulary_sizes_differ(c: Ctx):
    models = two_models(c, fisher=False, b={"path": str(c.models / "vocab")})
    return ["merge", str(config(c, models, method="isotropic")), "--no-progress"], ["vocabulary"], c.ws / "out"


def one_model_only(c: Ctx):
    return ["merge", str(config(c, two_models(c)[:1])), "--no-progress"], ["two models"], c.ws / "out"


def model_path_does_not_exist(c: Ctx):
    models = two_models(c, fisher=False, b={"path": str(c.models / "bb")})
    return ["merge", str(config(c, models, method="isotropic")), "--no-progress"], ["bb"], c.ws / "out"


def fisher_missing_for_fisher_method(c: Ctx):
    return ["merge", str(config(c, two_models(c, fisher=False))), "--no-progress"], ["fisher", "data"], c.ws / "out"


def unknown_output_dtype(c: Ctx):
    return ["merge", str(config(c, dtype="fp8")), "--no-progress"], ["dtype"], c.ws / "out"


def memory_limit_not_a_size(c: Ctx):
    return ["merge", str(config(c, memory_limit="lots")), "--no-progress"], ["memory_limit"], c.ws / "out"


def output_is_a_regular_file(c: Ctx):
    cfg = config(c, output=str(c.ws / "notes.txt"))
    return ["merge", str(cfg), "--no-progress", "--overwrite"], ["notes.txt"], c.ws / "notes.txt"


def merge_config_does_not_exist(c: Ctx):
    return ["merge", str(c.ws / "nope.yaml"), "--no-progress"], ["nope.yaml"], c.ws / "out"


def merge_config_empty(c: Ctx):
    (c.ws / "empty.yaml").write_text("")
    return ["merge", str(c.ws / "empty.yaml"), "--no-progress"], ["empty.yaml"], c.ws / "out"


def merge_config_is_a_yaml_list(c: Ctx):
    (c.ws / "list.yaml").write_text("- a\n- b\n")
    return ["merge", str(c.ws / "list.yaml"), "--no-progress"], ["list.yaml", "mapping"], c.ws / "out"


def merge_config_not_yaml(c: Ctx):
    (c.ws / "bad.yaml").write_text("name: t\nmodels: [a, b\n")
    return ["merge", str(c.ws / "bad.yaml"), "--no-progress"], ["bad.yaml", "yaml"], c.ws / "out"


def models_not_a_list(c: Ctx):
    cfg = config(c, {m["name"]: m for m in two_models(c)})
    return ["merge", str(cfg), "--no-progress"], ["models"], c.ws / "out"


def model_dir_is_a_file(c: Ctx):
    return fisher_argv(c, model="../notes.txt"), ["notes.txt"], c.ws / "store.zarr"


def model_without_config_json(c: Ctx):
    (c.models / "a" / "config.json").unlink()
    return ["plan", str(config(c))], ["config.json"], c.ws / "out"


def config_json_not_json(c: Ctx):
    (c.models / "a" / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], ')
    return fisher_argv(c), ["config.json"], c.ws / "store.zarr"


def config_json_without_architectures(c: Ctx):
    p = c.models / "a" / "config.json"
    cfg = json.loads(p.read_text())
    cfg.pop("architectures")
    p.write_text(json.dumps(cfg))
    return fisher_argv(c), ["architecture"], c.ws / "store.zarr"


def safetensors_header_is_a_list(c: Ctx):
    drop_fingerprint_cache(c.models / "a")
    f = c.models / "a" / "model.safetensors"
    _, data = st_read(f)
    body = b"[1, 2]  "
    f.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return ["plan", str(config(c))], ["model.safetensors"], c.ws / "out"


def safetensors_unknown_dtype(c: Ctx):
    drop_fingerprint_cache(c.models / "a")
    f = c.models / "a" / "model.safetensors"
    header, data = st_read(f)
    header[QUERY]["dtype"] = "Q4_K"
    st_write(f, header, data)
    return ["plan", str(config(c))], ["Q4_K"], c.ws / "out"


def index_names_a_missing_shard(c: Ctx):
    drop_fingerprint_cache(c.models / "a")
    header, _ = st_read(c.models / "a" / "model.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in header if k != "__metadata__"}
    weight_map[QUERY] = "model-00002-of-00002.safetensors"
    (c.models / "a" / "model.safetensors").rename(c.models / "a" / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (c.models / "a" / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["plan", str(config(c))], ["model-00002-of-00002.safetensors"], c.ws / "out"


def index_json_not_json(c: Ctx):
    drop_fingerprint_cache(c.models / "a")
    (c.models / "a" / "model.safetensors.index.json").write_text('{"weight_map": {')
    return ["plan", str(config(c))], ["index.json"], c.ws / "out"


def only_a_pickled_checkpoint(c: Ctx):
    drop_fingerprint_cache(c.models / "a")
    (c.models / "a" / "model.safetensors").rename(c.models / "a" / "pytorch_model.bin")
    return fisher_argv(c), ["safetensors"], c.ws / "store.zarr"


def data_path_does_not_exist(c: Ctx):
    argv = fisher_argv(c)
    argv[argv.index("--data") + 1] = str(c.ws / "missing.csv")
    return argv, ["missing.csv"], c.ws / "store.zarr"


def data_file_empty(c: Ctx):
    write_csv(c.ws / "empty.csv", [], fields=["text", "label"])
    argv = fisher_argv(c)
    argv[argv.index("--data") + 1] = str(c.ws / "empty.csv")
    return argv, ["empty"], c.ws / "store.zarr"


def unknown_text_column(c: Ctx):
    return fisher_argv(c, "--text-fields", "sentence"), ["sentence"], c.ws / "store.zarr"


def labels_out_of_range(c: Ctx):
    rows = sentences(6)
    rows[4]["label"] = 7
    write_csv(c.ws / "data.csv", rows)  # the workspace's data (the snapshot is taken after the builder)
    return fisher_argv(c, "--estimator", "empirical"), ["7"], c.ws / "store.zarr"


def split_not_in_a_file(c: Ctx):
    return fisher_argv(c, "--split", "dev"), ["dev"], c.ws / "store.zarr"


def exact_on_vocabulary_sized_output(c: Ctx):
    return fisher_argv(c, "--estimator", "exact", model="llama"), ["sampled"], c.ws / "store.zarr"


def fisher_examples_zero(c: Ctx):
    return fisher_argv(c, "--examples", "0"), ["examples"], c.ws / "store.zarr"


def fisher_batch_size_zero(c: Ctx):
    return fisher_argv(c, "--batch-size", "0"), ["batch-size"], c.ws / "store.zarr"


def fisher_max_length_one(c: Ctx):
    return fisher_argv(c, "--max-length", "1"), ["max-length"], c.ws / "store.zarr"


def fisher_shards_zero(c: Ctx):
    return fisher_argv(c, "--shards", "0"), ["shards"], c.ws / "store.zarr"


def fisher_workers_zero(c: Ctx):
    return fisher_argv(c, "--workers", "0"), ["workers"], c.ws / "store.zarr"


def fisher_max_memory_lots(c: Ctx):
    return fisher_argv(c, "--max-memory", "lots"), [("max-memory", "lots")], c.ws / "store.zarr"


def fisher_store_holds_another_model(c: Ctx):
    return fisher_argv(c, store="models/b.fisher.zarr"), ["another model"], c.models / "b.fisher.zarr"


def fisher_unknown_device(c: Ctx):
    return fisher_argv(c, "--device", "tpu"), ["tpu"], c.ws / "store.zarr"


def inspect_missing_store(c: Ctx):
    return ["inspect", str(c.ws / "nope.zarr")], ["nope.zarr"], None


def inspect_plain_folder(c: Ctx):
    return ["inspect", str(c.ws / "mydocs")], ["mydocs"], None


def promote_missing_version(c: Ctx):
    uri = f"sqlite:///{c.ws / 'registry' / 'mlflow.db'}"
    return ["promote", "reg", "--version", "9", "--tracking-uri", uri], ["reg", "version 9"], None


def history_unknown_model(c: Ctx):
    uri = f"sqlite:///{c.ws / 'registry' / 'mlflow.db'}"
    return ["history", "nosuch", "--tracking-uri", uri], ["nosuch"], None


def run_target_without_data(c: Ctx):
    cfg = pipeline_config(c)
    raw = yaml.safe_load(cfg.read_text())
    del raw["models"][1]["data"]
    raw["models"][1]["fisher"] = str(c.models / "b.fisher.zarr")
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return ["run", str(cfg), "--no-progress"], ["data"], c.ws / "out"


def run_search_one_point(c: Ctx):
    return ["run", str(pipeline_config(c, search={"points": 1})), "--no-progress"], ["points"], c.ws / "out"


def run_unknown_metric(c: Ctx):
    cfg = pipeline_config(c, evaluate={"metrics": ["bleu"]})
    return ["run", str(cfg), "--no-progress"], ["evaluate.metrics"], c.ws / "out"


INP, SUB = False, True
CASES = [
    # 1
    pytest.param(store_is_user_folder, INP, id="fisher-store-is-a-user-folder"),
    pytest.param(store_is_the_model, INP, id="fisher-store-is-the-model-folder"),
    pytest.param(store_inside_the_model, INP, id="fisher-store-inside-the-model-folder"),
    pytest.param(store_contains_the_model, INP, id="fisher-store-contains-the-model-folder"),
    # 2
    pytest.param(merge_overwrite_output_is_an_input, INP, id="merge-overwrite-output-is-an-input"),
    pytest.param(merge_overwrite_output_is_the_inputs_parent, INP, id="merge-overwrite-output-is-the-inputs-parent"),
    pytest.param(merge_output_inside_an_input, INP, id="merge-output-inside-an-input"),
    pytest.param(merge_output_is_a_user_folder, INP, id="merge-output-is-a-user-folder"),
    pytest.param(merge_overwrite_user_folder, INP, id="merge-overwrite-a-user-folder"),
    # 3
    pytest.param(truncated_fisher, SUB, id="truncated-safetensors-fisher"),
    pytest.param(truncated_plan, SUB, id="truncated-safetensors-plan"),
    pytest.param(truncated_merge, SUB, id="truncated-safetensors-merge"),
    pytest.param(truncated_run, SUB, id="truncated-safetensors-run"),
    pytest.param(offsets_past_end_fisher, SUB, id="offsets-past-end-fisher"),
    pytest.param(offsets_past_end_plan, SUB, id="offsets-past-end-plan"),
    pytest.param(offsets_past_end_merge, SUB, id="offsets-past-end-merge"),
    pytest.param(offsets_past_end_run, SUB, id="offsets-past-end-run"),
    # 4
    pytest.param(scale_nan, INP, id="scale-nan"),
    pytest.param(nan_in_a_model_tensor, INP, id="nan-in-a-model-tensor"),
    pytest.param(floor_nan, INP, id="fisher-floor-nan"),
    pytest.param(floor_negative, INP, id="fisher-floor-negative"),
    # 6, 7
    pytest.param(model_without_tokenizer, INP, id="model-without-tokenizer"),
    pytest.param(store_is_a_regular_file, INP, id="fisher-store-is-a-regular-file"),
    # 8
    pytest.param(safetensors_random_bytes, INP, id="safetensors-random-bytes"),
    pytest.param(safetensors_huge_header_length, INP, id="safetensors-huge-header-length"),
    pytest.param(config_json_is_a_list, INP, id="config-json-is-a-list"),
    pytest.param(merge_config_is_binary, INP, id="merge-config-is-binary"),
    pytest.param(merge_config_is_a_folder, INP, id="merge-config-is-a-folder"),
    pytest.param(plan_shard_size_lots, INP, id="plan-shard-size-lots"),
    pytest.param(inspect_s3_without_credentials, INP, id="inspect-s3-without-credentials"),
    # 9
    pytest.param(fisher_shape_beyond_offsets, INP, id="fisher-shape-beyond-offsets"),
    pytest.param(run_s3_store_root_without_credentials, INP, id="run-s3-store-root-without-credentials"),
    pytest.param(merge_read_only_output, INP, id="merge-read-only-output"),
    # 10
    pytest.param(inspect_nan_values, INP, id="inspect-nan-values"),
    # 12
    pytest.param(merge_threads_zero, INP, id="merge-threads-0"),
    pytest.param(merge_threads_negative, INP, id="merge-threads-negative"),
    pytest.param(shard_size_zero, INP, id="shard-size-0"),
    pytest.param(memory_limit_negative, INP, id="memory-limit-negative"),
    pytest.param(history_unknown_tracking_scheme, INP, id="history-unknown-tracking-scheme"),
    # more
    pytest.param(weight_negative, INP, id="weight-negative"),
    pytest.param(weights_sum_to_zero, INP, id="weights-sum-to-zero"),
    pytest.param(weight_infinite, INP, id="weight-infinite"),
    pytest.param(weight_nan, INP, id="weight-nan"),
    pytest.param(density_zero, INP, id="density-0"),
    pytest.param(density_above_one, INP, id="density-1.5"),
    pytest.param(density_nan, INP, id="density-nan"),
    pytest.param(scale_infinite, INP, id="scale-infinite"),
    pytest.param(duplicate_model_names, INP, id="duplicate-model-names"),
    pytest.param(target_not_a_model, INP, id="target-not-a-model"),
    pytest.param(unknown_method, INP, id="unknown-method"),
    pytest.param(unknown_top_level_key, INP, id="unknown-key-top-level"),
    pytest.param(unknown_model_key, INP, id="unknown-key-in-a-model"),
    pytest.param(unknown_fisher_key, INP, id="unknown-key-in-fisher"),
    pytest.param(task_arithmetic_without_base, INP, id="task-arithmetic-without-base"),
    pytest.param(base_of_another_shape, INP, id="base-of-another-shape"),
    pytest.param(base_does_not_exist, INP, id="base-does-not-exist"),
    pytest.param(fisher_store_of_another_model, INP, id="fisher-store-of-another-model"),
    pytest.param(fisher_path_does_not_exist, INP, id="fisher-path-does-not-exist"),
    pytest.param(fisher_path_is_a_plain_folder, INP, id="fisher-path-is-a-plain-folder"),
    pytest.param(nan_in_fisher_values, INP, id="nan-in-fisher-values"),
    pytest.param(inf_in_the_base_model, INP, id="inf-in-the-base-model"),
    pytest.param(values_overflow_float16, INP, id="values-overflow-float16"),
    pytest.param(architectures_differ, INP, id="architectures-differ"),
    pytest.param(vocabulary_sizes_differ, INP, id="vocabulary-sizes-differ"),
    pytest.param(one_model_only, INP, id="one-model-only"),
    pytest.param(model_path_does_not_exist, INP, id="model-path-does-not-exist"),
    pytest.param(fisher_missing_for_fisher_method, INP, id="fisher-method-without-fisher-or-data"),
    pytest.param(unknown_output_dtype, INP, id="unknown-output-dtype"),
    pytest.param(memory_limit_not_a_size, INP, id="memory-limit-lots"),
    pytest.param(output_is_a_regular_file, INP, id="merge-overwrite-output-is-a-regular-file"),
    pytest.param(merge_config_does_not_exist, INP, id="merge-config-does-not-exist"),
    pytest.param(merge_config_empty, INP, id="merge-config-empty"),
    pytest.param(merge_config_is_a_yaml_list, INP, id="merge-config-is-a-yaml-list"),
    pytest.param(merge_config_not_yaml, INP, id="merge-config-not-yaml"),
    pytest.param(models_not_a_list, INP, id="models-not-a-list"),
    pytest.param(model_dir_is_a_file, INP, id="model-dir-is-a-file"),
    pytest.param(model_without_config_json, INP, id="model-without-config-json"),
    pytest.param(config_json_not_json, INP, id="config-json-not-json"),
    pytest.param(config_json_without_architectures, INP, id="config-json-without-architectures"),
    pytest.param(safetensors_header_is_a_list, INP, id="safetensors-header-is-a-list"),
    pytest.param(safetensors_unknown_dtype, INP, id="safetensors-unknown-dtype"),
    pytest.param(index_names_a_missing_shard, INP, id="index-names-a-missing-shard"),
    pytest.param(index_json_not_json, INP, id="index-json-not-json"),
    pytest.param(only_a_pickled_checkpoint, INP, id="only-a-pickled-checkpoint"),
    pytest.param(data_path_does_not_exist, INP, id="data-path-does-not-exist"),
    pytest.param(data_file_empty, INP, id="data-file-empty"),
    pytest.param(unknown_text_column, INP, id="unknown-text-column"),
    pytest.param(labels_out_of_range, INP, id="labels-out-of-range"),
    pytest.param(split_not_in_a_file, INP, id="split-not-in-a-file"),
    pytest.param(exact_on_vocabulary_sized_output, INP, id="exact-on-vocabulary-sized-output"),
    pytest.param(fisher_examples_zero, INP, id="fisher-examples-0"),
    pytest.param(fisher_batch_size_zero, INP, id="fisher-batch-size-0"),
    pytest.param(fisher_max_length_one, INP, id="fisher-max-length-1"),
    pytest.param(fisher_shards_zero, INP, id="fisher-shards-0"),
    pytest.param(fisher_workers_zero, INP, id="fisher-workers-0"),
    pytest.param(fisher_max_memory_lots, INP, id="fisher-max-memory-lots"),
    pytest.param(fisher_store_holds_another_model, INP, id="fisher-store-holds-another-model"),
    pytest.param(fisher_unknown_device, INP, id="fisher-unknown-device"),
    pytest.param(inspect_missing_store, INP, id="inspect-missing-store"),
    pytest.param(inspect_plain_folder, INP, id="inspect-plain-folder"),
    pytest.param(promote_missing_version, INP, id="promote-missing-version"),
    pytest.param(history_unknown_model, INP, id="history-unknown-model"),
    pytest.param(run_target_without_data, INP, id="run-target-without-data"),
    pytest.param(run_search_one_point, INP, id="run-search-one-point"),
    pytest.param(run_unknown_metric, INP, id="run-unknown-metric"),
]


@pytest.fixture
def workspace(src, tmp_path, monkeypatch) -> Ctx:
    ws = tmp_path / "ws"
    shutil.copytree(src, ws, symlinks=True)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    return Ctx(ws)


@pytest.mark.parametrize(("build", "sub"), CASES)
def test_bad_input(build, sub, workspace, capsys, monkeypatch) -> None:
    try:
        argv, needles, output = build(workspace)
        check_contract(argv, needles, output, workspace, sub=sub, capsys=capsys, monkeypatch=monkeypatch)
    finally:
        for fn in reversed(workspace.cleanup):
            fn()


def test_max_length_above_the_model_limit_is_clamped_with_a_notice(src, tmp_path, capsys, monkeypatch) -> None:
    """`--max-length 128` on a model with 40 positions: a one-line notice and a Fisher, not a crash."""
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    shutil.copytree(src / "models" / "a", ws / "models" / "a")
    words = [f"w{i}" for i in range(90)]
    rows = [{"text": " ".join(words[(i + j) % 90] for j in range(70)), "label": i % 3} for i in range(4)]
    write_csv(ws / "long.csv", rows)
    monkeypatch.chdir(ws)
    store = ws / "store.zarr"
    capsys.readouterr()
    code = main(
        ["fisher", "--no-progress", "--model", str(ws / "models" / "a"), "--data", str(ws / "long.csv")]
        + ["--max-length", "128", "--batch-size", "4", "--store", str(store)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    notices = [ln for ln in err.splitlines() if ("max_length" in ln or "max-length" in ln) and "40" in ln]
    assert len(notices) == 1, err[-3000:]
    assert out.strip().splitlines()[-1] == str(store) and store.is_dir()
