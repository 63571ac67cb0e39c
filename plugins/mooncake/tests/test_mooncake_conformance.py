import pytest

from kvbridge.testing import TransportConformance


class TestMooncakeConformance(TransportConformance):
    transport_name = "mooncake"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp"}


class TestMooncakeConformanceTwoLanes(TestMooncakeConformance):
    """The same suite with two worker threads per peer: rooms to one peer written at once by the
    real library (the default is one)."""

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp", "lanes_per_peer": 2}
