"""A plugin module whose native library (and shared library) is missing, checked as the real
transports do it: kvbridge.native.check_native at import time."""

from kvbridge.native import check_native, python_module, shared_library

IMPORTED_MODULES: list[str] = []

check_native(
    "needs_native",
    python_module("kvbridge_no_such_native_binding", fix="pip install kvbridge-no-such[cpu]"),
    shared_library("kvbridge_no_such_lib", fix="apt-get install libkvbridge-no-such1"),
)

plugin = object()  # never reached
