import pytest

from kvbridge.testing import TransportConformance


class TestMoriConformance(TransportConformance):
    transport_name = "mori"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        # RDMA with the real library; the stand-in accepts the same backend names.
        return {"backend": "RDMA"}
