"""The 8-bit block-wise code of compressed optimizer state: ``fastopt.quantize_blockwise`` and
``fastopt.dequantize_blockwise`` against a NumPy reference written from the definition of the
code alone (below, in ``reference_quantize`` / ``reference_dequantize``), bit for bit, and the
code's stated error bounds.

The code. Blocks of 256 flat elements (C order); a block's scale ``absmax`` is the largest
``|x|`` over its finite elements, stored as 0 (every finite element then gets magnitude
code 0, a signed one keeping its sign bit) when it is below ``2**-126``. With ``E = 15``
(signed) or ``31`` (unsigned) a magnitude code ``c``
stands for 0 (``c == 0``), ``c/8 * 2**(1-E)`` (``c`` in 1..7) or ``(1 + f/8) * 2**(e-E)``
(``c = 8 e + f``, ``e >= 1``); the largest, ``8 E``, is 1.0. A finite element is encoded from
``y = |x| * (1.0f / absmax)`` in float32: below ``2**(1-E)`` as ``c = rint(y * 2**(E+2))``,
otherwise as the code of ``y`` with its float32 mantissa rounded to 3 bits (half up, carry
into the exponent), then ``c = min(c, 8 E)``. A signed byte is ``sign << 7 | c``, with
``0x7E | sign`` for infinities and ``0x7F`` for NaN (``0xFF`` reads as NaN too); an unsigned
byte is ``c``, ``0xFE`` for +inf, ``0xFF`` for NaN, and a negative finite value is code 0.
Decoding multiplies ``value(c)`` by ``absmax`` in float32, with the sign.
"""
import numpy as np
import pytest

import fastopt

BLOCK = 256
SIZES = [0, 1, 255, 256, 257, 1029]


# ---- the reference --------------------------------------------------------------------------

def _exponent_bias(signed):
    return 15 if signed else 31


def code_values(signed):
    """float32 value of every magnitude code 0..8E (exact: at most 4 significant bits)."""
    E = _exponent_bias(signed)
    c = np.arange(8 * E + 1)
    e, f = c // 8, c % 8
    v = np.where(e == 0, c / 8 * 2.0 ** (1 - E), (1 + f / 8) * 2.0 ** (e - E))
    return v.astype(np.float32)


def _magnitude_codes(y, E):
    """The magnitude code of each float32 ``y >= 0`` (y = |x| / absmax)."""
    y = y.astype(np.float32)
    c = np.zeros(y.shape, np.int64)
    low = y < np.float32(2.0 ** (1 - E))
    c[low] = np.rint((y[low] * np.float32(2.0 ** (E + 2))).astype(np.float64)).astype(np.int64)
    hi = ~low
    mant, ex = np.frexp(y[hi].astype(np.float64))  # y = mant * 2**ex, mant in [0.5, 1)
    k = ex.astype(np.int64) - 1                    # y = (2 mant) * 2**k, 2 mant in [1, 2)
    f = np.floor((2 * mant - 1) * 8 + 0.5).astype(np.int64)  # exact in float64; half up
    carry = f == 8
    k[carry] += 1
    f[carry] = 0
    c[hi] = 8 * (k + E) + f
    return np.minimum(c, 8 * E)


