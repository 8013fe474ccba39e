"""Everything beside the weights in a merged model folder: index, config, tokenizer, card, lineage.

Each target folder loads with `from_pretrained`: config and generation config (dtype updated),
the target's tokenizer files, `model.safetensors.index.json` when sharded, a README.md model
card with the lineage, and `fishmerge.json` (machine-readable: inputs with fingerprints, Fisher
ids, λ, method and options, fishmerge version).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from fishmerge import __version__
from fishmerge.io.checkpoint import FINGERPRINT_CACHE
from fishmerge.merge.plan import OUTPUT_MARKER, MergePlan

SKIP = {"model.safetensors.index.json", "README.md", "fishmerge.json", ".fishmerge-fingerprint.json"}
_TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def recorded_context(plan: MergePlan, context: dict) -> dict:
    """The pre-pass values the method records in the lineage (e.g. global Fisher norms)."""
    return {p.name: context[p.name] for p in plan.merge_method.prepasses(plan.params) if p.recorded}


def lineage(plan: MergePlan, target: str, context: dict | None = None) -> dict:
    """The machine-readable record of how a target was made (written as fishmerge.json)."""
    return {
        "fishmerge_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "plan_id": plan.plan_id,
        "name": plan.config_name,
        "target": target,
        "method": plan.method,
        "options": {
            **plan.params.model_dump(mode="json"),
            **recorded_context(plan, context or {}),
        },
        "inputs": [
            {
                "name": m.name,
                "path": m.path,
                "weight": w,
                "model_fingerprint": m.fingerprint,
                "fisher": m.fisher,
                "fisher_id": m.fisher_id,
            }
            for m, w in zip(plan.models, plan.weights)
        ],
        "base": {"path": plan.base.path, "model_fingerprint": plan.base.fingerprint} if plan.base else None,
        "merged_tensors": len(plan.shared),
        "own_tensors": next(t.own_keys for t in plan.targets if t.name == target),
    }


def model_card(record: dict, options_text: str) -> str:
    """A short README.md: what this model is and exactly how it was made."""
    rows = "\n".join(
        f"| {i['name']} | {i['weight']:.4g} | `{i['path']}` | `{i['model_fingerprint'][:23]}…` | {i['fisher_id'] or '—'} |"
        for i in record["inputs"]
    )
    base = f"\nBase model: `{record['base']['path']}`.\n" if record["base"] else ""
    return f"""---
library_name: transformers
tags: [fishmerge, merge, {record["method"]}]
---
# {record["name"]} — target `{record["target"]}`

Merged by [fishmerge](https://pypi.org/project/fishmerge/) {record["fishmerge_version"]} with the
**{record["method"]}** method ({options_text}) on {record["created"]}. The {record["merged_tensors"]} tensors
shared by every input were merged; the target's own {len(record["own_tensors"])} tensor(s) (its task
head) were copied from `{record["target"]}`.
{base}
| input | λ | path | fingerprint | Fisher |
|---|---|---|---|---|
{rows}

Plan id `{record["plan_id"]}`; the full record is in `fishmerge.json`.
"""


def write_metadata(plan: MergePlan, out_root: Path, context: dict) -> None:
    """Write the non-weight files of every target folder under out_root."""
    for t in plan.targets:
        src = Path(plan.models[t.index].path)
        dst = out_root / t.name
        for f in src.iterdir():
            own = f.name.startswith(FINGERPRINT_CACHE) or f.name.endswith(".tmp")  # fishmerge's cache files
            if f.is_file() and f.suffix != ".safetensors" and f.name not in SKIP and not own:
                shutil.copy2(f, dst / f.name)
        cfg_path = dst / "config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            floats = {d for k, d in t.dtypes.items() if d in _TORCH_NAMES}
            if len(floats) == 1:
                name = _TORCH_NAMES[floats.pop()]
                cfg["dtype"] = name
                if "torch_dtype" in cfg:
                    cfg["torch_dtype"] = name
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if len(t.files) > 1:
            index = {
                "metadata": {"total_size": t.nbytes},
                "weight_map": {k: f.name for f in t.files for k in f.keys},
            }
            (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        record = lineage(plan, t.name, context)
        (dst / "fishmerge.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
        (dst / "README.md").write_text(model_card(record, plan.merge_method.describe(plan.params, ", ")))
    marker = {"plan_id": plan.plan_id, "targets": [t.name for t in plan.targets], "fishmerge_version": __version__}
    (out_root / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
