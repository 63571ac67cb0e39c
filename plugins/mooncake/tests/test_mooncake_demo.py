import pytest

from kvbridge.testing.demo_check import assert_demo_passes

pytestmark = pytest.mark.multiprocess


def test_demo_tp2_to_tp2_every_byte_verified() -> None:
    assert_demo_passes("mooncake")
