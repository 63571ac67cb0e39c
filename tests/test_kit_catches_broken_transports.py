"""The conformance kit catches deliberately broken transports, each test for the rule it names,
and passes a correct transport it used to fail at random.

The kit runs in a child pytest against Fake variants with one rule broken each
(``sample_plugins/broken_transports.py``), loaded through the core's registry and dispatch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

TESTS = Path(__file__).resolve().parent

CLASS = """
class Test{name}(TransportConformance):
    transport_name = "fake"

    @pytest.fixture
    def transport(self):
        registry = TransportRegistry()
        record = registry.register("fake", broken.{plugin})
        assert record.loaded, record.error
        return Transport(registry.get("fake"))
"""

# (class, plugin, kit test, rule the failure must name; None: the test must pass)
CASES = [
    (
        "AnyRoom",
        "ACCEPTS_ANY_ROOM",
        "test_no_write_lands_after_receiver_abort",
        "no write lands after receiver_abort",
    ),
    (
        "AnyRoom",
        "ACCEPTS_ANY_ROOM",
        "test_no_write_lands_after_receiver_clear",
        "no write lands after receiver_clear",
    ),
    (
        "AnyRoom",
        "ACCEPTS_ANY_ROOM",
        "test_no_write_lands_for_a_room_the_receiver_never_constructed",
        "no write lands for a room the receiver never constructed",
    ),
    (
        "AuxFirst",
        "AUX_FIRST",
        "test_aux_row_lands_after_the_kv_pages",
        "the aux row lands after the KV pages of its chunk",
    ),
    (
        "Leaks",
        "LEAKS_AFTER_DRAIN",
        "test_no_write_lands_once_an_aborted_room_is_drained",
        "no write lands once sender_drained reports the aborted room",
    ),
    (
        "Options",
        "IGNORES_UNKNOWN_OPTIONS",
        "test_an_unknown_option_is_an_error_naming_it",
        "unknown options are errors naming them",
    ),
    # A correct transport whose receiver reports advisory Success: must pass, every time.
    *[
        (
            "Succeeds",
            "RECEIVER_SUCCEEDS",
            f"test_abort_works_in_every_state_and_failed_is_sticky[{stage}]",
            None,
        )
        for stage in ("constructed", "initialised", "metadata", "sent")
    ],
    # The real Fake passes every new test (none of them fails a correct transport).
    *[
        ("Fake", None, test, None)
        for test in (
            "test_no_write_lands_after_receiver_abort",
            "test_no_write_lands_after_receiver_clear",
            "test_no_write_lands_for_a_room_the_receiver_never_constructed",
            "test_aux_row_lands_after_the_kv_pages",
            "test_no_write_lands_once_an_aborted_room_is_drained",
            "test_an_unknown_option_is_an_error_naming_it",
        )
    ],
    ("WrongName", None, "test_info_names_the_transport", "no transport named 'fakee'"),
]


def test_the_kit_catches_each_broken_transport(tmp_path: Path) -> None:
    source = [
        "import pytest",
        "from kvbridge.transport.loading import TransportRegistry",
        "from kvbridge.testing import TransportConformance",
        "from kvbridge.transport.facade import Transport",
        "from sample_plugins import broken_transports as broken",
        "class TestFake(TransportConformance):\n    transport_name = 'fake'",
        "class TestWrongName(TransportConformance):\n    transport_name = 'fakee'",
    ]
    for name, plugin in sorted({(c, p) for c, p, _, _ in CASES if p}):
        source.append(CLASS.format(name=name, plugin=plugin))
    kit = tmp_path / "test_broken_kit.py"
    kit.write_text("\n".join(source) + "\n")
    ids = [f"{kit}::Test{cls}::{test}" for cls, _, test, _ in CASES]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("KVBRIDGE_REQUIRE_TRANSPORTS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "--tb=line",
            "--rootdir",
            str(tmp_path),
            *ids,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    # A crashed child prints its threads' stacks first: show them, not only the tail.
    assert "Fatal Python error" not in out, f"the kit's child pytest crashed:\n{out[:6000]}"
    outcomes = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED)\S* \S*?::(\S+::\S+)", out, re.M)
    )
    for cls, _, test, rule in CASES:
        outcome = outcomes.get(f"Test{cls}::{test}")
        if rule is None:
            assert outcome == "PASSED", f"Test{cls}::{test}: {outcome}\n{out[-4000:]}"
        else:
            # A fixture that fails (the wrong name) reports ERROR: a failing run all the same.
            assert outcome in ("FAILED", "ERROR"), f"Test{cls}::{test}: {outcome}\n{out[-4000:]}"
            failure = [line for line in out.splitlines() if rule in line]
            assert failure, f"Test{cls}::{test} failed without naming [{rule}]\n{out[-4000:]}"
