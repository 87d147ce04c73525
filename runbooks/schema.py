"""The runbook JSON Schema for editors (``python -m runbooks.schema > runbooks/schema.json``).
A test checks the committed file is current and that every example validates against it."""

from __future__ import annotations

import json
import sys
from typing import Any

from runbooks.model import StepType, Where

_NUM = {"type": "number", "exclusiveMinimum": 0}
_HOSTPORTS = {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": ":"}}
_HOSTPORT = {"type": "string", "pattern": "^.+:[0-9]{1,5}$"}
# A size or rate: a number of bytes or a string with a unit ("50MB/s", "4GiB")
_SIZE = {"type": ["string", "number"], "minimum": 1}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def _step(stype: StepType, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return _obj({"type": {"const": stype.value}, "name": {"type": "string"}, **props},
                ["type", *required])


def schema() -> dict[str, Any]:
    steps = [
        _step(StepType.PRECHECK, {"check": {"enum": ["replication_lag", "sites_reachable"]}},
              ["check"]),
        _step(StepType.HOOK, {"run": {"type": "string"}, "at": {"enum": [w.value for w in Where]},
                              "timeout": _NUM}, ["run"]),
        _step(StepType.WAIT_REPLICATION, {"timeout": _NUM}, []),
        _step(StepType.PROMOTE, {}, []),
        _step(StepType.HEALTH_CHECK, {"http": {"type": "string"}, "tcp": {"type": "string"},
                                      "command": {"type": "string"}, "timeout": _NUM,
                                      "retries": {"type": "integer", "minimum": 0},
                                      "interval": _NUM}, []),
        _step(StepType.DNS, {}, []),
    ]
    service = _obj({
        "primary": {"type": "string"}, "replica": {"type": "string"},
        "volumes": {"type": "array", "items": _obj({"name": {"type": "string"},
                                                    "path": {"type": "string"},
                                                    "group": {"type": "string"}},
                                                   ["name", "path"])},
        "replication": {**_obj({
            "mode": {"enum": ["hot", "warm"]},
            "rate_limit": {**_SIZE, "minimum": 65536}, "rpo": _NUM,
            "compression": {"oneOf": [{"enum": ["zstd", "none"]},
                                      {"type": "integer", "minimum": 0, "maximum": 22}]},
            "cp_interval": {"type": "number", "minimum": 0},
            "journal_limit": {**_SIZE, "minimum": 1 << 20},
            # 0 or off (YAML reads a bare off as false): the background verify is off
            "verify_rate": {"anyOf": [{"enum": [0, "off", False]},
                                      {**_SIZE, "minimum": 65536}]},
            "apply_interval": _NUM,
            "export": {"oneOf": [_HOSTPORT, {"type": "object", "minProperties": 1,
                                             "additionalProperties": _HOSTPORT}]},
            "export_tls": {"type": "boolean"},
            "export_allow": {"type": "array",
                             "items": {"type": "string", "pattern": "^operator:.+$"}}}),
            # apply_interval: only a warm replica applies on a schedule
            "dependentSchemas": {"apply_interval": {"required": ["mode"],
                                                    "properties": {"mode": {"const": "warm"}}}}},
        "failover": _obj({"automatic": {"type": "boolean"},
                          "grace": {"type": "number", "minimum": 0},
                          "damping": {"type": "number", "minimum": 0},
                          "allow_data_loss": {"type": "boolean"},
                          "drain_timeout": _NUM}),
        "dns": {"type": "array", "items": _obj({
            "zone": {"type": "string"}, "name": {"type": "string"},
            "type": {"enum": ["A", "AAAA", "CNAME"]},
            "ttl": {"type": "integer", "minimum": 1, "maximum": 86400}}, ["zone", "name"])},
        "steps": {"type": "array", "minItems": 1, "items": {"oneOf": steps}},
        "depends_on": {"type": "array", "items": {"type": "string"}},
    }, ["primary", "replica", "steps"])
    etcd = {"oneOf": [_HOSTPORTS, {
        **_obj({"endpoints": _HOSTPORTS, "user": {"type": "string"},
                "password_file": {"type": "string"}, "password_env": {"type": "string"},
                "ca": {"type": "string"}, "cert": {"type": "string"}, "key": {"type": "string"}},
               ["endpoints"]),
        # a user with exactly one of password_file/password_env; cert and key together
        "dependentRequired": {"password_file": ["user"], "password_env": ["user"],
                              "cert": ["key"], "key": ["cert"]},
        "dependentSchemas": {"user": {"oneOf": [{"required": ["password_file"]},
                                                {"required": ["password_env"]}]}}}]}
    algorithm = {"enum": ["hmac-sha256", "hmac-sha384", "hmac-sha512"]}
    zone = _obj({"servers": _HOSTPORTS, "update": _HOSTPORTS, "verify_timeout": _NUM, "tsig": {
        "oneOf": [_obj({"name": {"type": "string"}, "file": {"type": "string"},
                        "algorithm": algorithm}, ["name", "file"]),
                  _obj({"name": {"type": "string"}, "env": {"type": "string"},
                        "algorithm": algorithm}, ["name", "env"])]}},
                ["servers", "tsig"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "drctl runbook", **_obj({
            "kind": {"const": "drctl-runbook"}, "version": {"const": 1},
            "cluster": {"type": "string"}, "etcd": etcd,
            "lease_ttl": {"type": "integer", "minimum": 1},
            "sites": {"type": "object", "additionalProperties": _obj({
                "address": {"type": "string"},
                "data_dir": {"type": "string", "pattern": "^/"},
                "endpoints": _obj({"replication": _HOSTPORT, "health": {"type": "string"},
                                   "source_metrics": {"type": "string"},
                                   "target_metrics": _HOSTPORT})},
                ["address"])},
            "dns": _obj({"zones": {"type": "object", "additionalProperties": zone}}),
            "services": {"type": "object", "additionalProperties": service},
        }, ["kind", "version", "cluster", "etcd", "sites", "services"]),
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")
