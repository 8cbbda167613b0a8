"""Nothing from the bucket is ever unpickled: an AST scan of every module of the fedfs package.

Pickle (and formats built on it: ``torch.load``/``torch.save``, cloudpickle, dill,
joblib, shelve, marshal, ``numpy.load(allow_pickle=True)``, pandas pickles, and
nnU-Net's ``load_checkpoint``/``save_checkpoint``, which are ``torch.load``/``torch.save``
inside nnunetv2) runs code chosen by whoever wrote the file. Every use found is a
failure naming ``file:line``, unless it is one of the call sites in :data:`ALLOWED`,
each of which handles only nnU-Net's own local checkpoint files and never a file
that came from, or goes to, the bucket. The allow list is exact: an entry that no
longer matches anything fails too, so it cannot silently cover a new use.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedfs"

#: Modules whose only purpose is pickling (or unmarshalling code objects).
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal",
                  "pickletools", "copyreg"}
#: Fully qualified calls that (un)pickle.
PICKLE_CALLS = {"torch.load", "torch.save", "torch.jit.load", "torch.jit.save", "torch.serialization.load",
                "torch.serialization.save", "pandas.read_pickle", "numpy.lib.format.read_array"}
#: Method names that (un)pickle whatever the object: pandas' to_pickle, nnU-Net's trainer checkpoints.
PICKLE_METHODS = {"to_pickle", "load_checkpoint", "save_checkpoint"}

#: (file, enclosing function, what) -> why it never touches the bucket.
ALLOWED: dict[tuple[str, str, str], str] = {
    # nnU-Net's trainer restores its own checkpoint_{final,latest,best}.pth from the site's local
    # nnUNet_results folder (written by that same trainer on that machine); torch.load inside nnunetv2.
    ("nnunet/training.py", "NnunetSession.resume", "call .load_checkpoint"):
        "nnU-Net reads its own local checkpoint",
    # `pickle` is imported only for the exception class a torn local checkpoint raises in load_checkpoint.
    ("nnunet/training.py", "<module>", "import pickle"): "exception class only",
    ("nnunet/training.py", "NnunetSession.resume", "use pickle.UnpicklingError"): "exception class only",
    # fedfs asks nnU-Net to write its checkpoint after every round, into the local results folder
    # (torch.save inside nnunetv2); the bucket only ever receives safetensors exported from the network.
    ("nnunet/training.py", "NnunetSession.save_checkpoint", "call .save_checkpoint"):
        "nnU-Net writes its own local checkpoint",
    ("nnunet/training.py", "NnunetSession.train_epochs", "call .save_checkpoint"):
        "fedfs's wrapper above, called after the epochs of a round",
    # a DDP rank (worker process) forwards the parent's command to that same wrapper of its own session
    ("nnunet/ddp_worker.py", "Rank.save_checkpoint", "call .save_checkpoint"):
        "fedfs's wrapper above, in a DDP rank's process",
    # export: a local nnU-Net model folder for nnUNetv2_predict, whose loader needs checkpoint_final.pth
    # (torch.save format); the weights in it come from a verified safetensors global.
    ("nnunet/inference.py", "export_model_folder", "call torch.save"): "local model folder for nnU-Net's predictor",
    # `fedfs init --pretrained-weights X.pth`: the coordinator reads its own local checkpoint with
    # weights_only=True (tensors and numpy scalars only; nothing the unpickler would import), converts it
    # to safetensors, and only that reaches the bucket (tests/test_pretrained.py checks the bucket).
    ("nnunet/pretrained.py", "_torch_load", "import pickle"): "exception class only",
    ("nnunet/pretrained.py", "_torch_load", "call torch.load"): "weights_only=True, a local checkpoint at init",
    ("nnunet/pretrained.py", "_torch_load", "use pickle.UnpicklingError"): "exception class only",
}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class Scanner(ast.NodeVisitor):
    """Collect (line, enclosing function, what) for every pickle-family use in one module."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> fully qualified name
        self.stack: list[str] = []
        self.found: list[tuple[int, str, str]] = []

    def _where(self) -> str:
        return ".".join(self.stack) or "<module>"

    def _add(self, node: ast.AST, what: str) -> None:
        self.found.append((node.lineno, self._where(), what))

    def _resolve(self, node: ast.AST) -> str | None:
        name = _dotted(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]
    visit_ClassDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            if a.name.split(".")[0] in PICKLE_MODULES:
                self._add(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{mod}.{a.name}"
            if mod.split(".")[0] in PICKLE_MODULES:
                self._add(node, f"import {mod}.{a.name}")
            elif f"{mod}.{a.name}" in PICKLE_CALLS:
                self._add(node, f"import {mod}.{a.name}")

    def visit_Call(self, node: ast.Call) -> None:
        full = self._resolve(node.func)
        if full in PICKLE_CALLS:
            self._add(node, f"call {full}")
        elif full in ("importlib.import_module", "__import__") and node.args and \
                isinstance(node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in PICKLE_MODULES:
            self._add(node, f"dynamic import {node.args[0].value}")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in PICKLE_METHODS and \
                (full is None or full.split(".")[0] not in PICKLE_MODULES):
            self._add(node, f"call .{node.func.attr}")
        for kw in node.keywords:
            if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                self._add(node, f"call {full or '?'}(allow_pickle=...)")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        full = self._resolve(node)
        if full and full.split(".")[0] in PICKLE_MODULES and isinstance(node.value, ast.Name):
            self._add(node, f"use {full}")
        self.generic_visit(node)


def scan(path: Path) -> list[tuple[int, str, str]]:
    s = Scanner()
    s.visit(ast.parse(path.read_text(), filename=str(path)))
    return s.found


def test_scanner_finds_what_it_should(tmp_path):
    """The scanner itself: aliases, from-imports, methods, allow_pickle, dynamic imports."""
    src = tmp_path / "m.py"
    src.write_text(
        "import pickle as p\nimport torch as T\nfrom torch import load\nimport numpy as np\nimport importlib\n"
        "def f(x):\n    p.loads(x)\n    T.load(x)\n    load(x)\n    np.load(x, allow_pickle=True)\n"
        "    np.load(x)\n    x.to_pickle('f')\n    importlib.import_module('cloudpickle')\n    T.save(x, 'y')\n"
    )
    whats = [w for _, _, w in scan(src)]
    assert "import pickle" in whats and "use pickle.loads" in whats
    assert "call torch.load" in whats and "import torch.load" in whats and "call torch.save" in whats
    assert "call numpy.load(allow_pickle=...)" in whats and "call .to_pickle" in whats
    assert "dynamic import cloudpickle" in whats
    assert sum(w.startswith("call numpy.load") for w in whats) == 1  # plain np.load is not a pickle use


def test_no_pickle_on_bucket_data():
    found: list[str] = []
    used: set[tuple[str, str, str]] = set()
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the package was not found"
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        for line, where, what in scan(path):
            key = (rel, where, what)
            if key in ALLOWED:
                used.add(key)
            else:
                found.append(f"fedfs/{rel}:{line}: {what} (in {where})")
    assert not found, "pickle-family use outside the allowed nnU-Net checkpoint sites:\n" + "\n".join(found)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries that match nothing any more (remove them): {stale}"
