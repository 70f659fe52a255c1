"""Build (or find) a private virtualenv that contains nvflare==2.9.0.

NVFlare pins many packages of its own, so it must never be installed into the
project's environment.  Interop tests run a real NVFlare endpoint with the
python of this venv (see ``peer.py`` / ``nvflare_peer.py``).

DIR is ``$SFM_NVFLARE_VENV`` if set, else ``~/.cache/sfm/nvflare-2.9.0``.

* Safe against concurrent builders: an exclusive ``fcntl.flock`` on
  ``DIR.lock`` (a sibling of DIR) serialises creation.
* A half-built venv (interrupted pip, failed import) is detected: the marker
  file ``DIR/.sfm-nvflare-ok`` is written only after pip succeeded and
  ``import nvflare.fuel.f3.communicator`` works; without it DIR is wiped and
  rebuilt.
* Failures raise ``RuntimeError`` with the tail of the failing command's output.

CLI (used by CI before the tests)::

    python tests/interop/nvflare_env.py      # builds if needed, prints python path
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

NVFLARE_VERSION = "2.9.0"
NVFLARE_REQUIREMENT = f"nvflare=={NVFLARE_VERSION}"
MARKER_NAME = ".sfm-nvflare-ok"
IMPORT_CHECK = "import nvflare.fuel.f3.communicator"
_TAIL_CHARS = 4000
#: As ``helpers.TIMEOUT_FACTOR`` (this module also runs alone, without the tests' imports).
_TIMEOUT_FACTOR = float(os.environ.get("SFM_TESTS_TIMEOUT_FACTOR", "1"))


def venv_dir() -> pathlib.Path:
    env = os.environ.get("SFM_NVFLARE_VENV")
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return (pathlib.Path.home() / ".cache" / "sfm" / f"nvflare-{NVFLARE_VERSION}").resolve()


def _python_of(d: pathlib.Path) -> pathlib.Path:
    return d / "bin" / "python"


def _marker_of(d: pathlib.Path) -> pathlib.Path:
    return d / MARKER_NAME


def _is_ready(d: pathlib.Path) -> bool:
    marker = _marker_of(d)
    if not marker.is_file() or not _python_of(d).exists():
        return False
    try:
        return marker.read_text().strip() == NVFLARE_REQUIREMENT
    except OSError:
        return False


def _tail(text: str) -> str:
    text = text or ""
    return text[-_TAIL_CHARS:]


def _run(cmd: list[str], what: str, timeout: float) -> None:
    timeout *= _TIMEOUT_FACTOR
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise RuntimeError(
            f"{what} timed out after {timeout:.0f}s: {' '.join(cmd)}\n--- output tail ---\n{_tail(out)}"
        ) from None
    except OSError as e:
        raise RuntimeError(f"{what} could not run {' '.join(cmd)}: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n--- output tail ---\n{_tail(proc.stdout)}"
        )


def _build(d: pathlib.Path) -> None:
    if d.exists():
        # half-built or stale venv: start over
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    base_python = os.environ.get("SFM_NVFLARE_BASE_PYTHON") or shutil.which("python3") or sys.executable
    _run([base_python, "-m", "venv", str(d)], "creating the nvflare venv", timeout=300)
    py = str(_python_of(d))
    _run(
        [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", NVFLARE_REQUIREMENT],
        f"pip install {NVFLARE_REQUIREMENT}",
        timeout=1800,
    )
    _run([py, "-c", IMPORT_CHECK], "import check of nvflare in its venv", timeout=300)
    tmp = d / (MARKER_NAME + ".tmp")
    tmp.write_text(NVFLARE_REQUIREMENT + "\n")
    os.replace(tmp, _marker_of(d))


def ensure_nvflare_venv() -> pathlib.Path:
    """Return the python executable of a venv with nvflare==2.9.0, building it if needed."""
    d = venv_dir()
    if _is_ready(d):
        return _python_of(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    lock_path = d.parent / (d.name + ".lock")
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            # someone else may have finished while we waited for the lock
            if not _is_ready(d):
                _build(d)
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return _python_of(d)


def main() -> int:
    try:
        py = ensure_nvflare_venv()
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
