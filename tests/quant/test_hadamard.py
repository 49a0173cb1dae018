"""Hadamard matrices and the fast transform: exact constructions, fwht == x @ H, inverse, dtypes, autograd.

The transform tests run on both of fwht's paths (``backend`` fixture): the compiled CPU kernel
(qvggt_export.quant.fwht_native, skipped with the reason where it cannot be built) and the PyTorch ops.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvggt_export.errors import QVGGTError
from qvggt_export.quant import fwht_native
from qvggt_export.quant import hadamard as hm
from qvggt_export.quant.hadamard import (
    fwht,
    fwht_backend,
    fwht_inverse,
    hadamard_factors,
    hadamard_matrix,
    integer_hadamard,
    random_signs,
    use_native_fwht,
)

POWERS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
# 2^k * m sizes: DINOv2 ViT-S/B (384, 768), Paley I (12, 20, 24 = 2 * 12, 44, 60), Paley II (36),
# prime-power fields GF(27) (28), GF(25) (52), GF(49) (100).
MIXED = [12, 20, 24, 28, 36, 44, 52, 60, 100, 384, 768, 320, 224]


@pytest.fixture(params=["native", "pytorch"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with fwht's compiled kernel allowed (and available) or forbidden."""
    if request.param == "native" and fwht_native.load() is None:
        pytest.skip(f"native FWHT kernel {fwht_native.status()}")
    with use_native_fwht(request.param == "native"):
        yield request.param


def _exact_gram(h: torch.Tensor) -> torch.Tensor:
    # +-1 entries and sums below 2^53: float64 matmul is exact integer arithmetic (and BLAS-fast).
    return h.to(torch.float64) @ h.to(torch.float64).T


