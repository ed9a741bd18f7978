"""The layout of src/chatrlhf, read from the code with `ast` (nothing is imported): no import cycles, the
project's own modules imported at the top of files (a short allow-list says why each exception is lazy), the
layering of ARCHITECTURE.md "Which way imports run", and no function over 80 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "chatrlhf"
MAX_FUNCTION_LINES = 80

# (importer, imported): project imports allowed inside a function, each with its reason.
LAZY = {
    ("chatrlhf.cli", "chatrlhf.cli.*"):
        "the CLI loads only the command group that runs, so `chatrlhf --help` and `chatrlhf feedback …` never "
        "import torch",
    ("chatrlhf.feedback.api.replies", "chatrlhf.feedback.writers"):
        "ARCHITECTURE: the feedback app reaches a model only through the reply writer, imported when a --model is "
        "given, so the store and the app start and run without torch",
}

ENTRY_POINTS = ("chatrlhf.__main__",)  # `python -m chatrlhf` runs the CLI

# (importer prefix, imported prefix, why that import is not allowed). A prefix matches the module and its children.
FORBIDDEN = [
    ("*", "chatrlhf.cli", "nothing imports the CLI: it is where stages are wired together"),
    ("chatrlhf.losses", "*", "losses.py is pure tensor math and imports torch alone"),
    ("chatrlhf.evaluate.metrics", "*", "metrics are pure numpy functions"),
    ("chatrlhf.qeval", "*", "the Q-ranking statistics are pure numpy functions, shared by qlearn and qlearn-offline"),
    ("chatrlhf.errors", "*", "errors are the bottom layer"),
    ("chatrlhf.config", "chatrlhf.models", "configs are plain dataclasses"),
    ("chatrlhf.data", "chatrlhf.models", "data/ never imports model code"),
    ("chatrlhf.data", "chatrlhf.reward_model", "data/ never imports model code"),
    ("chatrlhf.data", "chatrlhf.engine", "data/ never imports model code"),
    ("chatrlhf.data", "chatrlhf.rollout", "data/ never imports model code"),
    ("chatrlhf.data", "chatrlhf.generation", "data/ never imports model code"),
    ("chatrlhf.data", "chatrlhf.rewards", "data/ never imports model code"),
    ("chatrlhf.data", "chatrlhf.trainers", "data/ never imports trainers"),
    ("chatrlhf.data", "chatrlhf.feedback", "data/ is below the feedback store"),
    ("chatrlhf.data", "chatrlhf.evaluate", "data/ is below evaluation"),
    ("chatrlhf.models", "chatrlhf.rewards", "models.py is below the reward sources"),
    ("chatrlhf.models", "chatrlhf.reward_model", "models.py is below the reward model"),
    ("chatrlhf.models", "chatrlhf.trainers", "models.py is below the trainers"),
    ("chatrlhf.models", "chatrlhf.evaluate", "models.py is below evaluation"),
    ("chatrlhf.reward_model", "chatrlhf.rewards", "rewards.py (the sources and their mix) uses the reward model"),
    ("chatrlhf.reward_model", "chatrlhf.trainers", "the reward trainer uses the reward model"),
    ("chatrlhf.trainers", "chatrlhf.feedback", "trainers read feedback only as exported files"),
    ("chatrlhf.trainers", "chatrlhf.serve", "trainers never import the server"),
    ("chatrlhf.evaluate", "chatrlhf.trainers", "evaluation reads saved folders, not trainers"),
    ("chatrlhf.engine", "chatrlhf.trainers", "the trainers use the generation engine, not the other way"),
    ("chatrlhf.generation", "chatrlhf.trainers", "the trainers use generation, not the other way"),
    ("chatrlhf.rollout", "chatrlhf.trainers", "the trainers use rollouts, not the other way"),
    ("chatrlhf.rewards", "chatrlhf.trainers", "the trainers use the reward sources, not the other way"),
    ("chatrlhf.logger", "chatrlhf.trainers", "the logger is below the trainers"),
    ("chatrlhf.env", "chatrlhf.trainers", "the trainers use the dialogue environment, not the other way"),
    ("chatrlhf.episodes", "chatrlhf.trainers", "the trainers play multi-turn episodes, not the other way"),
    ("chatrlhf.env", "chatrlhf.cli", "the CLI wires the environment to a trainer"),
    ("chatrlhf.qnet", "chatrlhf.trainers", "the Q-network serves trainers and reranking alike: trainers use it"),
    ("chatrlhf.evaluate", "chatrlhf.feedback", "evaluation reads feedback only as exported files"),
]
# feedback/ reaches model code only through the reply writer, which the app imports lazily (see LAZY).
REPLY_WRITER = "chatrlhf.feedback.writers"
MODEL_CODE = ("chatrlhf.models", "chatrlhf.reward_model", "chatrlhf.rewards", "chatrlhf.rollout", "chatrlhf.engine",
              "chatrlhf.generation", "chatrlhf.trainers", "chatrlhf.evaluate", "chatrlhf.qnet")
FORBIDDEN += [("chatrlhf.feedback", m, "feedback/ starts and runs without torch (ARCHITECTURE)") for m in MODEL_CODE]
# trainers never import each other; what they share lives in these modules (value.py: the value function, PPO's
# today, Q-learning's next).
TRAINER_SHARED = ("chatrlhf.trainers.common", "chatrlhf.trainers.run", "chatrlhf.trainers.value")
LONG_ALLOWED = ("chatrlhf.feedback.migrations",)  # a migration is one long, linear list of schema steps


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path = SRC) -> dict[str, ast.Module]:
    return {module_name(p, src): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted((src / PACKAGE).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, tree: ast.Module, known: set[str], is_package: bool) -> list[tuple[str, int, bool]]:
    """[(imported chatrlhf module, line, inside a function)] of one module: ``from a import b`` names the module
    ``a.b`` when that is a module, else ``a``."""
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                mod = _resolve(child, name, is_package)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in child.names]
            for t in dict.fromkeys(targets):
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    found.append((t, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def graph(trees: dict[str, ast.Module]) -> dict[str, list[tuple[str, int, bool]]]:
    known = set(trees)
    return {name: imports_of(name, tree, known, tree_is_package(name, trees)) for name, tree in trees.items()}


def tree_is_package(name: str, trees: dict) -> bool:
    return any(other.startswith(name + ".") for other in trees)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _match(pattern: str, module: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return module.startswith(pattern[:-1])
    return module == pattern or module.startswith(pattern + ".")


def lazy_problems(g) -> list[str]:
    return [f"{src}:{line} imports {dst} inside a function: import it at the top (move the shared piece down if "
            f"that makes a cycle), or add it to LAZY with the reason"
            for src, found in g.items() for dst, line, inner in found
            if inner and not any(_match(a, src) and _match(b, dst) for a, b in LAZY)]


def _exempt(importer: str, imported: str, src: str, dst: str) -> bool:
    """Edges a FORBIDDEN row does not mean: within the importer's own package, the CLI within itself and from the
    entry point, and the reply writer's imports of model code (the app reaches it lazily)."""
    return (importer != "*" and _match(importer, dst)) \
        or (imported == "chatrlhf.cli" and (_match(imported, src) or src in ENTRY_POINTS)) \
        or (src == REPLY_WRITER and importer == "chatrlhf.feedback")


