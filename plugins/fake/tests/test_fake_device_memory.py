"""The Fake moves host memory only: GPU regions are refused when the manager is created."""

from __future__ import annotations

import numpy as np
import pytest

from kvbridge.config import TransferConfig
from kvbridge.errors import MemoryRegistrationError
from kvbridge.types import MemoryRegion, RankIdentity, Role
from kvbridge_fake.manager import FakeManager


def test_gpu_regions_are_refused_naming_the_device() -> None:
    buf = np.zeros(4096, dtype=np.uint8)
    kv = (MemoryRegion(buf.ctypes.data, 4096, 1024, "cuda:1"),)
    aux = (MemoryRegion(buf.ctypes.data, 64, 64),)
    with pytest.raises(MemoryRegistrationError, match=r"host memory only.*cuda:1"):
        FakeManager(TransferConfig(transport="fake"), RankIdentity(Role.DECODE), kv, aux)
