"""`sfm config check FILE` and `sfm config example [--scheme S]`."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from sfm_core.cli import main
from sfm_core.pki import make_pki
from sfm_core.registry import get_registry
from sfm_core.tls import SECURE_SCHEMES

BAD = """[endpoint]
name = "srv"

[manager]
lingr = 1

[[connector]]
url = "tcp://user:secret@0:8002?send_timout=1"
mode = "passive"
"""


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("SFM_") and "__" in var:
            monkeypatch.delenv(var)


def test_check_a_clean_file_exits_0(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[endpoint]\nname = "srv"\n[[connector]]\nurl = "tcp://0:8002"\nmode = "passive"\n')
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: ok: endpoint srv, 1 connector(s): passive tcp://0:8002\n" and out.err == ""


def test_check_lists_every_error_and_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{path}:5: manager.lingr: unknown key") and "did you mean 'linger'?" in err[0]
    assert err[1].startswith(f"{path}:8: connector[0].url: TcpDriver (tcp://): unknown parameter 'send_timout'")
    assert err[2] == f"sfm config check: 2 errors in {path}"
    assert "secret" not in "\n".join(err)


def test_check_json(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    assert main(["config", "check", "--json", str(path)]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and [e["key"] for e in report["errors"]] == ["manager.lingr", "connector[0].url"]
    assert report["errors"][0]["line"] == 5 and report["errors"][0]["origin"] == str(path)


def test_check_a_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["config", "check", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: cannot read: No such file or directory" in capsys.readouterr().err


def test_the_example_is_valid_toml_that_check_accepts(tmp_path: Path, capsys) -> None:
    assert main(["config", "example"]) == 0
    text = capsys.readouterr().out
    tomllib.loads(text)
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("scheme", sorted({"tcp", "ws", "grpc", "http", *SECURE_SCHEMES}))
def test_the_example_of_each_scheme_is_accepted(scheme: str, tmp_path: Path, capsys) -> None:
    if scheme not in get_registry().schemes():
        pytest.skip(f"no driver installed for {scheme}")
    assert main(["config", "example", "--scheme", scheme]) == 0
    path = tmp_path / "example.toml"
    path.write_text(capsys.readouterr().out)
    if scheme in SECURE_SCHEMES:
        pytest.importorskip("trustme")
        assert main(["config", "check", str(path)]) == 2  # its TLS files do not exist yet
        assert "certs/ca.pem" in capsys.readouterr().err
        (tmp_path / "certs").mkdir()
        make_pki(str(tmp_path / "certs"), "server", "client")
    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err


def test_example_of_an_unknown_scheme_exits_2(capsys) -> None:
    assert main(["config", "example", "--scheme", "quic"]) == 2
    assert "no driver for scheme 'quic'" in capsys.readouterr().err


def test_the_reference_names_every_key() -> None:
    from sfm_core.config import SECTIONS, TLS_KEYS

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for section, keys in SECTIONS.items():
        assert f"[{section}]" in doc or f"[[{section}]]" in doc
        for key in keys:
            assert f"`{key.name}`" in doc, (section, key.name)
    for key in TLS_KEYS:
        assert f"`{key}`" in doc or f"`{key}`," in doc, key
