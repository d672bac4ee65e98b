"""GGUF codecs against the references: ggml's C quantizer (ggml_quantize_chunk, built from llama.cpp's sources) for
every type adaptools encodes, and gguf-py for the legacy types and for decoding."""
from __future__ import annotations

import numpy as np
import torch
import pytest
from gguf import GGMLQuantizationType as T
from llama_cpp import ggml_library, reference_quantize

from adaptools.checkpoints import gguf_quants

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def ggml():
    return ggml_library()


def samples(columns: int = 512) -> dict[str, np.ndarray]:
    """Rows that reach every branch of the reference quantizers: all-zero, constant, one-signed and sparse
    sub-blocks, a wide dynamic range, values on a power-of-two grid, and exact ties."""
    rng = np.random.default_rng(7)
    normal = rng.standard_normal((24, columns))
    mixed = normal * np.exp(rng.standard_normal((24, columns)) * 3)
    sparse = normal * (rng.random((24, columns)) < 0.08)
    negative = -np.abs(normal)
    negative[:, ::5] = 0.0
    constant = np.repeat(rng.standard_normal((24, 1)), columns, axis=1)
    constant[::3] = 0.0
    blocky = normal.copy()
    blocky[:, :32] = 0.0
    blocky[:, 64:80] = 1e-20
    grid = rng.integers(-16, 16, (24, columns)) / 32
    return {name: values.astype(np.float32) for name, values in
            {"normal": normal, "mixed": mixed, "sparse": sparse, "negative": negative, "constant": constant,
             "blocky": blocky, "grid": grid}.items()}


@pytest.mark.parametrize("qtype", sorted(gguf_quants.ENCODABLE, key=int), ids=lambda t: t.name)
def test_encoding_is_llama_cpps_byte_for_byte(qtype, ggml):
    for name, values in samples().items():
        got = gguf_quants.encode(values, qtype)
        want = reference_quantize(ggml, values, qtype)
        assert got.shape == want.shape == (len(values), gguf_quants.row_bytes(qtype, values.shape[1]))
        assert np.array_equal(got, want), f"{qtype.name} {name}: {int((got != want).any(axis=1).sum())} rows differ"


@pytest.mark.parametrize("qtype", sorted(gguf_quants.K_QUANTS | {T.Q8_0}, key=int), ids=lambda t: t.name)
def test_batches_do_not_change_the_bytes(qtype, ggml, monkeypatch):
    values = samples()["mixed"].reshape(-1, 256)
    monkeypatch.setattr(gguf_quants, "CHUNK_BLOCKS", 7)  # batches that split rows and tensors anywhere
    monkeypatch.setattr(gguf_quants, "Q8_0_CHUNK", 13)
    assert np.array_equal(gguf_quants.encode(values, qtype), reference_quantize(ggml, values, qtype))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_1, T.Q4_K, T.Q6_K, T.Q2_K, T.IQ4_NL],
                         ids=lambda t: t.name)
def test_decoding_is_gguf_py_dequantize(qtype, monkeypatch):
    """Encodable types from their encoding, the others (IQ4_NL) from arbitrary bytes of the right size; batches of
    blocks that split rows."""
    monkeypatch.setattr(gguf_quants, "DECODE_CHUNK_ELEMENTS", 96 * 32)
    values = samples()["normal"][:4]
    if gguf_quants.can_encode(qtype):
        stored = gguf_quants.encode(values, qtype)
    else:
        stored = np.random.default_rng(1).integers(0, 256, (4, gguf_quants.row_bytes(qtype, 512)), dtype=np.uint8)
    got = gguf_quants.decode(stored, qtype, (4, 512))
    want = np.asarray(gguf.quants.dequantize(stored, qtype), dtype=np.float32).reshape(4, 512)
    assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True)


def test_sequential_sum_is_ggmls_loop_order():
    rng = np.random.default_rng(3)
    for rows in (16, 32):
        terms = (rng.standard_normal((rows, 3001)) * np.exp(rng.standard_normal((rows, 3001)) * 6)).astype(np.float32)
        loop = terms[0].copy()
        for row in terms[1:]:
            loop = loop + row
        assert np.array_equal(gguf_quants.seqsum(terms), loop)


def test_nearest_int_rounds_half_to_even_like_rint():
    rng = np.random.default_rng(5)
    values = np.concatenate([np.arange(-40, 40, 0.5), rng.uniform(-4e6, 4e6, 1000)]).astype(np.float32)
    assert np.array_equal(gguf_quants.nearest_int(values), np.rint(values).astype(np.int32))


def test_types_without_an_encoder_are_refused():
    assert not gguf_quants.can_encode(T.IQ2_XS)
    with pytest.raises(NotImplementedError, match="IQ2_XS"):
        gguf_quants.encode(np.zeros((1, 256), np.float32), T.IQ2_XS)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K])
def test_survival_in_bands_is_the_whole_tensor_measure(qtype, monkeypatch):
    """The GGUF encoder's survival measure, re-decoding the merged tensor in bands of rows (made a few rows here),
    equals ⟨after − base, ΔW⟩ / ‖ΔW‖² over the whole tensor with `after` decoded by gguf-py."""
    import gguf as gguf_py

    from adaptools.checkpoints import gguf as container
    from adaptools.checkpoints.quantizing import retained_fraction

    g = torch.Generator().manual_seed(int(qtype))
    base = torch.randn(37, 512, generator=g)
    merged = base + 0.05 * torch.randn(37, 512, generator=g)
    encoded = torch.from_numpy(gguf_quants.encode(merged.numpy(), qtype).reshape(-1))
    encoder = container.GGUFEncoder.__new__(container.GGUFEncoder)
    encoder.types = {"w": qtype}
    monkeypatch.setattr(container, "SURVIVAL_BAND_ELEMENTS", 3 * 512)
    after = torch.from_numpy(gguf_py.quants.dequantize(encoded.numpy(), qtype).reshape(37, 512))
    want = retained_fraction(base, after, merged)
    assert encoder.survival("w", base, merged, {"w": encoded}) == pytest.approx(want, rel=1e-5)  # float32 dot products per band
    assert 0.5 < want < 1.5
