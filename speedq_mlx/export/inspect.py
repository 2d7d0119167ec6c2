"""What is in an artifact: bits, group size, parameters, bytes and bits/weight per component."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpeedQError
from ..model.io import safetensors_header
from ..quant.plan import component_of

ORDER = ("vision", "projector", "language", "embeddings", "lm_head", "other")


def artifact_report(folder: Path) -> dict:
    """Per-component and total statistics of an exported folder."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise SpeedQError(f"{folder} has no config.json (not a model folder)")
    config = json.loads(cfg_file.read_text())
    quant = config.get("quantization", {})
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(safetensors_header(f))
    if not tensors:
        raise SpeedQError(f"{folder} has no *.safetensors weights")
    modules: dict[str, dict] = {}
    for name, info in tensors.items():
        mod, _, leaf = name.rpartition(".")
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        entry = modules.setdefault(mod, {"bytes": 0, "leaves": {}})
        entry["bytes"] += nbytes
        entry["leaves"][leaf] = info
    comps = {c: {"params": 0, "bytes": 0, "settings": set()} for c in ORDER}
    for mod, entry in modules.items():
        leaves = entry["leaves"]
        comp = component_of(mod) if "scales" in leaves or _is_matrix(mod, leaves) else None
        comp = comp or "other"
        if "scales" in leaves:
            setting = quant.get(mod) if isinstance(quant.get(mod), dict) else quant
            bits, group = setting["bits"], setting["group_size"]
            out_dims, words = leaves["weight"]["shape"]
            params = out_dims * words * 32 // bits
            comps[comp]["settings"].add(f"{bits}-bit g{group}")
            if "bias" in leaves:
                params += _numel(leaves["bias"]["shape"])
        else:
            params = sum(_numel(i["shape"]) for i in leaves.values())
            dtypes = {i["dtype"] for i in leaves.values()}
            comps[comp]["settings"].add("float " + "/".join(sorted(dtypes)))
        comps[comp]["params"] += params
        comps[comp]["bytes"] += entry["bytes"]
    rows = []
    for c in ORDER:
        d = comps[c]
        if d["params"] == 0:
            continue
        rows.append({"component": c, "settings": ", ".join(sorted(d["settings"])),
                     "params": d["params"], "bytes": d["bytes"],
                     "bits_per_weight": 8 * d["bytes"] / d["params"]})
    total_params = sum(r["params"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder), "components": rows, "params": total_params,
            "weight_bytes": total_bytes, "bits_per_weight": 8 * total_bytes / total_params,
            "size_on_disk_bytes": disk, "dtype": config.get("torch_dtype")}


def _is_matrix(mod: str, leaves: dict) -> bool:
    w = leaves.get("weight")
    return w is not None and len(w["shape"]) == 2


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def format_report(rep: dict) -> str:
    """A plain-text table (also used in the model card)."""
    lines = [f"{'component':<11} {'quantization':<24} {'params':>13} {'MiB':>9} {'bits/w':>7}"]
    for r in rep["components"]:
        settings = r["settings"].split(", ")  # a budgeted plan mixes many: the card lists them
        shown = r["settings"] if len(settings) <= 2 else f"mixed: {len(settings)} settings"
        lines.append(f"{r['component']:<11} {shown:<24} {r['params']:>13,} "
                     f"{r['bytes'] / 2**20:>9.2f} {r['bits_per_weight']:>7.3f}")
    lines.append(f"{'total':<11} {'':<24} {rep['params']:>13,} "
                 f"{rep['weight_bytes'] / 2**20:>9.2f} {rep['bits_per_weight']:>7.3f}")
    lines.append(f"size on disk: {rep['size_on_disk_bytes'] / 2**20:.2f} MiB "
                 f"({rep['size_on_disk_bytes'] / 1e6:.2f} MB); float dtype {rep['dtype']}")
    return "\n".join(lines)