@pytest.mark.parametrize("n", POWERS[:-1] + MIXED)
def test_integer_hadamard_is_exactly_orthogonal(n: int) -> None:
    h = integer_hadamard(n)
    assert h.dtype == torch.int64 and h.shape == (n, n)
    assert torch.all(h.abs() == 1)
    assert torch.equal(_exact_gram(h), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize(("q", "kind"), [(3, 1), (7, 1), (11, 1), (19, 1), (23, 1), (27, 1), (43, 1), (59, 1),
                                         (5, 2), (9, 2), (13, 2), (17, 2), (25, 2)])
def test_paley_constructions_directly(q: int, kind: int) -> None:
    # Each construction at its own order, including those hadamard_factors never picks (24 via q = 23).
    h = hm._paley1(q) if kind == 1 else hm._paley2(q)
    n = q + 1 if kind == 1 else 2 * (q + 1)
    assert torch.equal(_exact_gram(h), n * torch.eye(n, dtype=torch.float64))
    # Paley I is I + skew, Paley II is symmetric: the reason fwht_inverse needs H^T.
    assert torch.equal(h, h.T) == (kind == 2)


def test_small_paley_matrix_by_hand() -> None:
    # q = 3: Jacobsthal Q[a, b] = chi(a - b) over GF(3), chi(1) = 1, chi(2) = -1, so
    # Q = [[0, -1, 1], [1, 0, -1], [-1, 1, 0]]; H = I + [[0, 1^T], [-1, Q]].
    expected = torch.tensor([[1, 1, 1, 1],
                             [-1, 1, -1, 1],
                             [-1, 1, 1, -1],
                             [-1, -1, 1, 1]])
    assert torch.equal(hm._paley1(3), expected)


@pytest.mark.parametrize(("n", "factors"), [(1024, (1024, 1)), (4096, (4096, 1)), (384, (32, 12)), (768, (64, 12)),
                                            (24, (2, 12)), (28, (1, 28)), (320, (16, 20)), (12, (1, 12))])
def test_hadamard_factors_prefers_smallest_base(n: int, factors: tuple[int, int]) -> None:
    assert hadamard_factors(n) == factors


def test_hadamard_is_kron_of_sylvester_and_base() -> None:
    assert torch.equal(integer_hadamard(768), torch.kron(integer_hadamard(64), integer_hadamard(12)))


@pytest.mark.parametrize("n", [3, 6, 10, 92, 2 * 3 * 5 * 7, 0, -4])
def test_unsupported_size_names_n_and_forms(n: int) -> None:
    with pytest.raises(QVGGTError, match=rf"{n}.*2\^k.*Paley"):
        hadamard_matrix(n)


def test_non_integer_size_is_rejected() -> None:
    with pytest.raises(QVGGTError, match="positive integer"):
        hadamard_factors(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [64, 384, 1024])
def test_hadamard_matrix_is_orthonormal(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert hadamard_matrix(n, torch.float16).dtype == torch.float16


def test_integer_hadamard_copies_the_cache() -> None:
    h = integer_hadamard(8)
    h.zero_()
    assert torch.all(integer_hadamard(8).abs() == 1)


def test_random_signs_are_seeded_pm1_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = random_signs(4096, 0), random_signs(4096, 0), random_signs(4096, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 0.1  # balanced, not all one sign
    assert random_signs(8, 3, torch.float64).dtype == torch.float64


# --------------------------------------------------------------------------------------------------------------------
# fwht == x @ H


def _paths() -> list[bool]:
    """``use_native_fwht`` settings to check: the kernel where it is available, and always the PyTorch path."""
    return [True, False] if fwht_native.load() is not None else [False]


# The dense references below are the expensive part (d = 4096): one reference, both paths checked against it.
@pytest.mark.parametrize("d", POWERS[6:] + MIXED)
def test_fwht_matches_dense_float64(d: int) -> None:
    x = torch.randn(3, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    ref = x @ hadamard_matrix(d)
    for native in _paths():
        with use_native_fwht(native):
            assert torch.allclose(fwht(x), ref, atol=1e-12, rtol=0), f"native={native}"


@pytest.mark.parametrize("d", POWERS[6:] + [12, 24, 384, 768, 320, 224])
def test_fwht_matches_dense_float32(d: int) -> None:
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(d))
    ref = x.double() @ hadamard_matrix(d)  # exact transform of the same fp32 input
    dense_err = ((x @ hadamard_matrix(d, torch.float32)).double() - ref).abs().max().item()
    for native in _paths():
        with use_native_fwht(native):
            err = (fwht(x).double() - ref).abs().max().item()
        # 1e-6 relative to the output scale (a few fp32 ulps; observed <= 8.0e-7 at |y| ~ 4.5 on the PyTorch path,
        # <= 7.6e-7 on the kernel's), and no worse than the dense fp32 product it replaces (observed 1.1e-6 .. 1.6e-6).
        assert err <= 1e-6 * ref.abs().max().item(), f"native={native}: max |fwht - x @ H| = {err:.2e}"
        assert err <= 1.5 * dense_err, f"native={native}: fwht {err:.2e} vs dense fp32 {dense_err:.2e}"


def test_fwht_signs_post_scale_and_unnormalised_semantics(backend: str) -> None:
    d = 384
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, d, dtype=torch.float64, generator=gen)
    signs = random_signs(d, 5, torch.float64)
    post = torch.rand(d, dtype=torch.float64, generator=gen) + 0.5
    h = hadamard_matrix(d)
    assert torch.allclose(fwht(x, signs, post), ((x * signs) @ h) * post, atol=1e-12)
    assert torch.allclose(fwht(x, signs=signs), (x @ torch.diag(signs)) @ h, atol=1e-12)
    assert torch.allclose(fwht(x, post_scale=post), (x @ h) @ torch.diag(post), atol=1e-12)
    assert torch.allclose(fwht(x, normalize=False), x @ integer_hadamard(d).double(), atol=1e-10)
    # Signs before the transform are not the same as signs after it (the convention matters).
    assert not torch.allclose(fwht(x, signs=signs), fwht(x, post_scale=signs), atol=1e-3)


@pytest.mark.parametrize("d", [12, 64, 768, 4096])
@pytest.mark.parametrize("normalize", [True, False])
def test_fwht_inverse_round_trip(d: int, normalize: bool, backend: str) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(9, d, dtype=torch.float64, generator=gen)
    signs = random_signs(d, 1, torch.float64)
    post = torch.rand(d, dtype=torch.float64, generator=gen) + 0.5
    y = fwht(x, signs, post, normalize=normalize)
    assert torch.allclose(fwht_inverse(y, signs, post, normalize=normalize), x, atol=1e-12)
    assert torch.allclose(fwht_inverse(fwht(x)), x, atol=1e-12)


def test_inverse_needs_the_transpose_for_paley_sizes(backend: str) -> None:
    # 768 = 64 x 12 with a Paley I (non-symmetric) factor: applying H twice is not the identity,
    # applying H then H^T is. For a Sylvester size H is its own inverse.
    x = torch.randn(4, 768, dtype=torch.float64)
    assert not torch.allclose(fwht(fwht(x)), x, atol=1e-3)
    assert torch.allclose(fwht_inverse(fwht(x)), x, atol=1e-12)
    assert torch.allclose(fwht_inverse(x), x @ hadamard_matrix(768).T, atol=1e-12)
    z = torch.randn(4, 1024, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(z)), z, atol=1e-12)


@given(d=st.sampled_from([1, 2, 16, 12, 20, 48, 96, 128]), rows=st.integers(0, 5), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_fwht_is_an_isometry(d: int, rows: int, seed: int) -> None:
    x = torch.randn(rows, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = fwht(x)
    assert y.shape == x.shape
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)


def test_chunked_eager_path_equals_single_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(100, 768)
    monkeypatch.setattr(hm, "_CHUNK_ELEMENTS", 768 * 7)  # 15 chunks, the last one partial
    chunked = fwht(x)
    monkeypatch.setattr(hm, "_CHUNK_ELEMENTS", 1 << 40)
    assert torch.equal(chunked, fwht(x))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 5e-2),
                                            (torch.float16, 5e-3)])
