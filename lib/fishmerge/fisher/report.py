"""What a Fisher store holds, for people: per-tensor statistics, per-layer mass, a plot."""

from __future__ import annotations

import base64
import io
import math
import re
from collections import OrderedDict

import numpy as np

from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER, GRAM
from fishmerge.fisher.store import held_statistics, open_fisher_store, stored_grams
from fishmerge.io import storage

_LAYER = re.compile(r"^(.*?\.(?:layer|layers|h|block|blocks)\.\d+)\.")


def layer_of(key: str) -> str:
    """Group a checkpoint key by transformer layer ('bert.encoder.layer.3'), else its top component."""
    m = _LAYER.match(key)
    if m:
        return m.group(1)
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def tensor_stats(uri: str, from_data: bool = False) -> list[dict]:
    """Per tensor: shape, mean, max, fraction of zeros, share of the total Fisher mass.

    By default the statistics recorded at write time (cheap); `from_data` reads every chunk and also
    counts NaN/Inf values (`nonfinite`), for checking a store that may have been damaged since.
    """
    group = open_fisher_store(uri)
    rows = []
    cached = None if from_data else group.attrs.get("tensor_stats")  # written by the reduce
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        count = max(1, int(np.prod(arr.shape)))
        if cached and name in cached:
            c = cached[name]
            rows.append(
                {
                    "tensor": name,
                    "shape": list(arr.shape),
                    "mass": c["mass"],
                    "mean": c["mass"] / count,
                    "max": c["max"],
                    "zero_fraction": c["zero_fraction"],
                }
            )
            continue
        total, peak, zeros, bad = 0.0, 0.0, 0, 0
        step = arr.chunks[0] if arr.ndim else 1
        for start in range(0, max(1, arr.shape[0] if arr.ndim else 1), step):
            block = np.asarray(arr[start : start + step] if arr.ndim else arr[...], dtype=np.float64)
            finite = np.isfinite(block)
            bad += int((~finite).sum())
            block = np.where(finite, block, 0.0)
            total += float(block.sum())
            peak = max(peak, float(block.max(initial=0.0)))
            zeros += int((block == 0).sum())
        rows.append(
            {
                "tensor": name,
                "shape": list(arr.shape),
                "mass": total,
                "mean": total / count,
                "max": peak,
                "zero_fraction": zeros / count,
                "nonfinite": bad,
            }
        )
    mass = sum(r["mass"] for r in rows) or 1.0
    for r in rows:
        r["mass_share"] = r["mass"] / mass
    return rows


def layer_mass(rows: list[dict]) -> OrderedDict[str, float]:
    """Fisher mass per layer, in network order (embeddings, layers by number, then heads)."""
    out: OrderedDict[str, float] = OrderedDict()

    def order(r):  # network order: embeddings, numbered layers, then the rest (final norm, pooler, head)
        layer = layer_of(r["tensor"])
        nums = [int(x) for x in re.findall(r"\.(\d+)(?:\.|$)", layer)]
        return (1 if nums else 0 if ("embed" in layer or "wte" in layer or "wpe" in layer) else 2, nums, r["tensor"])

    for r in sorted(rows, key=order):
        out[layer_of(r["tensor"])] = out.get(layer_of(r["tensor"]), 0.0) + r["mass"]
    return out


def inspect_store(uri: str) -> tuple[str, list[str]]:
    """The `fishmerge inspect` report (attributes, then a per-tensor table computed from the stored
    values) and its problems: tensors holding NaN/Inf, or values that differ from what was recorded."""
    group = open_fisher_store(uri)
    lines = [f"Fisher store {storage.normalize(uri)}"]
    for k, v in sorted(dict(group.attrs).items()):
        if k not in ("tensor_stats", "grams", "gram_stats"):  # shown as the tables below
            lines.append(f"  {k}: {v}")
    problems: list[str] = []
    if GRAM in held_statistics(group.attrs):
        lines += ["", *gram_table(group, problems)]
    if FISHER not in held_statistics(group.attrs):
        return "\n".join(lines), problems
    recorded = group.attrs.get("tensor_stats") or {}
    rows = tensor_stats(uri, from_data=True)
    lines.append("")
    lines.append(f"{'tensor':60s} {'shape':>16s} {'mean':>11s} {'max':>11s} {'zeros':>7s} {'mass':>7s} {'NaN/Inf':>8s}")
    for r in rows:
        lines.append(
            f"{r['tensor'][:60]:60s} {str(tuple(r['shape'])):>16s} {r['mean']:11.4e} {r['max']:11.4e} "
            f"{r['zero_fraction']:7.1%} {r['mass_share']:7.2%} {r['nonfinite']:8d}"
        )
        if r["nonfinite"]:
            problems.append(f"'{r['tensor']}' holds {r['nonfinite']} NaN/Inf value(s)")
        elif r["tensor"] in recorded:
            want = float(recorded[r["tensor"]].get("mass", r["mass"]))
            if not math.isclose(want, r["mass"], rel_tol=1e-4, abs_tol=1e-30):
                problems.append(f"'{r['tensor']}' sums to {r['mass']:.6g}, recorded {want:.6g} at write time")
    return "\n".join(lines), problems


