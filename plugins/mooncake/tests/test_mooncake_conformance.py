import pytest

from kvbridge.testing import TransportConformance


class TestMooncakeConformance(TransportConformance):
    transport_name = "mooncake"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"protocol": "tcp"}
