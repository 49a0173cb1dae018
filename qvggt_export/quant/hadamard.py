"""Hadamard matrices and the fast Walsh-Hadamard transform (pure math: tensors in, tensors out).

DSFQ's pre-global rotation (QuantVGGT, DESIGN.md section 1, step 1) multiplies activations by
``H = H_hat diag(v)``: a normalised Hadamard matrix of the channel size ``d`` and random signs ``v``.

Conventions (used by every caller: transforms, exporter, plugin):

* **Sizes.** ``d = 2^k * m`` where ``m = 1`` (pure Sylvester) or ``m`` is a *base order* that the
  Paley constructions give: Paley I for ``m = q + 1`` with ``q`` a prime power ``= 3 (mod 4)``
  (12, 20, 24, 28, 32, 44, 48, 60, ...), Paley II for ``m = 2(q + 1)`` with ``q`` a prime power
  ``= 1 (mod 4)`` (12, 20, 28, 36, 52, 60, ...). Among the decompositions of ``d`` the smallest ``m``
  is chosen (384 = 32 * 12, 768 = 64 * 12), which keeps the dense part of the transform small.
* **Kronecker order.** ``hadamard_matrix(2^k * m) = kron(H_{2^k}, H_m)`` (normalised), so a channel
  index ``c`` splits as ``c = i * m + r`` with ``i`` indexing the Sylvester part.
* **Row vectors.** :func:`fwht` returns exactly ``x @ hadamard_matrix(d)`` for ``x`` of shape
  ``[..., d]``. Sylvester matrices are symmetric, Paley I matrices are not, so in general
  ``H != H^T``; the inverse transform is ``y @ H^T`` (:func:`fwht_inverse`), since ``H H^T = I``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.quant import fwht_native

# Sylvester stages are applied as small dense +-1 matmuls of at most 2^4 = 16 points ("radix-16"): in eager
# PyTorch each butterfly stage is a separate pass with its own op overhead, and a few small GEMMs beat log2(d)
# of them (radix-2 butterflies measured ~20x slower at d = 4096 on a 2-core CPU).
_MAX_STAGE_BITS = 4
# Eager calls on large inputs run in row chunks of about this many elements (512 KiB in fp32, inside a 1 MiB L2)
# so all stages of a chunk stay in cache: one trip through main memory instead of one per stage.
_CHUNK_ELEMENTS = 1 << 17
# Whether fwht may use the compiled CPU kernel (qvggt_export.quant.fwht_native); a one-element list so that
# use_native_fwht() can switch it. The kernel itself is optional: fwht falls back to PyTorch without it.
_NATIVE = [True]
# Prime powers up to this bound are searched for Paley base orders (m <= 2 * (bound + 1)).
_MAX_PALEY_Q = 4096

_SUPPORTED_FORMS = (
    "2^k; or 2^k * m where m = q + 1 with q a prime power = 3 (mod 4) (Paley I: 12, 20, 24, 28, 44, ...) "
    "or m = 2(q + 1) with q a prime power = 1 (mod 4) (Paley II: 12, 20, 28, 36, 52, ...)"
)


# ---------------------------------------------------------------------------------------------------------------------
# Finite-field helpers for Paley's constructions (the quadratic character of GF(q), q = p^e).


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e`` for a prime ``p``, or ``None``."""
    if q < 2:
        return None
    p = next(f for f in range(2, q + 1) if q % f == 0)  # smallest factor is prime
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo the monic ``f`` over GF(p); coefficients lowest degree first."""
    a = a[:]
    deg_f = len(f) - 1
    for i in range(len(a) - 1, deg_f - 1, -1):
        c = a[i] % p
        if c:
            for j in range(deg_f + 1):
                a[i - deg_f + j] = (a[i - deg_f + j] - c * f[j]) % p
    return [c % p for c in a[:deg_f]] + [0] * (deg_f - len(a[:deg_f]))


def _poly_mul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % p
    return out


def _digits(value: int, p: int, e: int) -> list[int]:
    return [(value // p**i) % p for i in range(e)]


def _irreducible(p: int, e: int) -> list[int]:
    """A monic irreducible polynomial of degree ``e`` over GF(p) (first found by enumeration)."""
    for tail in range(p**e):
        f = _digits(tail, p, e) + [1]
        if f[0] == 0:
            continue  # divisible by x
        # Irreducible iff no monic factor of degree 1..e//2 divides it.
        has_factor = any(
            not any(_poly_mod(f, _digits(t, p, deg) + [1], p))
            for deg in range(1, e // 2 + 1)
            for t in range(p**deg)
        )
        if not has_factor:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # impossible: one always exists


@functools.lru_cache(maxsize=32)
def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[a, b] = chi(a - b)`` of GF(q), elements numbered by their base-p digits."""
    p, e = _prime_power(q)  # type: ignore[misc]  # callers pass prime powers only
    f = _irreducible(p, e) if e > 1 else [0, 1]
    squares = {sum(c * p**i for i, c in enumerate(_poly_mod(_poly_mul(_digits(a, p, e), _digits(a, p, e), p), f, p)))
               for a in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    digits = torch.tensor([_digits(a, p, e) for a in range(q)], dtype=torch.int64)  # [q, e]
    weights = torch.tensor([p**i for i in range(e)], dtype=torch.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p * weights).sum(-1)  # index of a - b
    return chi[diff]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 (q = 3 mod 4): ``H = I + S``, ``S = [[0, 1^T], [-1, Q]]`` is skew, so
    ``H H^T = I - S^2 = I + S S^T = (q + 1) I``."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) (q = 1 mod 4): the symmetric conference matrix ``C = [[0, 1^T], [1, Q]]``
    with each 0 replaced by ``[[1, -1], [-1, -1]]`` and each +-1 by ``+-[[1, 1], [1, -1]]``."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero)


def _paley_kind(m: int) -> tuple[int, int] | None:
    """``(1, q)`` or ``(2, q)`` when Paley I / II builds order ``m``; Paley I is preferred."""
    if m % 4 != 0:
        return None
    q = m - 1
    if q <= _MAX_PALEY_Q and _prime_power(q) is not None and q % 4 == 3:
        return 1, q
    q = m // 2 - 1
    if q <= _MAX_PALEY_Q and _prime_power(q) is not None and q % 4 == 1:
        return 2, q
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Public matrices.


def is_rotatable(n: int) -> bool:
    """Whether a Hadamard matrix of order ``n`` is available (:func:`hadamard_factors` succeeds)."""
    try:
        hadamard_factors(n)
    except QVGGTError:
        return False
    return True


def hadamard_factors(n: int) -> tuple[int, int]:
    """Split a Hadamard size into ``(2^k, m)`` with ``n = 2^k * m`` (see the module docstring).

    Args:
        n: Matrix order.

    Returns:
        ``(2^k, m)``: ``m == 1`` for powers of two, else the smallest Paley base order that works.

    Raises:
        QVGGTError: No supported construction gives order ``n``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise QVGGTError(f"Hadamard size must be a positive integer, got {n!r}; supported sizes: {_SUPPORTED_FORMS}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return n, 1
    m = odd
    while m <= n:
        if _paley_kind(m) is not None:
            return n // m, m
        m *= 2
    raise QVGGTError(f"no Hadamard matrix of order {n} is available; supported sizes: {_SUPPORTED_FORMS}")


@functools.lru_cache(maxsize=32)
def _integer_hadamard(n: int) -> torch.Tensor:
    """+-1 matrix of order ``n`` cached as int8 (4096^2 entries are 16 MiB, not 128 MiB)."""
    power, m = hadamard_factors(n)
    # Sylvester doubling [[H, H], [H, -H]]: H_{2^k} = H_2 (x) ... (x) H_2, symmetric.
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < power:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if m == 1:
        return h
    kind, q = _paley_kind(m)  # type: ignore[misc]  # hadamard_factors guarantees a construction
    base = (_paley1(q) if kind == 1 else _paley2(q)).to(torch.int8)
    return torch.kron(h, base)


def integer_hadamard(n: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix (int64) with ``H H^T = n I`` exactly.

    Args:
        n: Matrix order, ``2^k`` or ``2^k * m`` as in :func:`hadamard_factors`.

    Returns:
        ``[n, n]`` int64 tensor equal to ``kron(H_{2^k}, H_m)`` (Sylvester times Paley).

    Raises:
        QVGGTError: Unsupported order.
    """
    return _integer_hadamard(n).to(torch.int64)  # a copy: callers cannot mutate the cache


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised Hadamard matrix ``H`` with ``H H^T = I`` (``integer_hadamard(n) / sqrt(n)``).

    Args:
        n: Matrix order, ``2^k`` or ``2^k * m`` as in :func:`hadamard_factors`.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        ``[n, n]`` tensor; symmetric only when ``m`` is 1 or a Paley II order.

    Raises:
        QVGGTError: Unsupported order.
    """
    return (_integer_hadamard(n).to(torch.float64) / math.sqrt(n)).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random +-1 vector ``v`` of DSFQ's ``H = H_hat diag(v)``, reproducible from ``seed`` (CPU generator).

    Args:
        n: Length.
        seed: Seed of a private :class:`torch.Generator` (global RNG state is untouched).
        dtype: Floating dtype of the result.

    Returns:
        ``[n]`` tensor of +-1.
    """
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Fast transform.


def _stage_sizes(power: int) -> list[int]:
    """Split ``2^k`` into Sylvester stages: inner ones of ``2^_MAX_STAGE_BITS`` points, the outermost
    taking the remainder (1024 -> [4, 16, 16]). Measured here: a 16-point matmul on the contiguous
    last axis is the most efficient stage, and a small outer remainder is cheaper than evening the
    split out ([16, 8, 8] costs 1.5x [4, 16, 16])."""
    full, rest = divmod(power.bit_length() - 1, _MAX_STAGE_BITS)
    return ([2**rest] if rest else []) + [2**_MAX_STAGE_BITS] * full


def fwht_stages(d: int) -> tuple[list[int], int]:
    """How :func:`fwht` factors size ``d``: Sylvester stage sizes (outermost first) and the Paley order.

    ``hadamard_matrix(d) == kron(H_{s_0}, ..., H_{s_last}, H_m)`` (normalised) for ``(s, m) =
    fwht_stages(d)``; each stage costs ``2 s`` flops per element, the Paley factor ``2 m`` (none if
    ``m == 1``).

    Raises:
        QVGGTError: Unsupported size.
    """
    power, m = hadamard_factors(d)
    return _stage_sizes(power), m


def _is_graph_capture() -> bool:
    """True while tracing/exporting/compiling, where the eager row-chunk loop must not be recorded."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are computed in fp32: CPU half matmuls are slow and their sums lose precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _transform_rows(x: torch.Tensor, stages: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """``x [rows, d] @ kron(stage_0, ..., stage_last, base)`` with all factors symmetric except ``base``.

    With ``x`` viewed as ``[rows, f_0, ..., f_last, m]`` (row-major, the Kronecker index order), a
    factor acts on its own axis: ``y = x @ kron(A, B)`` is ``Y = A^T X B`` per row, and ``A^T = A``
    for Sylvester factors.
    """
    d = int(x.shape[-1])
    inner = 1
    if base is not None:
        inner = base.shape[0]
        x = (x.reshape(-1, inner) @ base).reshape(-1, d)
    for h in reversed(stages):
        f = h.shape[0]
        if inner == 1:
            x = (x.reshape(-1, f) @ h).reshape(-1, d)
        else:
            # Contract the Sylvester axis of [.., f, inner]: h is symmetric, so h @ X == h^T @ X.
            x = torch.matmul(h, x.reshape(-1, f, inner)).reshape(-1, d)
        inner *= f
    return x


def _prepare(d: int, dtype: torch.dtype, device: torch.device, normalize: bool,
             transpose: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    if device.type == "cpu" or _is_graph_capture():
        return _make_factors(d, dtype, device, normalize, transpose)
    # On a GPU, building the small factor matrices on the host and copying them over costs more than the
    # transform itself (a host-to-device copy per call); they are made once per size, dtype and device.
    return _cached_factors(d, dtype, device, normalize, transpose)


def _make_factors(d: int, dtype: torch.dtype, device: torch.device, normalize: bool,
                  transpose: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    power, m = hadamard_factors(d)
    # Normalised factors multiply to the normalised H; +-1 factors keep the unnormalised sums exact.
    make = hadamard_matrix if normalize else (lambda n, dt, dev: _integer_hadamard(n).to(dtype=dt, device=dev))
    stages = [make(f, dtype, device) for f in _stage_sizes(power)]
    base = None
    if m > 1:
        base = make(m, dtype, device)
        base = base.T.contiguous() if transpose else base
    return stages, base


_cached_factors = functools.lru_cache(maxsize=64)(_make_factors)  # read-only use: never handed to callers


def _check_vector(name: str, v: torch.Tensor | None, d: int) -> None:
    if v is not None and (v.dim() != 1 or int(v.shape[0]) != d):
        raise QVGGTError(f"{name} must have shape [{d}] (the last axis of x), got {list(v.shape)}")


def _native_eligible(x: torch.Tensor, pre: torch.Tensor | None, post: torch.Tensor | None) -> bool:
    """Whether the compiled CPU kernel may run: plain CPU tensors, no autograd, no graph capture."""
    if not _NATIVE[0]:
        return False
    tensors = [t for t in (x, pre, post) if t is not None]
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided for t in tensors):
        return False  # subclasses (fake/functional tensors) and other devices take the PyTorch path
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not _is_graph_capture()


@functools.lru_cache(maxsize=32)
def _native_base(m: int, dtype: torch.dtype, normalize: bool, transpose: bool) -> torch.Tensor:
    """The dense Paley factor as the kernel takes it (contiguous, row-major); cached, never handed out."""
    h = hadamard_matrix(m, dtype) if normalize else _integer_hadamard(m).to(dtype)
    return (h.T if transpose else h).contiguous()


def _apply_native(kernel: fwht_native.Kernel, x: torch.Tensor, work: torch.dtype, *, normalize: bool,
                  transpose: bool, pre: torch.Tensor | None, pre_divide: bool, post: torch.Tensor | None,
                  scalar: float | None) -> torch.Tensor:
    """:func:`_apply` through the compiled kernel (same arguments; see fwht_native for what it computes)."""
    d = int(x.shape[-1])
    power, m = hadamard_factors(d)
    flat = x.reshape(-1, d).to(work).contiguous()  # no copy for a contiguous fp32/fp64 input
    pre_w = None if pre is None else pre.to(work).contiguous()
    post_w = None if post is None else post.to(work).contiguous()
    if pre_w is not None and pre_divide:  # the inverse divides by post_scale; keep it a true division
        flat, pre_w = flat / pre_w, None
    rows = int(flat.shape[0])
    base = _native_base(m, work, normalize, transpose) if m > 1 else None
    out = kernel.empty(rows, d, work)
    scale = (1.0 / math.sqrt(power) if normalize else 1.0) * (1.0 if scalar is None else scalar)
    threads = max(1, min(torch.get_num_threads(), rows * d // fwht_native.MIN_ELEMENTS_PER_THREAD))
    kernel.transform(flat, out, power, m, pre_w, base, post_w, scale, threads)
    return out.to(x.dtype).reshape(x.shape)


def _apply(x: torch.Tensor, *, normalize: bool, transpose: bool, pre: torch.Tensor | None, pre_divide: bool,
           post: torch.Tensor | None, scalar: float | None) -> torch.Tensor:
    """``(((x * pre) or (x / pre)) @ M) * post * scalar`` with ``M`` = ``H``, ``H^T`` or their +-1 forms."""
    if x.dim() == 0:
        raise QVGGTError("fwht needs a tensor with at least one axis (the channels)")
    if not x.is_floating_point():
        raise QVGGTError(f"fwht needs a floating-point tensor, got {x.dtype}")
    d = int(x.shape[-1])  # a constant under tracing: it selects the matrices
    _check_vector("signs", pre if not pre_divide else post, d)
    _check_vector("post_scale", post if not pre_divide else pre, d)
    work = _work_dtype(x.dtype)
    if _native_eligible(x, pre, post):
        kernel = fwht_native.load()
        if kernel is not None:
            return _apply_native(kernel, x, work, normalize=normalize, transpose=transpose, pre=pre,
                                 pre_divide=pre_divide, post=post, scalar=scalar)
    stages, base = _prepare(d, work, x.device, normalize, transpose)

    def run(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(work)
        if pre is not None:
            rows = rows / pre.to(work) if pre_divide else rows * pre.to(work)
        y = _transform_rows(rows, stages, base)
        if post is not None:
            y = y * post.to(work)
        return y if scalar is None else y * scalar

    flat = x.reshape(-1, d)
    n_rows = flat.shape[0]
    # Row chunks keep a chunk in the CPU's cache through every stage; on a GPU they only multiply kernel launches
    # (measured on an H200 before this rule: 45 ms for 13740 x 4096 rows in chunks, against 9.5 ms for a dense
    # fp32 x @ H; benchmarks/results/gpu_check.md).
    chunk = max(1, _CHUNK_ELEMENTS // d) if x.device.type == "cpu" else n_rows
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, pre, post))
    if n_rows <= chunk or needs_grad or _is_graph_capture():
        return run(flat).to(x.dtype).reshape(x.shape)
    # Eager fast path: each chunk goes through every stage while it is still in cache.
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    for start in range(0, n_rows, chunk):
        out[start:start + chunk] = run(flat[start:start + chunk])
    return out.reshape(x.shape)


@contextlib.contextmanager
def use_native_fwht(enabled: bool) -> Iterator[None]:
    """Within the block, allow (``True``) or forbid (``False``) :func:`fwht`'s compiled CPU kernel.

    For benchmarks and tests that compare the two paths; the default is allowed. Not thread-local.
    """
    previous = _NATIVE[0]
    _NATIVE[0] = bool(enabled)
    try:
        yield
    finally:
        _NATIVE[0] = previous


def fwht_backend() -> str:
    """Which path eager CPU calls of :func:`fwht` take: ``"native (<library>)"`` or ``"pytorch (<why>)"``.

    Builds or loads the kernel on first use (see :mod:`qvggt_export.quant.fwht_native`).
    """
    if not _NATIVE[0]:
        return "pytorch (native kernel switched off by use_native_fwht(False))"
    state = fwht_native.status()
    return state if state.startswith("native") else f"pytorch (native kernel {state})"


def fwht(x: torch.Tensor, signs: torch.Tensor | None = None, post_scale: torch.Tensor | None = None,
         normalize: bool = True) -> torch.Tensor:
    """Fast Walsh-Hadamard transform over the last axis: ``((x * signs) @ H) * post_scale``.

    ``H = hadamard_matrix(d)`` for ``d = x.shape[-1]`` (row-vector convention, see the module
    docstring); the result equals the dense product up to float rounding. The Sylvester part costs
    ``O(d log d)``, the Paley part ``m`` multiply-adds per element.

    Two paths, equal up to float rounding (both within 1e-6 relative of the dense product in fp32): eager
    calls on plain CPU tensors without autograd run a compiled kernel (radix-2 butterflies, one row at a
    time in L1, rows over ``torch.get_num_threads()`` threads; :mod:`qvggt_export.quant.fwht_native`,
    built on first use); everything else (autograd, tracing/export, other devices, or no C++ compiler)
    runs PyTorch ops: radix-16 stages, each a small dense +-1 matmul, a fixed graph under tracing.
    :func:`fwht_backend` says which path is in use.

    In DSFQ terms the rotation is ``R = diag(signs) H`` and weights are folded with the same ``R``
    (``X W^T = (X R)(W R)^T``); ``post_scale = 1 / c`` adds the smoothing of DSFQ step 2. The paper's
    form ``H_hat diag(v)`` (signs after the transform) is ``fwht(x, post_scale=v)``.

    Half inputs are computed in fp32 and returned in their own dtype. Nothing is modified in place,
    so autograd flows to ``x``, ``signs`` and ``post_scale``; under ``torch.jit.trace``/ONNX export
    the graph is a fixed sequence of reshapes and matmuls.

    Args:
        x: ``[..., d]`` floating tensor, ``d`` a supported Hadamard size.
        signs: Optional ``[d]`` vector multiplied into ``x`` before the transform (``x diag(signs)``).
        post_scale: Optional ``[d]`` vector multiplied into the result per output channel.
        normalize: ``True`` for the orthonormal ``H``; ``False`` for the +-1 matrix ``sqrt(d) H``.

    Returns:
        Tensor of ``x``'s shape and dtype.

    Raises:
        QVGGTError: Unsupported size, non-float input, or ``signs``/``post_scale`` of the wrong shape.
    """
    return _apply(x, normalize=normalize, transpose=False, pre=signs, pre_divide=False, post=post_scale, scalar=None)


def fwht_inverse(y: torch.Tensor, signs: torch.Tensor | None = None, post_scale: torch.Tensor | None = None,
                 normalize: bool = True) -> torch.Tensor:
    """Inverse of :func:`fwht` called with the same arguments: ``((y / post_scale) @ H^T) * signs``.

    Uses ``H^-1 = H^T`` (``H`` orthonormal, but ``H^T != H`` when ``m`` is a Paley I order) and
    ``signs^-1 = signs`` for +-1 signs. With ``normalize=False`` the forward matrix is ``sqrt(d) H``,
    whose inverse is ``(sqrt(d) H)^T / d``.

    Args:
        y: ``[..., d]`` floating tensor.
        signs: The ``signs`` given to :func:`fwht` (entries +-1), or ``None``.
        post_scale: The ``post_scale`` given to :func:`fwht` (no zero entries), or ``None``.
        normalize: The ``normalize`` given to :func:`fwht`.

    Returns:
        Tensor of ``y``'s shape and dtype.

    Raises:
        QVGGTError: As :func:`fwht`.
    """
    scalar = None if normalize else 1.0 / (y.shape[-1] if y.dim() else 1)
    return _apply(y, normalize=normalize, transpose=True, pre=post_scale, pre_divide=True, post=signs, scalar=scalar)
