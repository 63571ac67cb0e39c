"""kvbridge-sglang: SGLang's ``--disaggregation-transfer-backend kvbridge``.

Installing the package registers the backend through SGLang's plugin entry point
(:mod:`kvbridge_sglang.plugin`); the transport and every kvbridge setting come from the
environment (:mod:`kvbridge_sglang.config`).
"""

__version__ = "0.1.0"
