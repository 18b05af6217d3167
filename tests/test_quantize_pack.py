import numpy as np
import pytest
import torch

from pipeline.codec.zstd_frames import PackError, Packer
from pipeline.codec.quantize import dequantize, qmax, quantize


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_quantize_roundtrip_error_is_bounded_by_half_a_step(bits):
    rng = np.random.default_rng(bits)
    z = torch.from_numpy(rng.standard_normal((50, 96)).astype(np.float32) * rng.uniform(0.1, 30, (50, 1)).astype(np.float32))
    codes, scales = quantize(z, bits)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert codes.abs().max() <= qmax(bits)
    back = dequantize(codes.numpy(), scales.numpy())
    step = scales.float().numpy()[:, None]
    assert np.all(np.abs(back - z.numpy()) <= 0.5 * step + 1e-6)


def test_quantize_uses_full_range_and_handles_zero_rows():
    z = torch.zeros(3, 8)
    z[1] = torch.linspace(-2, 2, 8)
    codes, scales = quantize(z, 8)
    assert int(codes[1].abs().max()) == 127
    assert np.all(dequantize(codes.numpy(), scales.numpy())[0] == 0)


def test_qmax_rejects_out_of_range_bits():
    with pytest.raises(ValueError):
        qmax(9)


def test_pack_roundtrip_and_refuses_lies():
    p = Packer(3)
    raw = np.arange(1000, dtype=np.int8).tobytes()
    frame = p.pack(raw)
    assert p.unpack(frame, len(raw)) == raw
    with pytest.raises(PackError):
        p.unpack(frame, len(raw) - 1)  # the row claims fewer bytes than the frame holds
    with pytest.raises(PackError):
        p.unpack(b"not zstd at all", 10)
    with pytest.raises(PackError):
        p.unpack(frame[: len(frame) // 2], len(raw))  # truncated frame


def test_pack_refuses_decompression_bomb():
    p = Packer(19)
    bomb = p.pack(b"\0" * (50 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(PackError):
        p.unpack(bomb, 1000)


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_bitpack_roundtrip_and_size(bits):
    from pipeline.codec.quantize import bitpack, bitunpack
    rng = np.random.default_rng(bits)
    q = qmax(bits)
    codes = rng.integers(-q, q + 1, size=(37, 12)).astype(np.int8)
    packed = bitpack(codes, bits)
    assert len(packed) == (codes.size * bits + 7) // 8
    np.testing.assert_array_equal(bitunpack(packed, bits, codes.size).reshape(codes.shape), codes)
