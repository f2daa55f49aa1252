"""The import layering of docs/architecture.md holds: nothing imports upward, and only the run
layer (and the config schema and CLI) touch ConfigDicts.

Every `import` statement of every module under vdm/ is read with `ast`, including imports
inside functions, so a late import cannot hide a dependency.
"""

import ast
from pathlib import Path

import pytest

VDM = Path(__file__).resolve().parents[1] / "vdm"

# Layer of each top-level piece of the package; a module may import its own piece and any
# piece of a strictly lower layer.
LAYERS = {
    "vdm.registry": 0,
    "vdm.runtime": 0,
    "vdm.errors": 0,
    "vdm.core": 1,
    "vdm.nets": 1,
    "vdm.data": 1,
    "vdm.optim": 1,
    "vdm.parallel": 1,
    "vdm.distributed": 1,
    "vdm.sampling": 2,
    "vdm.metrics": 2,
    "vdm.model": 3,
    "vdm.estimators": 3,
    "vdm.config_defaults": 4,
    "vdm.run": 5,
    "vdm.main": 6,
    "vdm.collect": 6,
    "vdm.convert_official": 6,
}
# Libraries that only the config schema, the run layer and the CLI may import.
CONFIG_LIBRARIES = ("ml_collections",)
CONFIG_LAYER = LAYERS["vdm.config_defaults"]


def piece(module: str) -> str | None:
    """The LAYERS key a dotted module name belongs to (None for the bare package)."""
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    return None


def modules():
    for path in sorted(VDM.rglob("*.py")):
        rel = path.relative_to(VDM.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def imports(path: Path, module: str):
    """Absolute names of everything `path` imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{root}.{base}" if base else root
            # `from vdm import core` imports vdm.core: count the names as modules too.
            yield from (f"{base}.{a.name}" for a in node.names)


def test_every_module_has_a_layer():
    unplaced = [name for name, _ in modules() if name != "vdm" and piece(name) is None]
    assert not unplaced, f"add these to LAYERS (and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize(("module", "path"), list(modules()), ids=lambda v: str(v))
def test_no_module_imports_upward(module, path):
    own = piece(module)
    if own is None:  # vdm/__init__.py: only the runtime flags
        assert {piece(i) for i in imports(path, module) if i.startswith("vdm.")} <= {"vdm.runtime"}
        return
    level = LAYERS[own]
    for name in imports(path, module):
        if name.split(".")[0] in CONFIG_LIBRARIES:
            assert level >= CONFIG_LAYER, f"{module} (layer {level}) imports {name}"
        if not name.startswith("vdm."):
            continue
        target = piece(name)
        if target is None or target == own:
            continue
        assert LAYERS[target] < level, f"{module} (layer {level}) imports {name} " + (
            f"(layer {LAYERS[target]})"
        )


def test_layering_test_catches_an_upward_import(tmp_path):
    bad = tmp_path / "losses.py"
    bad.write_text("from vdm.run import setup\nimport ml_collections\n")
    found = list(imports(bad, "vdm.core.losses"))
    assert "vdm.run.setup" in found and "ml_collections" in found
    assert LAYERS[piece("vdm.run.setup")] > LAYERS[piece("vdm.core.losses")]
