"""Packaging contracts: environment.yml agrees with pyproject.toml, CI runs the README's test command,
and ``import fluxvit`` works without the optional heavy dependencies."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_lists_the_pyproject_dependencies():
    project = _pyproject()
    extras = project["optional-dependencies"]
    expected = {_name(r) for r in project["dependencies"]}
    for extra in ("video", "deepspeed", "text", "embed", "onnx", "dev"):  # `gpu` (flash-attn) needs CUDA to build
        expected |= {_name(r) for r in extras[extra]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python=3.11") for d in conda) and "ffmpeg" in conda
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("-")}
    assert listed == expected, f"only in environment.yml: {listed - expected}; only in pyproject: {expected - listed}"
    assert "-c constraints.txt" in pip and any(r.startswith("-e .") for r in pip)


def test_constraints_pin_every_dependency_once():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"unpinned constraint {line!r}"
            assert _name(name) not in pins, f"{name} pinned twice"
            pins[_name(name)] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    project = _pyproject()
    needed = {_name(r) for r in project["dependencies"]}
    for extra in ("video", "deepspeed", "text", "embed", "onnx", "dev"):
        needed |= {_name(r) for r in project["optional-dependencies"][extra]}
    assert needed <= set(pins), f"not pinned: {needed - set(pins)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands[:2] == ["make pretrain", "make test"], commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == "make test"


def test_import_without_optional_dependencies():
    blocked = ["flash_attn", "deepspeed", "decord", "torchcodec"]
    code = (
        "import sys\n"
        "class Block:\n"
        f"    names = {blocked!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fluxvit, fluxvit.models, fluxvit.datasets, fluxvit.stages\n"
        "import torch\n"
        "m = fluxvit.create_model('fluxvit_tiny_patch14', depth=1)\n"
        "m(torch.randn(1, 3, 2, 28, 28))\n"
        f"assert not set({blocked!r}) & set(sys.modules), sorted(sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _function_level_project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's own modules inside a function of ``path``."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom):
                own = sub.level > 0 or (sub.module or "").split(".")[0] == "fluxvit"
                name = "." * sub.level + (sub.module or "")
            elif isinstance(sub, ast.Import):
                own = any(a.name.split(".")[0] == "fluxvit" for a in sub.names)
                name = ",".join(a.name for a in sub.names)
            else:
                continue
            # The one accepted reason: a module run with `python -m` must not be imported by its own package
            # first (runpy's RuntimeWarning); the comment above the import has to say so.
            if own and not any("runpy" in line for line in lines[max(0, sub.lineno - 4):sub.lineno - 1]):
                found.append((sub.lineno, name))
    return found


def test_project_imports_are_at_the_top_of_library_modules():
    offenders = {str(p.relative_to(ROOT)): hits for p in sorted((ROOT / "fluxvit").rglob("*.py"))
                 if (hits := _function_level_project_imports(p))}
    assert not offenders, f"project imports inside functions (move them to the top): {offenders}"


def test_the_import_check_sees_a_function_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\n\ndef f():\n    from fluxvit.models import create_model\n    return create_model\n")
    assert _function_level_project_imports(bad) == [(5, "fluxvit.models")]
    ok = tmp_path / "ok.py"
    ok.write_text("def f():\n    # runpy: imported here so `python -m pkg.mod` does not warn\n    from .mod import g\n"
                  "    import torch\n    return g, torch\n")
    assert _function_level_project_imports(ok) == []
