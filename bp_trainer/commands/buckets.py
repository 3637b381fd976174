"""`python -m bp_trainer buckets --config FILE.yaml [--dataset DIR] [--json]`: bucket list and a dataset's plan.

The YAML is a whole run config (its `arb:` block, and `dataset.path` when --dataset is absent; relative paths
are relative to the YAML's folder) or just an `arb:` block (with or without the `arb:` key).
JSON output: `buckets` ([w, h] in naifu-diffusion's order; just base_res when `arb.enabled` is false, as in
training), and with a dataset `counts` (per bucket, same order), `skipped` ({path, reason, kind}), `crop`
(mean/worst cropped area fraction, upscaled images) and more.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML, or a YAML holding just an arb: block")
    parser.add_argument("--dataset", help="dataset folder (default: dataset.path from the config)")
    parser.add_argument("--rule", choices=("log", "linear"), default="log",
                        help="nearest bucket by log aspect ratio (default) or naifu's linear w/h difference")
    parser.add_argument("--caption-ext", default=None, help="caption file extension (default .txt, or the config's)")
    parser.add_argument("--metadata", default=None, help="JSON/JSONL file mapping image -> caption instead of sidecars")
    parser.add_argument("--missing-caption", choices=("skip", "empty", "error"), default="skip",
                        help="images without a caption: skip them (default), train them with an empty caption, or fail")
    parser.add_argument("--verify", choices=("header", "full"), default="header",
                        help="header: sizes from headers, truncation from file ends (fast, default); "
                             "full: also decode every image to find damaged pixel data (slow)")
    parser.add_argument("--workers", type=int, default=1,
                        help="threads reading image headers (helps on network or spinning disks; default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="also count batches per epoch at this batch size")
    parser.add_argument("--world-size", type=int, default=1, help="processes (GPUs) for the epoch count")
    parser.add_argument("--leftover", choices=("pool", "short", "drop"), default="pool",
                        help="leftover images per bucket: naifu's pool at base_res, short batches, or drop")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def load_arb_yaml(path: "str | os.PathLike[str]") -> "Tuple[Dict[str, Any], Optional[str], Dict[str, Any]]":
    """(arb block, dataset path resolved against the YAML's folder or None, dataset section) from a YAML file."""
    import yaml

    from bp_trainer.buckets import ARB_IGNORED_KEYS, ARB_KEYS
    from bp_trainer.errors import BPError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BPError("config file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BPError(f"cannot read the config ({exc})", path=path) from None
    except yaml.YAMLError as exc:
        raise BPError(f"invalid YAML ({str(exc).splitlines()[0]})", path=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BPError("expected a mapping (a run config or an arb: block)", path=path)
    dataset: Dict[str, Any] = {}
    if "arb" in data:
        arb = data["arb"] or {}
        ds = data.get("dataset")
        if isinstance(ds, dict):
            dataset = ds
    elif data and all(k in ARB_KEYS or k in ARB_IGNORED_KEYS for k in data):
        arb = data
    elif not data:
        arb = {}
    else:
        raise BPError(
            "no arb: block in the config",
            path=path,
            hint="add an arb: section (enabled, base_res, max_size, divisible, max_ar_error, min_dim, dim_limit)",
        )
    ds_path = dataset.get("path") or dataset.get("img_path")
    if isinstance(ds_path, list):  # naifu's img_path is a list of folders
        ds_path = ds_path[0] if ds_path else None
    resolved = None
    if isinstance(ds_path, str) and "://" in ds_path:
        raise BPError(f"dataset path {ds_path} is a URL (naifu downloads .tgz archives)", path=path,
                      hint="download and extract it, then pass --dataset DIR")
    if isinstance(ds_path, str) and ds_path:
        p = Path(os.path.expanduser(ds_path))
        resolved = str(p if p.is_absolute() else (path.parent / p).resolve())
    return arb, resolved, dataset


def compute(args: argparse.Namespace) -> Dict[str, Any]:
    from bp_trainer.buckets import ArbConfig, training_buckets
    from bp_trainer.dataset.plan import plan_buckets
    from bp_trainer.dataset.scan import scan_dataset

    block, ds_path, ds_section = load_arb_yaml(args.config)
    arb = ArbConfig.from_dict(block, source=str(args.config))
    dataset = args.dataset or ds_path
    if not dataset:
        buckets = training_buckets(arb)
        return {"arb": arb.to_dict(), "enabled": arb.enabled, "buckets": [list(b) for b in buckets]}
    caption_ext = args.caption_ext or ds_section.get("caption_extension") or ".txt"
    scan = scan_dataset(dataset, caption_ext=caption_ext, metadata_file=args.metadata,
                        missing_caption=args.missing_caption, workers=max(1, args.workers),
                        verify=args.verify)
    plan = plan_buckets(scan.items, arb, rule=args.rule, problems=scan.problems, batch_size=args.batch_size,
                        world_size=args.world_size, leftover=args.leftover)
    out = plan.to_dict()
    out["enabled"] = arb.enabled
    out["dataset"] = str(dataset)
    out["empty_captions"] = scan.empty_captions
    return out


def run(args: argparse.Namespace) -> int:
    from bp_trainer.cli import emit
    from bp_trainer.dataset.plan import format_plan
    from bp_trainer.errors import BPError

    if args.batch_size is not None and args.batch_size < 1:
        raise BPError("--batch-size must be at least 1")
    if args.world_size < 1:
        raise BPError("--world-size must be at least 1")
    emit(compute(args), args.json, format_plan)
    return 0
