"""Benchmark: full-size SD 1.5 fp32 checkpoint -> fp16 .safetensors with a VAE baked in, vs. plainly copying it.

Generates (streamed, random weights) a full-size SD 1.5 fp32 checkpoint with the keys/shapes of the WebUI
fixture `tests/fixtures/sd15-ldm-keys.json` (~4.3 GB) and an fp32 VAE file (~335 MB), then measures in
child processes:
- copy: `shutil.copyfile` of the checkpoint + fsync (the baseline);
- convert, cold: `python -m bp_trainer merge --base CKPT --vae VAE --precision fp16 --out OUT --json` with an
  empty hash cache (`BP_TRAIN_CACHE_DIR` = a fresh folder): both inputs are hashed for the recipe during the
  conversion, the header is written last and the output hashed afterwards (a first merge);
- convert, warm: the same command again with the cache the cold run filled (a second merge of the same base,
  or a base hashed before by `hash`): header first, output hashed while it is written;
- convert without hashing (breakdown only): every SHA-256 replaced by a constant, header-last path.
Wall time and the child's peak resident memory (wait4 ru_maxrss) are recorded; each run is repeated
(alternating) and the best wall time is kept. The outputs are verified (fixture keys, every dtype fp16 except
position_ids, VAE tensors equal the VAE file's, reported hashes equal a fresh computation, cold and warm
outputs identical). Generated files are deleted at the end.

    .venv/bin/python bench/bench_checkpoint.py [--dir DIR] [--repeat 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(fixture: dict, ckpt: Path, vae: Path) -> None:
    import torch

    from bp_trainer.checkpoint.io import Entry, write_checkpoint

    def entries(spec: dict) -> list:
        out = []
        for i, (k, v) in enumerate(sorted(spec.items())):
            shape = tuple(v["shape"])
            if v["dtype"] == "I64":
                out.append(Entry(k, torch.int64, shape, lambda s=shape: torch.arange(s[-1]).reshape(s)))
            else:
                def make(s=shape, seed=i):
                    g = torch.Generator().manual_seed(seed)
                    return torch.randn(s, generator=g, dtype=torch.float32) * 0.02
                out.append(Entry(k, torch.float32, shape, make))
        return out

    write_checkpoint(entries(fixture["checkpoint"]), ckpt, {"bench": "sd15-fp32-random"})
    write_checkpoint(entries(fixture["vae"]), vae, {"bench": "vae-fp32-random"})


def run_child(cmd: list[str], env: "dict | None" = None) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS bytes, stdout, CPU seconds user+system) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, out.decode(), usage.ru_utime + usage.ru_stime


def child_nohash(base: str, vae: str, out: str) -> int:
    """The same merge with every SHA-256 replaced by a constant: what the conversion costs without the
    hashing a plain copy does not do (input hashes for the recipe, output hashes for the result)."""
    from bp_trainer.checkpoint import assemble, hashcache, io
    from bp_trainer.checkpoint.assemble import MergeOptions, merge

    fake = {"sha256": "0" * 64, "autov2": "0" * 10, "old": "0" * 8}
    hashcache.file_hashes = lambda p: dict(fake)
    hashcache.lookup = lambda p: None
    hashcache.store = lambda *a, **kw: False

    class NoHasher:  # the output's follower hasher, doing nothing
        def __init__(self, path, total):
            pass

        def written(self, offset, n):
            pass

        def abort(self):
            pass

        def result(self):
            return dict(fake)

    io.FollowingHasher = NoHasher
    real = assemble.write_checkpoint

    def header_last(*a, **kw):
        late = kw["late"]
        return real(*a, **{**kw, "late": io.LateMetadata(late.value, lambda: False, late.reserve)})

    assemble.write_checkpoint = header_last
    merge(MergeOptions(base=base, vae=vae, precision="fp16"), out)
    print("{}")
    return 0


def verify(fixture: dict, out: Path, vae: Path, reported: dict) -> None:
    import torch

    from bp_trainer.checkpoint.hashes import file_hashes
    from bp_trainer.checkpoint.io import open_file

    with open_file(out) as o, open_file(vae) as v:
        assert set(o.keys()) == set(fixture["checkpoint"]), "keys differ from the fixture"
        for k in o.keys():
            want = torch.int64 if fixture["checkpoint"][k]["dtype"] == "I64" else torch.float16
            assert o.info(k).dtype == want, k
            assert list(o.info(k).shape) == fixture["checkpoint"][k]["shape"], k
        for k in list(v.keys())[::25]:
            assert torch.equal(o.get("first_stage_model." + k), v.get(k).half()), k
    h = file_hashes(out)
    assert all(h[k] == reported[k] for k in h), "reported hashes differ"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bp-bench-checkpoint"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-nohash", nargs=3, metavar=("BASE", "VAE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_nohash:
        return child_nohash(*args.child_nohash)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, vae, out, copy = work / "sd15-fp32.safetensors", work / "vae-fp32.safetensors", work / "out-fp16.safetensors", \
        work / "copy.safetensors"
    fixture = json.loads((ROOT / "tests" / "fixtures" / "sd15-ldm-keys.json").read_text(encoding="utf-8"))
    if args.generate_only:
        generate(fixture, ckpt, vae)
        return 0
    try:
        if not ckpt.exists() or not vae.exists():
            # in a child process: this process must stay small, because a child's ru_maxrss starts from
            # its parent's resident size at fork
            t = time.perf_counter()
            run_child([sys.executable, __file__, "--dir", str(work), "--generate-only"])
            print(f"generated inputs in {time.perf_counter() - t:.1f}s", flush=True)
        size = ckpt.stat().st_size
        py = sys.executable
        copy_cmd = [py, "-c", "import os,shutil,sys; shutil.copyfile(sys.argv[1], sys.argv[2]); "
                    "fd=os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd)", str(ckpt), str(copy)]
        conv_cmd = [py, "-m", "bp_trainer", "merge", "--base", str(ckpt), "--vae", str(vae), "--precision", "fp16",
                    "--out", str(out), "--json"]
        copies, colds, warms, nohash = [], [], [], []
        reported = None
        for i in range(args.repeat):
            for p in (copy, out):
                if p.exists():
                    p.unlink()
            cache = work / f"hash-cache-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            env = {"BP_TRAIN_CACHE_DIR": str(cache)}
            load = os.getloadavg()[0]
            c_wall, c_rss, _, c_cpu = run_child(copy_cmd)
            copies.append((c_wall, c_rss, c_cpu))
            wall, rss, stdout, cpu = run_child(conv_cmd, env)
            colds.append((wall, rss, cpu))
            cold_reported = json.loads(stdout)
            if i == args.repeat - 1:
                verify(fixture, out, vae, cold_reported)
            out.unlink()
            cached = json.loads((cache / "hashes.json").read_text(encoding="utf-8"))["files"]
            if len(cached) != 2:
                raise SystemExit(f"the cold run did not fill the hash cache ({len(cached)} entries)")
            w_wall, w_rss, stdout, w_cpu = run_child(conv_cmd, env)
            warms.append((w_wall, w_rss, w_cpu))
            reported = json.loads(stdout)
            if reported["sha256"] != cold_reported["sha256"]:
                raise SystemExit("cold and warm outputs differ")
            nohash_out = work / "out-nohash.safetensors"
            n_wall, n_rss, _, n_cpu = run_child([py, __file__, "--child-nohash", str(ckpt), str(vae), str(nohash_out)],
                                                {"BP_TRAIN_CACHE_DIR": str(work / "hash-cache-unused")})
            nohash_out.unlink()
            nohash.append((n_wall, n_rss, n_cpu))
            print(f"run {i + 1} (load {load:.1f}): copy {c_wall:.2f}s wall {c_cpu:.2f}s cpu (rss {c_rss / 2**20:.0f} MiB), "
                  f"convert cold {wall:.2f}s wall {cpu:.2f}s cpu (rss {rss / 2**20:.0f} MiB), "
                  f"warm {w_wall:.2f}s wall {w_cpu:.2f}s cpu (rss {w_rss / 2**20:.0f} MiB), "
                  f"without hashing {n_wall:.2f}s wall {n_cpu:.2f}s cpu", flush=True)
        verify(fixture, out, vae, reported)
        copy_t = min(c[0] for c in copies)
        cold_t = min(c[0] for c in colds)
        warm_t = min(c[0] for c in warms)
        peak = max(c[1] for c in colds + warms)
        r2 = lambda xs: [round(x, 2) for x in xs]  # noqa: E731
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "input_bytes": size,
            "vae_bytes": vae.stat().st_size,
            "output_bytes": out.stat().st_size,
            "copy_s": round(copy_t, 2),
            "convert_cold_s": round(cold_t, 2),
            "time_ratio_cold": round(cold_t / copy_t, 3),
            "convert_warm_s": round(warm_t, 2),
            "time_ratio_warm": round(warm_t / copy_t, 3),
            "peak_rss_bytes": peak,
            "peak_rss_cold_bytes": max(c[1] for c in colds),
            "peak_rss_warm_bytes": max(c[1] for c in warms),
            "rss_ratio": round(peak / size, 4),
            "copy_cpu_s": round(min(c[2] for c in copies), 2),
            "convert_cold_cpu_s": round(min(c[2] for c in colds), 2),
            "convert_warm_cpu_s": round(min(c[2] for c in warms), 2),
            "convert_without_hashing_s": round(min(c[0] for c in nohash), 2),
            "convert_without_hashing_cpu_s": round(min(c[2] for c in nohash), 2),
            "time_ratio_without_hashing": round(min(c[0] for c in nohash) / copy_t, 3),
            "runs": {"copy": r2(c[0] for c in copies), "convert_cold": r2(c[0] for c in colds),
                     "convert_warm": r2(c[0] for c in warms), "convert_without_hashing": r2(c[0] for c in nohash),
                     "copy_cpu": r2(c[2] for c in copies), "convert_cold_cpu": r2(c[2] for c in colds),
                     "convert_warm_cpu": r2(c[2] for c in warms),
                     "convert_rss_mib": [round(c[1] / 2**20) for c in colds + warms]},
            "verified": True,
        }
        print(json.dumps(result, indent=2))
        for run in ("cold", "warm"):
            ok = result[f"time_ratio_{run}"] <= 1.5 and result["rss_ratio"] < 0.25
            print(f"targets, {run} (time <= 1.5x copy, RSS < 25% of input):", "met" if ok else "NOT met")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
