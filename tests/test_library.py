"""The library stands apart from the workbench: `import lowbit` pulls in neither transformers, click, matplotlib
nor lowbit_workbench; quantize, save and load of a plain nn.Module work with those made unimportable, for every
recipe; and the modules of lowbit import one another without cycles, upward imports or private names."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lowbit
from lowbit.recipes import RECIPES, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lowbit"
OPTIONAL = ("transformers", "click", "matplotlib", "gguf", "compressed_tensors")
OPTIONAL += ("onnx", "onnxruntime", "onnxscript", "openvino")  # the ONNX export's, imported where it runs
WORKBENCH = "lowbit_workbench"

# Installed before anything else in a child interpreter: importing any of `names` (or a submodule) fails as
# if it were not installed.
BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        def __init__(self, names):
            self.names = names

        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
            return None

    sys.meta_path.insert(0, Blocker(NAMES))
""")


def run_python(code: str, *, blocked: tuple[str, ...] = (), timeout: float = 900) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with the worktree's lowbit first on the path and `blocked` unimportable."""
    prelude = BLOCKER.replace("NAMES", repr(set(blocked))) if blocked else ""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, check=False)


def test_blocker_really_blocks():
    """The finder the tests below rely on makes the optional packages fail to import (else they prove nothing)."""
    r = run_python("""
        import importlib
        for name in ("transformers", "click", "matplotlib.pyplot", "lowbit_workbench"):
            try:
                importlib.import_module(name)
            except ImportError:
                print("blocked", name)
    """, blocked=OPTIONAL + (WORKBENCH,))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == [f"blocked {n}" for n in
                                        ("transformers", "click", "matplotlib.pyplot", "lowbit_workbench")]


def test_import_lowbit_imports_no_optional_package():
    r = run_python("""
        import json, sys
        import lowbit
        print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
    """)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout))
    assert "lowbit" in loaded
    assert not loaded & {*OPTIONAL, WORKBENCH}, f"import lowbit imported {sorted(loaded & {*OPTIONAL, WORKBENCH})}"


def test_every_module_imports_without_optional_packages():
    """Each module of lowbit imports with transformers, matplotlib and the workbench absent (they are imported
    where used, inside functions); only the command line needs click at import time, and says so."""
    modules = sorted(_module_files())
    r = run_python(f"""
        import importlib
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except ImportError as e:
                print(name, "|", e)
    """, blocked=OPTIONAL + (WORKBENCH,))
    assert r.returncode == 0, r.stderr
    failures = dict(line.split(" | ", 1) for line in r.stdout.splitlines())
    assert set(failures) == {"lowbit.cli"}, failures
    assert "pip install 'lowbit[cli]'" in failures["lowbit.cli"]


# A model with every layer kind a recipe replaces: an embedding, a conv (quantized by static recipes) and
# linears, with widths every documented group size divides.
ROUND_TRIP = """
    import json, sys, tempfile, warnings
    import torch
    from torch import nn
    import lowbit
    from lowbit.backends import onednn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 128)
            self.conv = nn.Conv1d(128, 128, 3, padding=1)
            self.fc1 = nn.Linear(128, 256)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(256, 128)

        def forward(self, ids):
            h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            return self.fc2(self.act(self.fc1(h)))

    def make():
        torch.manual_seed(0)
        return Net().eval()

    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 100, (4, 16), generator=g) for _ in range(4)]
    x = torch.randint(0, 100, (3, 16), generator=g)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            config = lowbit.parse_recipe(recipe)
            # backend="auto" keeps W8A8 layers this small in float when int8 activations are slower here:
            # force the int8 kernel where it exists, so the quantized path is the one saved and loaded.
            backend = "onednn" if recipe.startswith("w8a8") and onednn.available() else "auto"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q = lowbit.quantize(make(), recipe, backend=backend,
                                        calibration=calibration if config.needs_calibration else None)
                    kinds = sorted({type(m).__name__ for m in q.modules() if isinstance(m, lowbit.modules.QuantModule)})
                    with torch.inference_mode():
                        before = q(x)
                    lowbit.save(q, f"{tmp}/{recipe}")
                    loaded = lowbit.load(f"{tmp}/{recipe}", model=make())
                    with torch.inference_mode():
                        after = loaded(x)
                results[recipe] = {"equal": bool(torch.equal(before, after)), "kinds": kinds,
                                   "changed": bool(not torch.equal(before, make()(x)))}
            except Exception as e:
                results[recipe] = {"error": f"{type(e).__name__}: {e}"}
    blocked_loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    print(json.dumps({"results": results, "loaded": blocked_loaded}))
"""


