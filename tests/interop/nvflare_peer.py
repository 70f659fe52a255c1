#!/usr/bin/env python3
"""A real NVFlare F3 endpoint driven by JSON lines on stdin.

This script runs INSIDE the nvflare venv (see ``nvflare_env.py``); it imports
only the standard library and nvflare.  ``peer.py`` (``NvflarePeer``) is the
test-side driver.

Usage::

    python nvflare_peer.py --name site-1 [--prop KEY=VALUE ...] [--props-json JSON]
                           [--app-ids 1,2,3] [--echo APP_ID] [--heartbeat SECONDS]
                           [--log-level WARNING] [--log-events LEVEL] [--no-payload-in-events]

Protocol (one JSON object per line, UTF-8):

stdin, commands (an optional "id" field is copied into the reply)::

    {"cmd": "add_connector", "url": "tcp://127.0.0.1:5000", "mode": "active"|"passive",
     "secure": false, "resources": {...}|null}
        -> {"reply": "add_connector", "ok": true, "handle": "CH00001", "params": {...}}
       (``Communicator.add_connector(url, mode, secure, resources)``: resources are driver
       params, e.g. TLS: ca_cert, server_cert, server_key, client_cert, client_key,
       connection_security; a secure scheme (stcp, grpcs, https) turns TLS on by itself)
    {"cmd": "remove_connector", "handle": "CH00001"}
    {"cmd": "start"}
    {"cmd": "send", "to": NAME, "app_id": N, "headers": {...}|null, "payload_b64": B64|null,
     "repeat": 1}
        -> {"reply": "send", "ok": true, "sent": 1}
    {"cmd": "find_endpoint", "name": NAME}
        -> {"reply": "find_endpoint", "ok": true, "endpoint": null |
            {"name":..., "state": "READY", "properties": {...}, "conn_props": {...}}}
    {"cmd": "remove_endpoint", "name": NAME}
    {"cmd": "ping"}                       -> {"reply": "ping", "ok": true}
    {"cmd": "stop"}                       -> {"reply": "stop", "ok": true}; then the process exits

Every command gets exactly one reply line ``{"reply": <cmd>, "ok": bool, ...}``;
on failure ``"error"`` holds ``"<ExceptionType>: <message>"``.

stdout, events (asynchronous)::

    {"event": "ready", "name": NAME, "pid": PID, "nvflare_version": "2.9.0"}   (first line)
    {"event": "state", "endpoint": NAME, "state": "READY"|"DISCONNECTED"|..., "properties": {...}}
    {"event": "message", "from": NAME, "app_id": N, "headers": {...}|null,
     "payload_b64": B64|null, "payload_type": "bytes"|"bytearray"|"NoneType"|...,
     "payload_len": N|null, "payload_sha256": HEX|null, "conn": CONN_NAME, "n": COUNTER}
    {"event": "error", "where": ..., "error": ...}
    {"event": "log", "level": "ERROR", "logger": NAME, "message": TEXT}   (with --log-events LEVEL:
     every log record at LEVEL or above, from any logger, also goes to stderr as usual)

JSON value encoding (headers, properties): str/int/float/bool/None/list as is;
``bytes``/``bytearray``/``memoryview`` as ``{"__bytes__": "<base64>"}``; a dict
whose keys are not all ``str`` (or that would be mistaken for a tag) as
``{"__dict__": [[key, value], ...]}``; a tuple as a list; anything else as
``{"__repr__": repr(value)}`` (not decodable).  The same tags are accepted in
commands.

All of nvflare's logging goes to stderr (default level WARNING).  File
descriptor 1 is redirected to stderr too, so only this protocol ever appears
on the real stdout.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
import threading
import traceback

import json_tags  # beside this script, so on sys.path when it runs

# --------------------------------------------------------------------------------------
# stdout discipline: keep a private handle on the real stdout, send everything else
# (print(), C-level writes from grpc, ...) to stderr.
# --------------------------------------------------------------------------------------
_OUT_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
_OUT = os.fdopen(_OUT_FD, "w", encoding="utf-8", buffering=1 << 16)
_OUT_LOCK = threading.Lock()


def emit(obj: dict) -> None:
    line = json.dumps(obj, separators=(",", ":"))
    with _OUT_LOCK:
        _OUT.write(line)
        _OUT.write("\n")
        _OUT.flush()


# --------------------------------------------------------------------------------------
# tagged JSON encoding
# --------------------------------------------------------------------------------------
def to_json(v):
    return json_tags.to_json(v, strict=False)


def from_json(v):
    return json_tags.from_json(v, strict=True)


def parse_props(items, props_json):
    props = {}
    if props_json:
        props.update(from_json(json.loads(props_json)))
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--prop expects KEY=VALUE, got {item!r}")
        k, val = item.split("=", 1)
        props[k] = val
    return props


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="local endpoint name")
    ap.add_argument("--prop", action="append", default=[], help="public property KEY=VALUE (str value)")
    ap.add_argument("--props-json", default=None, help="public properties as a JSON object (tagged encoding)")
    ap.add_argument("--app-ids", default="", help="comma separated app ids to register a receiver for")
    ap.add_argument("--echo", type=int, default=None, help="send every message received on this app id back")
    ap.add_argument(
        "--heartbeat",
        type=float,
        default=None,
        help="heartbeat interval in seconds (NVFlare default 60, checked every 5 s); "
        "also shortens the check tick to min(5, SECONDS/2)",
    )
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument(
        "--log-events",
        default=None,
        metavar="LEVEL",
        help="also emit every log record at LEVEL or above as a 'log' event (e.g. NVFlare's refusals)",
    )
    ap.add_argument(
        "--no-payload-in-events",
        action="store_true",
        help="omit payload_b64 from message events (payload_len and payload_sha256 remain)",
    )
    args = ap.parse_args()

    level = getattr(logging, args.log_level.upper(), logging.WARNING)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger().setLevel(level)
    logging.getLogger("nvflare").setLevel(level)
    if args.log_events:
        log_events_level = getattr(logging, args.log_events.upper(), logging.WARNING)

        class EventHandler(logging.Handler):
            def emit(self, record):
                try:
                    msg = record.getMessage()
                    if record.exc_info and record.exc_info[1] is not None:
                        msg += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
                    emit({"event": "log", "level": record.levelname, "logger": record.name, "message": msg})
                except Exception:  # never let logging raise into nvflare
                    pass

        handler = EventHandler(level=log_events_level)
        logging.getLogger().addHandler(handler)
        if log_events_level < level:  # records below --log-level must still reach the handler
            logging.getLogger().setLevel(log_events_level)
            logging.getLogger("nvflare").setLevel(log_events_level)
            for h in logging.getLogger().handlers:
                if h is not handler:
                    h.setLevel(level)

    app_ids = sorted({int(x) for x in args.app_ids.split(",") if x.strip()})
    if args.echo is not None and args.echo not in app_ids:
        app_ids.append(args.echo)
    props = parse_props(args.prop, args.props_json)

    import nvflare
    from nvflare.fuel.f3 import communicator as comm_mod
    from nvflare.fuel.f3.endpoint import Endpoint, EndpointMonitor
    from nvflare.fuel.f3.message import Message, MessageReceiver
    from nvflare.fuel.f3.sfm import heartbeat_monitor as hb_mod
    from nvflare.fuel.f3.sfm.conn_manager import Mode

    # nvflare may have (re)configured logging on import
    root_level = min(level, log_events_level) if args.log_events else level
    logging.getLogger().setLevel(root_level)
    logging.getLogger("nvflare").setLevel(root_level)

    local = Endpoint(args.name, properties=props)
    comm = comm_mod.Communicator(local)

    if args.heartbeat is not None:
        # HeartbeatMonitor reads the module global HEARTBEAT_TICK on each loop and its
        # own .interval attribute; PING is sent when now - last_received > interval.
        hb_mod.HEARTBEAT_TICK = max(0.01, min(5.0, args.heartbeat / 2.0))
        comm.conn_manager.heartbeat_monitor.interval = args.heartbeat

    counter = {"n": 0}
    counter_lock = threading.Lock()

    def endpoint_info(ep):
        if ep is None:
            return None
        state = getattr(ep, "state", None)
        return {
            "name": ep.name,
            "state": getattr(state, "name", str(state)),
            "properties": to_json(dict(ep.properties or {})),
            "conn_props": to_json(dict(getattr(ep, "conn_props", None) or {})),
        }

    class Monitor(EndpointMonitor):
        def state_change(self, endpoint):
            try:
                state = endpoint.state
                emit(
                    {
                        "event": "state",
                        "endpoint": endpoint.name,
                        "state": getattr(state, "name", str(state)),
                        "properties": to_json(dict(endpoint.properties or {})),
                    }
                )
            except Exception as ex:  # never let an exception into nvflare
                emit({"event": "error", "where": "state_change", "error": f"{type(ex).__name__}: {ex}"})

    class Receiver(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message):
            try:
                payload = message.payload
                with counter_lock:
                    counter["n"] += 1
                    n = counter["n"]
                if payload is None:
                    b = None
                else:
                    b = bytes(payload)
                ev = {
                    "event": "message",
                    "from": endpoint.name,
                    "app_id": app_id,
                    "headers": to_json(message.headers),
                    "payload_type": type(payload).__name__,
                    "payload_len": None if b is None else len(b),
                    "payload_sha256": None if b is None else hashlib.sha256(b).hexdigest(),
                    "conn": getattr(connection, "name", None),
                    "n": n,
                }
                if not args.no_payload_in_events:
                    ev["payload_b64"] = None if b is None else base64.b64encode(b).decode("ascii")
                if args.echo is not None and app_id == args.echo:
                    try:
                        comm.send(endpoint, app_id, Message(message.headers, payload))
                        ev["echoed"] = True
                    except Exception as ex:
                        ev["echoed"] = False
                        ev["echo_error"] = f"{type(ex).__name__}: {ex}"
                emit(ev)
            except Exception as ex:
                emit({"event": "error", "where": "process_message", "error": f"{type(ex).__name__}: {ex}"})

    comm.register_monitor(Monitor())
    receiver = Receiver()
    for a in app_ids:
        comm.register_message_receiver(a, receiver)

    def do_add_connector(c):
        mode_s = str(c.get("mode", "active")).lower()
        if mode_s not in ("active", "passive"):
            raise ValueError(f"mode must be 'active' or 'passive', not {mode_s!r}")
        mode = Mode.ACTIVE if mode_s == "active" else Mode.PASSIVE
        resources = from_json(c.get("resources")) or None
        handle, params = comm.add_connector(c["url"], mode, secure=bool(c.get("secure", False)), resources=resources)
        # keys may be DriverParams members (a str Enum): report their values
        return {"handle": handle, "params": to_json({str(getattr(k, "value", k)): v for k, v in dict(params).items()})}

    def do_send(c):
        ep = comm.find_endpoint(c["to"])
        if ep is None:
            raise LookupError(f"endpoint {c['to']!r} not known (no handshake yet?)")
        headers = from_json(c.get("headers"))
        pb = c.get("payload_b64")
        payload = None if pb is None else base64.b64decode(pb)
        if payload is not None and c.get("payload_type") == "bytearray":
            payload = bytearray(payload)
        repeat = int(c.get("repeat", 1))
        for _ in range(repeat):
            # a fresh headers dict per message: nvflare keeps a reference
            h = dict(headers) if isinstance(headers, dict) else headers
            comm.send(ep, int(c["app_id"]), Message(h, payload))
        return {"sent": repeat}

    def do_find_endpoint(c):
        return {"endpoint": endpoint_info(comm.find_endpoint(c["name"]))}

    def do_stop(c):
        done = threading.Event()
        errors = []

        def run():
            try:
                comm.stop()
            except Exception as ex:
                errors.append(f"{type(ex).__name__}: {ex}")
            finally:
                done.set()

        threading.Thread(target=run, name="stopper", daemon=True).start()
        # The tests' SFM_TESTS_TIMEOUT_FACTOR (inherited) scales this wait as it does theirs.
        factor = float(os.environ.get("SFM_TESTS_TIMEOUT_FACTOR", "1"))
        clean = done.wait(float(c.get("timeout", 10.0)) * factor)
        if errors:
            raise RuntimeError(errors[0])
        return {"clean": clean}

    handlers = {
        "add_connector": do_add_connector,
        "remove_connector": lambda c: (comm.remove_connector(c["handle"]), {})[1],
        "start": lambda c: (comm.start(), {})[1],
        "send": do_send,
        "find_endpoint": do_find_endpoint,
        "remove_endpoint": lambda c: (comm.remove_endpoint(c["name"]), {})[1],
        "ping": lambda c: {},
        "stop": do_stop,
    }

    emit({"event": "ready", "name": args.name, "pid": os.getpid(), "nvflare_version": nvflare.__version__})

    stopping = False
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if not line:
            continue
        cmd_name = None
        reply = {}
        try:
            c = json.loads(line)
            cmd_name = c.get("cmd")
            reply = {"reply": cmd_name}
            if "id" in c:
                reply["id"] = c["id"]
            handler = handlers.get(cmd_name)
            if handler is None:
                raise ValueError(f"unknown cmd {cmd_name!r}; known: {sorted(handlers)}")
            reply.update(handler(c) or {})
            reply["ok"] = True
        except Exception as ex:
            reply["reply"] = cmd_name
            reply["ok"] = False
            reply["error"] = f"{type(ex).__name__}: {ex}"
            traceback.print_exc(file=sys.stderr)
        emit(reply)
        if cmd_name == "stop":
            stopping = True
            break

    if not stopping:  # stdin closed: stop anyway
        try:
            comm.stop()
        except Exception:
            traceback.print_exc(file=sys.stderr)
    with _OUT_LOCK:
        _OUT.flush()
    sys.stderr.flush()
    # nvflare leaves non-daemon threads (grpc, aio loop) behind; do not wait for them
    os._exit(0)


if __name__ == "__main__":
    main()
