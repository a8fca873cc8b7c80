"""Sessions: tests(package) per package folder, integration, trl, verl, lint, typecheck, bench, demo, build,
lock, tests-latest.

Every session but tests-latest installs through constraints.txt, the lock that `nox -s lock` compiles
with uv from every package's requirements and extras and the tools below: every transitive dependency
pinned, torch as the CPU build lying on these machines' disk (PIP_FIND_LINKS). The same file constrains
the build back-ends of the packages (hatchling). uv is used when present (and told about that folder
through UV_FIND_LINKS), virtualenv + pip otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox
import nox.command
import tomllib

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")
# verl's own lock: verl asks for an older transformers than the main lock's, so its session resolves apart
VERL_CONSTRAINTS = str(ROOT / "constraints-verl.txt")
TORCH = "torch==2.13.0+cpu"  # the CPU wheel on these machines' disk; the registry's torch is a CUDA build
# what the sessions install beside the packages: locked with them
TOOLS = ["nox", "uv", "ruff", "mypy", "build", "setuptools", "wheel", "deepspeed", "psutil", "trl", "gpytorch"]
# extras left out of the lock: their own sessions resolve them (verl asks for an older transformers); lpips
# requires torchvision, whose registry builds do not load against CPU torch
UNLOCKED_EXTRAS = {"verl", "vllm", "lpips"}
CORE = "shared/klcore"
NO_TESTS = 5  # pytest's exit code when a folder holds no test yet: not a failure
PACKAGES = [CORE, *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "packages").glob("*") if (p / "pyproject.toml").exists())]

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "integration", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = False

if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
    os.environ["UV_FIND_LINKS"] = ",".join(os.environ["PIP_FIND_LINKS"].split())  # uv: comma-separated


def _locked_env(constraints: str = CONSTRAINTS) -> dict[str, str]:
    """Constraints for the build environments pip and uv make for sdists and local packages."""
    return {"UV_BUILD_CONSTRAINT": constraints, "PIP_CONSTRAINT": constraints}


def _install(session: nox.Session, *args: str, constraints: str = CONSTRAINTS, env: dict | None = None) -> None:
    session.install("-c", constraints, *args, env={**_locked_env(constraints), **(env or {})})


def _short(path: str) -> str:
    return Path(path).name


@nox.session(tags=["test"])
@nox.parametrize("package", [_short(p) for p in PACKAGES])
def tests(session: nox.Session, package: str) -> None:
    """One package's tests in a fresh venv holding only that package, klcore and their test deps."""
    path = next(p for p in PACKAGES if _short(p) == package)
    pkgs = [f"{CORE}[test]"] if path == CORE else [f"{CORE}[lm]", f"{path}[test]"]
    _install(session, *pkgs)
    session.run("python", "-m", "pytest", f"{path}/tests", "-q", *session.posargs, success_codes=[0, NO_TESTS])


@nox.session(tags=["test"])
def integration(session: nox.Session) -> None:
    """Every package installed together; tests that compose plugins and run the trainer under
    accelerate's engines (DDP, FSDP2, DeepSpeed) on CPU processes."""
    _install(session, f"{CORE}[test]", *[f"{p}[test]" for p in PACKAGES if p != CORE])
    # DeepSpeed is a source distribution whose setup imports torch: build it against the venv's CPU torch,
    # without compiling its CUDA ops (its CPU communication op is compiled on first use)
    _install(session, "setuptools", "wheel")
    _install(session, "--no-build-isolation", "deepspeed", env={"DS_BUILD_OPS": "0"})
    session.run("python", "-m", "pytest", "integration-tests", "-q", *session.posargs, success_codes=[0, NO_TESTS])


# the packages with adapters for each framework (their tests marked `trl` / `verl`)
TRL_PACKAGES = ["packages/entropy-rl", "packages/divergence-rl", "packages/hypo", "packages/opd-distill"]
VERL_PACKAGES = ["packages/entropy-rl", "packages/divergence-rl"]


def _adapter_tests(session: nox.Session, marker: str, packages: list[str]) -> None:
    """Each package's tests marked ``marker``, one pytest call per package (test basenames repeat across them)."""
    for path in packages:
        session.run("python", "-m", "pytest", f"{path}/tests", "-q", "-m", marker, *session.posargs,
                    success_codes=[0, NO_TESTS])


