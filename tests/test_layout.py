"""The package's shape: no import cycle between its modules, every module listed in the README Layout
with its one job, every module mirrored by a test file."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnx_tucker"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("onnx_tucker",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def top_level_imports(path: Path) -> set[str]:
    deps = set()
    for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy by design
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_tucker"):
            deps.add(node.module)
    return deps


def test_no_import_cycle_between_modules():
    graph = {name: top_level_imports(path) - {"onnx_tucker"} for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph.get(node, ()):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    for name, path in modules().items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert f"`{path.relative_to(ROOT).as_posix()}`" in readme, f"README Layout misses {path.relative_to(ROOT)}"


def test_every_module_has_its_test_file():
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    mirrored = {"cli": "test_cli.py", "tucker2": "test_factorization.py", "svd": "test_factorization.py", "vbmf": "test_ranks.py",
                "convert": "test_real_models.py", "budget": "test_calibrate.py",
                "errors": "test_cli.py", "outputs": "test_hostile.py"}
    for name, path in modules().items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        stem = path.stem
        assert f"test_{stem}.py" in tests or mirrored.get(stem) in tests, f"no test file for {name}"