def gram_table(group, problems: list[str]) -> list[str]:
    """One line per stored Gram, read from its data: the weights reading it, width, tokens, the mean
    squared input norm (trace / tokens), its asymmetry and NaN/Inf count (each a problem when not 0)."""
    by_array: dict[str, list[str]] = {}
    grams = stored_grams(group)
    for key, entry in grams.items():
        by_array.setdefault(entry["array"], []).append(key)
    lines = [f"Grams: {len(by_array)} stored for {len(grams)} weights"]
    lines.append(f"{'gram (weights reading it)':72s} {'width':>6s} {'tokens':>9s} {'E‖x‖²':>11s} {'NaN/Inf':>8s}")
    for path, keys in sorted(by_array.items()):
        g = np.asarray(group[path][...], dtype=np.float32)  # fp32 as stored: no widened copy of a wide Gram
        tokens = int(grams[keys[0]]["tokens"])
        bad = int(g.size - np.isfinite(g).sum())
        label = keys[0] + (f" (+{len(keys) - 1})" if len(keys) > 1 else "")
        trace = float(np.trace(g, dtype=np.float64)) if not bad else float("nan")
        lines.append(f"{label[:72]:72s} {g.shape[0]:6d} {tokens:9d} {trace / max(tokens, 1):11.4e} {bad:8d}")
        if bad:
            problems.append(f"the Gram '{path}' holds {bad} NaN/Inf value(s)")
            continue
        scale = max(float(np.abs(np.diagonal(g)).max(initial=0.0)), 1e-30)
        g -= g.T  # in place: the asymmetry
        if float(np.abs(g).max(initial=0.0)) > 1e-5 * scale:
            problems.append(f"the Gram '{path}' is not symmetric: the store is damaged")
    return lines


def layer_mass_markdown(rows: list[dict]) -> str:
    masses = layer_mass(rows)
    total = sum(masses.values()) or 1.0
    body = "\n".join(f"| {k} | {v:.4e} | {v / total:.1%} |" for k, v in masses.items())
    return "| layer | Fisher mass | share |\n|---|---|---|\n" + body


def plot_layer_mass(rows: list[dict], title: str, out_uri: str) -> str:
    """A bar chart of per-layer Fisher mass (log scale), written as PNG to `out_uri`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masses = layer_mass(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(masses)), 4))
    ax.bar(range(len(masses)), list(masses.values()), color="#3b7dd8")
    ax.set_xticks(range(len(masses)), list(masses), rotation=70, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("Σ F (per layer)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs, path = storage.filesystem(out_uri)
    fs.pipe_file(path, buf.getvalue())
    return out_uri


MAX_INLINE_PNG = 4 * 2**20  # a plot larger than this is linked, not inlined
MAX_INLINE_PNGS = 16 * 2**20  # the plots of one artifact together: a plot that no longer fits is linked


def png_markdown(uri: str, alt: str, inline: bool, limit: int = MAX_INLINE_PNG) -> str:
    """A markdown image of a PNG plot. Inline, as a data: URI, for a Prefect artifact (the UI shows it
    without access to the file, which may be on another machine); else by its file name, for a
    report written beside the plot. A plot larger than `limit` bytes is named by its path instead."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if not inline:
        return f"![{alt}]({name})"
    try:
        data = storage.read_bytes(uri, min(limit, MAX_INLINE_PNG))
    except (ValueError, OSError, FishmergeError):  # too large, changed or unreadable: named, not shown
        return f"{alt}: `{uri}`"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"


def fisher_report_markdown(store: str, summaries: list[dict]) -> tuple[str, str]:
    """The report of an estimation, as markdown (spec, examples, wall time, throughput, the shards
    computed this run, per-layer mass), and the per-layer mass plot written beside the store."""
    attrs = dict(open_fisher_store(store).attrs)
    rows = tensor_stats(store)
    png = plot_layer_mass(
        rows,
        f"{attrs['fisher_id']} · {attrs['estimator']} · N={attrs['n_examples']}",
        store.rstrip("/").removesuffix(".zarr") + ".layer-mass.png",
    )
    spec = attrs.get("spec", {})
    shard_rows = "\n".join(
        f"| {s['shard']} | {s['n_examples']} | {s['compute_s']:.1f} | {s['n_examples'] / max(s['compute_s'], 1e-9):.1f} |"
        for s in sorted(summaries, key=lambda s: s["shard"])
    )
    md = f"""# Fisher {attrs["fisher_id"]}

| | |
|---|---|
| store | `{store}` |
| model | `{spec.get("model")}` (`{attrs["model_fingerprint"][:19]}…`) |
| data | `{spec.get("data")}` split `{spec.get("split")}` (`{attrs["data_fingerprint"][:19]}…`) |
| estimator | {attrs["estimator"]} |
| examples | {attrs["n_examples"]} (seed {spec.get("seed")}, max length {spec.get("max_length")}) |
| shards | {attrs.get("shards")} (computed this run: {attrs.get("shards_computed_last_run")}) |
| wall time | {attrs.get("wall_time_s")} s |
| examples/s | {attrs.get("examples_per_s")} |
| device / dtype | {attrs.get("device")} / {attrs.get("model_dtype")} |
| plot | `{png}` |

{png_markdown(png, "Fisher mass per layer", inline=True)}

## Shards computed this run
| shard | examples | compute s | examples/s |
|---|---|---|---|
{shard_rows}

## Per-layer Fisher mass
{layer_mass_markdown(rows)}
"""
    return md, png
