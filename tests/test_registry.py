"""Driver discovery by scheme: entry points, errors, duplicates, in-process registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import scaled

from sfm_core import CommError, Driver, DriverRegistry, get_plugin_manager

GROUP = "sfm.drivers.testing"

DRIVER_SRC = """
from sfm_core import Driver, hookimpl

LOADED = []

class {cls}(Driver):
    @staticmethod
    def supported_transports():
        return ["{scheme}"]

    @staticmethod
    def capabilities():
        return {{"from": "{dist}"}}

    def listen(self, connector):
        pass

    def connect(self, connector):
        pass

@hookimpl
def sfm_driver_loaded(scheme, driver_class):
    LOADED.append(scheme)
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install fake distributions into a temporary sys.path entry."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made_modules: list[str] = []

    def make(dist: str, entries: dict[str, str], module: str | None = None, source: str = "") -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")
        if module:
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            made_modules.append(module)

    yield make
    for module in made_modules:
        mod = sys.modules.pop(module, None)
        if mod is not None and get_plugin_manager().is_registered(mod):
            get_plugin_manager().unregister(mod)


def _driver(cls: str, scheme: str, dist: str) -> str:
    return DRIVER_SRC.format(cls=cls, scheme=scheme, dist=dist)


def test_unknown_scheme_names_scheme_known_schemes_and_package(site) -> None:
    site("fake-a", {"foo": "fake_a:FooDriver"}, "fake_a", _driver("FooDriver", "foo", "fake-a"))
    reg = DriverRegistry(GROUP)
    with pytest.raises(CommError) as err:
        reg.get_driver_class("grpc")
    assert err.value.code == CommError.NOT_SUPPORTED
    assert "no driver for scheme 'grpc' (known schemes: foo); install sfm-driver-grpc" in str(err.value)
    with pytest.raises(CommError, match="no driver for scheme 'nope' \\(known schemes: foo\\)$"):
        reg.get_driver_class("nope")


def test_a_driver_that_fails_to_import_is_reported_and_breaks_nothing_else(site) -> None:
    site("fake-broken", {"bad": "fake_broken:Driver"}, "fake_broken", "raise RuntimeError('boom at import')\n")
    site("fake-a", {"foo": "fake_a:FooDriver"}, "fake_a", _driver("FooDriver", "foo", "fake-a"))
    reg = DriverRegistry(GROUP)
    with pytest.raises(CommError) as err:
        reg.get_driver_class("bad")
    assert err.value.code == CommError.NOT_SUPPORTED
    assert "from fake-broken 1.0 failed to load: RuntimeError: boom at import" in str(err.value)
    assert reg.get_driver_class("foo").__name__ == "FooDriver"
    status = {e.scheme: e.status for e in reg.load_all()}
    assert status == {"bad": "failed", "foo": "ok"}


def test_an_entry_point_that_is_not_a_driver_is_refused(site) -> None:
    site("fake-notdriver", {"odd": "fake_notdriver:thing"}, "fake_notdriver", "def thing():\n    pass\n")
    reg = DriverRegistry(GROUP)
    with pytest.raises(CommError, match="is not a subclass of sfm_core.Driver"):
        reg.get_driver_class("odd")


def test_duplicate_schemes_follow_the_documented_rule(site, monkeypatch) -> None:
    site("zeta-dist", {"dup": "fake_z:ZDriver"}, "fake_z", _driver("ZDriver", "dup", "zeta-dist"))
    site("alpha-dist", {"dup": "fake_al:ADriver"}, "fake_al", _driver("ADriver", "dup", "alpha-dist"))
    reg = DriverRegistry(GROUP)
    # No preference: the distribution whose name sorts first; the other is reported shadowed.
    assert reg.get_driver_class("dup").__name__ == "ADriver"
    shadowed = [e for e in reg.entries() if e.status == "shadowed"]
    assert [(e.distribution, e.shadowed_by) for e in shadowed] == [("zeta-dist", "alpha-dist")]
    # An explicit choice in the environment wins ...
    monkeypatch.setenv("SFM_DRIVERS", "dup=zeta-dist")
    assert DriverRegistry(GROUP).get_driver_class("dup").__name__ == "ZDriver"
    # ... and one in code wins over the environment.
    reg2 = DriverRegistry(GROUP)
    reg2.prefer("dup", "alpha-dist")
    assert reg2.get_driver_class("dup").__name__ == "ADriver"


