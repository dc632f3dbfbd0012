"""Tests for sqakd_hf.packing (bit-packing of low-bit integer codes)."""

from __future__ import annotations

import math

import pytest
import torch

from sqakd_hf.serialization.packing import packed_num_bytes, pack_codes, storage_bits, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_odd_shape(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    shape = (3, 5, 7)
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    per_byte = 8 // storage_bits(bits)
    assert packed.numel() == math.ceil(codes.numel() / per_byte) == packed_num_bytes(105, bits)
    out = unpack_codes(packed, bits, shape)
    assert out.dtype == torch.uint8 and out.shape == shape
    assert torch.equal(out.to(torch.int64), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_input_dtypes(dtype: torch.dtype) -> None:
    codes = torch.tensor([[3, 0, 1], [2, 3, 1]], dtype=dtype)
    out = unpack_codes(pack_codes(codes, 2), 2, (2, 3))
    assert torch.equal(out, codes.to(torch.uint8))


def test_non_contiguous_input() -> None:
    codes = torch.randint(0, 16, (6, 9), dtype=torch.int32).t()
    assert not codes.is_contiguous()
    out = unpack_codes(pack_codes(codes, 4), 4, tuple(codes.shape))
    assert torch.equal(out.to(torch.int32), codes)


def test_storage_bits() -> None:
    assert [storage_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_byte_counts() -> None:
    assert pack_codes(torch.tensor([1, 2, 3]), 4).numel() == 2
    assert pack_codes(torch.tensor([1, 2, 3]), 3).numel() == 2  # 3-bit uses 4-bit containers
    assert pack_codes(torch.ones(9, dtype=torch.int64), 1).numel() == 2
    assert pack_codes(torch.ones(5, dtype=torch.int64), 2).numel() == 2
    for bits in (5, 6, 7, 8):
        assert pack_codes(torch.ones(5, dtype=torch.int64), bits).numel() == 5


def test_bit_layout_by_hand() -> None:
    # First code in the least-significant bits.
    # 2-bit [0, 1, 2, 3] -> 0b11_10_01_00 = 0 + 4 + 32 + 192 = 228
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2).tolist() == [228]
    # 4-bit [1, 2, 3] -> byte0 = 0x21 = 33, byte1 = 0x03 (high nibble zero-padded)
    assert pack_codes(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    # 1-bit [1, 0, 0, 0, 0, 0, 0, 1, 1] -> 0b1000_0001 = 129, then 1
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [129, 1]
    # 3-bit [5, 7] in 4-bit containers -> 0x75 = 117
    assert pack_codes(torch.tensor([5, 7]), 3).tolist() == [0x75]
    # 6-bit codes are stored one per byte unchanged
    assert pack_codes(torch.tensor([63, 0, 17]), 6).tolist() == [63, 0, 17]


def test_empty() -> None:
    packed = pack_codes(torch.empty(0, 4, dtype=torch.int64), 4)
    assert packed.numel() == 0 and packed.dtype == torch.uint8
    assert unpack_codes(packed, 4, (0, 4)).shape == (0, 4)


def test_pack_does_not_alias_input() -> None:
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = pack_codes(codes, 8)
    packed[0] = 200
    assert codes[0] == 1


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_invalid_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(4, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), bits, (4,))
    with pytest.raises(ValueError, match="bits"):
        storage_bits(bits)


def test_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match=r"out of range.*\[0, 3\].*max=4"):
        pack_codes(torch.tensor([0, 4, 1]), 2)
    with pytest.raises(ValueError, match=r"out of range.*min=-1"):
        pack_codes(torch.tensor([0, -1]), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([8]), 3)  # 3-bit max is 7 even though the container holds 15
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([256]), 8)


def test_float_codes_rejected() -> None:
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)


def test_wrong_byte_count() -> None:
    packed = pack_codes(torch.tensor([1, 2, 3]), 4)  # 2 bytes
    with pytest.raises(ValueError, match="expected 3 bytes, got 2 bytes"):
        unpack_codes(packed, 4, (5,))
    with pytest.raises(ValueError, match="expected 1 bytes, got 2 bytes"):
        unpack_codes(packed, 4, (2,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.to(torch.int32), 4, (3,))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_large_vectorised(bits: int) -> None:
    """Functional check on 10M codes: completes quickly only if packing is vectorised."""
    n = 10_000_001
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_num_bytes(n, bits)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)
