"""Moved: the HTTP client to :mod:`kvbridge.bootstrap.http_client`, a prefill's kept
registration to :mod:`kvbridge.bootstrap.registration` (``BootstrapClient.register_rank(...,
keep=True)`` and ``publish_rooms`` are ``PrefillRegistration.register`` / ``.publish_rooms``
now), the directory to :mod:`kvbridge.bootstrap.directory`, the write plan to
:mod:`kvbridge.protocol.plan`. This old path is kept for one release."""

from kvbridge.bootstrap.directory import BootstrapDirectory as BootstrapDirectory
from kvbridge.bootstrap.directory import DecodeExpectation as DecodeExpectation
from kvbridge.bootstrap.directory import check_compatible as check_compatible
from kvbridge.bootstrap.http_client import *  # noqa: F403
from kvbridge.bootstrap.registration import MAX_BATCH as MAX_BATCH
from kvbridge.bootstrap.registration import PrefillRegistration as PrefillRegistration
from kvbridge.protocol.plan import Contact as Contact
