"""Loading driver plugins: hooks, broken and incompatible drivers, duplicates, allow/deny, strict.

Every test installs fake distributions (a ``*.dist-info`` folder and its modules) in a temporary
``sys.path`` entry under a test-only entry point group, so nothing installed is touched.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest

from sfm_core import CommError, ConnManager, Driver, DriverRegistry, Endpoint, Mode, get_plugin_manager
from sfm_core.registry import DRIVER_CONTRACT_VERSIONS, normalize_name

GROUP = "sfm.drivers.loading-tests"

GOOD = """
from sfm_core import Driver

class {cls}(Driver):
    {contract}
    @staticmethod
    def supported_transports():
        return ["{scheme}"]

    @staticmethod
    def capabilities():
        return {{"cls": "{cls}"}}

    def listen(self, connector):
        pass

    def connect(self, connector):
        pass
"""

HALF = """
from sfm_core import Driver

class HalfDriver(Driver):
    @staticmethod
    def supported_transports():
        return ["half"]

    @staticmethod
    def capabilities():
        return {}
"""


def good(cls: str, scheme: str, contract: int | None = None) -> str:
    line = f"SFM_DRIVER_CONTRACT = {contract}" if contract is not None else ""
    return GOOD.format(cls=cls, scheme=scheme, contract=line)


@pytest.fixture
def dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``dist(name, {scheme: target}, {relative module path: source})`` installs a fake distribution."""
    for var in ("SFM_DRIVERS", "SFM_DRIVERS_ALLOW", "SFM_DRIVERS_DENY", "SFM_DRIVERS_STRICT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    tops: set[str] = set()

    def make(name: str, entries: dict[str, str], files: dict[str, str]) -> None:
        info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")
        for rel, source in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
            tops.add(rel.split("/")[0].removesuffix(".py"))

    yield make
    pm = get_plugin_manager()
    for mod_name in [m for m in sys.modules if m.split(".")[0] in tops]:
        mod = sys.modules.pop(mod_name)
        if pm.is_registered(mod):
            pm.unregister(mod)


# -- 2. hooks ---------------------------------------------------------------------------------


def test_hooks_of_the_entry_point_module_and_of_the_class_module_are_registered_once_each(dist) -> None:
    dist(
        "fake-pkg",
        {"pkg": "fake_pkg:PkgDriver", "pkgs": "fake_pkg:PkgDriver"},
        {
            "fake_pkg/__init__.py": """
                from sfm_core import hookimpl
                from .driver import PkgDriver, sfm_admit_connection

                EVENTS = []

                @hookimpl
                def sfm_driver_loaded(scheme, driver_class):
                    EVENTS.append(("init", scheme))
            """,
            "fake_pkg/driver.py": good("PkgDriver", "pkg")
            + textwrap.dedent(
                """
                from sfm_core import hookimpl

                @hookimpl
                def sfm_admit_connection(manager, connection, endpoint_name, conn_props):
                    return "refused-" + endpoint_name if endpoint_name == "pkg-peer" else None
                """
            ),
        },
    )
    reg = DriverRegistry(GROUP)
    reg.get_driver_class("pkg")
    reg.get_driver_class("pkgs")
    pm = get_plugin_manager()
    init, driver = sys.modules["fake_pkg"], sys.modules["fake_pkg.driver"]
    assert pm.is_registered(init) and pm.is_registered(driver)
    # The hook in __init__ (the module the entry point names) saw both loads.
    assert init.EVENTS == [("init", "pkg"), ("init", "pkgs")]
    # The hook re-exported by __init__ is one implementation, not two.
    hook = pm.hook.sfm_admit_connection
    impls = [i for i in hook.get_hookimpls() if i.function is driver.sfm_admit_connection]
    assert len(impls) == 1
    # Called once: one answer from it, not two.
    answers = hook(manager=None, connection=None, endpoint_name="pkg-peer", conn_props={})
    assert answers.count("refused-pkg-peer") == 1


# -- 3. abstract methods; a broken plugin never takes the host down -----------------------------


def test_a_driver_with_abstract_methods_is_failed_and_raises_commerror_naming_them(dist) -> None:
    dist("fake-half", {"half": "fake_half:HalfDriver"}, {"fake_half.py": HALF})
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    reg = DriverRegistry(GROUP)
    status = {e.scheme: e for e in reg.load_all()}
    assert status["half"].status == "failed"
    assert "abstract methods" in status["half"].error and "connect, listen" in status["half"].error
    assert status["half"].describe()["status"] == "failed"
    for call in (reg.create_driver, reg.get_driver_class):
        with pytest.raises(CommError) as err:
            call("half")
        assert err.value.code == CommError.BAD_CONFIG
        for word in ("'half'", "fake-half", "connect", "listen"):
            assert word in str(err.value)
    cm = ConnManager(Endpoint("host"), registry=reg)
    try:
        with pytest.raises(CommError, match="connect, listen"):
            cm.add_connector("half://127.0.0.1:1", {}, Mode.ACTIVE)
        assert isinstance(reg.create_driver("good"), Driver)
        cm.add_connector("good://127.0.0.1:1", {}, Mode.ACTIVE)  # the host goes on
    finally:
        cm.stop()


def test_broken_abstract_and_incompatible_drivers_leave_the_others_working(dist) -> None:
    dist("fake-broken", {"broken": "fake_broken:Driver"}, {"fake_broken.py": "import no_such_module_here\n"})
    dist("fake-half", {"half": "fake_half:HalfDriver"}, {"fake_half.py": HALF})
    dist("fake-future", {"future": "fake_future:FutureDriver"}, {"fake_future.py": good("FutureDriver", "future", 99)})
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    reg = DriverRegistry(GROUP)
    status = {e.scheme: e.status for e in reg.load_all()}
    assert status == {"broken": "failed", "half": "failed", "future": "incompatible", "good": "ok"}
    assert reg.create_driver("good").capabilities() == {"cls": "GoodDriver"}


def test_a_package_with_broken_metadata_hides_no_driver(dist, tmp_path, caplog) -> None:
    """Review finding: a package whose METADATA has no Name, or whose entry_points.txt is
    malformed, made every lookup raise (KeyError, TypeError) for every scheme."""
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    nameless = tmp_path / "nameless-1.0.dist-info"
    nameless.mkdir()
    (nameless / "METADATA").write_text("Metadata-Version: 2.1\nVersion: 1.0\n")
    (nameless / "entry_points.txt").write_text(f"[{GROUP}]\nnameless = nowhere:Driver\n")
    garbled = tmp_path / "garbled-1.0.dist-info"
    garbled.mkdir()
    (garbled / "METADATA").write_text("Metadata-Version: 2.1\nName: garbled\nVersion: 1.0\n")
    (garbled / "entry_points.txt").write_text("[console_scripts]\nno equals sign here\n")
    with caplog.at_level(logging.WARNING, logger="sfm_core.registry"):
        reg = DriverRegistry(GROUP)
        assert "good" in reg.schemes()
        assert reg.create_driver("good").capabilities() == {"cls": "GoodDriver"}
    assert any("broken metadata" in r.getMessage() for r in caplog.records)


# -- 4. duplicates: the warning, and names compared as packaging normalizes them ----------------


def test_normalize_name_follows_pep_503() -> None:
    assert normalize_name("SFM_Driver.._x") == "sfm-driver-x"
    assert normalize_name("sfm-driver-x") == normalize_name("sfm_driver_x") == normalize_name("Sfm.Driver.X")


def test_a_shared_scheme_logs_a_warning_naming_both_the_choice_and_the_rule(dist, caplog) -> None:
    dist("zeta-dist", {"dup": "fake_z:ZDriver"}, {"fake_z.py": good("ZDriver", "dup")})
    dist("alpha-dist", {"dup": "fake_al:ADriver"}, {"fake_al.py": good("ADriver", "dup")})
    reg = DriverRegistry(GROUP)
    with caplog.at_level(logging.WARNING, logger="sfm_core.registry"):
        assert reg.get_driver_class("dup").__name__ == "ADriver"
        reg.get_driver_class("dup")  # once per choice, not per resolution
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for word in ("'dup'", "alpha-dist", "zeta-dist", "using alpha-dist", "sorts first"):
        assert word in warnings[0]
    caplog.clear()
    reg.prefer("dup", "Zeta_Dist")  # normalized: zeta-dist
    with caplog.at_level(logging.WARNING, logger="sfm_core.registry"):
        assert reg.get_driver_class("dup").__name__ == "ZDriver"
    assert any("using zeta-dist" in r.getMessage() and "prefer" in r.getMessage() for r in caplog.records)


def test_preferences_and_the_official_rule_compare_normalized_names(dist, monkeypatch) -> None:
    dist("zeta-dist", {"dup": "fake_z:ZDriver"}, {"fake_z.py": good("ZDriver", "dup")})
    dist("alpha-dist", {"dup": "fake_al:ADriver"}, {"fake_al.py": good("ADriver", "dup")})
    dist("aaa-tcp", {"tcp": "fake_aaa:AaaDriver"}, {"fake_aaa.py": good("AaaDriver", "tcp")})
    dist("SFM_Driver_TCP", {"tcp": "fake_off:OffDriver"}, {"fake_off.py": good("OffDriver", "tcp")})
    monkeypatch.setenv("SFM_DRIVERS", "dup=ZETA.dist")
    reg = DriverRegistry(GROUP)
    assert reg.get_driver_class("dup").__name__ == "ZDriver"
    assert reg.get_driver_class("tcp").__name__ == "OffDriver"
    assert any("official" in line for line in reg.explain("tcp"))


# -- 5. the driver contract version ------------------------------------------------------------


def test_contract_versions(dist) -> None:
    assert DRIVER_CONTRACT_VERSIONS == (1,)
    dist("fake-future", {"future": "fake_future:FutureDriver"}, {"fake_future.py": good("FutureDriver", "future", 99)})
    dist("fake-one", {"one": "fake_one:OneDriver"}, {"fake_one.py": good("OneDriver", "one", 1)})
    dist("fake-none", {"none": "fake_none:NoneDriver"}, {"fake_none.py": good("NoneDriver", "none")})
    dist(
        "fake-modpkg",
        {"modpkg": "fake_modpkg:ModDriver"},
        {
            "fake_modpkg/__init__.py": "SFM_DRIVER_CONTRACT = 2\nfrom .d import ModDriver\n",
            "fake_modpkg/d.py": good("ModDriver", "modpkg"),
        },
    )
    reg = DriverRegistry(GROUP)
    entries = {e.scheme: e for e in reg.load_all()}

    future = entries["future"].describe()
    assert future["status"] == "incompatible"
    assert "99" in future["error"] and "supports driver contract 1" in future["error"]
    with pytest.raises(CommError) as err:
        reg.create_driver("future")
    assert "fake-future" in str(err.value) and "99" in str(err.value)
    # Refused: its module is not a plugin and no load event was told.
    assert not get_plugin_manager().is_registered(sys.modules["fake_future"])

    one = entries["one"].describe()
    assert (one["status"], one["contract"], one["notes"]) == ("ok", 1, [])

    none = entries["none"].describe()
    assert (none["status"], none["contract"]) == ("ok", 1)
    assert any("declares no driver contract" in n for n in none["notes"])
    assert isinstance(reg.create_driver("none"), Driver)

    # A module-level declaration in the package the entry point names counts too.
    assert entries["modpkg"].status == "incompatible"
    assert "2" in entries["modpkg"].error


def test_registering_an_incompatible_class_in_process_is_refused() -> None:
    class Future(Driver):
        SFM_DRIVER_CONTRACT = 7

        @staticmethod
        def supported_transports() -> list[str]:
            return ["f"]

        @staticmethod
        def capabilities() -> dict:
            return {}

        def listen(self, connector) -> None:
            pass

        def connect(self, connector) -> None:
            pass

    with pytest.raises(CommError, match="contract 7"):
        DriverRegistry(GROUP).register("f", Future)


# -- 6. allow, deny, strict, explain ------------------------------------------------------------


def _two_dups(dist) -> None:
    dist("zeta-dist", {"dup": "fake_z:ZDriver"}, {"fake_z.py": good("ZDriver", "dup")})
    dist("alpha-dist", {"dup": "fake_al:ADriver"}, {"fake_al.py": good("ADriver", "dup")})


def test_deny_list_from_the_environment_and_in_code(dist, monkeypatch) -> None:
    _two_dups(dist)
    monkeypatch.setenv("SFM_DRIVERS_DENY", " Alpha_Dist , other")
    reg = DriverRegistry(GROUP)
    assert reg.get_driver_class("dup").__name__ == "ZDriver"
    status = {e.distribution: e.status for e in reg.entries()}
    assert status == {"alpha-dist": "denied", "zeta-dist": "ok"}
    assert any("alpha-dist" in line and "denied" in line and "SFM_DRIVERS_DENY" in line for line in reg.explain("dup"))
    monkeypatch.delenv("SFM_DRIVERS_DENY")
    reg2 = DriverRegistry(GROUP, deny=["alpha-dist", "zeta.dist"])
    with pytest.raises(CommError) as err:
        reg2.get_driver_class("dup")
    assert err.value.code == CommError.NOT_SUPPORTED
    assert "denied" in str(err.value) and "alpha-dist" in str(err.value) and "zeta-dist" in str(err.value)
    assert "fake_al" not in sys.modules  # a denied driver is never imported


def test_allow_list_from_the_environment_and_in_code(dist, monkeypatch) -> None:
    _two_dups(dist)
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    monkeypatch.setenv("SFM_DRIVERS_ALLOW", "zeta_dist,fake-good")
    reg = DriverRegistry(GROUP)
    assert reg.get_driver_class("dup").__name__ == "ZDriver"
    monkeypatch.delenv("SFM_DRIVERS_ALLOW")
    reg2 = DriverRegistry(GROUP, allow=["FAKE_good"])
    assert reg2.get_driver_class("good").__name__ == "GoodDriver"
    with pytest.raises(CommError, match="not in the allow list"):
        reg2.get_driver_class("dup")
    reg2.allow("alpha-dist")
    assert reg2.get_driver_class("dup").__name__ == "ADriver"
    reg2.deny("alpha-dist")  # deny wins over allow
    with pytest.raises(CommError, match="denied"):
        reg2.get_driver_class("dup")
    assert {e.scheme: e.status for e in reg2.load_all()} == {"dup": "denied", "good": "ok"}


def test_strict_mode_raises_from_load_all_listing_every_failure(dist, monkeypatch) -> None:
    dist("fake-broken", {"broken": "fake_broken:Driver"}, {"fake_broken.py": "raise RuntimeError('boom')\n"})
    dist("fake-half", {"half": "fake_half:HalfDriver"}, {"fake_half.py": HALF})
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    assert {e.status for e in DriverRegistry(GROUP).load_all()} == {"failed", "ok"}  # not strict: logged only
    for reg in (DriverRegistry(GROUP, strict=True), None):
        if reg is None:
            monkeypatch.setenv("SFM_DRIVERS_STRICT", "1")
            reg = DriverRegistry(GROUP)
        with pytest.raises(CommError) as err:
            reg.load_all()
        message = str(err.value)
        assert "2 drivers failed to load" in message
        assert "fake-broken" in message and "boom" in message
        assert "fake-half" in message and "connect, listen" in message
        assert reg.get_driver_class("good").__name__ == "GoodDriver"  # every driver was still tried


def test_explain_says_who_claims_a_scheme_and_why_one_was_chosen(dist) -> None:
    _two_dups(dist)
    reg = DriverRegistry(GROUP)
    lines = reg.explain("dup")
    text = "\n".join(lines)
    assert "alpha-dist 1.0" in text and "zeta-dist 1.0" in text
    assert any(line.startswith("chosen: alpha-dist") and "sorts first" in line for line in lines), lines
    assert any("zeta-dist" in line and "shadowed by alpha-dist" in line for line in lines), lines
    assert "fake_al" not in sys.modules  # explain imports nothing unless asked
    reg.explain("dup", load=True)
    assert any("alpha-dist" in line and ": ok" in line for line in reg.explain("dup"))
    assert "no distribution claims" in reg.explain("nope")[0]

    class Mine(Driver):
        @staticmethod
        def supported_transports() -> list[str]:
            return ["dup"]

        @staticmethod
        def capabilities() -> dict:
            return {}

        def listen(self, connector) -> None:
            pass

        def connect(self, connector) -> None:
            pass

    reg.register("dup", Mine)
    lines = reg.explain("dup")
    assert any(line.startswith("chosen: <in-process>") and "in-process" in line for line in lines), lines


def test_a_preference_for_a_missing_distribution_is_warned_about_with_one_claim(dist, monkeypatch, caplog) -> None:
    """Review finding: with one distribution claiming the scheme, SFM_DRIVERS naming another
    (a typo, a fork never installed) was silently ignored."""
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    monkeypatch.setenv("SFM_DRIVERS", "good=my-fork")
    reg = DriverRegistry(GROUP)
    with caplog.at_level(logging.WARNING, logger="sfm_core.registry"):
        assert reg.create_driver("good") is not None
    assert any("'my-fork'" in r.getMessage() and "not installed" in r.getMessage() for r in caplog.records)


def test_a_driver_that_calls_sys_exit_at_import_does_not_end_the_host(dist) -> None:
    dist("fake-exits", {"exits": "fake_exits:Driver"}, {"fake_exits.py": "import sys\nsys.exit(3)\n"})
    dist("fake-good", {"good": "fake_good:GoodDriver"}, {"fake_good.py": good("GoodDriver", "good")})
    reg = DriverRegistry(GROUP)
    status = {e.scheme: e.status for e in reg.load_all()}
    assert status == {"exits": "failed", "good": "ok"}
