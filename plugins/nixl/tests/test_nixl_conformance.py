import pytest

from kvbridge.testing import TransportConformance


class TestNixlConformance(TransportConformance):
    transport_name = "nixl"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"backend": "UCX"}