@pytest.mark.slow
def test_quantize_save_load_every_recipe_without_optional_packages():
    """Every documented recipe (float casts, intB per channel and grouped, k-means, ternary/binary, W8A8 dynamic
    and static, -a8, GPTQ/AWQ/HQQ and SmoothQuant with calibration) quantizes a plain nn.Module, saves it and
    loads it back into a float skeleton with transformers, click, matplotlib and the workbench unimportable;
    the loaded model's outputs equal the saved model's bit for bit."""
    blocked = OPTIONAL + (WORKBENCH,)
    code = f"RECIPES = {list(RECIPES)!r}\nBLOCKED = {set(blocked)!r}\n" + textwrap.dedent(ROUND_TRIP)
    r = run_python(code, blocked=blocked)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["loaded"] == []
    results = report["results"]
    assert set(results) == set(RECIPES)
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not errors, errors
    assert [k for k, v in results.items() if not v["equal"]] == []
    # Each recipe really quantized something (else equal outputs would prove nothing).
    assert [k for k, v in results.items() if not v["kinds"] or not v["changed"]] == []
    # The families are all there: weight-only layers, embeddings, and int8-activation layers.
    kinds = {kind for v in results.values() for kind in v["kinds"]}
    assert {"QuantLinear", "QuantEmbedding"} <= kinds
    assert {"W8A8Linear", "W8A8Conv"} <= kinds or not lowbit.backends.onednn.available()
    families = {parse_recipe(r).kind for r in RECIPES} | {parse_recipe(r).method for r in RECIPES}
    assert {"int", "float", "kmeans", "ternary", "binary", "gptq", "awq", "hqq"} <= families
    assert {parse_recipe(r).act for r in RECIPES} >= {"dynamic", "static"}


# ---------------------------------------------------------------- the import graph, read statically


def _module_files() -> dict[str, Path]:
    """{dotted module name: file} of every Python module in the lowbit package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """(imported module, imported name or "", line, at module level) of each import statement in a module,
    the ones inside functions included; `from package import submodule` counts as importing the submodule."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno, at_top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules or sub == EXTENSION:
                    found.append((sub, "", node.lineno, at_top))
                else:
                    found.append((target, alias.name, node.lineno, at_top))
    return found


def test_import_graph_has_no_cycles_upward_or_private_imports():
    modules = _module_files()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    problems = []
    for name, path in modules.items():
        for target, imported, line, at_top in _imports(name, path, modules):
            where = f"{path.relative_to(ROOT)}:{line}"
            root = target.split(".")[0]
            if root == WORKBENCH and name != "lowbit.cli":
                problems.append(f"{where}: the library imports the workbench ({target})")
            if root in OPTIONAL and at_top and not (root == "click" and name == "lowbit.cli"):
                problems.append(f"{where}: {target} imported at module level (it is an optional extra)")
            if root != "lowbit":
                continue
            if target == "lowbit" and name != "lowbit":
                problems.append(f"{where}: imports {imported or 'lowbit'} from the package root (upward import)")
            if imported.startswith("_") and not imported.endswith("__"):  # dunders such as __version__ are public
                problems.append(f"{where}: imports the private name {imported} from {target}")
            for layer, allowed in LOWER_LAYERS.items():
                if (name == layer or name.startswith(layer + ".")) and target != "lowbit" and not any(
                        target == a or target.startswith(a + ".") for a in allowed + (layer,)):
                    problems.append(f"{where}: {name} (a lower layer) imports {target}")
            if target in edges:
                edges[name].add(target)
    assert not problems, "\n".join(problems)
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# What the bottom layers may import from lowbit besides themselves: nothing above them.
LOWER_LAYERS = {
    "lowbit.core": (),
    "lowbit.algorithms": ("lowbit.core",),
    "lowbit.backends": ("lowbit.core", "lowbit.hw", "lowbit.recipes", "lowbit.version", "lowbit._C"),
}
EXTENSION = "lowbit._C"  # the compiled kernels: a module, though its name starts with an underscore


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The static reader resolves relative imports and finds imports inside functions (as the loop
    autotune <-> quantize was)."""
    modules = _module_files()
    found = {t: top for t, _, _, top in _imports("lowbit.autotune", modules["lowbit.autotune"], modules)}
    assert found["lowbit.hw"] and not found["lowbit.modules"]  # `from . import hw`; modules inside survey()
    lazy = [(t, top) for t, _, _, top in _imports("lowbit.hf", modules["lowbit.hf"], modules) if t == "transformers"]
    assert lazy and not any(top for _, top in lazy)


def test_workbench_data_missing_is_one_clear_error(monkeypatch, tmp_path):
    """Without the repository's data (as in an installed wheel), the workbench and the command line say where
    the data comes from, and calibration asks for --calib instead of failing deep inside."""
    pytest.importorskip("click")
    import lowbit_workbench
    from lowbit import cli
    from lowbit_workbench import evaluate

    monkeypatch.setattr(lowbit_workbench, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="clone of the lowbit repository"):
        evaluate.load_stsb("dev")
    with pytest.raises(ValueError, match="pass --calib FILE"):
        cli._calibration(None, None, 8)