@nox.session(tags=["test"])
def trl(session: nox.Session) -> None:
    """The TRL adapters against TRL itself (locked): every package's tests marked ``trl``."""
    _install(session, f"{CORE}[lm,test]", *[f"{p}[trl,test]" for p in TRL_PACKAGES])
    _adapter_tests(session, "trl", TRL_PACKAGES)


@nox.session(tags=["test"])
def verl(session: nox.Session) -> None:
    """The verl adapters against verl itself, installed through its own lock (constraints-verl.txt): every
    package's tests marked ``verl``."""
    _install(session, f"{CORE}[lm,test]", *[f"{p}[verl,test]" for p in VERL_PACKAGES], constraints=VERL_CONSTRAINTS)
    _adapter_tests(session, "verl", VERL_PACKAGES)


@nox.session(tags=["test"])
def lint(session: nox.Session) -> None:
    """ruff over the whole repository."""
    _install(session, "ruff")
    session.run("ruff", "check", ".")


@nox.session(tags=["test"])
def typecheck(session: nox.Session) -> None:
    """mypy on klcore and on every package (each ships py.typed)."""
    _install(session, "mypy", f"{CORE}[lm]", *[p for p in PACKAGES if p != CORE])
    sources = [str(next(d for d in (ROOT / p / "src").iterdir() if (d / "__init__.py").exists()).relative_to(ROOT))
               for p in PACKAGES]
    session.run("mypy", *sources)


@nox.session(tags=["test"])
def docs(session: nox.Session) -> None:
    """Every public name of every package (its modules' __all__) is documented in docs/<package>.md."""
    _install(session, *[f"{p}[lm]" if p == CORE else p for p in PACKAGES])
    for path in PACKAGES:
        session.run("python", "-c", _CHECK_DOCS, path)


