"""The package's layout (ARCHITECTURE.md): folders by pipeline stage, every module under the line budget,
imports only downward (no circle), and every old top-level module path still importable."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grpo_mlx"
MAX_LINES = 450

# A folder may import its own modules and those of folders ranked lower, never higher.
LAYERS = {
    "core": 0,  # errors, the config and its checks, plug-in loading, the atomic write
    "ui": 1,  # presenting: formatting, the dashboard, trackers, metrics.jsonl, report
    "recipes": 1,
    "data": 1,
    "model": 2,
    "rewards": 2,
    "memory": 3,
    "envs": 3,
    "rollout": 4,
    "eval": 5,
    "train": 6,
    "": 7,  # the top level: cli.py, and the old paths
}

# Every module that stood at the top of the package before the folders, and where it lives now.
OLD_PATHS = {
    "answers": "rewards.answers", "config": "core.config", "convert": "model.convert",
    "dashboard": "ui.dashboard", "display": "ui.display", "distributed": "train.distributed",
    "environments": "envs.environments", "errors": "core.errors", "evaluate": "eval.evaluate", "fuse": "model.fuse",
    "gradients": "train.gradients", "grpo": "train.grpo", "heldout": "eval.heldout", "logprobs": "model.logprobs",
    "multiturn": "rollout.multiturn", "openblas": "core.openblas", "planner": "memory.planner",
    "policy": "model.policy", "prompts": "data.prompts", "report": "ui.report", "run_dir": "train.run_dir",
    "run_log": "ui.run_log", "runner": "train.runner", "sampling": "train.sampling", "sandbox": "envs.sandbox",
    "sandbox_child": "envs.sandbox_child", "shapes": "model.shapes", "step_metrics": "train.step_metrics",
    "tools": "envs.tools", "trackers": "ui.trackers", "trainer": "train.trainer",
}
# Old modules whose name is now a folder: the package re-exports what the module held.
OLD_PACKAGES = {
    "data": ["data.examples"],
    "memory": ["memory.estimate"],
    "rollout": ["rollout.batch"],
    "rewards": ["rewards.registry", "rewards.builtins", "rewards.scoring", "rewards.worker"],
}
# Old modules whose names now live in two homes: a module that imports them from both.
SHIMS = {
    "tiny_model": ["model.tiny_model", "eval.demo"],
    "checkpoint": ["train.checkpoint", "train.run_dir:RUN_FILES,RUN_LOCK,RUN_MARKER,SYSTEM_FILES,TRACKER_DIRS,RunLock,"
                   "foreign_entries,remove_run_files,run_entries"],
}


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "demo_" not in p.parts[-2])


def folder_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ""


def imported_modules(path: Path) -> set[str]:
    """The grpo_mlx modules `path` imports, at the top or inside a function, as dotted paths below grpo_mlx."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1] if path.name != "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
            elif (node.module or "").startswith("grpo_mlx"):
                base = []
            else:
                continue
            module = (node.module or "").removeprefix("grpo_mlx").lstrip(".")
            target = base + (module.split(".") if module else [])
            for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                as_module = "/".join(target + [alias.name])
                found.add(".".join(target + [alias.name]) if (PACKAGE / f"{as_module}.py").exists() else ".".join(target))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("grpo_mlx.") for a in node.names if a.name.startswith("grpo_mlx.")}
    return {m for m in found if m}


def defined_names(path: Path) -> list[str]:
    """The public names a module defines at its top level (functions, classes, constants)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_")]


def test_no_module_is_over_the_line_budget():
    over = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, f"over {MAX_LINES} lines: {over}"


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= LAYERS.keys()


def test_imports_point_down_the_layers_only():
    upward = []
    for path in modules():
        if folder_of(path) == "":
            continue  # the top level (cli.py, the old paths) may import anything
        for target in imported_modules(path):
            if LAYERS[target.split(".")[0] if "." in target else ""] > LAYERS[folder_of(path)]:
                upward.append(f"{path.relative_to(PACKAGE)} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    graph = {}
    for path in modules():
        if folder_of(path) == "":
            continue
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        graph[name.removesuffix(".__init__")] = {t for t in imported_modules(path) if folder_of(PACKAGE / (t.replace(".", "/") + ".py")) != ""}
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            pytest.fail("import circle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt != node.rsplit(".", 1)[0]:  # a module's own package __init__ re-exports it: not a circle
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_module_path_is_its_new_home(old):
    module = importlib.import_module(f"grpo_mlx.{old}")
    home = importlib.import_module(f"grpo_mlx.{OLD_PATHS[old]}")
    assert module is home
    assert getattr(importlib.import_module("grpo_mlx"), old) is home  # `from grpo_mlx import trainer`


@pytest.mark.parametrize("old", sorted({**OLD_PACKAGES, **SHIMS}))
def test_an_old_module_that_became_a_folder_or_two_re_exports_its_names(old):
    package = importlib.import_module(f"grpo_mlx.{old}")
    for entry in {**OLD_PACKAGES, **SHIMS}[old]:
        home_name, _, listed = entry.partition(":")
        home = importlib.import_module(f"grpo_mlx.{home_name}")
        names = listed.split(",") if listed else defined_names(Path(home.__file__))
        assert names
        missing = [n for n in names if not hasattr(package, n)]
        assert not missing, f"grpo_mlx.{old} lacks {missing}"
        for name in names:
            assert getattr(package, name) is getattr(home, name), f"grpo_mlx.{old}.{name}"


def test_the_cli_entry_point_and_module_run():
    import grpo_mlx.cli

    assert callable(grpo_mlx.cli.main)
