"""The layering the code promises: a pure core, and PySyncObj only where it is allowed.

Imports are read from the source (AST), relative imports resolved, and followed through the
project's own modules, so a pure module cannot reach I/O through a helper either.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("veristore_py", "cache_plane")

# Decision logic and replicated state: no I/O, clocks, randomness, Raft, HTTP or LMDB.
PURE = (
    "veristore_py.state", "veristore_py.codec", "veristore_py.errors", "veristore_py.auth",
    "cache_plane.machine", "cache_plane.policy", "cache_plane.calibration",
    "cache_plane.index", "cache_plane.blocklog", "cache_plane.hashing", "cache_plane.model",
    "cache_plane.views", "cache_plane.commands", "cache_plane.limits",
    "cache_plane.kvevents.wire", "cache_plane.kvevents.stream",
    "cache_plane.responses.keys", "cache_plane.responses.rules", "cache_plane.responses.replay",
    "cache_plane.responses.catalog", "cache_plane.responses.guards",
)
FORBIDDEN = {
    "os", "io", "pathlib", "shutil", "tempfile", "socket", "select", "selectors", "ssl",
    "subprocess", "multiprocessing", "threading", "asyncio", "signal", "mmap",
    "time", "datetime", "random", "secrets", "uuid",
    "logging", "structlog",
    "pysyncobj", "aiohttp", "lmdb", "requests", "httpx", "zmq",
}
# The one module that may import PySyncObj (the seam: its imports, patches, private reads).
PYSYNCOBJ_ALLOWED = {"veristore_py.raft"}


def _path(module: str) -> str | None:
    base = os.path.join(ROOT, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(candidate):
            return candidate
    return None


def _imports(module: str) -> Iterator[str]:
    """Absolute names of every module `module` imports (relative imports resolved)."""
    path = _path(module)
    if path is None:
        return
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            yield name
            for alias in node.names:  # `from . import x` may name a submodule
                if _path(f"{name}.{alias.name}"):
                    yield f"{name}.{alias.name}"


def _closure(module: str) -> dict[str, str]:
    """Every module reachable from `module` through project imports: name -> imported by."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        for name in _imports(current):
            if name in seen:
                continue
            seen[name] = current
            if name.split(".")[0] in PACKAGES:
                todo.append(name)
    return seen


def _modules() -> Iterator[str]:
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, file), ROOT)[:-3]
                    name = rel.replace(os.sep, ".")
                    yield name[:-len(".__init__")] if name.endswith(".__init__") else name


@pytest.mark.parametrize("module", PURE)
def test_the_pure_core_reaches_no_io_clock_randomness_raft_http_or_lmdb(module):
    """A pure module, and every project module it imports, imports none of FORBIDDEN."""
    assert _path(module), f"{module} is listed as pure but does not exist"
    bad = {name: by for name, by in _closure(module).items()
           if name.split(".")[0] in FORBIDDEN}
    assert not bad, f"{module} reaches {sorted(bad)} (imported by {bad})"


def test_only_the_allowed_modules_import_pysyncobj():
    """PySyncObj is imported by the seam (veristore_py/raft.py) and nowhere else."""
    offenders = sorted(m for m in _modules()
                       if any(name.split(".")[0] == "pysyncobj" for name in _imports(m))
                       and m not in PYSYNCOBJ_ALLOWED)
    assert not offenders, f"pysyncobj imported outside {sorted(PYSYNCOBJ_ALLOWED)}: {offenders}"


def test_the_checker_sees_relative_and_transitive_imports():
    """The resolver is not vacuous: it finds known edges, relative ones included."""
    assert "cache_plane.index" in set(_imports("cache_plane.policy"))
    assert "veristore_py.codec" in _closure("cache_plane.machine")
    assert "pysyncobj" in {n.split(".")[0] for n in _imports("veristore_py.raft")}
    assert "veristore_py.raft" in set(_imports("veristore_py.node"))


SYNCOBJ_ATTRIBUTES = re.compile(
    r"\.(raftCurrentTerm|raftCommitIndex|raftLastApplied|otherNodes|selfNode|_isLeader|"
    r"_getLeader|forceLogCompaction|isNodeConnected|transferLeadership|destroy_synchronous|"
    r"addNodeToCluster|removeNodeFromCluster|addOnTickCallback|removeOnTickCallback|getStatus|"
    r"isReady|_poller|_onTick|_syncObj|_SyncObj__\w+)\b")
# The seam's `RaftMember` is the SyncObj; only the seam may use SyncObj's own attributes. The
# node holds a member and uses its facade; everything else uses the node's facade: term,
# commit_index, last_applied, is_leader, peers, ...
SYNCOBJ_ATTRIBUTES_ALLOWED = {"veristore_py.raft"}


def test_only_the_seam_uses_syncobj_attributes():
    """Other modules go through the member's narrow facade, not PySyncObj's attributes."""
    offenders = {}
    for module in _modules():
        path = _path(module)
        if module in SYNCOBJ_ATTRIBUTES_ALLOWED or path is None:
            continue
        with open(path, encoding="utf-8") as f:
            found = sorted(set(SYNCOBJ_ATTRIBUTES.findall(f.read())))
        if found:
            offenders[module] = found
    assert not offenders, f"PySyncObj attributes used outside the seam: {offenders}"


def test_the_node_holds_its_syncobj():
    """The node is not a SyncObj (Patroni's shape: it holds one behind a facade)."""
    from veristore_py.node import VeristoreNode
    from veristore_py.raft import RaftMember, SyncObj

    assert not issubclass(VeristoreNode, SyncObj)
    assert issubclass(RaftMember, SyncObj)
