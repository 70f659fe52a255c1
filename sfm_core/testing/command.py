"""``sfm conformance SCHEME [--tls-params FILE] [-k EXPR]``: run the conformance suite on the
installed driver for SCHEME; exit 0 when it passes (``docs/conformance.md``).

The ``sfm`` command wires :func:`add_command` into its subcommands; ``python -m
sfm_core.testing`` runs :func:`main` on its own. Both run pytest in this process, in an
empty directory of their own (no conftest or ini file of the current directory applies),
with the suite's plugin on for SCHEME. More pytest options go in ``PYTEST_ADDOPTS``
(``PYTEST_ADDOPTS="-x --durations=5" sfm conformance tcp``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence

DESCRIPTION = (
    "run the driver conformance suite on the installed driver for SCHEME (docs/conformance.md); exit 0 when it passes"
)


def pytest_argv(
    scheme: str,
    directory: str,
    tls_params: str | None = None,
    keyword: str | None = None,
    verbose: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    """The pytest command line that runs the suite for ``scheme`` from the empty ``directory``."""
    ini = os.path.join(directory, "pytest.ini")
    if not os.path.exists(ini):
        with open(ini, "w") as f:
            f.write("[pytest]\n")
    argv = [
        "-p",
        "sfm_core.testing.plugin",
        f"--sfm-conformance={scheme}",
        "-c",
        ini,
        "--rootdir",
        directory,
        "-p",
        "no:cacheprovider",
        "-rfEsx",
        # This process imported sfm_core before pytest could mark it for assertion rewriting.
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += ["-o", "timeout=120"]  # a hung driver fails its check instead of hanging the run
    if tls_params:
        argv.append(f"--sfm-tls-params={os.path.abspath(tls_params)}")
    if keyword:
        argv += ["-k", keyword]
    if verbose:
        argv.append("-" + "v" * verbose)
    argv += list(extra)
    argv.append(directory)
    return argv


class _Outcomes:
    """Counts what the suite's checks did (a run where nothing passed did not pass)."""

    def __init__(self) -> None:
        self.passed = 0
        self.skipped = 0

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.skipped:
            self.skipped += 1


def run(
    scheme: str,
    tls_params: str | None = None,
    keyword: str | None = None,
    verbose: int = 0,
    extra: Sequence[str] = (),
) -> int:
    """Run the suite for ``scheme``; return 0 when it passes, else pytest's exit code (1 when
    every check was skipped: nothing was shown to work)."""
    try:
        import pytest
    except ImportError:
        print("sfm conformance needs pytest: pip install pytest", file=sys.stderr)
        return 4
    outcomes = _Outcomes()
    with tempfile.TemporaryDirectory(prefix="sfm-conformance-") as directory:
        code = int(pytest.main(pytest_argv(scheme, directory, tls_params, keyword, verbose, extra), plugins=[outcomes]))
    if code == 0 and outcomes.passed == 0:
        print(f"sfm conformance {scheme}: no check passed ({outcomes.skipped} skipped)", file=sys.stderr)
        return 1
    return code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scheme", metavar="SCHEME", help="the URL scheme whose installed driver is checked, e.g. tcp")
    p.add_argument(
        "--tls-params",
        metavar="FILE",
        help="JSON or TOML file with the 'server' and 'client' TLS params for a secure scheme "
        "(default: certificates made with trustme, if installed)",
    )
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="only the checks matching EXPR (pytest -k)")


def _cmd(args: argparse.Namespace) -> int:
    verbose = int(getattr(args, "verbose", 0) or 0) + int(getattr(args, "sub_verbose", 0) or 0)
    return run(args.scheme, args.tls_params, args.keyword, verbose)


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``conformance`` to a command's subparsers (``sfm``'s); the parsed arguments'
    ``func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser("conformance", help=DESCRIPTION, description=DESCRIPTION)
    p.add_argument(
        "-v", "--verbose", dest="sub_verbose", action="count", default=0, help="more detail (-v lists every check)"
    )
    add_arguments(p)
    p.set_defaults(func=_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sfm_core.testing SCHEME [--tls-params FILE] [-k EXPR] [-v]`` (more pytest
    options: ``PYTEST_ADDOPTS``)."""
    ap = argparse.ArgumentParser(prog="python -m sfm_core.testing", description=DESCRIPTION)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-v lists every check)")
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(args.scheme, args.tls_params, args.keyword, args.verbose)
