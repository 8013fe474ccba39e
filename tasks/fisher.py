"""Prefect tasks for Fisher estimation: thin wrappers over fishmerge.fisher.job (inputs/outputs are JSON)."""

from __future__ import annotations

from fishmerge.errors import FishmergeError
from fishmerge.fisher.job import Resolved, compute_shard, finish, missing_shards
from fishmerge.fisher.reduce import CorruptPartials
from fishmerge.fisher.shards import Shard
from prefect import task


@task(name="fisher-shard", tags=["fisher-gpu"], retries=2, retry_delay_seconds=2, task_run_name="shard-{shard[0]}")
def fisher_shard(resolved: dict, shard: tuple[int, int, int], progress: bool = False) -> dict:
    """Compute one shard's partial (its own model copy, its own device) and return its summary.

    Bad input (FishmergeError) comes back as {'error': message}: retrying cannot fix it, and the
    flow turns it into one readable failure instead of a traceback per task.
    """
    try:
        return compute_shard(Resolved.from_dict(resolved), Shard(*shard), progress)
    except FishmergeError as exc:
        return {"error": str(exc)}


@task(name="fisher-missing-shards")
def fisher_missing_shards(resolved: dict, plan: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Shards of the plan without a complete partial (all of them on a first run)."""
    todo = missing_shards(Resolved.from_dict(resolved), [Shard(*s) for s in plan])
    return [(s.index, s.start, s.stop) for s in todo]


@task(name="fisher-reduce")
def fisher_reduce(
    resolved: dict, plan: list[tuple[int, int, int]], summaries: list[dict], wall_s: float, keep_partials: bool
) -> dict:
    """Reduce partials into the store: {'store': uri} or {'corrupt': [shard indices]} to recompute."""
    try:
        uri = finish(Resolved.from_dict(resolved), [Shard(*s) for s in plan], summaries, wall_s, keep_partials)
    except CorruptPartials as exc:
        return {"corrupt": exc.shards}
    except FishmergeError as exc:
        return {"error": str(exc)}
    return {"store": uri}


@task(name="fisher-resolve")
def fisher_resolve(spec: dict, store: str | None, store_root: str) -> dict:
    """Fingerprint inputs (no model load) → resolved spec, plus the finished store if one exists."""
    from fishmerge.fisher.job import FisherSpec, existing_store, resolve

    try:
        r = resolve(FisherSpec(**spec), store, store_root)
        return {"resolved": r.to_dict(), "existing": existing_store(r)}
    except FishmergeError as exc:
        return {"error": str(exc)}


@task(name="fisher-report")
def fisher_report(store: str, summaries: list[dict]) -> str:
    """Markdown artifact (spec, examples, wall time, throughput, per-layer mass) and a PNG beside the store."""
    from fishmerge.fisher.report import layer_mass_markdown, plot_layer_mass, tensor_stats
    from fishmerge.fisher.store import open_fisher_store
    from prefect.artifacts import create_markdown_artifact

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

## Shards computed this run
| shard | examples | compute s | examples/s |
|---|---|---|---|
{shard_rows}

## Per-layer Fisher mass
{layer_mass_markdown(rows)}
"""
    create_markdown_artifact(key=f"fisher-{attrs['fisher_id']}", markdown=md, description="fishmerge Fisher")
    return png
