"""The import directions of docs/architecture.md, read from every module's source (ast).

    cli.py, benchmarks/        may import any layer (benchmarks: public names only)
    drivers (heads.DRIVERS)    use both stages: predict, explain, the demo
    stage two: heads/          training and evaluation: never decoding code, never a driver
    stage one: pipeline/       never heads/
    cache/                     never pipeline/ or heads/; its life cycle (lock, HDF5 staging,
                               creating and extending) is reached from outside only through
                               cache.lifecycle.WriteSession
    ground floor: cache/core/  nothing of caer-kit outside itself
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "pipeline", "heads")
# Stage two's modules that drive stage one as well (they re-decode clips).
DRIVERS = {"heads.predict", "heads.explain", "heads.explain_inputs", "heads.demo",
           "heads.demo_data", "heads.demo_analyses"}
# Stage one's decoding: clips, frames, faces, persons, crops, the worker, extract itself.
DECODING = ("pipeline.video", "pipeline.faces", "pipeline.persons", "pipeline.crops",
            "pipeline.prepare", "pipeline.original", "pipeline.boxes", "pipeline.annotations",
            "pipeline.extract", "pipeline.workers", "pipeline.encode", "pipeline.datasets")
# What a writer outside cache/ may use of a store's life cycle: the session alone.
LIFE_CYCLE = ("cache.lifecycle", "cache.lock", "cache.hdf5")
WRITER_API = {"WriteSession"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[Path]:
    files = [ROOT / "cli.py"]
    for top in (*PACKAGES, "benchmarks"):
        files += sorted((ROOT / top).rglob("*.py"))
    return files


def imports(path: Path):
    """(module imported, names imported from it, line) for every import, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(a.name for a in node.names), node.lineno


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def broken_rules(source: str, target: str, names: tuple) -> list[str]:
    if not within(target, *PACKAGES):
        return []
    wrong = []
    if within(source, "cache.core") and not within(target, "cache.core"):
        wrong.append("the ground floor imports nothing of caer-kit outside cache.core")
    if within(source, "cache") and within(target, "pipeline", "heads"):
        wrong.append("cache/ imports nothing from pipeline/ or heads/")
    if (not within(source, "cache") and target in LIFE_CYCLE
            and (target != "cache.lifecycle" or not WRITER_API >= set(names))):
        wrong.append("a store's life cycle is cache/'s: outside it, use cache.lifecycle."
                     "WriteSession")
    if within(source, "pipeline") and within(target, "heads"):
        wrong.append("stage one imports nothing from stage two")
    if within(source, "heads") and source not in DRIVERS:
        if within(target, *DECODING):
            wrong.append("training and evaluation never import decoding code")
        if target in DRIVERS:
            wrong.append("training and evaluation never import a driver")
    if source.startswith("benchmarks"):
        private = [n for n in names if n.startswith("_")]
        if private or any(part.startswith("_") for part in target.split(".")):
            wrong.append(f"benchmarks use public names only ({', '.join(private) or target})")
    return wrong


def test_every_import_points_the_allowed_way():
    found = []
    for path in sources():
        source = module_name(path)
        for target, names, line in imports(path):
            for rule in broken_rules(source, target, names):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {target}: {rule}")
    assert not found, "\n".join(found)


def test_every_module_is_read():
    names = {module_name(p) for p in sources()}
    assert {"cli", "cache.core.errors", "cache.store", "cache.layout", "cache.writer",
            "cache.fingerprint", "pipeline.extract", "pipeline.workers", "pipeline.encode",
            "heads.train", "benchmarks.run"} <= names and len(names) > 60


@pytest.mark.parametrize("source, target, names", [
    ("cache.store", "pipeline.errors", ("CaerError",)),
    ("pipeline.extract", "heads.model", ()),
    ("heads.train", "pipeline.video", ("middle_candidate",)),
    ("heads.evaluate", "heads.predict", ()),
    ("benchmarks.bench_head", "heads.step", ("_private",)),
    ("cache.core.labels", "cache.store", ()),
    ("pipeline.extract", "cache.hdf5", ("export_hdf5",)),
    ("pipeline.extract", "cache.lifecycle", ("WriteSession", "prepare_store")),
    ("cli", "cache.lock", ("StoreLock",)),
])
def test_the_rules_catch_each_kind_of_wrong_edge(source, target, names):
    assert broken_rules(source, target, names)


def test_allowed_edges_pass():
    for source, target in [("heads.train", "pipeline.clip"), ("heads.predict", "pipeline.prepare"),
                           ("pipeline.extract", "cache.store"), ("cli", "heads.train"),
                           ("heads.model", "cache.core.labels"), ("cache.store", "cache.core")]:
        assert not broken_rules(source, target, ()), (source, target)
    assert not broken_rules("pipeline.extract", "cache.lifecycle", ("WriteSession",))
    assert not broken_rules("cache.build", "cache.hdf5", ("export_hdf5",))
