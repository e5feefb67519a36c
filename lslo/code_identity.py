"""The code a stage runs, as one hash: its workflow script and every lslo module the script imports.

What is hashed is the code, not the text: each file's syntax tree without its docstrings, so a comment, a
docstring or a line break reruns nothing, while any change to what runs does. The modules are the ones Python
loads with the script: imports at module level (inside `with`, `if` or `try` blocks too), not the imports a
function defers until it is called (lslo.jobs's dispatcher, lslo.cli's subcommands), which the script's own
imports already cover for the stage it runs.

The rules carry `code_hash(script)` as the `code` param of every job (rules/common.smk CODE), so a change in the
library code a stage runs reruns the job (Snakemake's params trigger), while a touched but unchanged script does
not. The training checkpoints hold the same hash in their identity (`stage_code_hash`, lslo.train.run_identity),
so the rerun of a killed job after a code change starts from scratch instead of finishing the old code's run.
Standard library only: the rules import it while building the DAG.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SCRIPTS_DIR = Path("workflow", "scripts")  # the workflow's scripts, relative to the directory above the package


def _module_level(tree: ast.AST):
    """The nodes of `tree` outside function bodies (what runs when the module is imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def lslo_imports(path: Path) -> set[str]:
    """The lslo module names a Python file imports when it is loaded (module level; not inside functions)."""
    modules, from_names = _imports_of(Path(path).read_text(encoding="utf-8"), str(path))
    # `from lslo import figures` imports the submodule lslo.figures
    return set(modules) | {name for name in from_names if module_file(name) is not None}


# A DAG build hashes every script, and the scripts share most modules: each text is parsed once per process. The
# cache is keyed by the text itself, so an edited file is parsed again.
@functools.lru_cache(maxsize=None)
def _imports_of(text: str, filename: str) -> tuple[frozenset[str], frozenset[str]]:
    """(the lslo modules the text imports at module level, the `module.name` of each name it imports from one)."""
    modules, from_names = set(), set()
    for node in _module_level(ast.parse(text, filename=filename)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lslo")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "lslo":
            modules.add(node.module)
            from_names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(modules), frozenset(from_names)


def module_file(name: str) -> Path | None:
    """lslo.x.y -> lslo/x/y.py (or lslo/x/y/__init__.py); None when it is not a module of the package."""
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(script) -> dict[str, Path]:
    """{module name: file} of every lslo module `script` imports, transitively (lslo/__init__.py always)."""
    found, todo = {"lslo": PACKAGE_DIR / "__init__.py"}, set(lslo_imports(script))
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in found or path is None:
            continue
        found[name] = path
        todo |= lslo_imports(path) - set(found)
    return found


def code_of(path: Path) -> bytes:
    """A file's code: its syntax tree without docstrings and positions (comments and layout are not in it)."""
    return _code_of_text(Path(path).read_text(encoding="utf-8"), str(path))


@functools.lru_cache(maxsize=None)
def _code_of_text(text: str, filename: str) -> bytes:
    tree = ast.parse(text, filename=filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def code_hash(script) -> str:
    """sha256 (16 hex digits) over the code (`code_of`) of the script and of every lslo module it imports."""
    digest = hashlib.sha256(code_of(script))
    for name, path in sorted(imported_modules(script).items()):
        digest.update(f"\0{name}\0".encode())
        digest.update(code_of(path))
    return digest.hexdigest()[:16]


def stage_entry(stage: str | None) -> Path:
    """The file stage `stage` runs from: its workflow script (workflow/scripts/<stage>.py beside the package, the
    file whose hash the rules carry), else its library module (lslo/<stage>.py: the package used without the
    workflow), else the training loop (lslo/train.py: a stage of the caller's own)."""
    for path in (PACKAGE_DIR.parent / SCRIPTS_DIR / f"{stage}.py", PACKAGE_DIR / f"{stage}.py"):
        if stage and path.is_file():
            return path
    return PACKAGE_DIR / "train.py"


def stage_code_hash(stage: str | None) -> str:
    """code_hash of the stage's entry file (stage_entry): for a workflow stage, the rules' `code` param itself."""
    return code_hash(stage_entry(stage))
