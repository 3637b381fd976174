"""The pre-flight estimate (`bp-train train --estimate-memory`) of the full-size SD 1.5 architecture: the 1024 and
768 presets' largest buckets, batch 1, the baseline (the preset as written: AdamW fp32 states, gradient
checkpointing), `training.memory: lean` (the text encoder's outputs cached, as lean does by default) and lean with
`text_cache.mode: none` (the text encoder resident in bf16 and run every step). The base model is a header-only `.safetensors` written from the
full-size checkpoint's key/shape fixture (no weights: the estimate reads only the architecture).

    .venv/bin/python bench/bench_estimate.py [--out bench/out/estimate.json] [--method tally|memtracker]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT.parent / "shared" / "fixtures" / "sd15-ldm-keys.json"


def header_only_checkpoint(out: Path) -> Path:
    keys = json.loads(FIXTURE.read_text())["checkpoint"]
    header, offset = {}, 0
    for key, info in keys.items():
        n = {"F16": 2, "F32": 4, "I64": 8}[info["dtype"]]
        for s in info["shape"]:
            n *= s
        header[key] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "estimate.json"))
    parser.add_argument("--method", default="tally", help="tally (as the product) or memtracker (the cross-check)")
    parser.add_argument("--presets", default="1024,768")
    parser.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4")
    args = parser.parse_args()
    from bp_trainer.train import config as C
    from bp_trainer.train.estimate import estimate_run

    work = Path(tempfile.mkdtemp(prefix="bp-estimate-"))
    base = header_only_checkpoint(work / "sd15-header-only.safetensors")
    (work / "data").mkdir()
    rows = []
    cases = [(preset, int(batch), plan, text_cache) for batch in args.batches.split(",")
             for preset in args.presets.split(",")
             for plan, text_cache in (("manual", "auto"), ("lean", "auto"), ("lean", "none"))]
    for preset, batch, plan, text_cache in cases:
        raw = C.merge(C.preset(preset), {"model": {"base": str(base)}, "dataset": {"path": str(work / "data")},
                                         "training": {"memory": plan, "batch_size": batch},
                                         "text_cache": {"mode": text_cache}})
        cfg = C.validate(raw)
        t0 = time.perf_counter()
        r = estimate_run(cfg, method=args.method)
        r.update(preset=preset, plan=plan if text_cache == "auto" else f"{plan}, text_cache none",
                 seconds=round(time.perf_counter() - t0, 1))
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("preset", "plan", "batch_size", "peak_gib", "bucket", "parts", "method",
                                            "seconds")}),
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
