from kvbridge.testing import TransportConformance


class TestFakeConformance(TransportConformance):
    transport_name = "fake"
