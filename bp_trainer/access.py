"""Which folders a remote request may make the server read or write (the HTTP API's path rule).

Inside the WebUI the API is reachable by anyone who can reach the WebUI (`--listen`, `--share`), so a request
names files only inside allowed roots, checked after resolving `..` and symbolic links:

- `config_path`, `resume_dir`, `run_dir` (events): inside the runs folder.
- `model.base`, `model.vae`: inside the host's model folders (the WebUI's checkpoint and VAE folders), the runs
  folder (trained checkpoints) or a root the user allowed in Settings > BP Train.
- `dataset.path`, `validation.path`: inside a dataset folder the user has trained from in the tab (remembered in the runs folder),
  a root allowed in Settings > BP Train, or the runs folder.
- `latents.dir`, `text_cache.dir`, `run.accelerate_config`: inside the runs folder. `run.runs_dir` and `run.python` are the host's
  own (a request cannot choose the folder runs go to or the program that runs).

The tab and the CLI are the user's own hands and are not restricted. Importable without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

from bp_trainer.errors import BPError

DATASET_ROOTS_FILE = ".bp-train-dataset-roots.json"
MAX_REMEMBERED = 50


class Forbidden(BPError):
    """A request named a path outside the folders it may touch (HTTP 403)."""


def inside(path: "str | os.PathLike[str]", root: "str | os.PathLike[str]") -> bool:
    """Whether `path` lies in `root` (both resolved: `..` and symbolic links cannot step out)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([real, top]) == top
    except ValueError:  # different drives (Windows)
        return False


@dataclass(frozen=True)
class AllowedRoots:
    runs: str
    models: Tuple[str, ...] = ()
    datasets: Tuple[str, ...] = ()

    def check(self, key: str, path: Any, roots: Iterable[str]) -> str:
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise BPError(f"'{key}' must be a path (text), got {type(path).__name__}")
        roots = [r for r in roots if r]
        if not any(inside(path, r) for r in roots):
            raise Forbidden(f"'{key}' is outside the folders this API may use",
                            hint="over HTTP, paths must lie in the runs folder, the model folders, a dataset "
                                 "folder used in the tab, or a folder allowed in Settings > BP Train")
        return os.path.realpath(path)

    def run_file(self, key: str, path: Any) -> str:
        return self.check(key, path, [self.runs])

    def model(self, key: str, path: Any) -> str:
        return self.check(key, path, [*self.models, self.runs])

    def dataset(self, key: str, path: Any) -> str:
        return self.check(key, path, [*self.datasets, self.runs])


def roots_of(host: Any) -> AllowedRoots:
    """The host's allowed roots: its runs folder, model folders and dataset roots (see the module doc)."""
    runs = host.runs_dir()
    fn = getattr(host, "allowed_roots", None)
    extra = fn() if callable(fn) else {}
    models = [host.checkpoint_dir(), *extra.get("models", []), *extra.get("any", [])]
    datasets = [*remembered_datasets(runs), *extra.get("datasets", []), *extra.get("any", [])]
    return AllowedRoots(runs=runs, models=tuple(str(m) for m in models if m),
                        datasets=tuple(str(d) for d in datasets if d))


def check_config_paths(cfg: Any, roots: AllowedRoots) -> None:
    """Every path a request's (validated) config names must lie in its allowed roots."""
    roots.model("model.base", cfg.model.base)
    if cfg.model.vae:
        roots.model("model.vae", cfg.model.vae)
    roots.dataset("dataset.path", cfg.dataset.path)
    if cfg.validation.path:  # a folder of images, or a list file naming dataset images
        roots.dataset("validation.path", cfg.validation.path)
    if cfg.latents.dir:
        roots.run_file("latents.dir", cfg.latents.dir)
    if cfg.text_cache.dir:
        roots.run_file("text_cache.dir", cfg.text_cache.dir)
    if cfg.run.accelerate_config:
        roots.run_file("run.accelerate_config", cfg.run.accelerate_config)


def remembered_datasets(runs_dir: "str | os.PathLike[str]") -> List[str]:
    from bp_trainer.fsutil import read_json_object

    data = read_json_object(Path(runs_dir) / DATASET_ROOTS_FILE) or {}
    roots = data.get("roots") if isinstance(data, dict) else None
    return [r for r in roots if isinstance(r, str)] if isinstance(roots, list) else []


def remember_dataset(runs_dir: "str | os.PathLike[str]", dataset: Optional[str]) -> None:
    """Record a dataset folder the user trained from in the tab (the API may then use it)."""
    if not dataset:
        return
    from bp_trainer.fsutil import atomic_write_text

    real = os.path.realpath(dataset)
    roots = [r for r in remembered_datasets(runs_dir) if r != real]
    roots = (roots + [real])[-MAX_REMEMBERED:]
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(runs_dir) / DATASET_ROOTS_FILE, json.dumps({"roots": roots}, indent=1))
