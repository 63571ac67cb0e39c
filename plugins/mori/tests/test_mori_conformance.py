from kvbridge.testing import TransportConformance


class TestMoriConformance(TransportConformance):
    transport_name = "mori"
    # RDMA with the real library; the stand-in accepts the same backend names.
    transport_options = {"backend": "RDMA"}
