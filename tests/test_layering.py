"""Dependencies point one way. Every import in src/tunelab (function-level ones included) is read with `ast` and
checked against the layers below: a module may import its own layer and the layers under it, never one above,
and never a sibling in its layer (the trainer and the service know nothing of each other). No import cycles
between modules either. A new module must be given a place here, so its place is a decision, not an accident.
"""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A layer is a dict of sibling groups: module or package names directly under tunelab.
LAYERS = [
    {"config": ["config", "run_files"]},  # run_files: the run dir's names, exit codes, log prefixes (imports nothing)
    {
        "data": ["data", "tasks"],  # tasks: the demo's synthetic data and its reward, imports nothing of tunelab
        "graders": ["graders"],  # OpenAI's graders as rewards: pure Python, imports only config
        "environments": ["environments"],  # tool environments for multi-turn GRPO (pure Python)
    },
    # Files in and out of tunelab's own forms, above config / data: peer configs (axolotl, LLaMA-Factory) -> config
    # dicts; model cards (the Hub's README.md) and Hub uploads, which the trainer, merge and export all write.
    {
        "interop": ["interop"],
        "publish": ["modelcard", "hub"],
        "verifiers": ["verifiers"],  # ready-made reward functions: data.tools' parser, graders' sandboxed runner
    },
    # What a model is and how it runs (modeling/): building one to train and loading one for inference, from-scratch
    # tokenizers and architectures, attention, MoE routers and their loss, gated MLPs, LoRA dropout, merging, number
    # formats, the CPU allocator, generation (infer: serve and evaluation use it too).
    {"modeling": ["modeling"]},
    {"objectives": ["objectives"]},
    {
        # The loop and the machinery it alone uses (training/).
        "training": ["training"],
        # The service runs `tunelab train` as processes and loads finished models; it never imports the trainer.
        # client/: the Python client, tuning/ (re-exported as tunelab.tuning) and `tunelab jobs`.
        "serve": ["serve", "client", "tuning"],
        # One-shot tools on a config or a model: evaluation, the memory / time planner, tokenizing ahead of a run.
        "tools": ["evaluation", "estimate", "preprocess", "export"],
    },
    {"cli": ["cli", "launch", "__main__", "__init__", "api"]},  # api: the commands as Python functions
]
# Imports that break the rule on purpose, with the reason. Keep this short: each entry is a debt.
EXCEPTIONS = {
    ("tunelab.config", "tunelab.data.builtin_templates"):
        "data.template is checked against the built-in template names at validation (plain strings, no heavy import)",
}
PLACE = {name: (rank, group) for rank, layer in enumerate(LAYERS) for group, names in layer.items() for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> set[str]:
    """tunelab modules imported anywhere in the file; `from pkg import mod` counts as importing pkg.mod."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}  # `if TYPE_CHECKING:` imports never run
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            modules = {f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}")}
            found |= modules if len(modules) == len(node.names) else modules | {base}
    return {m for m in found if m == "tunelab" or m.startswith("tunelab.")}


def place(module: str) -> tuple[int, str] | None:
    top = module.split(".")[1] if "." in module else "__init__"
    return PLACE.get(top)


GRAPH = {module_name(p): imports(p) for p in sorted((SRC / "tunelab").rglob("*.py"))}


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if place(m) is None] == []


def test_every_imported_module_exists():
    """A function-level import of a module that moved fails only when that function runs: catch it here."""
    assert sorted({f"{t} (from {m})" for m, targets in GRAPH.items() for t in targets if not is_module(t)}) == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    rank, group = place(module)
    wrong = []
    for target in GRAPH[module]:
        if (module, target) in EXCEPTIONS:
            continue
        t_rank, t_group = place(target) or (None, None)
        if t_rank is None:
            continue
        if t_rank > rank or (t_rank == rank and t_group != group):
            wrong.append(f"{target} ({t_group}, layer {t_rank}) from {group} (layer {rank})")
    assert wrong == [], f"{module} imports above or beside itself: {wrong}"


def test_exceptions_are_still_needed():
    assert [pair for pair in EXCEPTIONS if pair[1] not in GRAPH.get(pair[0], ())] == []


def test_no_import_cycles():
    """Depth-first search over module -> imported modules; any back edge is a cycle."""
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH or t == m or m.startswith(t + "."):  # a package's own __init__ is not a cycle
                continue
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The rule would pass vacuously if imports inside functions or `from . import x` were missed."""
    pkg = tmp_path / "tunelab" / "objectives"
    pkg.mkdir(parents=True)
    (tmp_path / "tunelab" / "__init__.py").write_text("")
    (tmp_path / "tunelab" / "trainer.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("")
    (pkg / "x.py").write_text("from . import base\nif TYPE_CHECKING:\n    import tunelab.cli\n\n"
                              "def f():\n    from tunelab.training.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert imports(pkg / "x.py") == {"tunelab.objectives.base", "tunelab.training.loop"}