def reference_quantize(x, signed):
    """``(codes, absmax)`` of the array ``x`` (any float dtype, taken as float32)."""
    x = np.asarray(x)
    flat = x.astype(np.float32).reshape(-1)
    n = flat.size
    E = _exponent_bias(signed)
    nblocks = -(-n // BLOCK)
    absmax = np.zeros(nblocks, np.float32)
    codes = np.zeros(n, np.uint8)
    finite = np.isfinite(flat)
    for b in range(nblocks):
        sl = slice(BLOCK * b, BLOCK * (b + 1))
        xs, fin = flat[sl], finite[sl]
        m = np.abs(xs[fin]).max() if fin.any() else np.float32(0)
        if m < np.float32(2.0 ** -126):
            m = np.float32(0)
        absmax[b] = m
        out = np.zeros(xs.shape, np.int64)
        # magnitude code 0 for every finite element when the scale is 0
        mag = np.zeros(int(fin.sum()), np.int64)
        if m > 0:
            inv = np.float32(1) / np.float32(m)
            y = np.abs(xs[fin]) * inv
            mag = _magnitude_codes(y, E)
        if signed:  # the sign bit is kept, also on magnitude code 0
            out[fin] = (np.signbit(xs[fin]).astype(np.int64) << 7) | mag
        else:
            out[fin] = np.where(xs[fin] < 0, 0, mag)
        nan, inf = np.isnan(xs), np.isinf(xs)
        if signed:
            out[nan] = 0x7F
            out[inf] = 0x7E | (np.signbit(xs[inf]).astype(np.int64) << 7)
        else:
            out[nan] = 0xFF
            out[inf & (xs > 0)] = 0xFE
        codes[sl] = out.astype(np.uint8)
    return codes.reshape(x.shape), absmax


def reference_dequantize(codes, absmax, signed):
    """float32 values of ``codes`` (of their shape) with block scales ``absmax``."""
    codes = np.asarray(codes)
    c = codes.reshape(-1).astype(np.int64)
    E = _exponent_bias(signed)
    table = code_values(signed)
    scale = np.asarray(absmax, np.float32)[np.arange(c.size) // BLOCK]
    if signed:
        mag, neg = c & 0x7F, (c >> 7).astype(bool)
        inf, nan = mag == 0x7E, mag == 0x7F
    else:
        mag, neg = c, np.zeros(c.shape, bool)
        inf, nan = c == 0xFE, c == 0xFF
    finite = ~(inf | nan)
    assert (mag[finite] <= 8 * E).all(), "a code the encoder never writes"
    out = np.zeros(c.size, np.float32)
    out[finite] = table[mag[finite]] * scale[finite]
    out[inf] = np.inf
    out[nan] = np.nan
    out = np.where(neg, -out, out).astype(np.float32)
    return out.reshape(codes.shape)


# ---- the reference checks itself (no fastopt needed) ----------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_code_values_are_increasing_and_end_at_one(signed):
    v = code_values(signed)
    E = _exponent_bias(signed)
    assert v[0] == 0 and v[-1] == 1.0 and len(v) == 8 * E + 1
    assert (np.diff(v) > 0).all()
    # the bottom range continues the normal one with the same spacing at 2**(1-E)
    assert v[8] == np.float32(2.0 ** (1 - E)) and v[9] - v[8] == v[8] - v[7]


@pytest.mark.parametrize("signed", [True, False])
def test_the_reference_picks_the_nearest_code(signed):
    """In the normal range rounding the mantissa to 3 bits is rounding to the nearest code:
    check against a brute-force nearest search on many y."""
    E = _exponent_bias(signed)
    v = code_values(signed).astype(np.float64)
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.random(4000), 2.0 ** rng.uniform(1 - E, 0, 4000),
                        v[8:], (v[8:-1] + v[9:]) / 2]).astype(np.float32)
    c = _magnitude_codes(y, E)
    err = np.abs(v[c] - y)
    best = np.abs(v[None, :] - y.astype(np.float64)[:, None]).min(axis=1)
    np.testing.assert_array_equal(err, best)


# ---- fastopt against the reference ----------------------------------------------------------

def _fastopt():
    return fastopt.quantize_blockwise, fastopt.dequantize_blockwise


def _same_bits(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=what)