def layering_problems(g) -> list[str]:
    out = []
    for src, found in g.items():
        for dst, line, lazy in found:
            out += [f"{src}:{line} imports {dst}: {why}" for importer, imported, why in FORBIDDEN
                    if _match(importer, src) and _match(imported, dst) and not _exempt(importer, imported, src, dst)]
            if dst == REPLY_WRITER and not lazy and src != REPLY_WRITER:
                out.append(f"{src}:{line} imports {dst} at the top: import it where a model is loaded, so the feedback "
                           "app starts without torch")
            if src.startswith("chatrlhf.trainers.") and dst.startswith("chatrlhf.trainers.") and src != dst \
                    and dst not in TRAINER_SHARED and src not in TRAINER_SHARED:
                out.append(f"{src}:{line} imports {dst}: trainers never import each other (shared code goes in "
                           f"{' or '.join(TRAINER_SHARED)})")
    return out


def long_functions(trees: dict[str, ast.Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    return [f"{name}:{node.lineno} {node.name}() is {node.end_lineno - node.lineno + 1} lines (limit {limit}): "
            f"split it" for name, tree in trees.items() if not any(_match(p, name) for p in LONG_ALLOWED)
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


TREES = modules()
GRAPH = graph(TREES)


def test_the_walk_sees_the_package_and_its_imports():
    assert "chatrlhf.losses" in TREES and "chatrlhf.feedback.store" in TREES and len(TREES) > 30
    assert ("chatrlhf.errors", True) in {(d, True) for d, _, _ in GRAPH["chatrlhf.config"]}


def test_no_import_cycle():
    edges = {src: {dst for dst, _, _ in found if dst in TREES} for src, found in GRAPH.items()}
    found = cycles(edges)
    assert not found, "\n".join(map(str, found))


def test_project_modules_are_imported_at_the_top():
    found = lazy_problems(GRAPH)
    assert not found, "\n".join(map(str, found))


def test_imports_run_the_way_architecture_says():
    found = layering_problems(GRAPH)
    assert not found, "\n".join(map(str, found))


def test_no_function_over_80_lines():
    found = long_functions(TREES)
    assert not found, "\n".join(map(str, found))


def test_the_cli_and_the_feedback_app_start_without_torch():
    code = ("import sys, chatrlhf.cli, chatrlhf.cli.feedback, chatrlhf.cli.active, chatrlhf.feedback.app; "
            "chatrlhf.cli.parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", ["chatrlhf", "chatrlhf.cli"])
def test_python_dash_m_runs_the_cli(module):
    out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("chatrlhf "), out.stdout + out.stderr


# ---------------------------------------------------------------- the checks can fail (hand-made modules)


def fake(tmp_path: Path, files: dict[str, str]):
    for rel, text in files.items():
        p = tmp_path / PACKAGE / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    trees = modules(tmp_path)
    return trees, graph(trees)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    trees, g = fake(tmp_path, {"__init__.py": "", "a.py": "from chatrlhf import b\n",
                               "b.py": "def f():\n    from chatrlhf.a import x\n    return x\n",
                               "pkg/__init__.py": "", "pkg/c.py": "from . import d\n", "pkg/d.py": "from .c import y\n"})
    edges = {s: {d for d, _, _ in f if d in trees} for s, f in g.items()}
    assert cycles(edges) == [["chatrlhf.a", "chatrlhf.b"], ["chatrlhf.pkg.c", "chatrlhf.pkg.d"]]
    assert lazy_problems(g) == ["chatrlhf.b:2 imports chatrlhf.a inside a function: import it at the top (move the "
                                "shared piece down if that makes a cycle), or add it to LAZY with the reason"]


def test_a_forbidden_import_and_a_long_function_are_found(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    trees, g = fake(tmp_path, {"__init__.py": "", "losses.py": "import chatrlhf.errors\n", "errors.py": "",
                               "cli.py": "", "models.py": f"import chatrlhf.cli\ndef f():\n{body}",
                               "trainers/__init__.py": "", "trainers/ppo.py": "from chatrlhf.trainers import sft\n",
                               "trainers/sft.py": "from chatrlhf.trainers.common import x\n",
                               "trainers/common.py": ""})
    assert layering_problems(g) == [
        "chatrlhf.losses:1 imports chatrlhf.errors: losses.py is pure tensor math and imports torch alone",
        "chatrlhf.models:1 imports chatrlhf.cli: nothing imports the CLI: it is where stages are wired together",
        "chatrlhf.trainers.ppo:1 imports chatrlhf.trainers.sft: trainers never import each other (shared code goes "
        "in chatrlhf.trainers.common or chatrlhf.trainers.run or chatrlhf.trainers.value)"]
    assert long_functions(trees) == ["chatrlhf.models:2 f() is 81 lines (limit 80): split it"]


def test_the_feedback_app_reaches_a_model_only_through_the_reply_writer_lazily(tmp_path):
    trees, g = fake(tmp_path, {"__init__.py": "", "models.py": "", "feedback/__init__.py": "",
                               "feedback/writers.py": "from chatrlhf.models import x\n",
                               "feedback/app.py": "from chatrlhf.feedback.writers import W\n",
                               "feedback/store.py": "def f():\n    from chatrlhf.feedback.writers import W\n",
                               "feedback/export.py": "import chatrlhf.models\n"})
    assert layering_problems(g) == [
        "chatrlhf.feedback.app:1 imports chatrlhf.feedback.writers at the top: import it where a model is loaded, so "
        "the feedback app starts without torch",
        "chatrlhf.feedback.export:1 imports chatrlhf.models: feedback/ starts and runs without torch (ARCHITECTURE)"]


@pytest.mark.parametrize("pattern, module, want", [("*", "chatrlhf.x", True), ("chatrlhf.data", "chatrlhf.data.a", True),
                                                   ("chatrlhf.data", "chatrlhf.dataset", False),
                                                   ("chatrlhf.cli.*", "chatrlhf.cli", False),
                                                   ("chatrlhf.cli.*", "chatrlhf.cli.train", True)])
def test_prefixes_match_whole_module_names(pattern, module, want):
    assert _match(pattern, module) is want
