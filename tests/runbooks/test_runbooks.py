"""Runbooks: every example is valid (by the loader and by the published JSON Schema) and has a
plan; every case under runbooks/invalid fails with the error its expected.txt names."""

from __future__ import annotations

import glob
import json
import os

import jsonschema
import pytest
import yaml

from runbooks.loader import RunbookError, load
from runbooks.plan import order, plan
from runbooks.schema import schema
from tests.procs import DRCTL, REPO, run

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "runbooks", "examples", "*.yaml")))
INVALID = sorted(glob.glob(os.path.join(REPO, "runbooks", "invalid", "*", "runbook.yaml")))


def test_there_are_at_least_three_examples_and_seven_invalid_cases() -> None:
    assert len(EXAMPLES) >= 3 and len(INVALID) >= 7


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_is_valid_and_plans(path: str) -> None:
    rb = load(path)
    with open(path) as fh:
        jsonschema.validate(yaml.safe_load(fh), schema())
    for name in rb.services:
        steps = plan(rb, name)
        assert steps and steps[0].startswith("1. ")
        assert any("promote" in s for s in steps)
        p = run([*DRCTL, "runbook", "plan", path, name])
        assert p.returncode == 0 and "1. [" in p.stdout, p.stderr


@pytest.mark.parametrize("path", INVALID, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_invalid_case_fails_with_its_error(path: str) -> None:
    with open(os.path.join(os.path.dirname(path), "expected.txt")) as fh:
        expected = fh.read().strip()
    with pytest.raises(RunbookError) as info:
        load(path)
    assert any(expected in e for e in info.value.errors), info.value.errors
    p = run([*DRCTL, "runbook", "validate", path])
    assert p.returncode == 65 and expected in p.stderr


def test_every_error_is_reported_at_once() -> None:
    path = os.path.join(REPO, "runbooks", "invalid", "several-errors", "runbook.yaml")
    with pytest.raises(RunbookError) as info:
        load(path)
    assert len(info.value.errors) >= 6
    assert all(e.startswith(path + ":") for e in info.value.errors)


def test_dependencies_come_first() -> None:
    rb = load(os.path.join(REPO, "runbooks", "examples", "two-site-web.yaml"))
    assert order(rb, "app") == ["db", "app"]
    lines = plan(rb, "app")
    assert lines[0].startswith("1. [db]") and lines[-1].startswith("10. [app] dns")
    assert any("zero lag" in s for s in plan(rb, "db", switchover=True))


def test_published_schema_is_current() -> None:
    with open(os.path.join(REPO, "runbooks", "schema.json")) as fh:
        assert json.load(fh) == schema(), "run: python -m runbooks.schema > runbooks/schema.json"
