"""scripts/mutation_check.py itself: a stale rule is named before any test runs, --list says which
rules still match their code, and the copy it mutates is the installed layout whether the tree is
a plain checkout or a git worktree with the aitbc/server -> ../server development links."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "mutation_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rules(tmp_path: Path, *finds: str) -> Path:
    out = tmp_path / "rules.toml"
    out.write_text("".join(
        f'[[rule]]\nrule = "rule {i}"\nfile = "aitbc/bech32.py"\nfind = {f!r}\nreplace = ""\n'
        f'tests = ["tests/test_bech32.py"]\n\n' for i, f in enumerate(finds)).replace("'", '"'))
    return out


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_a_stale_rule_is_named_and_nothing_runs(tmp_path: Path) -> None:
    rules = _rules(tmp_path, "raise ValueError(bad checksum)", "def decode(", "return")
    done = _run("--rules", str(rules))
    assert done.returncode == 1
    assert "rule 'rule 0': its find text is MISSING in aitbc/bech32.py" in done.stderr
    assert "rule 'rule 2': its find text is AMBIGUOUS (" in done.stderr
    assert "rule 'rule 1'" not in done.stderr
    assert "2 rule(s) went stale; no tests run" in done.stderr and "baseline" not in done.stdout


def test_list_shows_each_rules_state_and_fails_when_one_is_stale(tmp_path: Path) -> None:
    done = _run("--rules", str(_rules(tmp_path, "def decode(", "def nowhere(")), "--list")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ok", "aitbc/bech32.py", "rule", "0"]
    assert lines[1].split() == ["MISSING", "aitbc/bech32.py", "rule", "1"]
    assert lines[-1] == "2 rules, 1 with a find text that is not there exactly once"
    assert _run("--rules", str(_rules(tmp_path, "def decode(")), "--list").returncode == 0


def test_the_repositorys_rules_all_match_their_code() -> None:
    done = _run("--list")
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("worktree", [False, True], ids=["checkout", "worktree with development links"])
def test_the_copy_is_the_installed_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worktree: bool) -> None:
    mc = _load()
    src = tmp_path / "repo"
    for d in ("aitbc", *mc.MAPPED, "tests"):
        (src / d).mkdir(parents=True)
        (src / d / "__init__.py").write_text(f"# {d}\n")
    (src / "scripts").mkdir()
    (src / "scripts" / "make_vectors.py").write_text("# a generator tests load\n")
    (src / "pyproject.toml").write_text("")
    (src / "aitbc" / "__pycache__").mkdir()
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("kept as a link\n")
    (src / "tests" / "fixture").symlink_to(outside)
    if worktree:
        for name in mc.MAPPED:
            (src / "aitbc" / name).symlink_to(f"../{name}")
    monkeypatch.setattr(mc, "ROOT", src)
    dest = tmp_path / "copy"
    dest.mkdir()
    mc.build_copy(dest)
    for name, path in mc.MAPPED.items():
        assert not (dest / path).is_symlink() and (dest / path / "__init__.py").read_text() == f"# {name}\n"
    assert not (dest / "aitbc" / "__pycache__").exists()
    assert (dest / "scripts" / "make_vectors.py").read_text() == "# a generator tests load\n"
    assert (dest / "tests" / "fixture").is_symlink() and (dest / "tests" / "fixture").read_text() == "kept as a link\n"
