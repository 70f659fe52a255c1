"""``sfm new-driver`` (sfm_core/scaffold.py): the package it writes installs and passes the
conformance suite as it is, is clean under ruff, is the UDS example under another name; and it
refuses a bad NAME, SCHEME or DIR with exit 2, writing nothing.

The install goes into a fresh virtual environment in tmp (never the shared one): created without
pip, the package installed into it by this pip (``--python``, a normal isolated build), and only
then given a ``.pth`` that adds this environment's site-packages (sfm_core, pytest), so the
generated driver's entry point is seen only there. About 10 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import scaled

from sfm_core import scaffold

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "sfm-driver-uds"
#: What an install or a test run leaves in a package's directory: not part of it.
NOT_SOURCE = ("build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache")


def _source_files(directory: Path) -> dict[str, str]:
    out = {}
    for path in sorted(directory.rglob("*")):
        parts = path.relative_to(directory).parts
        if path.is_dir() or any(p in NOT_SOURCE or p.endswith(".egg-info") for p in parts):
            continue
        out["/".join(parts)] = path.read_text(encoding="utf-8")
    return out


def _run(argv: list, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=scaled(timeout), env=full_env)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


def _ruff() -> str | None:
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.exists() else shutil.which("ruff")


def test_the_uds_package_is_the_example_byte_for_byte():
    rendered = scaffold.render("uds", "uds")
    example = _source_files(EXAMPLE)
    assert sorted(rendered) == sorted(example), "the scaffold's files and docs/examples/sfm-driver-uds differ in names"
    differ = [path for path in rendered if rendered[path] != example[path]]
    assert not differ, (
        f"sfm_core/scaffold.py TEMPLATES and docs/examples/sfm-driver-uds differ at {differ}: change both together"
    )


def test_names_reach_every_file(tmp_path: Path):
    files = scaffold.write_package(tmp_path / "pkg", "my_pipe", "my-pipe.x+y")
    text = {p.relative_to(tmp_path / "pkg").as_posix(): p.read_text() for p in files}
    assert sorted(text) == sorted(
        [
            "README.md",
            "pyproject.toml",
            "sfm_driver_my_pipe/__init__.py",
            "sfm_driver_my_pipe/driver.py",
            "sfm_driver_my_pipe/py.typed",
            "tests/conftest.py",
            "tests/test_my_pipe.py",
        ]
    )
    assert 'name = "sfm-driver-my-pipe"' in text["pyproject.toml"]
    assert '"my-pipe.x+y" = "sfm_driver_my_pipe:MyPipeDriver"' in text["pyproject.toml"]  # a quoted TOML key
    assert 'license = "Apache-2.0"' in text["pyproject.toml"]
    assert 'requires = ["setuptools>=77"]' in text["pyproject.toml"]
    assert 'SCHEME = "my-pipe.x+y"' in text["sfm_driver_my_pipe/driver.py"]
    assert "class MyPipeDriver(Driver):" in text["sfm_driver_my_pipe/driver.py"]
    assert 'sfm_conformance_scheme = "my-pipe.x+y"' in text["tests/conftest.py"]
    leftover = [path for path, body in text.items() if "uds" in body.lower()]
    assert not leftover, f"the example's scheme 'uds' left in {leftover}"
    marks = [p for p, body in text.items() if any(m in body for m in ("@P@", "@D@", "@C@", "@S@", "@K@", "@N@"))]
    assert not marks, f"template markers left in {marks}"


def test_a_generated_package_is_clean_under_ruff(tmp_path: Path):
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    long_name = "a_rather_long_transport_name_x"  # 30 characters: no line grows past the limit
    for name, scheme in (("my_pipe", "my-pipe.x+y"), (long_name, long_name.replace("_", "-"))):
        directory = tmp_path / name
        scaffold.write_package(directory, name, scheme)
        for argv in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
            result = _run(argv, cwd=directory, timeout=60)
            assert result.returncode == 0, f"{' '.join(argv[1:])} on the package for {name}: {_explain(result)}"


def test_a_generated_package_installs_and_passes_the_conformance_suite(tmp_path: Path):
    package = tmp_path / "sfm-driver-my-pipe"
    assert scaffold.main(["my_pipe", "--scheme", "my-pipe.x+y", str(package)]) == 0
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=60)
    assert made.returncode == 0, _explain(made)
    python = venv / "bin" / "python"
    # This pip installs into that environment, with an isolated build (setuptools>=77 from the
    # index), before the environment can see this one's packages (whose setuptools may be older).
    installed = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(package)], timeout=300
    )
    assert installed.returncode == 0, f"pip install of the generated package: {_explain(installed)}"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "_sfm_test_parent.pth").write_text(f"import site; site.addsitedir({ours!r})\n")

    listed = _run([str(python), "-m", "sfm_core", "drivers"], timeout=60)
    assert "my-pipe.x+y" in listed.stdout and "sfm-driver-my-pipe" in listed.stdout, _explain(listed)
    # Its own tests, with the suite its conftest turns on (the installed copy, from outside the source).
    tests = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")], cwd=tmp_path)
    assert tests.returncode == 0, f"the generated package's tests and the suite: {_explain(tests)}"
    summary = tests.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, _explain(tests)
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 20, f"{passed} passed: the conformance suite did not run with the package's tests; {summary}"
    # And `sfm conformance SCHEME`, as its author would run it.
    suite = _run([str(python), "-m", "sfm_core.testing", "my-pipe.x+y"], cwd=tmp_path)
    assert suite.returncode == 0, f"sfm conformance my-pipe.x+y: {_explain(suite)}"
    assert "passed" in suite.stdout and "failed" not in suite.stdout, _explain(suite)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["1pipe", "--scheme", "pipe"], "not a valid Python identifier"),
        (["my-pipe", "--scheme", "pipe"], "not a valid Python identifier"),
        (["class", "--scheme", "pipe"], "not a valid Python identifier"),
        (["pïpe", "--scheme", "pipe"], "not a valid Python identifier"),
        (["__", "--scheme", "pipe"], "not a valid Python identifier"),
        (["pipe", "--scheme", "Pipe"], "give 'pipe'"),
        (["pipe", "--scheme", "1pipe"], "not a URL scheme"),
        (["pipe", "--scheme", "my_pipe"], "not a URL scheme"),
        (["pipe", "--scheme", "pipe://"], "not a URL scheme"),
        (["pipe", "--scheme", ""], "not a URL scheme"),
    ],
)
def test_a_bad_name_or_scheme_is_refused_with_exit_2(tmp_path: Path, capsys, argv: list, message: str):
    target = tmp_path / "out"
    assert scaffold.main([*argv, str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfm new-driver: ") and message in err, err
    assert not target.exists(), "a refused run wrote something"


def test_an_existing_non_empty_directory_or_a_file_is_refused(tmp_path: Path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    assert scaffold.main(["pipe", "--scheme", "pipe", str(full)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["mine.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert scaffold.main(["pipe", "--scheme", "pipe", str(a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "keep"


def test_an_empty_directory_and_the_default_directory_are_taken(tmp_path: Path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scaffold.main(["pipe", "--scheme", "pipe", str(empty)]) == 0
    assert (empty / "sfm_driver_pipe" / "driver.py").exists()
    monkeypatch.chdir(tmp_path)
    assert scaffold.main(["other_pipe", "--scheme", "opipe"]) == 0
    assert (tmp_path / "sfm-driver-other-pipe" / "pyproject.toml").exists()
    out = capsys.readouterr().out
    assert "sfm conformance opipe" in out and "pip install -e ." in out


def test_a_scheme_served_already_is_written_with_a_note(tmp_path: Path, capsys):
    pytest.importorskip("sfm_driver_tcp")
    assert scaffold.main(["mytcp", "--scheme", "tcp", str(tmp_path / "p")]) == 0
    assert "tcp:// is served by sfm-driver-tcp already" in capsys.readouterr().err


def test_add_command_wires_new_driver_into_a_parser_dir_after_the_option(tmp_path: Path):
    ap = argparse.ArgumentParser(prog="sfm")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="command", required=True)
    scaffold.add_command(sub)
    target = tmp_path / "here"
    args = ap.parse_args(["new-driver", "pipe", "--scheme", "pipe", str(target)])  # the documented order
    assert (args.name, args.scheme, args.directory, args.sub_verbose) == ("pipe", "pipe", str(target), 0)
    assert args.func(args) == 0
    assert (target / "pyproject.toml").exists()
    args = ap.parse_args(["new-driver", "--scheme", "x", "pipe"])
    assert (args.name, args.directory) == ("pipe", None)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["new-driver", "pipe"])  # --scheme is required: argparse's exit 2
    assert e.value.code == 2
