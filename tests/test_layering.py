"""Package boundaries and safe deserialization, checked by parsing the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("offsite", "emulator", "client", "coordinator")

FORBIDDEN = {
    "emulator": {"client", "coordinator", "grpc", "flwr", "sqlalchemy"},
    "client": {"coordinator"},
    "coordinator": {"client"},
    "offsite": {"client", "coordinator", "emulator", "flwr", "grpc"},
}
# The CLI is the one place that wires packages together (imports happen inside commands).
ALLOWED = {
    "offsite/cli/main.py": {"client", "coordinator", "emulator"},
    "offsite/cli/deploy.py": {"client", "coordinator", "emulator"},
    # the generated gRPC stubs are the wire contract both sides share, and the typed clients
    # and thin servicers over them
    "offsite/wire/v1/artifacts_pb2_grpc.py": {"grpc"},
    "offsite/wire/v1/enrollment_pb2_grpc.py": {"grpc"},
    "offsite/wire/clients.py": {"grpc"},
    "offsite/wire/servicers.py": {"grpc"},
    # and the Flower-plane messages (Flower records) both roles share, and Flower's Control API
    "offsite/wire/messages.py": {"flwr"},
    "offsite/wire/flower_control.py": {"flwr"},
}
# gRPC handlers decide; the servicers in offsite/wire/servicers.py speak gRPC for them
NO_TRANSPORT = ("coordinator/service/handlers.py",)
# protobuf modules (ours and Flower's) are imported by the wire package alone, even in the
# scripts a benchmark generates: everything else goes through offsite.wire.serde and its clients
PB2_IMPORT = re.compile(r"\b(?:from|import)\b[^\n#]*?_pb2")
PB2_SCANNED = (*PACKAGES, "bench")


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_boundaries(package: str) -> None:
    violations = []
    for path in _sources(package):
        relative = path.relative_to(ROOT).as_posix()
        bad = (_imports(path) & FORBIDDEN[package]) - ALLOWED.get(relative, set())
        if bad:
            violations.append(f"{relative} imports {sorted(bad)}")
    assert not violations, violations


def test_handlers_import_no_transport() -> None:
    for relative in NO_TRANSPORT:
        bad = _imports(ROOT / relative) & {"grpc", "google", "flwr"}
        assert not bad, f"{relative} imports {sorted(bad)}: handlers take and return domain values"


def test_only_the_wire_package_imports_protobuf_modules() -> None:
    offenders = []
    for folder in PB2_SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith("offsite/wire/"):
                continue
            text = path.read_text()
            for node in ast.walk(ast.parse(text)):  # imports, however they are wrapped
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
                    if any("_pb2" in name for name in names):
                        offenders.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
            for number, line in enumerate(text.splitlines(), 1):  # and code in strings
                if PB2_IMPORT.search(line) and not line.lstrip().startswith(("from", "import")):
                    offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, (
        "use offsite.wire.serde / offsite.wire.clients / offsite.wire.flower_control instead of "
        "a *_pb2 module:\n" + "\n".join(offenders)
    )


def test_no_unsafe_deserialization_anywhere() -> None:
    """No torch.load, pickle, unsafe yaml or allow_pickle on any code path: untrusted bytes
    never reach an unpickler."""
    offenders = []
    for package in PACKAGES:
        for path in _sources(package):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = ast.unparse(node.func)
                    if name in {"torch.load", "pickle.load", "pickle.loads", "yaml.load"}:
                        offenders.append(f"{path.name}: {name}")
                    for kw in node.keywords:
                        if kw.arg == "allow_pickle" and ast.unparse(kw.value) != "False":
                            offenders.append(f"{path.name}: allow_pickle")
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names]
                    module = getattr(node, "module", None) or ""
                    if "pickle" in names or module == "pickle":
                        offenders.append(f"{path.name}: imports pickle")
    assert not offenders, offenders


def test_every_package_has_a_docstring() -> None:
    for package in PACKAGES:
        init = ROOT / package / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{package}/__init__.py"


# Which rooms of a package may import which of its other rooms (sub-packages, or top-level
# modules for ``offsite``): run state below the Flower server side and evaluation, the service
# beside them on the store only, the workflows on top.
ROOMS = {
    "coordinator": {
        "store": set(),
        "state": {"store"},
        "federation": {"state", "store"},
        "evaluation": {"state", "models"},
        "service": {"store"},
        "serve": {"evaluation", "federation", "models", "state"},
        # the dashboard reads the registry and run folders, and acts through the service's
        # audit log; nothing below it imports it
        "dashboard": {"evaluation", "service", "state", "store"},
        "workflow": {
            "evaluation",
            "federation",
            "models",
            "serve",
            "service",
            "state",
            "store",
        },
    },
    "offsite": {
        "host": {"errors"},
        "crypto": {"host", "errors"},
        "federation": {"crypto", "errors"},
        "wire": {"crypto", "errors"},
    },
}


def _room_imports(package: str, path: Path) -> set[str]:
    """The rooms of ``package`` (its sub-packages and top-level modules) ``path`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == package and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ROOMS))
def test_rooms_import_only_the_rooms_below_them(package: str) -> None:
    violations = []
    for room, allowed in ROOMS[package].items():
        folder = ROOT / package / room
        for path in sorted(folder.rglob("*.py")):
            if "migrations" in path.parts:
                continue
            bad = _room_imports(package, path) - allowed - {room}
            if bad:
                violations.append(f"{path.relative_to(ROOT).as_posix()} imports {sorted(bad)}")
    assert not violations, violations


def test_every_room_has_a_rule() -> None:
    """A new sub-package must say which rooms it may import."""
    for package, rooms in ROOMS.items():
        found = {p.name for p in (ROOT / package).iterdir() if (p / "__init__.py").is_file()}
        exempt = {"cli"} if package == "offsite" else set()  # the CLI wires everything
        assert found - exempt == set(rooms), (package, sorted(found - exempt - set(rooms)))


def test_the_docs_map_matches_the_tree() -> None:
    """The docs' "Where things live" (docs/internals.md) names every package and sub-package,
    and nothing else."""
    page = (ROOT / "docs" / "internals.md").read_text()
    section = page.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    listed = {
        cell.strip("`").rstrip("/")
        for line in section.splitlines()
        if line.startswith("| `")
        for cell in [line.split("|")[1].strip()]
    }
    packages = {
        path.parent.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).glob("*/__init__.py")
        # client's and offsite's inner folders are named in their package's line
        if path.parent.relative_to(ROOT).as_posix() not in {"client/runtime", "client/kernels"}
    } | set(PACKAGES)
    missing = {p for p in packages if not any(e == p or e.startswith(p + "/") for e in listed)}
    assert not missing, f"packages missing from the docs/internals.md map: {sorted(missing)}"
    stale = {p for p in listed if not (ROOT / p).exists()}
    assert not stale, f"docs/internals.md map lists paths that do not exist: {sorted(stale)}"
