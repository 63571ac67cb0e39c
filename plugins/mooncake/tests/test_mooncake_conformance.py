from kvbridge.testing import TransportConformance


class TestMooncakeConformance(TransportConformance):
    transport_name = "mooncake"
    transport_options = {"protocol": "tcp"}
