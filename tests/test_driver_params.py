"""Declared driver parameters (``sfm_core.driver_params``): unknown keys, bad values and a
parameter on the wrong side are refused at ``add_connector``, on every scheme, all at once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfm_core import CommError, ConnectorInfo, ConnManager, Driver, Endpoint, Mode
from sfm_core import driver_params as dp
from sfm_core.connectors import connector_errors
from sfm_core.frames import MAX_FRAME_SIZE
from sfm_core.registry import get_registry

SCHEMES = ["tcp", "stcp", "ws", "wss", "http", "https", "grpc", "grpcs"]
SECURE = {"stcp", "wss", "https", "grpcs"}
MODES = [Mode.PASSIVE, Mode.ACTIVE]


@pytest.fixture
def manager():
    m = ConnManager(Endpoint("params"))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from sfm_core.pki import make_pki

    return make_pki(str(tmp_path_factory.mktemp("pki")), "server", "site-1")


def _url(scheme: str, mode: Mode, query: str = "") -> str:
    port = 0 if mode == Mode.PASSIVE else 1
    return f"{scheme}://127.0.0.1:{port}{'?' + query if query else ''}"


def _tls(pki, scheme: str, mode: Mode) -> dict:
    if scheme not in SECURE:
        return {}
    return dict(pki.server if mode == Mode.PASSIVE else pki.client)


def _refused(manager: ConnManager, url: str, params: dict, mode: Mode) -> CommError:
    with pytest.raises(CommError) as err:
        manager.add_connector(url, params, mode)
    assert err.value.code == CommError.BAD_CONFIG
    assert manager.connectors == {}
    return err.value


# -- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_misspelt_key_in_the_url_query_is_refused_with_a_did_you_mean(manager, pki, scheme, mode) -> None:
    e = _refused(manager, _url(scheme, mode, "send_timout=1"), _tls(pki, scheme, mode), mode)
    assert "unknown parameter 'send_timout'; did you mean 'send_timeout'?" in e.message


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_misspelt_key_in_a_params_dict_is_refused_with_a_did_you_mean(manager, pki, scheme, mode) -> None:
    params = {**_tls(pki, scheme, mode), "max_frame_sise": 1024}
    e = _refused(manager, _url(scheme, mode), params, mode)
    assert "unknown parameter 'max_frame_sise'; did you mean 'max_frame_size'?" in e.message


def test_a_key_like_nothing_known_lists_what_the_driver_takes(manager) -> None:
    e = _refused(manager, "tcp://127.0.0.1:0", {"colour": "blue"}, Mode.PASSIVE)
    assert "unknown parameter 'colour'" in e.message
    assert "backlog" in e.message and "send_timeout" in e.message and "max_frame_size" in e.message


# -- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "params", "words"),
    [
        ("tcp", {"send_timeout": "soon"}, ["send_timeout='soon' is not a float", "expected a finite float >= 0.001"]),
        ("ws", {"high_water": "lots"}, ["high_water='lots'", "is not an int", "expected an int >= 0"]),
        ("grpc", {"batch": "maybe"}, ["batch='maybe'", "is not a bool", "expected a bool"]),
        ("tcp", {"io_threads": 0}, ["io_threads=0", "is out of range", "expected an int >= 1"]),
        ("tcp", {"max_frame_size": 8}, ["max_frame_size=8", f"expected an int in 16..{MAX_FRAME_SIZE}"]),
        ("ws", {"max_frame_size": "8"}, ["max_frame_size='8'", f"expected an int in 16..{MAX_FRAME_SIZE}"]),
        ("grpc", {"port": 70000}, ["port=70000", "expected an int in 0..65535"]),
        ("tcp", {"connection_security": "mtsl"}, ["connection_security='mtsl'", "is not one of mtls, tls, clear"]),
        ("grpc", {"send_timeout": float("nan")}, ["send_timeout=nan", "is not a float"]),
        ("grpc", {"max_streams": 2.5}, ["max_streams=2.5", "is not an int"]),
        ("tcp", {"max_connections": True}, ["max_connections=True", "is not an int"]),
    ],
)
def test_a_bad_value_names_the_key_what_was_expected_and_what_was_found(manager, scheme, params, words) -> None:
    e = _refused(manager, _url(scheme, Mode.PASSIVE), params, Mode.PASSIVE)
    for w in words:
        assert w in e.message, e.message
    assert scheme in e.message  # the driver is named


@pytest.mark.parametrize("scheme", ["tcp", "ws", "grpc"])
def test_max_frame_size_above_the_wire_limit_is_refused_not_clamped(manager, scheme) -> None:
    e = _refused(manager, f"{scheme}://127.0.0.1:0?max_frame_size={MAX_FRAME_SIZE + 1}", {}, Mode.PASSIVE)
    assert f"max_frame_size='{MAX_FRAME_SIZE + 1}' is out of range" in e.message


def test_grpc_batch_bytes_above_a_batch_is_refused_not_clamped(manager) -> None:
    e = _refused(manager, "grpc://127.0.0.1:0?batch_bytes=300000", {}, Mode.PASSIVE)
    assert "batch_bytes='300000' is out of range; expected an int in 0..262144" in e.message


@pytest.mark.parametrize(
    ("scheme", "mode", "key", "value"),
    [
        ("tcp", Mode.ACTIVE, "backlog", 10),
        ("tcp", Mode.ACTIVE, "io_threads", 2),
        ("ws", Mode.ACTIVE, "backlog", 10),
        ("grpc", Mode.ACTIVE, "handshake_timeout", 1),
        ("grpc", Mode.ACTIVE, "idle_timeout", 1),
        ("grpc", Mode.ACTIVE, "max_streams", 1),
        ("http", Mode.ACTIVE, "max_connections", 5),
        ("tcp", Mode.PASSIVE, "connect_timeout", 5),
        ("grpc", Mode.PASSIVE, "ssl_target_name_override", "x"),
    ],
)
def test_a_parameter_for_the_other_side_is_refused(manager, scheme, mode, key, value) -> None:
    e = _refused(manager, _url(scheme, mode), {key: value}, mode)
    assert f"parameter {key} is for" in e.message
    assert ("not an active connector" if mode == Mode.ACTIVE else "not a listener") in e.message


def test_every_error_is_reported_at_once(manager) -> None:
    url = "tcp://127.0.0.1:0?send_timout=1&io_threads=0&backlog=many"
    e = _refused(manager, url, {"max_frame_size": 1, "connect_timeout": 3}, Mode.PASSIVE)
    assert isinstance(e, dp.ParamError)
    assert len(e.errors) == 5, e.errors
    for key in ("send_timout", "io_threads", "backlog", "max_frame_size", "connect_timeout"):
        assert any(key in line for line in e.errors), key
        assert key in e.message
    assert e.message.startswith("5 bad parameters: ")


def test_connector_errors_lists_everything_and_then_the_drivers_own_check(pki) -> None:
    driver = get_registry().create_driver("stcp")
    params = {"scheme": "stcp", "sent_timeout": 1, "tls_handshake_timeout": "soon"}
    errors = connector_errors(driver, params, Mode.PASSIVE)
    assert len(errors) == 2 and "did you mean 'send_timeout'" in errors[0] and "tls_handshake_timeout" in errors[1]
    # Right parameters, but no certificate: the driver's own validate() says so.
    errors = connector_errors(driver, {"scheme": "stcp"}, Mode.PASSIVE)
    assert len(errors) == 1 and "missing: ca_cert, server_cert, server_key" in errors[0]
    assert connector_errors(driver, {"scheme": "stcp", **pki.server}, Mode.PASSIVE) == []


# -- what is accepted --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_core_parameters_are_accepted_on_every_scheme(manager, pki, scheme, mode) -> None:
    params: dict[str, Any] = {
        **_tls(pki, scheme, mode),
        "max_frame_size": "1048576",
        "tls_handshake_timeout": 5,
        "check_hostname": "off",
        "path": "/f3",
    }
    if mode == Mode.PASSIVE:
        params.update(max_connections="100", max_handshakes=10)
    if scheme in SECURE:
        params["connection_security"] = "MTLS"
    manager.add_connector(_url(scheme, mode, "secure=false" if scheme not in SECURE else ""), params, mode)
    assert len(manager.connectors) == 1


@pytest.mark.parametrize("scheme", ["tcp", "ws", "http", "grpc"])
def test_each_driver_declares_its_parameters_with_a_doc(scheme) -> None:
    driver = get_registry().create_driver(scheme)
    declared = driver.parameters()
    assert declared, f"{scheme}: no parameters()"
    for p in declared:
        assert isinstance(p, dp.Param) and p.doc, p
    assert "send_timeout" in {p.name for p in declared}


def test_the_drivers_validate_uses_the_declarations_too() -> None:
    driver = get_registry().create_driver("tcp")
    with pytest.raises(CommError, match="did you mean 'send_timeout'"):
        driver.validate({"scheme": "tcp", "send_timout": 1}, Mode.PASSIVE)
    driver.validate({"scheme": "tcp", "send_timeout": "2"}, Mode.PASSIVE)


class _OldDriver(Driver):
    """A third-party driver written before parameters(): no declarations."""

    @staticmethod
    def supported_transports() -> list[str]:
        return ["old"]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {}

    def listen(self, connector: ConnectorInfo) -> None:
        connector.failed(CommError(CommError.ERROR, "not a real driver"))

    def connect(self, connector: ConnectorInfo) -> None:
        raise CommError(CommError.CLOSED, "not a real driver")


def test_a_driver_without_parameters_keeps_accepting_any_key(manager) -> None:
    assert _OldDriver.parameters() is None
    manager.add_connector(_OldDriver(), {"anything": "goes", "send_timout": 1}, Mode.ACTIVE)
    assert len(manager.connectors) == 1
    # The core's own parameters are still the core's: checked for every driver.
    e = _refused_driver(manager, {"max_frame_size": 3})
    assert "max_frame_size=3 is out of range" in e.message


def _refused_driver(manager: ConnManager, params: dict) -> CommError:
    with pytest.raises(CommError) as err:
        manager.add_connector(_OldDriver(), params, Mode.ACTIVE)
    assert err.value.code == CommError.BAD_CONFIG
    return err.value


def test_a_driver_may_give_a_core_parameter_its_own_default() -> None:
    declared = [dp.Param("path", str, "/f3", doc="the upgrade path")]
    assert dp.parse_params(declared, {}, Mode.ACTIVE, driver="x")["path"] == "/f3"
    assert dp.parse_params(declared, {"path": "/y"}, Mode.ACTIVE, driver="x")["path"] == "/y"
    values = dp.parse_params(declared, {}, Mode.PASSIVE, driver="x")
    assert values["max_frame_size"] == MAX_FRAME_SIZE and values["max_connections"] > 0


def test_param_declarations_are_checked() -> None:
    with pytest.raises(TypeError):
        dp.Param("x", list, None)
    with pytest.raises(ValueError):
        dp.Param("x", int, 0, modes=("sideways",))
    with pytest.raises(TypeError):
        dp.Param("x", int, 0, choices=("a",))


# -- converters: strings from URL queries -------------------------------------------------------

_INT = dp.Param("n", int, 0, doc="")
_FLOAT = dp.Param("t", float, 1.0, doc="")
_BOOL = dp.Param("b", bool, False, doc="")


@given(st.integers(min_value=-(10**12), max_value=10**12), st.sampled_from(["", " ", "\t"]))
def test_an_int_from_a_query_string_is_that_int(n: int, pad: str) -> None:
    assert _INT.parse(f"{pad}{n}{pad}") == n
    assert _INT.parse(n) == n
    assert _INT.parse(float(n)) == n


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_from_a_query_string_is_that_float(x: float) -> None:
    assert _FLOAT.parse(repr(x)) == x
    assert _FLOAT.parse(x) == x


@given(st.sampled_from(["1", "true", "yes", "on", "0", "false", "no", "off", ""]), st.booleans())
def test_bool_strings_in_any_case(text: str, upper: bool) -> None:
    value = text.upper() if upper else text
    assert _BOOL.parse(value) is (text in ("1", "true", "yes", "on"))


@given(st.text(max_size=12))
def test_any_query_string_converts_or_is_refused_in_words(text: str) -> None:
    for p in (_INT, _FLOAT, _BOOL):
        try:
            p.parse(text)
        except ValueError as e:
            assert "expected" in str(e)


def test_values_that_are_not_what_they_claim_are_refused() -> None:
    for p, bad in [(_INT, "1.5"), (_INT, True), (_INT, "x"), (_FLOAT, "inf"), (_FLOAT, False), (_BOOL, "maybe")]:
        with pytest.raises(ValueError):
            p.parse(bad)
    assert _INT.parse("64e6") == 64_000_000
    assert _BOOL.parse(1) is True and _BOOL.parse(0) is False
    assert dp.Param("f", str, None, doc="").parse("") is None  # an empty string is "not set"
