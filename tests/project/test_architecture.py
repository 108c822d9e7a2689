"""The layers are enforced, the engine is made of registered parts, and settings are one object."""

import dataclasses
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import batches, ce_loss, correlated_inputs, trained_mlp

import curvature.pruning as pruning
from curvature.pruning import METHODS, PruneSettings, parts, pipeline, prune, register
from curvature.pruning.curvatures import Curvature, CurvatureBlocks
from curvature.pruning.solvers import ScoreOnly

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
    return subprocess.run([exe], cwd=tree, capture_output=True, text=True, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "curvature", tmp_path / "curvature", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_layer_contract_holds():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    "module,bad_import",
    [
        ("curvature/core/fisher.py", "import curvature.pruning.engine"),  # core -> engine
        ("curvature/pruning/engine.py", "import curvature.recipes"),  # engine -> recipes
        ("curvature/recipes/loader.py", "import curvature.cli.main"),  # recipes -> cli
        ("curvature/tasks/data.py", "import curvature.recipes.loader"),  # sibling layers
        ("curvature/kernels/obs.py", "import curvature.core.fisher"),  # kernels -> core
        ("curvature/optim/mfac.py", "import transformers"),  # engine -> Hugging Face
        ("curvature/tasks/data.py", "import curvature.core.checks"),  # tasks are a leaf
        ("curvature/cli/results.py", "import curvature.cli.sweep"),  # a circle in the CLI
        ("curvature/cli/report.py", "import curvature.cli.jobs"),  # report -> jobs -> report
        ("curvature/cli/outputs.py", "import curvature.cli.config"),  # siblings
    ],
)
def test_layer_contract_fails_on_a_wrong_import(tmp_path, module, bad_import):
    tree = _copy_tree(tmp_path)
    with open(tree / module, "a") as fh:
        fh.write(f"\n{bad_import}  # noqa\n")
    r = _lint_imports(tree)
    assert r.returncode != 0, f"{bad_import} in {module} was not caught:\n{r.stdout}"
    assert "BROKEN" in r.stdout


def test_every_method_is_a_registry_row():
    assert set(METHODS.names()) >= {"obs", "obs-independent", "mfac", "magnitude"}
    with pytest.raises(ValueError, match=r"method must be one of .*'obs'.*'magnitude'"):
        pipeline("obz")
    with pytest.raises(ValueError, match="did you mean 'obs'"):
        pipeline("obz")
    with pytest.raises(ValueError, match="already registered"):
        register("obs", Curvature, ScoreOnly, "again")


def test_a_new_method_is_one_new_part_and_one_row(monkeypatch):
    """A diagonal curvature (per input column) + the score-only solver: a new method without
    touching the engine; it must prune by |w| * scale, not by |w|."""

    class ColumnScale(Curvature):
        name = "column-scale"

        def build(self, targets, gradients, settings):
            class Blocks(CurvatureBlocks):
                def __init__(self, t):
                    cols = t.param.shape[1]
                    scale = (torch.arange(t.numel) % cols).to(torch.float64) + 1.0
                    self.d = t.blocks_of(scale, fill=1.0)

                def diagonal(self, sl):
                    return self.d[sl]

            return {t.name: Blocks(t) for t in targets}

    monkeypatch.setattr(pruning.registry.METHODS, "_entries", dict(METHODS._entries))
    register("column-scaled", ColumnScale, ScoreOnly, "test: w^2 times the column index")
    layer = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    prune(
        layer,
        [],
        loss_fn=None,
        sparsity=0.5,
        method=pipeline("column-scaled").with_settings(block_size=8),
        progress=False,
    )
    zero_cols = (layer.weight == 0).all(0)
    assert zero_cols.tolist() == [True] * 4 + [False] * 4  # the low-scale columns went first


