import pytest

from kvbridge.testing import TransportConformance


class TestMooncakeConformance(TransportConformance):
    transport_name = "mooncake"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp"}


class TestMooncakeConformanceFewInFlight(TestMooncakeConformance):
    """The same suite with the submit path's limits small: a chunk of thousands of runs goes out
    a few descriptors at a time, and rooms to one peer wait for a free place."""

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp", "max_in_flight": 8, "writes_in_flight": 2}


class TestMooncakeConformanceSync(TestMooncakeConformance):
    """The same suite on the blocking API (``write_api`` "sync", one worker thread per peer)."""

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp", "write_api": "sync"}


class TestMooncakeConformanceSyncTwoLanes(TestMooncakeConformance):
    """The blocking API with two worker threads per peer: rooms to one peer written at once by
    the real library."""

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp", "write_api": "sync", "lanes_per_peer": 2}