def test_the_official_package_wins_a_shared_scheme(site) -> None:
    site("aaa-tcp", {"tcp": "fake_aaa:ADriver"}, "fake_aaa", _driver("ADriver", "tcp", "aaa-tcp"))
    site("sfm-driver-tcp", {"tcp": "fake_off:TDriver"}, "fake_off", _driver("TDriver", "tcp", "x"))
    assert DriverRegistry(GROUP).get_driver_class("tcp").__name__ == "TDriver"


def test_in_process_registration_wins_and_can_be_undone(site) -> None:
    site("fake-a", {"foo": "fake_a:FooDriver"}, "fake_a", _driver("FooDriver", "foo", "fake-a"))

    class Mine(Driver):
        @staticmethod
        def supported_transports() -> list[str]:
            return ["foo"]

        @staticmethod
        def capabilities() -> dict:
            return {}

        def listen(self, connector) -> None:
            pass

        def connect(self, connector) -> None:
            pass

    reg = DriverRegistry(GROUP)
    reg.register("foo", Mine)
    reg.register("mem", Mine)
    assert reg.get_driver_class("foo") is Mine
    assert isinstance(reg.create_driver("mem"), Mine)
    assert "mem" in reg.schemes()
    reg.unregister("foo")
    assert reg.get_driver_class("foo").__name__ == "FooDriver"
    with pytest.raises(CommError, match="not a subclass"):
        reg.register("x", object)  # type: ignore[arg-type]


def test_loading_a_driver_registers_its_module_as_a_plugin(site) -> None:
    site("fake-a", {"foo": "fake_a:FooDriver"}, "fake_a", _driver("FooDriver", "foo", "fake-a"))
    cls = DriverRegistry(GROUP).get_driver_class("foo")
    module = sys.modules["fake_a"]
    assert get_plugin_manager().is_registered(module)
    assert module.LOADED == ["foo"]  # its own hookimpl saw the load event
    assert cls.capabilities() == {"from": "fake-a"}


def test_listing_schemes_imports_no_driver_and_resolving_imports_only_that_one() -> None:
    code = textwrap.dedent(
        """
        import sys
        import sfm_core
        from sfm_core import ConnManager, Endpoint, get_registry
        ConnManager(Endpoint("probe"))
        schemes = get_registry().schemes()
        assert "tcp" in schemes, schemes
        drivers = lambda: sorted(m for m in sys.modules if m.startswith("sfm_driver"))
        assert drivers() == [], drivers()
        get_registry().get_driver_class("tcp")
        assert {m.split(".")[0] for m in drivers()} == {"sfm_driver_tcp"}, drivers()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    out = subprocess.run([sys.executable, "-m", "sfm_core.cli", "drivers"], capture_output=True, text=True)
    assert out.returncode == 0


def test_cli_drivers_lists_every_scheme_without_taking_the_host_down() -> None:
    out = subprocess.run([sys.executable, "-m", "sfm_core.cli", "drivers", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    drivers = {d["scheme"]: d for d in json.loads(out.stdout)["drivers"]}
    tcp = drivers["tcp"]
    assert (tcp["distribution"], tcp["status"], tcp["driver_class"]) == (
        "sfm-driver-tcp",
        "ok",
        "sfm_driver_tcp.driver.TcpDriver",
    )
    assert tcp["capabilities"]["max_frame_size"] > 0
