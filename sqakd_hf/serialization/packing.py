"""Dense bit-packing of low-bit integer weight codes into ``uint8`` bytes.

Layout
------
Codes are flattened in row-major (C) order and stored in containers of
``storage_bits(bits)`` bits, ``8 // storage_bits(bits)`` codes per byte.
Within a byte the *first* code occupies the *least significant* bits
(little-endian within the byte): code ``i`` of a group sits at bit offset
``(i % codes_per_byte) * storage_bits``. For example the 2-bit codes
``[0, 1, 2, 3]`` pack to the single byte ``0b11_10_01_00 == 228``.

Container widths: 1, 2, 4 and 8 bits pack exactly ``8 / bits`` codes per
byte; 3-bit codes use 4-bit containers (two per byte, one bit of padding
each) and 5-, 6- and 7-bit codes use whole bytes, since codes never straddle
a byte boundary. If the number of codes is not a multiple of the codes per
byte, the last byte is zero-padded in its high bits.

This module only depends on ``torch``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_codes", "unpack_codes", "storage_bits", "packed_num_bytes"]

_CONTAINER = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
# Unsigned dtypes wider than 8 bits lack most reductions on CPU; widen them first.
_WIDE_UNSIGNED = tuple(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _CONTAINER:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def storage_bits(bits: int) -> int:
    """Return the container width (in bits) used to store one ``bits``-bit code.

    1->1, 2->2, 3->4, 4->4, 5..8->8.
    """
    _check_bits(bits)
    return _CONTAINER[bits]


def packed_num_bytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack_codes` produces for ``numel`` codes of ``bits`` bits."""
    per_byte = 8 // storage_bits(bits)
    return math.ceil(numel / per_byte)


def _shifts(container: int, device: torch.device) -> torch.Tensor:
    per_byte = 8 // container
    return torch.arange(0, per_byte * container, container, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2**bits - 1]``) into a 1-D uint8 tensor.

    See the module docstring for the bit layout (first code in the low bits).
    Raises ``ValueError`` if ``bits`` is not in 1..8, ``codes`` is not an
    integer tensor, or any code is out of range.
    """
    container = storage_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    elif flat.dtype in _WIDE_UNSIGNED:
        flat = flat.to(torch.int64)  # values >= 2**63 wrap negative and fail the range check

    lo, hi = torch.aminmax(flat)
    max_code = (1 << bits) - 1
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi > max_code:
        raise ValueError(
            f"codes out of range for {bits}-bit packing: expected values in [0, {max_code}], "
            f"got min={lo}, max={hi}"
        )
    flat = flat.to(torch.uint8)
    if container == 8:
        return flat.clone()  # never alias the caller's tensor

    per_byte = 8 // container
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte) << _shifts(container, flat.device)
    # The shifted fields do not overlap, so a sum equals a bitwise OR and never overflows.
    return groups.sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: return uint8 codes of ``shape``.

    Raises ``ValueError`` if ``bits`` is invalid, ``packed`` is not uint8, or
    ``packed`` does not hold exactly the number of bytes ``shape`` requires.
    """
    container = storage_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must have dtype torch.uint8, got {packed.dtype}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    numel = math.prod(shape)
    expected = packed_num_bytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() != expected:
        raise ValueError(
            f"packed tensor has the wrong size for shape {shape} at {bits} bits: "
            f"expected {expected} bytes, got {flat.numel()} bytes"
        )
    if container == 8:
        return flat.clone().view(shape)

    mask = (1 << container) - 1
    codes = (flat.unsqueeze(1) >> _shifts(container, flat.device)) & mask
    return codes.reshape(-1)[:numel].reshape(shape)