def test_settings_are_one_frozen_validated_object():
    """The call-wide settings and every part's settings are frozen values checked once, when
    made, each with a message naming the argument."""
    s = PruneSettings(sparsity=0.5, params=["a", "b"])
    assert s.params == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sparsity = 0.1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts.OBS().gradients = 3  # type: ignore[misc]
    for kw, msg in [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 0.3, "mask": "2:4"}, "prunes exactly 0.5"),
    ]:
        with pytest.raises(ValueError, match=msg):
            PruneSettings(**kw)
    for make, msg in [
        (lambda: parts.OBS(gradients=0), "gradients must be a positive integer"),
        (lambda: parts.OBS(fisher_damping=0), "fisher_damping must be > 0"),
        (lambda: parts.OBS(selection="greedyy"), "did you mean 'greedy'"),
        (lambda: parts.OBS(recomputations=0), "recomputations must be an integer >= 1"),
        (lambda: parts.SparseGPT(rel_damp=-1), "rel_damp must be > 0"),
        (lambda: parts.Outlier(lam=1.5), r"lam must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            make()
    with pytest.raises(ValueError, match="not a multiple"):  # a part against the call
        parts.chain(parts.OBS(block_size=6)).check(PruneSettings(0.5, mask="block4"))
    # magnitude has no gradient settings at all
    assert not {"gradients", "fisher_damping"} & set(parts.Magnitude.__dataclass_fields__)


def test_engine_functions_take_few_parameters():
    """Internal engine functions take at most 8 parameters (the public prune() keywords aside)."""
    mods = [pruning.engine, pruning.stages, pruning.solvers, pruning.allocation]
    mods += [pruning.curvatures, pruning.registry, pruning.gradient_driver, pruning.parts]
    too_many = []
    for mod in mods:
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__ or name == "prune":
                continue
            n = len(inspect.signature(fn).parameters)
            if n > 8:
                too_many.append(f"{mod.__name__}.{name}: {n}")
    assert not too_many


def test_methods_resolve_through_the_registry_everywhere(tmp_path):
    """obs-independent by name equals obs with selection='independent'; mfac runs the M-FAC form."""
    x = correlated_inputs(n=64, pairs=4)
    model, y = trained_mlp(x, hidden=8, steps=50)
    data = batches(x, y, 8)
    outs = []
    for method in [
        pipeline("obs-independent"),
        pipeline("obs").with_settings(selection="independent"),
        pipeline("mfac").with_settings(selection="independent"),
    ]:
        m = __import__("copy").deepcopy(model)
        method = method.with_settings(gradients=8, block_size=8, fisher_damping=1e-4)
        prune(m, data, loss_fn=ce_loss, sparsity=0.5, method=method, progress=False)
        outs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-7)


def test_no_function_in_the_package_takes_more_than_8_positional_parameters():
    """Read from the source (every def in curvature/, nested ones too): at most 8 positional
    parameters, ``self`` included; the optimizers take ``params`` (or the model) and ``lr``
    positionally and everything else by keyword, as ``torch.optim`` does. Triton kernels
    (``@triton.jit``) are exempt: a kernel takes its pointers, strides and sizes positionally."""
    import ast

    def jitted(node) -> bool:
        return any("jit" in ast.unparse(d) for d in node.decorator_list)

    too_many = []
    for path in sorted((ROOT / "curvature").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not jitted(node):
                n = len(node.args.posonlyargs) + len(node.args.args)
                if n > 8:
                    too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n}")
    import curvature.optim as optim

    optimizers = {
        name: [
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        for name, cls in inspect.getmembers(optim, inspect.isclass)
        if issubclass(cls, torch.optim.Optimizer) and cls.__module__.startswith("curvature")
    }
    assert not too_many, too_many
    assert {"AdaHessian", "MFAC", "MKOR", "LAMB", "MuonAdamW"} <= set(optimizers), optimizers
    for name, args in optimizers.items():
        if name != "Combined":  # a wrapper of built optimizers: its one argument is the list
            assert args[2:] == ["lr"] and args[1] in ("params", "model"), (name, args)


def _package_imports() -> dict[str, set[str]]:
    """``{module: curvature modules it imports}``, read from the source: top-level imports and
    those made inside functions."""
    import ast

    files = {}
    for folder, prefix in ((ROOT / "curvature", ["curvature"]),):
        for path in folder.rglob("*.py"):
            parts = prefix + list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    graph[module].add(sub if sub in files else node.module)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (or a module importing itself)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_the_package():
    """Every import in curvature/, inside functions too, as a graph: no circle."""
    graph = _package_imports()
    assert len(graph) > 60 and "curvature.cli.results" in graph["curvature.cli.report"]
    assert _circles(graph) == []
    # the check finds a circle when there is one (report -> sweep -> report)
    graph["curvature.cli.report"].add("curvature.cli.sweep")
    assert ["curvature.cli.report", "curvature.cli.sweep"] in [
        [m for m in c if m in ("curvature.cli.report", "curvature.cli.sweep")]
        for c in _circles(graph)
    ]


def test_no_function_in_the_package_is_over_100_lines():
    import ast

    long = []
    for path in sorted((ROOT / "curvature").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines}")
    assert not long, long


def _module_switches(source: str) -> list[str]:
    """Module-level names bound to True/False: switches a caller would flip."""
    import ast

    out = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, bool):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out += [t.id for t in targets if isinstance(t, ast.Name)]
    return out


def test_no_module_switch_in_the_command_line():
    """A job's switches (such as a rank's private outputs) are fields of its typed
    configuration, never module globals flipped by the caller."""
    assert _module_switches("PRIVATE_OUTPUTS = False\nX: bool = True\n") == ["PRIVATE_OUTPUTS", "X"]
    for path in sorted((ROOT / "curvature" / "cli").glob("*.py")):
        assert _module_switches(path.read_text()) == [], path.name


def test_no_folder_at_the_root_shadows_an_installed_package():
    """``python -m pytest`` (the README's test command) puts the checkout's root first on the
    import path, so a package folder there hides an installed distribution of the same name
    (a root ``kernels/`` hid the ``kernels`` package that ``transformers`` imports, and every
    model load failed). The toolkit's own packages live inside ``curvature/``."""
    from importlib.metadata import packages_distributions

    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert ours == {"curvature"}, ours
    assert "kernels" in packages_distributions()  # the name the old root folder hid