def test_fwht_preserves_dtype_and_shape(dtype: torch.dtype, tol: float, backend: str) -> None:
    x = torch.randn(2, 3, 384, dtype=torch.float64).to(dtype)
    y = fwht(x, random_signs(384, 0, dtype))
    assert y.dtype == dtype and y.shape == x.shape
    ref = (x.double() * random_signs(384, 0, torch.float64)) @ hadamard_matrix(384)
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_fwht_on_a_single_vector(backend: str) -> None:
    x = torch.randn(64, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(64), atol=1e-12)


def test_fwht_rejects_bad_inputs(backend: str) -> None:
    with pytest.raises(QVGGTError, match="signs must have shape"):
        fwht(torch.randn(2, 64), signs=torch.ones(32))
    with pytest.raises(QVGGTError, match="post_scale must have shape"):
        fwht(torch.randn(2, 64), post_scale=torch.ones(2, 64))
    with pytest.raises(QVGGTError, match="floating-point"):
        fwht(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(QVGGTError, match="order 6 "):
        fwht(torch.randn(2, 6))


def test_fwht_is_differentiable() -> None:
    d = 24
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, d, dtype=torch.float64, generator=gen, requires_grad=True)
    signs = random_signs(d, 0, torch.float64).requires_grad_()
    post = (torch.rand(d, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(fwht, (x, signs, post))
    # A large input that would take the chunked eager path still gets gradients: d/dx <w, x H> = w H^T.
    big = torch.randn(200, 768, requires_grad=True)
    w = torch.randn(200, 768)
    (fwht(big) * w).sum().backward()
    assert torch.allclose(big.grad.double(), w.double() @ hadamard_matrix(768).T, atol=1e-5)


def test_fwht_traces_with_torch_jit() -> None:
    x = torch.randn(40, 768)
    traced = torch.jit.trace(lambda t: fwht(t), (x,))
    other = torch.randn(40, 768)
    assert torch.allclose(traced(other), other.double().matmul(hadamard_matrix(768)).float(), atol=1e-5)
    # The trace is the single-pass graph, not 40 / chunk copies of it.
    assert len(list(traced.graph.findAllNodes("aten::matmul"))) <= 4


def test_fwht_exports_to_onnx_and_runs_in_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Rotate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("signs", random_signs(384, 0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fwht(x, self.signs)

    x = torch.randn(5, 384)
    path = tmp_path / "fwht.onnx"
    torch.onnx.export(Rotate(), (x,), str(path), dynamo=False, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(out), fwht(x, random_signs(384, 0)), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# The compiled CPU kernel (qvggt_export.quant.fwht_native)

COMPILER = shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(COMPILER is None or os.environ.get(fwht_native.ENV_DISABLE) == "0",
                    reason="no C++ compiler (or QVGGT_FWHT_NATIVE=0): fwht runs its PyTorch path")
def test_native_kernel_is_built_where_a_compiler_exists() -> None:
    # Guards against a silent fallback: with a compiler present the fast path must really be in use.
    assert fwht_native.load() is not None, fwht_native.status()
    assert fwht_backend().startswith("native (")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records (n, m) of every native kernel call."""
    if fwht_native.load() is None:
        pytest.skip(f"native FWHT kernel {fwht_native.status()}")
    seen: list[tuple[int, int]] = []
    original = fwht_native.Kernel.transform

    def spy(self, x, y, n, m, *args):  # noqa: ANN001, ANN202
        seen.append((n, m))
        return original(self, x, y, n, m, *args)

    monkeypatch.setattr(fwht_native.Kernel, "transform", spy)
    return seen


def test_native_path_only_where_allowed(calls: list[tuple[int, int]]) -> None:
    x = torch.randn(6, 768)
    fwht(x)
    assert calls == [(64, 12)]  # 64 Sylvester points of 12 (the Paley factor), all in the kernel
    fwht(x.requires_grad_())  # autograd: PyTorch ops
    with torch.no_grad():
        fwht(x)
    assert len(calls) == 2
    with use_native_fwht(False):
        fwht(torch.randn(3, 64))
    torch.jit.trace(lambda t: fwht(t), (torch.randn(2, 64),), check_trace=False)  # (the check reruns eagerly)
    assert len(calls) == 2
    fwht(torch.randn(2, 3, 4096).transpose(0, 1))  # non-contiguous input: copied, then the kernel
    assert calls[-1] == (4096, 1)


@pytest.mark.parametrize("d", POWERS + MIXED + [256 * 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_and_pytorch_paths_agree_with_dense(d: int, dtype: torch.dtype) -> None:
    if fwht_native.load() is None:
        pytest.skip(f"native FWHT kernel {fwht_native.status()}")
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, dtype=torch.float64, generator=gen).to(dtype)
    signs, post = random_signs(d, d, dtype), (torch.rand(d, dtype=torch.float64, generator=gen) + 0.5).to(dtype)
    h = hadamard_matrix(d) if d <= 1024 else None  # larger sizes: dense-checked in test_fwht_matches_dense_*
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for normalize in (True, False):
        native = fwht(x, signs, post, normalize=normalize)
        with use_native_fwht(False):
            torch_path = fwht(x, signs, post, normalize=normalize)
        scale = 1.0 if normalize else d**0.5
        bound = tol * torch_path.abs().max().item()
        assert (native - torch_path).abs().max().item() <= bound
        if h is not None:
            ref = ((x.double() * signs.double()) @ h) * post.double() * scale
            assert (native.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
        back = fwht_inverse(native, signs, post, normalize=normalize)
        assert (back.double() - x.double()).abs().max().item() <= 10 * tol * x.abs().max().item()


def test_native_result_does_not_depend_on_thread_count() -> None:
    if fwht_native.load() is None:
        pytest.skip(f"native FWHT kernel {fwht_native.status()}")
    x = torch.randn(67, 4096)  # 67 rows: 2 threads split it unevenly
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fwht(x, random_signs(4096, 0))
        torch.set_num_threads(3)
        three = fwht(x, random_signs(4096, 0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


@pytest.mark.parametrize("d", [768, 4096, 8])
def test_native_leaves_inputs_untouched(d: int, backend: str) -> None:
    x = torch.randn(9, d)
    signs, post = random_signs(d, 1), torch.rand(d) + 0.5
    copies = [t.clone() for t in (x, signs, post)]
    y = fwht(x, signs, post)
    assert all(torch.equal(a, b) for a, b in zip((x, signs, post), copies, strict=True))
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(fwht_inverse(y, signs, post), fwht_inverse(y.clone(), signs, post))


def test_build_without_a_working_compiler_reports_why(tmp_path) -> None:
    kernel, reason = fwht_native.build(tmp_path, None)
    assert kernel is None and "no C++ compiler" in reason
    broken = shutil.which("false")
    if broken is None:
        pytest.skip("no 'false' executable to stand in for a failing compiler")
    kernel, reason = fwht_native.build(tmp_path / "cache", broken)
    assert kernel is None and "failed" in reason
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_build_compiles_once_and_reuses_the_cache(tmp_path) -> None:
    kernel, reason = fwht_native.build(tmp_path, COMPILER)
    assert kernel is not None, reason
    stamp = kernel.path.stat().st_mtime_ns
    again, _ = fwht_native.build(tmp_path, COMPILER)
    assert again is not None and again.path == kernel.path and again.path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [kernel.path.name]


def test_environment_switch_disables_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fwht_native, "_state", {})
    monkeypatch.setenv(fwht_native.ENV_DISABLE, "0")
    assert fwht_native.load() is None
    assert fwht_backend() == f"pytorch (native kernel unavailable: disabled by {fwht_native.ENV_DISABLE}=0)"
    x = torch.randn(4, 4096, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(4096), atol=1e-12)
