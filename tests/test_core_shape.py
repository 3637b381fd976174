"""The core's shape: no import cycles, the UI imported only by the UI, short functions, one owner of the run
folder's names, and one `arb:` validator that the config, the bucket generator and the trainer's data module
all agree with."""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

import pytest

from bp_trainer.buckets import ArbConfig, generate_buckets
from bp_trainer.errors import ConfigError
from bp_trainer.train import config as C

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "bp_trainer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict) -> set:
    """Every bp_trainer module `path` imports, at module level or inside functions (a lazy import is still an
    edge: it runs whenever that code does)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {d for d in _imports(p, modules) if d != m and not m.startswith(d + ".")}
             for m, p in modules.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():  # the checker itself, on a known graph
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_ui_imports_the_ui():
    modules = _modules()
    offenders = [m for m, p in modules.items()
                 if not m.startswith("bp_trainer.ui") and m != "bp_trainer.commands.ui"
                 and any(d.startswith("bp_trainer.ui") for d in _imports(p, modules))]
    assert offenders == []


def test_no_function_is_longer_than_100_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


RUN_FOLDER_NAMES = ("run.lock", "trainer.pid", "events.jsonl", "exit.json", "accelerate.yaml", "train.log",
                    '"STOP"')


def test_only_rundir_spells_the_run_folder_names():
    found = []
    for path in PKG.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for name in RUN_FOLDER_NAMES:
                quoted = name if name.startswith('"') else f'"{name}"'
                if quoted in code or f"'{name}'" in code:
                    found.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert found == []


# ------------------------------------------------------------------------------------------------ arb blocks


def _random_block(rng: random.Random) -> dict:
    """A block from the space users type: sometimes trainable, often not (odd multiples, zero, tiny limits)."""
    def side():
        if rng.random() < 0.75:
            return rng.randrange(256, 1600, 64)
        return rng.choice([0, 7, 12, 60, 100, 500, 1000, rng.randrange(8, 2048, 8)])

    block = {}
    if rng.random() < 0.8:
        small = rng.choice([256, 512, 512, 768]) if rng.random() < 0.7 else side()
        block["base_res"] = [small, side()] if rng.random() < 0.2 else [small] * 2
    if rng.random() < 0.8:
        block["max_size"] = [side(), side()]
    if rng.random() < 0.7:
        block["divisible"] = rng.choice([0, 8, 12, 16, 32, 60, 64, 64, 64, 128])
    if rng.random() < 0.5:
        block["max_ar_error"] = rng.choice([0, -1, 0.5, 4, 4.0, 2])
    if rng.random() < 0.6:
        block["min_dim"] = rng.choice([0, 8, 60, 64, 128, 256, 257, 512])
    if rng.random() < 0.6:
        block["dim_limit"] = rng.choice([64, 256, 512, 1024, 2048, 2048, 4096])
    return block


def _config_accepts(block: dict) -> bool:
    try:
        C.validate({"arb": block}, check_paths=False)
        return True
    except ConfigError:
        return False


def _generator_accepts(block: dict) -> bool:
    try:
        ArbConfig.from_dict(block)
        return True
    except ConfigError:
        return False


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("arb-data")
    for i, size in enumerate([(640, 480), (480, 640), (512, 512)]):
        Image.new("RGB", size, (i * 60, 90, 120)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("1girl, solo", encoding="utf-8")
    return root


def _data_module_accepts(block: dict, dataset: Path) -> bool:
    """The trainer's data module builds its bucket sampler from the validated config (every image assigned or
    skipped, every bucket a multiple of 8)."""
    from bp_trainer.train.data import build_data

    cfg = C.validate({"arb": block, "dataset": {"path": str(dataset)}, "training": {"batch_size": 1}},
                     check_paths=False)
    data = build_data(cfg, rank=0, world_size=1)
    return all(w % 8 == 0 and h % 8 == 0 for w, h in data["buckets"]) and len(data["sampler"]) > 0


EDGE_BLOCKS = [{"max_ar_error": 0}, {"divisible": 12}, {"min_dim": 260}, {"base_res": [500, 500]},
               {"max_ar_error": float("nan")}, {"base_res": [1024, 1024], "max_size": [768, 512]}, {}]


def test_config_bucket_generator_and_data_module_agree_on_arb_blocks(three_images):
    rng = random.Random(20261202)
    blocks = EDGE_BLOCKS + [_random_block(rng) for _ in range(250)]
    accepted = 0
    for block in blocks:
        by_config = _config_accepts(block)
        assert by_config == _generator_accepts(block), block
        if by_config:
            accepted += 1
            assert generate_buckets(ArbConfig.from_dict(block)), block
            assert _data_module_accepts(block, three_images), block
    assert 40 < accepted < len(blocks) - 40  # both kinds were exercised


@pytest.mark.parametrize("block, fragment", [({"max_ar_error": 0}, "arb.max_ar_error"),
                                             ({"divisible": 12}, "arb.divisible"),
                                             ({"min_dim": 260}, "arb.min_dim")])
def test_untrainable_blocks_are_refused_by_the_config_naming_the_key(block, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        C.validate({"arb": block}, check_paths=False)
