"""GPU memory end to end, on CPU: regions keep their device from ``MemoryRegion.of`` through the
control wire into the descriptors a transport receives.

CUDA tensors are stood in for by a duck-typed object that answers only what a real tensor
answers without a device sync; anything that would copy or sync raises.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvbridge.errors import MemoryRegistrationError
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.protocol.messages import (
    MalformedFrame,
    Register,
    decode,
    encode,
    regions_from_wire,
    regions_to_wire,
)
from kvbridge.types import HOST, Descriptors, MemoryRegion, device_index, device_name


class FakeDeviceTensor:
    """What ``MemoryRegion.of`` may read from a tensor on a GPU: pointer, sizes, device."""

    def __init__(
        self,
        device: object,
        shape: tuple[int, ...] = (8, 64),
        element_size: int = 2,
        contiguous: bool = True,
        ptr: int = 0x7F00_0000_0000,
    ) -> None:
        self.device = device
        self.shape = shape
        self._element_size = element_size
        self._contiguous = contiguous
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr

    def is_contiguous(self) -> bool:
        return self._contiguous

    def element_size(self) -> int:
        return self._element_size

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def dim(self) -> int:
        return len(self.shape)

    def __getattr__(self, name: str) -> object:  # .cpu(), .numpy(), .item(), .to(), ...
        raise AssertionError(f"MemoryRegion.of touched tensor.{name}: that copies or syncs")

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("MemoryRegion.of copied the tensor to host")


class FakeDevice:
    """A torch.device look-alike (``type`` and ``index``), e.g. for devices torch lacks here."""

    def __init__(self, type: str, index: int | None) -> None:
        self.type, self.index = type, index

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@pytest.fixture(autouse=True)
def _no_cuda_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("kvbridge synchronised the device")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)


# -- MemoryRegion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device", [torch.device("cuda", 1), FakeDevice("cuda", 1), "cuda:1"], ids=str
)
def test_of_describes_a_cuda_tensor_in_place(device: object) -> None:
    tensor = FakeDeviceTensor(device, shape=(8, 64), element_size=2)
    region = MemoryRegion.of(tensor)
    assert region == MemoryRegion(0x7F00_0000_0000, 8 * 64 * 2, 64 * 2, "cuda:1")
    assert region.is_gpu and region.device_index == 1


def test_of_rocm_tensors_are_cuda_devices() -> None:
    # torch built for ROCm reports AMD GPUs with device type "cuda" (torch.version.hip is set).
    region = MemoryRegion.of(FakeDeviceTensor(torch.device("cuda", 3)), item_bytes=256)
    assert (region.device, region.device_index, region.item_bytes) == ("cuda:3", 3, 256)


def test_of_cpu_tensor_and_numpy_array_are_host_memory() -> None:
    tensor = torch.zeros(4, 32, dtype=torch.bfloat16)
    region = MemoryRegion.of(tensor)
    assert (region.addr, region.device, region.device_index) == (tensor.data_ptr(), "cpu", HOST)
    assert not region.is_gpu
    assert MemoryRegion.of(np.zeros((4, 8))).device == "cpu"


@pytest.mark.parametrize(
    ("device", "named"),
    [
        (torch.device("mps"), "'mps'"),
        (torch.device("meta"), "'meta'"),
        (FakeDevice("xla", 0), "'xla:0'"),
        (FakeDevice("hip", 0), "'hip:0'"),
        ("xpu:1", "'xpu:1'"),
    ],
    ids=str,
)
def test_of_refuses_devices_it_cannot_describe(device: object, named: str) -> None:
    with pytest.raises(MemoryRegistrationError, match=f"device {named}.*'cuda:N'"):
        MemoryRegion.of(FakeDeviceTensor(device))


def test_of_refuses_cuda_without_an_index() -> None:
    with pytest.raises(MemoryRegistrationError, match="without a device index"):
        MemoryRegion.of(FakeDeviceTensor(torch.device("cuda")))


def test_of_refuses_non_contiguous_device_tensors() -> None:
    with pytest.raises(MemoryRegistrationError, match="cuda:0 must be contiguous"):
        MemoryRegion.of(FakeDeviceTensor(torch.device("cuda", 0), contiguous=False))
    with pytest.raises(MemoryRegistrationError, match="contiguous"):
        MemoryRegion.of(torch.zeros(4, 8).t())


@pytest.mark.parametrize("device", ["cuda", "cuda:01", "CUDA:0", "gpu:0", "cuda:1 ", "", 1, None])
def test_region_refuses_unknown_device_names(device: object) -> None:
    with pytest.raises(MemoryRegistrationError, match="'cpu' or 'cuda:N'"):
        MemoryRegion(4096, 4096, 1024, device)  # type: ignore[arg-type]


def test_device_codes() -> None:
    assert [device_index(d) for d in ("cpu", "cuda:0", "cuda:1", "cuda:17")] == [-1, 0, 1, 17]
    assert [device_name(i) for i in (-1, 0, 1, 17)] == ["cpu", "cuda:0", "cuda:1", "cuda:17"]


# -- descriptors ----------------------------------------------------------------------------------


def _regions(device: str, base: int, count: int = 2, page: int = 1024) -> list[MemoryRegion]:
    return [MemoryRegion(base + i * (1 << 20), 16 * page, page, device) for i in range(count)]


def test_kv_and_aux_descriptors_carry_each_runs_devices() -> None:
    src = [*_regions("cuda:1", 1 << 30), MemoryRegion(1 << 34, 16 * 1024, 1024, "cpu")]
    dst = [*_regions("cuda:0", 1 << 32), MemoryRegion(1 << 35, 16 * 1024, 1024, "cuda:2")]
    pages = np.array([0, 1, 2, 7, 8])
    d = kv_descriptors(src, dst, pages, pages)  # two runs per region
    assert d.src_device.tolist() == [1, 1, 1, 1, -1, -1]
    assert d.dst_device.tolist() == [0, 0, 0, 0, 2, 2]
    sliced = kv_descriptors(src, dst, pages, pages, src_offset=0, dst_offset=512, length=512)
    assert sliced.src_device.tolist() == [1] * 10 + [-1] * 5
    assert sliced.dst_device.tolist() == [0] * 10 + [2] * 5

    # GPU KV with host-memory aux rows: the aux row write says host on both sides.
    aux = aux_descriptors(
        [MemoryRegion(1 << 36, 24 * 8, 24, "cpu")], [MemoryRegion(1 << 37, 24 * 8, 24)], 1, 5
    )
    chunk = Descriptors.concat([d, aux])
    assert chunk.src_device.tolist() == [1, 1, 1, 1, -1, -1, -1]
    assert chunk.dst_device.tolist() == [0, 0, 0, 0, 2, 2, -1]


def test_descriptors_default_to_host_and_select_keeps_devices() -> None:
    plain = Descriptors(np.array([1, 2]), np.array([3, 4]), np.array([5, 6]))
    assert plain.src_device.tolist() == plain.dst_device.tolist() == [HOST, HOST]
    d = Descriptors(
        np.arange(4),
        np.arange(4) + 10,
        np.ones(4, dtype=np.int64),
        src_device=np.array([1, -1, 1, -1], dtype=np.int32),
        dst_device=np.array([0, -1, 0, -1], dtype=np.int32),
    )
    picked = d.select(np.array([True, False, True, False]))
    assert picked.src.tolist() == [0, 2] and picked.src_device.tolist() == [1, 1]
    assert picked.dst_device.tolist() == [0, 0]
    with pytest.raises(ValueError, match="one length"):
        Descriptors(np.arange(2), np.arange(2), np.arange(2), src_device=np.zeros(1))
    assert len(Descriptors.concat([])) == 0 and Descriptors.empty().src_device.dtype == np.int32


@given(st.lists(st.tuples(st.integers(-1, 3), st.integers(-1, 3)), min_size=0, max_size=40))
def test_device_groups_partition_runs_by_device_pair(pairs: list[tuple[int, int]]) -> None:
    n = len(pairs)
    d = Descriptors(
        np.arange(n, dtype=np.int64),
        np.arange(n, dtype=np.int64) + 100,
        np.ones(n, dtype=np.int64),
        src_device=np.array([p[0] for p in pairs], dtype=np.int32),
        dst_device=np.array([p[1] for p in pairs], dtype=np.int32),
    )
    groups = d.device_groups()
    seen: list[int] = []
    for s, t, runs in groups:
        assert runs.src_device.tolist() == [s] * len(runs)
        assert runs.dst_device.tolist() == [t] * len(runs)
        assert [pairs[i] for i in runs.src.tolist()] == [(s, t)] * len(runs)
        seen += runs.src.tolist()
    assert sorted(seen) == list(range(n))
    assert [(s, t) for s, t, _ in groups] == list(dict.fromkeys(pairs))


# -- the control wire -----------------------------------------------------------------------------


def test_register_carries_region_devices_across_the_wire() -> None:
    kv = _regions("cuda:1", 1 << 30)
    aux = [MemoryRegion(1 << 36, 24 * 8, 24, "cpu")]
    message = Register("dec", {"id": "x"}, regions_to_wire(kv), regions_to_wire(aux), "tcp://h:1")
    back = decode(encode(message))
    assert back == message
    assert regions_from_wire(back.kv_regions) == tuple(kv)
    assert regions_from_wire(back.aux_regions) == tuple(aux)
    assert [r.device for r in regions_from_wire(back.kv_regions)] == ["cuda:1", "cuda:1"]


def _register_frames(kv_regions: object) -> list[bytes]:
    frames = encode(Register("dec", {"id": "x"}, (), ((1, 24, 24, "cpu"),), "tcp://h:1"))
    header = json.loads(frames[1])
    header["kv_regions"] = kv_regions
    return [frames[0], json.dumps(header).encode(), *frames[2:]]


def test_three_entry_regions_from_older_peers_mean_cpu() -> None:
    back = decode(_register_frames([[4096, 8192, 1024]]))
    assert back.kv_regions == ((4096, 8192, 1024, "cpu"),)


@pytest.mark.parametrize(
    "entry",
    [
        [4096, 8192, 1024, "mps"],
        [4096, 8192, 1024, "cuda"],
        [4096, 8192, 1024, "cuda:"],
        [4096, 8192, 1024, "cuda:01"],
        [4096, 8192, 1024, "cuda:99999"],
        [4096, 8192, 1024, "cuda:1" + " " * 20],
        [4096, 8192, 1024, "c" * 1000],
        [4096, 8192, 1024, 1],
        [4096, 8192, 1024, None],
        [4096, 8192, 1024, ["cuda:1"]],
        [4096, 8192, 1024, "cuda:1", "extra"],
        [4096, 8192, "cuda:1"],
    ],
    ids=lambda e: repr(e)[:40],
)
def test_bad_region_devices_are_malformed_frames(entry: list[object]) -> None:
    with pytest.raises(MalformedFrame, match="kv_regions"):
        decode(_register_frames([entry]))