_CHECK_DOCS = """
import importlib, pkgutil, re, sys, tomllib
from pathlib import Path
root = Path(sys.argv[1])
meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
doc_name = "klcore" if meta["name"] == "klcore" else root.name
text = Path("docs", f"{doc_name}.md").read_text()
top = next(p.name for p in (root / "src").iterdir() if p.is_dir() and (p / "__init__.py").exists())
pkg = importlib.import_module(top)
missing = []
public = [m.name for m in pkgutil.walk_packages(pkg.__path__, top + ".") if not m.name.split(".")[-1].startswith("_")]
for mod in [pkg, *map(importlib.import_module, public)]:
    for name in getattr(mod, "__all__", []):
        if not name.startswith("_") and not re.search(rf"\\b{name}\\b", text):
            missing.append(f"{mod.__name__}.{name}")
if missing:
    sys.exit(f"docs/{doc_name}.md does not mention: " + ", ".join(sorted(set(missing))))
print(f"docs/{doc_name}.md covers the public API of {top}")
"""


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmarks/*.py (or those named: `nox -s bench -- dkm hodge`), with the peer libraries they compare to."""
    _install(session, f"{CORE}[lm]", *[p for p in PACKAGES if p != CORE], "psutil", "trl", "gpytorch")
    scripts = sorted(s for s in (ROOT / "benchmarks").glob("*.py") if not s.name.startswith("_"))
    chosen = [s for s in scripts if not session.posargs or s.stem in session.posargs]
    for script in chosen:
        session.run("python", str(script.relative_to(ROOT)))


@nox.session
def demo(session: nox.Session) -> None:
    """Every registered recipe at its default size; those that need the user's own input files are skipped."""
    _install(session, f"{CORE}[lm]", *[p for p in PACKAGES if p != CORE])
    out = session.posargs[0] if session.posargs else "runs/demo"
    session.run("python", "-c", _DEMO, out)


_DEMO = """
import json
import sys
from pathlib import Path
from klcore.plugins import build_plugin_manager
from klcore.recipes import run_recipe
from klcore.errors import ConfigError
plugins = build_plugin_manager()
for name in plugins.registry("recipe"):
    print(f"=== klcore run {name}", flush=True)
    try:
        summary = run_recipe(plugins, name, out=Path(sys.argv[1]) / name)
    except ConfigError as err:  # recipes that work on the user's own files (a checkpoint, a metrics file)
        print(f"skipped: {err}", flush=True)
        continue
    print(json.dumps(summary, indent=2, default=str), flush=True)
"""


@nox.session
def build(session: nox.Session) -> None:
    """Build every package's wheel, install each alone into a clean venv, and load its entry points."""
    _install(session, "build")
    dist = Path(session.create_tmp()) / "dist"
    for path in PACKAGES:
        session.run("python", "-m", "build", "--wheel", "--outdir", str(dist), path, env=_locked_env())
    core_wheel = str(next(dist.glob("klcore-*.whl")))
    for wheel in sorted(dist.glob("*.whl")):
        venv = Path(session.create_tmp()) / f"venv-{wheel.name.split('-')[0]}"
        session.run("python", "-m", "venv", "--clear", str(venv))
        py = str(venv / "bin" / "python")
        extra = [] if str(wheel) == core_wheel else [core_wheel]
        session.run(py, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, *extra, str(wheel), external=True,
                    env=_locked_env())
        session.run(py, "-c", _CHECK_ENTRY_POINTS, external=True)


_CHECK_ENTRY_POINTS = """
from klcore.plugins import build_plugin_manager
plugins = build_plugin_manager()
assert not plugins.failures, plugins.failures
print("plugins:", sorted(plugins.distributions))
"""


def _extras(path: str) -> list[str]:
    meta = tomllib.loads((ROOT / path / "pyproject.toml").read_text())["project"]
    return sorted(set(meta.get("optional-dependencies", {})) - UNLOCKED_EXTRAS)


def _with_extras(path: str) -> str:
    extras = _extras(path)
    return f"{path}[{','.join(extras)}]" if extras else path


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Recompile constraints.txt: every package with its extras (but UNLOCKED_EXTRAS) and TOOLS, resolved to
    the newest versions they allow for this machine's Python and platform, every transitive dependency pinned."""
    spec = Path(session.create_tmp()) / "lock.in"
    spec.write_text("\n".join([*(f"-e {_with_extras(p)}" for p in PACKAGES), TORCH, *TOOLS]) + "\n")
    names = [tomllib.loads((ROOT / p / "pyproject.toml").read_text())["project"]["name"] for p in PACKAGES]
    session.run("uv", "pip", "compile", str(spec), "--output-file", CONSTRAINTS, "--python-version", "3.11",
                "--custom-compile-command", "nox -s lock", "--no-annotate", "--quiet", "--upgrade",
                *[arg for name in names for arg in ("--no-emit-package", name)], external=True)
    verl_spec = Path(session.create_tmp()) / "lock-verl.in"
    verl_spec.write_text("\n".join([f"-e {CORE}[lm,test]", *(f"-e {p}[verl,test]" for p in VERL_PACKAGES), TORCH]) + "\n")
    session.run("uv", "pip", "compile", str(verl_spec), "--output-file", VERL_CONSTRAINTS, "--python-version", "3.11",
                "--custom-compile-command", "nox -s lock", "--no-annotate", "--quiet", "--upgrade",
                *[arg for name in names for arg in ("--no-emit-package", name)], external=True)


@nox.session(name="tests-latest")
def tests_latest(session: nox.Session) -> None:
    """The whole suite (every package's tests, then integration) with the newest versions the packages' own
    ranges allow, torch aside (the CPU wheel): finds drift before the lock is refreshed. Not in CI."""
    newest = Path(session.create_tmp()) / "torch.txt"
    newest.write_text(TORCH + "\n")
    _install(session, *(_with_extras(p) for p in PACKAGES), "setuptools", "wheel", constraints=str(newest))
    _install(session, "--no-build-isolation", "deepspeed", constraints=str(newest), env={"DS_BUILD_OPS": "0"})
    session.run("python", "-m", "pip", "freeze")  # what "newest" meant today, for the report
    failed = []
    for path in [*PACKAGES, "integration-tests"]:
        tests = path if path == "integration-tests" else f"{path}/tests"
        try:
            session.run("python", "-m", "pytest", tests, "-q", *session.posargs, success_codes=[0, NO_TESTS])
        except nox.command.CommandFailed:
            failed.append(tests)
    if failed:
        session.error("failed with the newest versions: " + ", ".join(failed))
