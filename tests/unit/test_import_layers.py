"""Imports point downward only: each effine module imports modules of its own package or of lower layers.

    0  effine, errors                           the version, the error types
    1  system, config, dtypes, module_tree      process facts (allocator, memory, cache dir), settings, dtype
                                                table, the module-swap layer
    2  data, quant, ops                         tokens, number formats, kernels
    3  model                                    loading base models
    4  adapters                                 LoRA on a model
    5  recipe                                   build_model(recipe): model + quant + adapters + ops
    6  eval, export, train (the engine)         loss/generation, merge/PTQ/GGUF, loop/step/optimizer/checkpoints
    7  plan                                     memory prediction and measurement (measures the engine)
    8  train.run, report                        a whole run: everything above, in order
    9  cli, __main__                            the command line

Imports inside functions count too (a function-local import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "effine"

LAYERS: dict[str, int] = {
    "effine": 0, "effine.errors": 0,
    "effine.system": 1, "effine.config": 1, "effine.dtypes": 1, "effine.module_tree": 1,
    "effine.data": 2, "effine.quant": 2, "effine.ops": 2,
    "effine.model": 3,
    "effine.adapters": 4,
    "effine.recipe": 5,
    "effine.eval": 6, "effine.export": 6, "effine.train": 6,
    "effine.plan": 7,
    "effine.train.run": 8, "effine.report": 8,
    "effine.cli": 9, "effine.__main__": 9,
}


def _unit(module: str) -> str:
    """The longest LAYERS key that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module}: not in any layer of tests/unit/test_import_layers.py; add it there")


def _imports() -> list[tuple[str, str, int]]:
    out = []
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("effine"):
                out.append((module, node.module, node.lineno))
            elif isinstance(node, ast.Import):
                out += [(module, a.name, node.lineno) for a in node.names if a.name.startswith("effine")]
    return out


def test_every_module_has_a_layer():
    for module, target, _ in _imports():
        _unit(module), _unit(target)


def test_imports_point_downward():
    bad = []
    for module, target, line in _imports():
        src, dst = _unit(module), _unit(target)
        if src == dst:  # within one unit (a unit nested in another, e.g. train.run in train, is a unit of its own)
            continue
        if LAYERS[dst] >= LAYERS[src]:
            bad.append(f"{module}:{line} imports {target} (layer {LAYERS[dst]} >= {LAYERS[src]})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_rule_catches_an_upward_import():
    assert LAYERS[_unit("effine.model.loader")] < LAYERS[_unit("effine.export.ptq")]
    assert LAYERS[_unit("effine.train.loop")] < LAYERS[_unit("effine.train.run")]
