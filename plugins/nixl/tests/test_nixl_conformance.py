from kvbridge.testing import TransportConformance


class TestNixlConformance(TransportConformance):
    transport_name = "nixl"
    transport_options = {"backend": "UCX"}