def _check(x, signed):
    """fastopt's codes, scales and decoded values are the reference's, bit for bit."""
    quantize, dequantize = _fastopt()
    codes, absmax = quantize(x, signed)
    rcodes, rabsmax = reference_quantize(x, signed)
    assert codes.dtype == np.uint8 and codes.shape == np.shape(x)
    assert absmax.dtype == np.float32 and absmax.shape == (-(-np.size(x) // BLOCK),)
    _same_bits(absmax, rabsmax, "absmax")
    nan = np.isnan(np.asarray(x, np.float32))
    if signed and nan.any():  # 0x7F is written; 0xFF would read as NaN as well
        assert np.isin(codes[nan], [0x7F, 0xFF]).all()
        codes_cmp = np.where(nan, rcodes, codes).astype(np.uint8)
    else:
        codes_cmp = codes
    _same_bits(codes_cmp, rcodes, "codes")
    values = dequantize(codes, absmax, signed)
    _same_bits(values, reference_dequantize(codes, absmax, signed), "dequantized")
    return codes, absmax, values


SCALES = [2.0 ** k for k in (-125, -100, -60, -30, -10, -3, 0, 1, 7, 30, 60, 100, 126)]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale", SCALES)
def test_random_data_of_many_scales(scale, signed):
    rng = np.random.default_rng(int(np.log2(scale)) + 200)
    x = rng.standard_normal((13, 97)) * scale
    # a few blocks of very different magnitudes, and heavy tails
    x[3] *= 1e-6
    x[7] *= rng.standard_cauchy(97)
    x = np.clip(x, -3e38, 3e38).astype(np.float32)
    if not signed:
        x = np.abs(x)
    _check(x, signed)


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_boundary(signed):
    """y at, just below and just above each midpoint between adjacent codes and at every
    code (at the midpoints: the even code in the linear range, the larger above it), in one
    block whose absmax is 1."""
    v = code_values(signed)
    mids = ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)
    y = np.concatenate([v, mids, np.nextafter(mids, 0), np.nextafter(mids, 2)])
    for start in range(0, y.size, BLOCK - 1):
        part = np.concatenate([[np.float32(1)], y[start:start + BLOCK - 1]])
        if signed:
            part = part * np.where(np.arange(part.size) % 3 == 1, -1, 1).astype(np.float32)
        _check(part.astype(np.float32), signed)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", SIZES)
def test_block_and_vector_tails(n, signed):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    if not signed:
        x = np.abs(x)
    codes, absmax, values = _check(x, signed)
    assert absmax.shape == (-(-n // BLOCK),)
    assert values.shape == (n,)
    # a 2-d array is flattened in C order: the same codes in its shape
    if n and n % 3 == 0:
        codes2, absmax2 = fastopt.quantize_blockwise(x.reshape(3, -1), signed)
        _same_bits(codes2.reshape(-1), codes, "2-d codes")
        _same_bits(absmax2, absmax, "2-d absmax")


@pytest.mark.parametrize("signed", [True, False])
def test_all_zero_and_tiny_blocks(signed):
    """A block of zeros and a block whose largest magnitude is below 2**-126 (subnormal
    float32 values) store absmax 0 and magnitude code 0 for every finite element (signed:
    with its sign bit), and decode to 0; the blocks around them are unaffected."""
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_normal(4 * BLOCK)).astype(np.float32)
    x[BLOCK:2 * BLOCK] = 0
    tiny = np.float32(2.0 ** -126)
    x[2 * BLOCK:3 * BLOCK] = np.nextafter(tiny, 0) * rng.random(BLOCK).astype(np.float32)
    if signed:
        x[2 * BLOCK:3 * BLOCK:2] *= -1
    codes, absmax, values = _check(x, signed)
    assert absmax[1] == 0 and absmax[2] == 0 and absmax[0] > 0 and absmax[3] > 0
    assert not (codes[BLOCK:3 * BLOCK] & (0x7F if signed else 0xFF)).any()
    if signed:
        np.testing.assert_array_equal(codes[BLOCK:3 * BLOCK] >> 7,
                                      np.signbit(x[BLOCK:3 * BLOCK]))
    assert not values[BLOCK:3 * BLOCK].any()
    # exactly 2**-126 is kept as a scale
    x[3 * BLOCK:] = 0
    x[3 * BLOCK + 5] = tiny
    codes, absmax, values = _check(x, signed)
    assert absmax[3] == tiny and values[3 * BLOCK + 5] == tiny


def test_nan_and_infinities_signed():
    x = np.linspace(-3, 2, 300).astype(np.float32)
    x[[0, 10]] = np.inf
    x[[1, 11]] = -np.inf
    x[[2, 12, 257]] = np.nan
    x[3] = -np.float32(np.nan)
    x[258] = np.inf  # in the second block, whose largest finite magnitude is small
    codes, absmax, values = _check(x, signed=True)
    assert codes[0] == codes[10] == codes[258] == 0x7E
    assert codes[1] == codes[11] == 0xFE
    assert codes[2] == codes[12] == codes[257] == 0x7F
    assert codes[3] in (0x7F, 0xFF)
    finite = np.isfinite(x)
    assert absmax[0] == np.abs(x[:256][finite[:256]]).max()
    assert absmax[1] == np.abs(x[256:][finite[256:]]).max()
    assert np.isposinf(values[[0, 10, 258]]).all() and np.isneginf(values[[1, 11]]).all()
    assert np.isnan(values[[2, 3, 12, 257]]).all()
    # 0xFF reads as NaN too
    assert np.isnan(fastopt.dequantize_blockwise(np.array([0xFF, 0x7F], np.uint8),
                                                 np.ones(1, np.float32), True)).all()


def test_nan_and_infinity_unsigned():
    x = np.linspace(0, 2, 300).astype(np.float32)
    x[[0, 20]] = np.inf
    x[[1, 270]] = np.nan
    x[5] = -0.5  # unsigned state is non-negative: a negative value encodes as 0
    codes, absmax, values = _check(x, signed=False)
    assert codes[0] == codes[20] == 0xFE and codes[1] == codes[270] == 0xFF
    assert codes[5] == 0 and values[5] == 0
    assert absmax[0] == np.abs(x[:256][np.isfinite(x[:256])]).max()
    assert np.isposinf(values[[0, 20]]).all() and np.isnan(values[[1, 270]]).all()


def test_a_block_of_only_nan_and_inf():
    x = np.full(BLOCK + 3, np.nan, np.float32)
    x[::2] = np.inf
    codes, absmax, values = _check(x, signed=True)
    assert not absmax.any()
    assert np.isposinf(values[::2]).all() and np.isnan(values[1::2]).all()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_input_dtypes(dtype, signed):
    """float16, bfloat16 and float64 input: the codes of its float32 values (exact for the
    16-bit ones; float64 data in float32's normal range)."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = ml_dtypes.bfloat16
    else:
        dt = np.dtype(dtype)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(1029) * 0.01).astype(dt)
    if not signed:
        x = np.abs(x)
    codes, absmax, _ = _check(x, signed)
    c32, a32 = fastopt.quantize_blockwise(x.astype(np.float32), signed)
    _same_bits(codes, c32, "codes vs float32 input")
    _same_bits(absmax, a32, "absmax vs float32 input")


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale", [2.0 ** -120, 1e-3, 1.0, 3e5, 2.0 ** 120])
def test_round_trip_error_bounds(scale, signed):
    """Per block: an element with |x| >= 2**(1-E) absmax comes back within 1/16 of its
    magnitude, one below within 2**(-3-E) absmax; the block's largest magnitude exactly.
    (A hair of slack for the float32 reciprocal of absmax, and float32's subnormal rounding
    of decoded values below 2**-126.)"""
    E = _exponent_bias(signed)
    rng = np.random.default_rng(11)
    x = rng.standard_normal(10 * BLOCK) * 2.0 ** rng.uniform(-40, 0, 10 * BLOCK)
    x = (x * scale).astype(np.float32)
    if not signed:
        x = np.abs(x)
    codes, absmax = fastopt.quantize_blockwise(x, signed)
    back = fastopt.dequantize_blockwise(codes, absmax, signed)
    slack = 1 + 2.0 ** -20
    for b in range(absmax.size):
        xs = x[b * BLOCK:(b + 1) * BLOCK].astype(np.float64)
        ys = back[b * BLOCK:(b + 1) * BLOCK].astype(np.float64)
        m = float(absmax[b])
        assert m == np.abs(xs).max()
        big = np.abs(xs) >= 2.0 ** (1 - E) * m
        err = np.abs(ys - xs)
        # plus half of float32's subnormal spacing: decoded values below 2**-126 round there
        sub = 2.0 ** -150
        assert (err[big] <= np.abs(xs[big]) / 16 * slack + sub).all(), b
        assert (err[~big] <= 2.0 ** (-3 - E) * m * slack + sub).all(), b
        top = np.argmax(np.abs(xs))
        assert ys[top] == xs[top]
        assert (np.sign(ys[big]) == np.sign(xs[big])).all()


def test_reference_round_trip_bounds_hold():
    """The same bounds on the reference itself, so that they are checked before fastopt
    has the functions too."""
    for signed in (True, False):
        E = _exponent_bias(signed)
        rng = np.random.default_rng(5)
        x = (rng.standard_normal(4 * BLOCK) * 2.0 ** rng.uniform(-30, 0, 4 * BLOCK))
        x = x.astype(np.float32)
        if not signed:
            x = np.abs(x)
        codes, absmax = reference_quantize(x, signed)
        back = reference_dequantize(codes, absmax, signed).astype(np.float64)
        m = absmax[np.arange(x.size) // BLOCK].astype(np.float64)
        xs = x.astype(np.float64)
        big = np.abs(xs) >= 2.0 ** (1 - E) * m
        err = np.abs(back - xs)
        assert (err[big] <= np.abs(xs[big]) / 16 * (1 + 2.0 ** -20)).all()
        assert (err[~big] <= 2.0 ** (-3 - E) * m[~big] * (1 + 2.0 ** -20)).all()
