import pytest

from kvbridge.testing.demo_check import assert_demo_passes

pytestmark = pytest.mark.multiprocess


def test_demo_two_processes_every_byte_verified() -> None:
    assert_demo_passes("mori", prefill_tp=1, decode_tp=1)


def test_demo_tp2_to_tp2_every_byte_verified() -> None:
    assert_demo_passes("mori")
