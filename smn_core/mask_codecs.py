"""Lossless codecs for binary masks and for fp32 weights, and the entropy references they are judged by.

Paper App. C (Tables 6-7) compresses learned masks and, for comparison, fully fine-tuned fp32 weights
with five off-the-shelf compressors (gzip, bz2, lzma, lz4, snappy). This module registers those five
plus zstd (:data:`LIBRARY_CODECS`), ``"none"`` (bit-packed, uncompressed: 1 bit per weight), and our
own mask codec ``"smn-ctx"`` (:class:`ContextMaskCodec`), the smallest.

The default (:data:`DEFAULT_CODEC`) is ``"zstd"``: a store's tasks are served, and a task that is not resident
is decoded on its first request. Learned masks through Zstandard decode in a fraction of a millisecond;
``smn-ctx`` range-codes every bit (about 270 k binary decisions for a ResNet-20 task: 10-20 ms on a CPU core)
for files a few percent smaller (``benchmarks/SERVE_RESULTS.md``). Use ``smn-ctx`` for archives.

Library codecs are byte compressors: a mask set is bit-packed (``numpy.packbits`` of the concatenated,
row-major flattened masks; 1 bit per weight, zero padding at the very end only) and the bytes are
compressed; fp32 weights are compressed as their raw little-endian bytes.

``smn-ctx`` is a context-modelling binary range coder (the coder itself is the ``constriction``
library's range coder; the probability model is ours). Each mask tensor is viewed as units x K
positions (K = kh*kw for a convolution with a spatial kernel, else runs of 8 along the flattened
tensor) and coded one position ("plane") at a time, all units of a plane in one vectorised call. The
probability that a bit is 1 depends on a context made of

* the number of zeros already coded in the same kernel (0, 1, 2+): kept weights cluster per kernel;
* when the frozen backbone weights are given (they always are in a mask store, whose files are
  bound to one backbone by its hash): the quantile bin of ``|W|`` within its tensor (8 bins) and the
  sign of ``W``; the score gradient ``dL/dM = W * dL/dW'`` makes both informative.

Probabilities adapt from plane to plane: ``p(1 | c) = (ones_c + a d) / (n_c + a)`` with counts of the
planes already coded in the tensor, prior strength ``a = 4`` and ``d`` the tensor's density (its
exact count of ones is sent in the payload header). No per-context side information is sent. On real
learned CIFAR ResNet-20 masks this codes below the order-0 entropy ``H(density)`` bound (see the
storage note); the order-0 bound is :func:`order0_entropy_bits`.

Plain numpy (+ the compressor libraries); never imports ray.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import math
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .registry import Registry

__all__ = [
    "MaskCodec",
    "ByteCodec",
    "ContextMaskCodec",
    "CodecError",
    "CodecMeasurement",
    "LIBRARY_CODECS",
    "DEFAULT_CODEC",
    "split_packed",
    "available_codecs",
    "get_codec",
    "register_codec",
    "pack_bits",
    "unpack_bits",
    "binary_entropy",
    "order0_entropy_bits",
    "measure_mask_codec",
    "measure_byte_codec",
]

#: The five compressors of paper App. C, plus zstd.
LIBRARY_CODECS: tuple[str, ...] = ("gzip", "bz2", "lzma", "lz4", "snappy", "zstd")
#: The codec new mask files (and ``smn store add``) use unless told otherwise: fast to decode on a cold task
#: switch (module docstring); ``"smn-ctx"`` is the smallest.
DEFAULT_CODEC = "zstd"


class CodecError(ValueError):
    """A payload that a codec cannot decode (corrupted, truncated, or coded for other shapes)."""


# --------------------------------------------------------------------------------------------------
# bit packing and entropy references
# --------------------------------------------------------------------------------------------------


def pack_bits(masks: Sequence[np.ndarray]) -> bytes:
    """Bit-pack masks: concatenation of the row-major flattened masks, 8 weights per byte (MSB first).

    Args:
        masks: boolean (or 0/1) arrays of any shapes.

    Returns:
        ``ceil(total / 8)`` bytes, ``total`` the number of weights; the last byte is zero-padded.

    Raises:
        ValueError: if an array holds values other than 0/1.
    """
    flat = [np.asarray(m).reshape(-1) for m in masks]
    if not flat:
        return b""
    cat = np.concatenate(flat)
    if cat.dtype != np.bool_:
        if cat.size and not np.isin(cat, (0, 1)).all():
            raise ValueError("masks must hold only 0/1 (or bool) values")
        cat = cat.astype(np.bool_)
    return np.packbits(cat).tobytes()


def unpack_bits(data: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Inverse of :func:`pack_bits`: bool arrays of the given shapes.

    Raises:
        CodecError: if ``data`` does not hold exactly ``ceil(total / 8)`` bytes.
    """
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    if len(data) != (total + 7) // 8:
        raise CodecError(f"bit-packed masks of {total} weights need {(total + 7) // 8} bytes, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=total).astype(np.bool_)
    out, start = [], 0
    for s, n in zip(shapes, sizes):
        out.append(bits[start:start + n].reshape(s))
        start += n
    return out


def split_packed(data: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """:func:`pack_bits`' stream cut into one packed mask per shape: uint8 arrays of ``ceil(numel / 8)`` bytes,
    each as :func:`numpy.packbits` packs that mask alone (zero-padded).

    When every mask but the last has a multiple of 8 weights (every conv and linear weight of the zoo), the
    arrays are read-only views of ``data``: nothing is unpacked or copied. Otherwise the stream is unpacked and
    each mask packed again.

    Raises:
        CodecError: if ``data`` does not hold exactly ``ceil(total / 8)`` bytes.
    """
    sizes = [math.prod(int(d) for d in s) for s in shapes]
    total = sum(sizes)
    if len(data) != (total + 7) // 8:
        raise CodecError(f"bit-packed masks of {total} weights need {(total + 7) // 8} bytes, got {len(data)}")
    if any(n % 8 for n in sizes[:-1]):
        return [np.packbits(m.reshape(-1)) for m in unpack_bits(data, shapes)]
    buf = np.frombuffer(data, dtype=np.uint8)
    out, start = [], 0
    for n in sizes:
        out.append(buf[start:start + (n + 7) // 8])
        start += (n + 7) // 8
    return out


def binary_entropy(p: float | np.ndarray) -> float | np.ndarray:
    """``H(p) = -p log2 p - (1-p) log2 (1-p)`` in bits (0 at p in {0, 1}).

    Raises:
        ValueError: if ``p`` is outside [0, 1].
    """
    arr = np.asarray(p, dtype=np.float64)
    if ((arr < 0) | (arr > 1)).any():
        raise ValueError(f"a probability must lie in [0, 1], got {p!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(arr * np.log2(arr) + (1 - arr) * np.log2(1 - arr))
    h = np.where((arr == 0) | (arr == 1), 0.0, h)
    return float(h) if np.ndim(h) == 0 else h


def order0_entropy_bits(masks: Sequence[np.ndarray], per_tensor: bool = False) -> float:
    """Order-0 entropy of a mask set in bits: ``N * H(density)`` over all ``N`` weights, or, with
    ``per_tensor``, the sum of ``n_t * H(density_t)`` over tensors (a tighter reference).

    This is what an ideal coder that sees each bit as an independent draw at the (per-tensor)
    density would need; a coder that models structure (rows, kernels, the weights) can go under it.

    Raises:
        ValueError: if there is no weight.
    """
    arrays = [np.asarray(m).reshape(-1) for m in masks]
    total = sum(a.size for a in arrays)
    if total == 0:
        raise ValueError("no mask weights to measure")
    if per_tensor:
        return float(sum(a.size * binary_entropy(float(a.mean())) for a in arrays if a.size))
    ones = sum(int(a.sum()) for a in arrays)
    return float(total * binary_entropy(ones / total))


# --------------------------------------------------------------------------------------------------
# codecs
# --------------------------------------------------------------------------------------------------


class MaskCodec:
    """A lossless codec for a list of binary masks.

    ``encode(masks, weights=None) -> bytes`` and ``decode(payload, shapes, weights=None) -> masks``;
    ``masks`` are bool arrays, ``weights`` (optional) the frozen backbone tensors of the same shapes.
    Codecs with ``needs_weights`` use the weights as context when they are given at encoding, and
    then need the very same weights to decode.
    """

    name: str = ""
    description: str = ""
    compresses_bytes: bool = False  # True: also compresses arbitrary bytes (fp32 weights)

    def encode(self, masks: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes, shapes: Sequence[tuple[int, ...]],
               weights: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        raise NotImplementedError

    def decode_packed(self, payload: bytes, shapes: Sequence[tuple[int, ...]],
                      weights: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Decode to bit-packed masks: per shape, a uint8 array of ``ceil(numel / 8)`` bytes, row-major, most
        significant bit first, zero-padded (what :func:`numpy.packbits` gives for the flattened mask).

        A serving replica keeps masks packed; this default packs :meth:`decode`'s masks, and a codec whose
        payload already is the packed bits (:class:`ByteCodec`) overrides it to skip the unpacking.

        Raises:
            CodecError: a payload that does not decode to ``shapes``.
        """
        return [np.packbits(np.asarray(m, dtype=np.bool_).reshape(-1)) for m in self.decode(payload, shapes, weights)]

    def uses_weights(self, payload: bytes) -> bool:
        """Whether decoding ``payload`` needs the backbone weights."""
        return False


#: A codec factory: ``fn() -> MaskCodec``, called on first use (so a codec's library is imported only then).
CodecFactory = Callable[[], MaskCodec]
_FACTORIES: Registry[CodecFactory] = Registry("codec")
_CODECS: dict[str, MaskCodec] = {}  # the codecs built so far, by name


def register_codec(name: str, *, package: str | None = None) -> Callable[[CodecFactory], CodecFactory]:
    """Decorator registering a codec factory under ``name`` (for :func:`get_codec`).

    The factory takes no arguments and returns the :class:`MaskCodec`; :func:`get_codec` calls it once, on
    first use. ``package`` names the pip package the factory imports, for the error when it is missing.
    A class with a no-argument constructor can be registered directly.

    Raises:
        ValueError: ``name`` is not a non-empty str or is already registered.
    """
    return _FACTORIES.register(name, package=package)


class ByteCodec(MaskCodec):
    """A general-purpose byte compressor applied to bit-packed masks (or to raw fp32 bytes).

    ``compress(bytes) -> bytes`` and ``decompress(bytes) -> bytes`` are the library's functions.
    """

    compresses_bytes = True

    def __init__(self, name: str, description: str, compress: Callable[[bytes], bytes],
                 decompress: Callable[[bytes], bytes]) -> None:
        self.name, self.description = name, description
        self.compress, self.decompress = compress, decompress

    def __repr__(self) -> str:
        return f"ByteCodec({self.name!r})"

    def encode(self, masks, weights=None) -> bytes:
        return self.compress(pack_bits(masks))

    def decode(self, payload, shapes, weights=None) -> list[np.ndarray]:
        try:
            raw = self.decompress(bytes(payload))
        except Exception as exc:  # each library raises its own error type on bad input
            raise CodecError(f"{self.name}: payload does not decompress ({type(exc).__name__}: {exc})") from None
        return unpack_bits(raw, shapes)

    def decode_packed(self, payload, shapes, weights=None) -> list[np.ndarray]:
        """The decompressed bytes are :func:`pack_bits`' stream: cut into one packed array per mask
        (:func:`split_packed`), without unpacking any bit when the masks start on byte boundaries."""
        try:
            raw = self.decompress(bytes(payload))
        except Exception as exc:  # each library raises its own error type on bad input
            raise CodecError(f"{self.name}: payload does not decompress ({type(exc).__name__}: {exc})") from None
        return split_packed(raw, shapes)


@register_codec("none")
def _none() -> ByteCodec:
    return ByteCodec("none", "bit-packed, uncompressed (1 bit per weight)", bytes, bytes)


@register_codec("gzip")
def _gzip() -> ByteCodec:
    return ByteCodec("gzip", "gzip (DEFLATE), level 9, mtime 0 (Python gzip)",
                     lambda b: gzip.compress(b, compresslevel=9, mtime=0), gzip.decompress)


@register_codec("bz2")
def _bz2() -> ByteCodec:
    return ByteCodec("bz2", "bzip2, level 9 (Python bz2)", lambda b: bz2.compress(b, 9), bz2.decompress)


@register_codec("lzma")
def _lzma() -> ByteCodec:
    return ByteCodec("lzma", "LZMA/xz, preset 6 (Python lzma)", lzma.compress, lzma.decompress)


@register_codec("lz4", package="lz4")
def _lz4() -> ByteCodec:
    import lz4.frame

    return ByteCodec("lz4", "LZ4 frame, default level (lz4 package)", lambda b: lz4.frame.compress(b, store_size=True),
                     lz4.frame.decompress)


@register_codec("snappy", package="python-snappy")
def _snappy() -> ByteCodec:
    import snappy

    return ByteCodec("snappy", "Snappy (python-snappy)", snappy.compress, snappy.decompress)


@register_codec("zstd", package="zstandard")
def _zstd() -> ByteCodec:
    import zstandard

    def compress(b: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=19).compress(b)

    local = threading.local()  # a decompression context per thread (one instance is not thread-safe); making
    # one per call costs more than decompressing a ResNet-20 task

    def decompress(b: bytes) -> bytes:
        if not hasattr(local, "d"):
            local.d = zstandard.ZstdDecompressor()
        return local.d.decompress(b)

    return ByteCodec("zstd", "Zstandard, level 19 (zstandard package)", compress, decompress)


# ------------------------------- our own: context-modelled range coder ----------------------------

_CTX_MAGIC = b"SMC1"
_FLAG_WEIGHTS = 1
_W_BINS = 8
_Z_LEVELS = 3
_PRIOR = 4.0
_RUN = 8


def _units_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """(units, K): a conv with a spatial kernel codes kernel by kernel; anything else in runs of 8."""
    n = int(np.prod(shape, dtype=np.int64))
    if len(shape) == 4 and shape[2] * shape[3] > 1:
        k = shape[2] * shape[3]
    elif n % _RUN == 0 and n >= _RUN:
        k = _RUN
    else:
        k = 1
    return n // k, k


_CONTEXT_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_CONTEXT_CACHE_SIZE = 256  # tensors (a ResNet-20 has 19 masked ones; a ResNet-50 54)
_CONTEXT_LOCK = threading.Lock()


def _weight_context(weight: np.ndarray, units: int, k: int) -> np.ndarray:
    """(units, K) int context from the frozen weights: |W| quantile bin (8 within the tensor) x sign.

    The quantiles cost about half of a decode, and a store decodes every task against the same backbone,
    so the result is kept in a small LRU keyed by the tensor's shape and the SHA-1 of its float32 bytes
    (hashing costs about a tenth of the computation; equal bytes give the same context, so a cached
    context is exactly the one computed anew). The returned array is read-only, uint8 (one byte per weight:
    a ResNet-50's contexts take 25 MB).
    """
    w = np.ascontiguousarray(weight, dtype=np.float32).reshape(units, k)
    key = (units, k, hashlib.sha1(w).digest())
    with _CONTEXT_LOCK:
        hit = _CONTEXT_CACHE.get(key)
        if hit is not None:
            _CONTEXT_CACHE.move_to_end(key)
            return hit
    mag = np.abs(w)
    edges = np.quantile(mag, np.linspace(0.0, 1.0, _W_BINS + 1)[1:-1])
    ctx = (np.searchsorted(edges, mag) * 2 + (w > 0)).astype(np.uint8)  # 0-15: a byte per weight in the cache
    ctx.flags.writeable = False
    with _CONTEXT_LOCK:
        _CONTEXT_CACHE[key] = ctx
        while len(_CONTEXT_CACHE) > _CONTEXT_CACHE_SIZE:
            _CONTEXT_CACHE.popitem(last=False)
    return ctx


@register_codec("smn-ctx", package="constriction")
class ContextMaskCodec(MaskCodec):
    """``smn-ctx``: context-modelled binary range coding of masks (module docstring).

    Payload: ``b"SMC1"``, flags (u8; bit 0: weight contexts used), number of tensors (u32),
    ones per tensor (u32 each), then the range coder's 32-bit words. Decoding needs the shapes
    (from the mask file) and, when bit 0 is set, the same backbone weights.

    Speed (pure numpy model + constriction's compiled coder): about 1-2 MB/s of packed mask, i.e.
    10-15 million weights per second on one core (see the storage note for the measured figures).
    """

    name = "smn-ctx"
    description = ("ours: adaptive context-modelled range coder (kernel zeros so far x |W| bin x sign of W), "
                   "constriction range coder")

    def _model(self):
        import constriction

        return constriction, constriction.stream.model.Bernoulli(perfect=False)

    @staticmethod
    def _check_weights(weights, shapes) -> None:
        if len(weights) != len(shapes):
            raise ValueError(f"smn-ctx: {len(weights)} weight tensors for {len(shapes)} masks")
        for i, (w, s) in enumerate(zip(weights, shapes)):
            if tuple(np.shape(w)) != tuple(s):
                raise ValueError(f"smn-ctx: weight tensor {i} has shape {tuple(np.shape(w))}, mask has {tuple(s)}")

    def encode(self, masks, weights=None) -> bytes:
        constriction, family = self._model()
        masks = [np.asarray(m).astype(np.bool_) for m in masks]
        shapes = [m.shape for m in masks]
        if weights is not None:
            self._check_weights(weights, shapes)
        flags = _FLAG_WEIGHTS if weights is not None else 0
        ones = [int(m.sum()) for m in masks]
        header = _CTX_MAGIC + struct.pack("<BI", flags, len(masks)) + struct.pack(f"<{len(masks)}I", *ones)
        encoder = constriction.stream.queue.RangeEncoder()
        for i, m in enumerate(masks):
            self._code_tensor(m, None if weights is None else weights[i], ones[i], family, encoder=encoder)
        words = encoder.get_compressed()
        return header + np.asarray(words, dtype="<u4").tobytes()

    def uses_weights(self, payload: bytes) -> bool:
        if len(payload) < 9 or payload[:4] != _CTX_MAGIC:
            raise CodecError("smn-ctx: payload does not start with the smn-ctx header")
        return bool(payload[4] & _FLAG_WEIGHTS)

    def decode(self, payload, shapes, weights=None) -> list[np.ndarray]:
        constriction, family = self._model()
        payload = bytes(payload)
        use_w = self.uses_weights(payload)
        (count,) = struct.unpack_from("<I", payload, 5)
        if count != len(shapes):
            raise CodecError(f"smn-ctx: payload holds {count} masks, the file lists {len(shapes)}")
        start = 9 + 4 * count
        if len(payload) < start or (len(payload) - start) % 4:
            raise CodecError(f"smn-ctx: payload of {len(payload)} bytes is truncated")
        ones = struct.unpack_from(f"<{count}I", payload, 9)
        if use_w and weights is None:
            raise ValueError("smn-ctx: this payload was coded with the backbone weights as context; pass the "
                             "backbone's weights to decode it")
        if use_w:
            self._check_weights(weights, shapes)
        for s, k in zip(shapes, ones):
            if k > int(np.prod(s, dtype=np.int64)):
                raise CodecError(f"smn-ctx: {k} ones for a mask of shape {tuple(s)}")
        words = np.frombuffer(payload, dtype="<u4", offset=start).astype(np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        out = []
        try:
            for i, s in enumerate(shapes):
                m = self._code_tensor(np.zeros(s, dtype=np.bool_), weights[i] if use_w else None, ones[i], family,
                                      decoder=decoder)
                out.append(m)
        except BaseException as exc:  # constriction raises on an exhausted or invalid stream
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise CodecError(f"smn-ctx: range-coded stream is corrupted ({type(exc).__name__}: {exc})") from None
        for m, s, k in zip(out, shapes, ones):
            if int(m.sum()) != k:
                raise CodecError(f"smn-ctx: decoded mask of shape {tuple(s)} has {int(m.sum())} ones, header says {k}"
                                 " (corrupted payload)")
        return out

    @staticmethod
    def _code_tensor(mask: np.ndarray, weight, ones: int, family, *, encoder=None, decoder=None) -> np.ndarray:
        """Encode ``mask`` (encoder given) or decode into a fresh array (decoder given), plane by plane.

        Planes are rows of a (K, units) array, so each plane's bits and contexts are contiguous; the counts
        are kept as integers and read as float64, which gives the very probabilities of the first version
        of this coder (payloads stay interchangeable).
        """
        shape = mask.shape
        n = mask.size
        if n == 0:
            return mask
        if ones == 0 or ones == n:  # the header's count determines the mask
            return np.full(shape, ones == n, dtype=np.bool_)
        units, k = _units_view(shape)
        planes = mask.reshape(units, k).T.copy() if encoder is not None else np.empty((k, units), dtype=np.bool_)
        wctx = (_weight_context(weight, units, k).T.astype(np.int64) * _Z_LEVELS if weight is not None
                else np.zeros((k, units), dtype=np.int64))
        nctx = _W_BINS * 2 * _Z_LEVELS
        prior = _PRIOR * (ones / n)
        ones_c = np.zeros(nctx, dtype=np.int64)
        seen_c = np.zeros(nctx, dtype=np.int64)
        zeros_so_far = np.zeros(units, dtype=np.int64)
        for j in range(k):
            ctx = wctx[j] + np.minimum(zeros_so_far, _Z_LEVELS - 1)
            p = (ones_c[ctx] + prior) / (seen_c[ctx] + _PRIOR)
            if encoder is not None:
                encoder.encode(planes[j].astype(np.int32), family, p)
            else:
                planes[j] = decoder.decode(family, p)
            col = planes[j]
            ones_c += np.bincount(ctx[col], minlength=nctx)
            seen_c += np.bincount(ctx, minlength=nctx)
            zeros_so_far += ~col
        return planes.T.reshape(shape)


def available_codecs() -> list[str]:
    """Names of every codec: ``"none"``, the library codecs, and ``"smn-ctx"``."""
    return _FACTORIES.names()


def get_codec(name: str) -> MaskCodec:
    """The codec registered under ``name`` (built on first use, then the same object).

    Raises:
        ValueError: on an unknown name (lists the allowed ones).
        ImportError: if the codec's library is not installed (names the package).
    """
    if name in _CODECS:
        return _CODECS[name]
    if name not in _FACTORIES:
        raise ValueError(f"codec {name!r} is not known; allowed: {', '.join(available_codecs())}")
    package = _FACTORIES.info(name)["package"]
    try:
        codec = _FACTORIES[name]()
    except ImportError as exc:
        if package is None:
            raise
        raise ImportError(f"codec {name!r} needs the package {package!r} ({exc})") from exc
    _CODECS[name] = codec
    return codec


# --------------------------------------------------------------------------------------------------
# measurement (App. C, Tables 6-7)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecMeasurement:
    """Size and speed of one codec on one payload.

    Attributes:
        codec: codec name.
        weights: number of weights coded.
        raw_bytes: uncompressed size (packed masks: ``ceil(weights / 8)``; fp32: ``4 * weights``).
        compressed_bytes: encoded size.
        encode_s, decode_s: wall seconds (best of ``repeats``).
    """

    codec: str
    weights: int
    raw_bytes: int
    compressed_bytes: int
    encode_s: float
    decode_s: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.compressed_bytes / self.weights

    @property
    def reduction_pct(self) -> float:
        """``100 * (1 - compressed / raw)`` (paper Tables 6-7 "Reduction (%)")."""
        return 100.0 * (1.0 - self.compressed_bytes / self.raw_bytes)

    @property
    def ratio_vs_fp32(self) -> float:
        """fp32 size of the same weights (``4 * weights`` bytes) over the compressed size."""
        return 4.0 * self.weights / self.compressed_bytes

    @property
    def encode_mb_s(self) -> float:
        """Throughput in MB (1e6 bytes) of *uncompressed* payload per second."""
        return self.raw_bytes / 1e6 / max(self.encode_s, 1e-12)

    @property
    def decode_mb_s(self) -> float:
        return self.raw_bytes / 1e6 / max(self.decode_s, 1e-12)


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure_mask_codec(name: str, masks: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None,
                       repeats: int = 3) -> CodecMeasurement:
    """Encode and decode ``masks`` with codec ``name``, check the round trip, time both (best of ``repeats``).

    Args:
        masks: bool arrays; weights: the backbone tensors (used by ``smn-ctx`` as context).

    Raises:
        ValueError: unknown codec; RuntimeError: if the decoded masks differ from the input.
    """
    codec = get_codec(name)
    masks = [np.asarray(m).astype(np.bool_) for m in masks]
    shapes = [m.shape for m in masks]
    enc_s, payload = _best_time(lambda: codec.encode(masks, weights), repeats)
    dec_s, decoded = _best_time(lambda: codec.decode(payload, shapes, weights), repeats)
    if any(not np.array_equal(a, b) for a, b in zip(masks, decoded)):
        raise RuntimeError(f"codec {name!r} did not reproduce the masks")
    n = sum(m.size for m in masks)
    return CodecMeasurement(name, n, (n + 7) // 8, len(payload), enc_s, dec_s)


def measure_byte_codec(name: str, weights: Sequence[np.ndarray], repeats: int = 3) -> CodecMeasurement:
    """Compress the fp32 bytes of ``weights`` (e.g. fully fine-tuned tensors) with a byte codec and time it.

    Raises:
        ValueError: if the codec cannot compress bytes (``smn-ctx`` codes masks only) or is unknown.
        RuntimeError: if decompression does not reproduce the bytes.
    """
    codec = get_codec(name)
    if not isinstance(codec, ByteCodec):
        allowed = ["none", *LIBRARY_CODECS]
        raise ValueError(f"codec {name!r} codes masks only; for fp32 weights use one of {', '.join(allowed)}")
    raw = b"".join(np.ascontiguousarray(np.asarray(w, dtype="<f4")).tobytes() for w in weights)
    enc_s, payload = _best_time(lambda: codec.compress(raw), repeats)
    dec_s, back = _best_time(lambda: codec.decompress(payload), repeats)
    if back != raw:
        raise RuntimeError(f"codec {name!r} did not reproduce the fp32 bytes")
    n = len(raw) // 4
    return CodecMeasurement(name, n, len(raw), len(payload), enc_s, dec_s)
