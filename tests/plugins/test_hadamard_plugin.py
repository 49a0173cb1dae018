"""The Hadamard TensorRT plugin and CUDA kernel, as far as a machine without a GPU can check them.

Verified here: the creator registers (idempotently) with TensorRT-RTX; a TensorRT-RTX engine for SM89 builds
on the CPU from an ONNX model with the plugin-form node (so TensorRT ran the plugin's build-time methods);
those methods answer shape/type/format queries as documented; the CUDA kernel compiles for sm_80..sm_120;
its per-row algorithm, built for the host, matches ``fwht``. NOT verified here: ``enqueue`` and the kernel
on a GPU (no CUDA device), inference through the engine.

Everything that makes TensorRT-RTX's ONNX parser create a plugin runs in a subprocess: without the
``libtensorrt_rtx.so`` link the parser aborts the process (SIGABRT), which must not take pytest down.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qvggt_export.errors import MissingDependencyError
from qvggt_export.export import hadamard_onnx
from qvggt_export.plugins import CSRC_DIR, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, register
from qvggt_export.quant.hadamard import fwht, hadamard_factors, integer_hadamard, random_signs

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
requires_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX not installed (pip install 'qvggt-export[rtx]')")
KERNEL = CSRC_DIR / "hadamard_kernel.cu"
SUBPROCESS_TIMEOUT = 120


def _run_python(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. A crash (e.g. SIGABRT) fails the test."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, (f"subprocess exited with {proc.returncode} (negative: killed by that signal)\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_identity_matches_the_exporter_contract() -> None:
    assert (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) == (
        hadamard_onnx.HADAMARD_OP, hadamard_onnx.PLUGIN_VERSION, hadamard_onnx.PLUGIN_NAMESPACE)


def test_package_imports_without_tensorrt_or_torch(tmp_path: Path) -> None:
    found = _run_python("""
        import json, sys
        import qvggt_export.plugins
        print(json.dumps({m: m in sys.modules for m in ("tensorrt_rtx", "tensorrt", "torch")}))
    """, tmp_path)
    assert found == {"tensorrt_rtx": False, "tensorrt": False, "torch": False}


def test_register_without_tensorrt_raises_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes both find_spec and import fail, as for an absent package.
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="not installed"):
        register("auto")
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        register("trt")


@requires_rtx
@pytest.mark.rtx
def test_register_is_visible_and_idempotent(tmp_path: Path) -> None:
    got = _run_python("""
        import json
        import tensorrt_rtx as trt
        from qvggt_export.plugins import register, is_registered
        registry = trt.get_plugin_registry()
        before = registry.get_creator("Hadamard", "1", "qvggt") is not None
        names = [register("rtx"), register("rtx"), register("auto")]
        creator = registry.get_creator("Hadamard", "1", "qvggt")
        ours = [c for c in registry.all_creators if c.name == "Hadamard" and c.plugin_namespace == "qvggt"]
        print(json.dumps({"before": before, "names": names, "found": creator is not None,
                          "fields": [f.name for f in creator.field_names], "count": len(ours),
                          "is_registered": is_registered("rtx")}))
    """, tmp_path)
    assert got == {"before": False, "names": ["rtx", "rtx", "rtx"], "found": True, "fields": ["size"], "count": 1,
                   "is_registered": True}


@pytest.mark.slow
@requires_rtx
@pytest.mark.rtx
def test_rtx_engine_with_the_plugin_builds_on_cpu(tmp_path: Path) -> None:
    got = _run_python("""
        import json
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from qvggt_export.engine import build_engine
        from qvggt_export.engine.backend import _RTX_LIB_UNVERSIONED, _rtx_libs_dir
        from qvggt_export.export.hadamard_onnx import add_to_model, emit_hadamard
        from qvggt_export.plugins import register

        d = 64  # images [1, S, 3, 8, 64]: the Hadamard runs over W
        shape = [1, "S", 3, 8, d]
        rng = np.random.default_rng(0)
        pre = numpy_helper.from_array((rng.integers(0, 2, d) * 2 - 1).astype(np.float32), "pre")
        post = numpy_helper.from_array(rng.uniform(0.5, 2.0, d).astype(np.float32), "post")
        graph = helper.make_graph([], "hadamard_plugin",
                                  [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                                  initializer=[pre, post])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        add_to_model(model, emit_hadamard("images", "y", d, "pre", "post", prefix="h/", variant="plugin"))
        onnx.checker.check_model(model)
        onnx.save(model, "m.onnx")

        register("rtx")
        result = build_engine("m.onnx", "m.engine", "rtx-sm89")
        engine = open("m.engine", "rb").read()
        link = _rtx_libs_dir() / _RTX_LIB_UNVERSIONED
        log = result.log_path.read_text()
        print(json.dumps({"plugin_ops": list(result.plugin_ops), "target_sms": list(result.target_sms),
                          "size": result.size_bytes, "seconds": result.build_seconds,
                          "has_name": b"Hadamard" in engine, "has_namespace": b"qvggt" in engine,
                          "link": link.is_symlink() and link.resolve().name == "libtensorrt_rtx.so.1",
                          "created": "Successfully created plugin: Hadamard" in log,
                          "custom_layer": "LayerType: custom_layer" in log, "input_shape": list(result.input_shape)}))
    """, tmp_path)
    # Observed on a 2-core CPU: ~0.06 s build, 11.5 kB engine.
    assert got["plugin_ops"] == ["qvggt::Hadamard"]
    assert got["target_sms"] == ["SM89"]
    assert got["has_name"] and got["has_namespace"]
    assert got["created"] and got["custom_layer"], "TensorRT did not instantiate the plugin"
    assert got["link"], "build_engine should have created libtensorrt_rtx.so -> libtensorrt_rtx.so.1"
    assert got["input_shape"] == [1, -1, 3, 8, 64]
    assert 0 < got["size"] < 1_000_000


# ---------------------------------------------------------------------------------------------------------------------
# Build-time methods called directly (no registry, no parser: safe in-process).


@pytest.fixture(scope="module")
def rtx():
    if not HAS_RTX:
        pytest.skip("TensorRT-RTX not installed (pip install 'qvggt-export[rtx]')")
    import tensorrt_rtx

    return tensorrt_rtx


def _desc(trt, dims: tuple[int, ...], dtype, fmt=None, bounds: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.dims = trt.Dims(dims)
    desc.desc.type = dtype
    desc.desc.format = fmt if fmt is not None else trt.TensorFormat.LINEAR
    lo, hi = bounds if bounds is not None else (dims, dims)
    desc.min, desc.max = trt.Dims(lo), trt.Dims(hi)
    return desc


def _plugin(trt, size: int = 64, phase=None):
    from qvggt_export.plugins.hadamard_plugin import plugin_classes

    _, creator_class = plugin_classes(trt)
    fields = trt.PluginFieldCollection([trt.PluginField("size", np.array([size], np.int32), trt.PluginFieldType.INT32)])
    return creator_class().create_plugin("h", fields, phase if phase is not None else trt.TensorRTPhase.BUILD)


@pytest.mark.rtx
def test_plugin_identity_clone_and_fields(rtx) -> None:
    plugin = _plugin(rtx, 1024)
    assert (plugin.plugin_name, plugin.plugin_version, plugin.plugin_namespace, plugin.num_outputs) == (
        "Hadamard", "1", "qvggt", 1)
    clone = plugin.clone()
    assert clone is not plugin
    assert (clone.plugin_namespace, clone.size, clone.timing_cache_id) == ("qvggt", 1024, plugin.timing_cache_id)
    (field,) = list(plugin.get_fields_to_serialize())
    assert field.name == "size" and np.asarray(field.data).tolist() == [1024]
    assert plugin.get_workspace_size([], []) == 0 and plugin.get_valid_tactics() == []


@pytest.mark.rtx
def test_create_plugin_rejects_bad_fields(rtx) -> None:
    from qvggt_export.errors import QVGGTError
    from qvggt_export.plugins.hadamard_plugin import plugin_classes

    creator = plugin_classes(rtx)[1]()
    with pytest.raises(QVGGTError, match="field 'size'"):
        creator.create_plugin("h", rtx.PluginFieldCollection([]), rtx.TensorRTPhase.BUILD)
    with pytest.raises(QVGGTError, match="supported sizes"):
        _plugin(rtx, 6)  # no Hadamard matrix of order 6 exists


@pytest.mark.rtx
def test_output_type_and_format_queries(rtx) -> None:
    plugin = _plugin(rtx)
    dt, lin = rtx.DataType, rtx.TensorFormat.LINEAR
    for x_type in (dt.FLOAT, dt.HALF, dt.BF16):
        assert plugin.get_output_data_types([x_type, dt.FLOAT, dt.FLOAT]) == [x_type]

    def ok(pos: int, x_type, other, fmt=lin) -> bool:
        """supports_format_combination at ``pos`` with x (and y) of ``x_type`` and ``other`` at ``pos`` if > 0."""
        types = [x_type, dt.FLOAT, dt.FLOAT, x_type]
        if pos > 0:
            types[pos] = other
        dims = [(2, 64), (64,), (64,), (2, 64)]
        in_out = [_desc(rtx, dims[i], types[i], fmt if i == pos else lin) for i in range(4)]
        return plugin.supports_format_combination(pos, in_out, 3)

    assert all(ok(0, t, dt.FLOAT) for t in (dt.FLOAT, dt.HALF, dt.BF16))
    assert not ok(0, dt.INT8, dt.FLOAT) and not ok(0, dt.INT32, dt.FLOAT)
    assert not ok(0, dt.FLOAT, dt.FLOAT, rtx.TensorFormat.CHW32)
    assert ok(1, dt.HALF, dt.FLOAT) and ok(2, dt.HALF, dt.HALF)  # scales: fp32 or x's dtype
    assert not ok(1, dt.HALF, dt.BF16) and not ok(2, dt.FLOAT, dt.INT32)
    assert ok(3, dt.HALF, dt.HALF) and not ok(3, dt.HALF, dt.FLOAT)  # output: x's dtype


@pytest.mark.rtx
def test_configure_plugin_checks_the_last_axis(rtx) -> None:
    from qvggt_export.errors import QVGGTError

    plugin = _plugin(rtx, 64)
    f32 = rtx.DataType.FLOAT
    scales = [_desc(rtx, (64,), f32), _desc(rtx, (64,), f32)]
    x = _desc(rtx, (1, -1, 3, 8, 64), f32, bounds=((1, 1, 3, 8, 64), (1, 32, 3, 8, 64)))
    plugin.configure_plugin([x, *scales], [x])  # rank 5, dynamic frames: accepted
    plugin.configure_plugin([_desc(rtx, (64,), f32), *scales], [_desc(rtx, (64,), f32)])  # rank 1
    with pytest.raises(QVGGTError, match="last dimension"):
        bad = _desc(rtx, (4, 128), f32)
        plugin.configure_plugin([bad, *scales], [bad])
    with pytest.raises(QVGGTError, match="pre must have shape"):
        plugin.configure_plugin([x, _desc(rtx, (32,), f32), scales[1]], [x])


@pytest.mark.rtx
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message; GPU hosts run enqueue for real")
def test_enqueue_without_a_gpu_says_so(rtx) -> None:
    # The real enqueue (torch CUDA tensors on TensorRT's buffers) is NOT executed in CI: there is no GPU here.
    from qvggt_export.errors import QVGGTError

    plugin = _plugin(rtx, 64, rtx.TensorRTPhase.RUNTIME)
    descs = [_desc(rtx, (2, 64), rtx.DataType.FLOAT).desc for _ in range(3)]
    with pytest.raises(QVGGTError, match="CUDA"):
        plugin.enqueue(descs, descs[:1], [0, 0, 0], [0], 0, 0)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA kernel: compile check (nvcc) and the per-row algorithm on the host.

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++") or shutil.which("c++")
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_120")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not on PATH: the kernel compile check needs it")
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_compiles(arch: str, tmp_path: Path) -> None:
    out = tmp_path / f"hadamard_{arch}.o"
    proc = subprocess.run([NVCC, "-c", f"--gpu-architecture={arch}", "-Xptxas", "-v", "-o", str(out), str(KERNEL)],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ptxas reports one entry per schedule (simple, tiled) and storage type (fp32, fp16, bf16), each compiled to SASS
    # for this architecture; none spills, and none keeps a stack frame (the tiled schedule's 8 registers must stay
    # registers: a runtime index would put them in local memory).
    compiled = [line for line in proc.stderr.splitlines() if "Compiling entry function" in line and f"'{arch}'" in line]
    assert len(compiled) == 6, proc.stderr
    assert proc.stderr.count(" 0 bytes spill stores") == 6, proc.stderr
    assert proc.stderr.count("0 bytes stack frame") == 6, proc.stderr
    assert out.stat().st_size > 0


def _compile_host(compiler: list[str], tmp_path: Path, name: str) -> ctypes.CDLL:
    lib_path = tmp_path / name
    proc = subprocess.run([*compiler, "-O2", "-shared", "-o", str(lib_path), str(KERNEL)], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.qvggt_hadamard_rows_host
    p = ctypes.c_void_p
    fn.argtypes = [p, p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, p, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    tiled = lib.qvggt_hadamard_rows_host_tiled
    tiled.argtypes = [p, p, ctypes.c_longlong, ctypes.c_int, p, p]
    tiled.restype = ctypes.c_int
    return lib


HOST_BUILDS = {
    # The .cu as plain C++: only the shared per-row functions and the host twin (device code is behind __CUDACC__).
    "g++": (GXX, lambda: [GXX, "-x", "c++", "-fPIC", "-Wall", "-Wextra", "-Werror"]),
    # The same file through nvcc: the host pass of exactly the translation unit that holds the kernel.
    "nvcc": (NVCC, lambda: [NVCC, "-x", "cu", "-Xcompiler", "-fPIC"]),
}


@pytest.fixture(scope="module", params=sorted(HOST_BUILDS))
def host_kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    tool, command = HOST_BUILDS[request.param]
    if tool is None:
        pytest.skip(f"{request.param} not on PATH: cannot build the kernel's host twin with it")
    return _compile_host(command(), tmp_path_factory.mktemp(f"host_{request.param}"), f"hadamard_{request.param}.so")


def _host_transform(lib: ctypes.CDLL, x: torch.Tensor, pre: torch.Tensor | None, post: torch.Tensor | None,
                    threads: int = 0) -> torch.Tensor:
    d = int(x.shape[-1])
    _, m = hadamard_factors(d)
    xs = np.ascontiguousarray(x.reshape(-1, d).numpy(), dtype=np.float32)
    ys = np.empty_like(xs)
    hm = np.ascontiguousarray(integer_hadamard(m).numpy().astype(np.int8)) if m > 1 else None
    vec = [np.ascontiguousarray(v.numpy(), np.float32) if v is not None else None for v in (pre, post)]
    ptr = [a.ctypes.data if a is not None else None for a in (hm, *vec)]
    status = lib.qvggt_hadamard_rows_host(xs.ctypes.data, ys.ctypes.data, xs.shape[0], d, m, *ptr, threads)
    assert status == 0, f"host twin returned {status}"
    return torch.from_numpy(ys).reshape(x.shape)


@pytest.mark.parametrize("d", [64, 256, 1024, 4096, 768])  # 768 = 64 x Paley 12: the dense m-factor path
@pytest.mark.parametrize("threads", [0, 1, 32])  # 0: the kernel's own block size for d
def test_kernel_host_math_matches_fwht(host_kernel: ctypes.CDLL, d: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(3, 5, d, generator=gen)
    signs, post = random_signs(d, seed=d), torch.rand(d, generator=gen) + 0.5
    for pre_v, post_v in ((signs, post), (None, None), (signs, None)):
        got = _host_transform(host_kernel, x, pre_v, post_v, threads)
        ref = fwht(x, signs=pre_v, post_scale=post_v)
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5, f"d={d}: relative error {rel:.2e} (observed ~2e-7)"


def test_kernel_host_twin_rejects_bad_sizes(host_kernel: ctypes.CDLL) -> None:
    x = np.zeros(96, np.float32)
    fn = host_kernel.qvggt_hadamard_rows_host
    assert fn(x.ctypes.data, x.ctypes.data, 1, 96, 1, None, None, None, 0) == -1  # 96 / 1 is not a power of two
    assert fn(x.ctypes.data, x.ctypes.data, 1, 96, 12, None, None, None, 0) == -2  # m > 1 needs H_m
    assert fn(x.ctypes.data, x.ctypes.data, 1, 16384, 1, None, None, None, 0) == -1  # above the shared-memory limit


@pytest.mark.parametrize("d", [256, 512, 1024, 2048, 4096, 8192])  # every round layout: log2(d) = 8 .. 13
def test_kernel_host_twin_of_the_tiled_schedule_matches_fwht(host_kernel: ctypes.CDLL, d: int) -> None:
    gen = torch.Generator().manual_seed(d + 1)
    x = torch.randn(4, d, generator=gen)
    signs, post = random_signs(d, seed=d), torch.rand(d, generator=gen) + 0.5
    for pre_v, post_v in ((signs, post), (None, None)):
        xs = np.ascontiguousarray(x.numpy())
        ys = np.empty_like(xs)
        vec = [np.ascontiguousarray(v.numpy(), np.float32) if v is not None else None for v in (pre_v, post_v)]
        ptr = [a.ctypes.data if a is not None else None for a in vec]
        assert host_kernel.qvggt_hadamard_rows_host_tiled(xs.ctypes.data, ys.ctypes.data, 4, d, *ptr) == 0
        ref = fwht(x, signs=pre_v, post_scale=post_v)
        rel = float((torch.from_numpy(ys) - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5, f"d={d}: relative error {rel:.2e} (observed ~3e-7)"


def test_kernel_host_twin_of_the_tiled_schedule_refuses_what_it_cannot_do(host_kernel: ctypes.CDLL) -> None:
    x = np.zeros(768, np.float32)
    tiled = host_kernel.qvggt_hadamard_rows_host_tiled
    assert tiled(x.ctypes.data, x.ctypes.data, 1, 128, None, None) == -4  # below the tiled minimum (256)
    assert tiled(x.ctypes.data, x.ctypes.data, 1, 768, None, None) == -1  # 768 = 256 x 3 has a Paley factor


# ---------------------------------------------------------------------------------------------------------------------
# The kernel through NVRTC (qvggt_export.plugins.hadamard_cuda): compiled here, launched only on a GPU.

def _nvrtc_reason() -> str | None:
    from qvggt_export.plugins.hadamard_cuda import kernel_unavailable_reason

    return kernel_unavailable_reason()


@pytest.mark.skipif(_nvrtc_reason() is not None, reason="cuda-python / NVRTC not installed "
                    "(pip install 'qvggt-export[cuda]'): cannot compile the kernel at run time here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_120"])
def test_nvrtc_compiles_the_kernel_source_and_caches_it(arch: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from qvggt_export.plugins import hadamard_cuda

    monkeypatch.setenv("QVGGT_CACHE_DIR", str(tmp_path))
    cubin = hadamard_cuda.compile_kernel_source(arch)
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image with the SASS of the six entry points
    for schedule in ("simple", "tiled"):
        for suffix in ("f32", "f16", "bf16"):
            assert f"qvggt_hadamard_{schedule}_{suffix}".encode() in cubin
    (cached,) = (tmp_path / "hadamard_cuda").iterdir()
    assert cached.read_bytes() == cubin
    assert hadamard_cuda.compile_kernel_source(arch) == cubin  # second call: from the cache


def test_schedule_choice_matches_the_header() -> None:
    from qvggt_export.errors import QVGGTError
    from qvggt_export.plugins.hadamard_cuda import resolve_schedule

    assert resolve_schedule(4096, 1) == "tiled"
    assert resolve_schedule(128, 1) == "simple"
    assert resolve_schedule(768, 3) == "simple"
    assert resolve_schedule(4096, 1, "simple") == "simple"
    with pytest.raises(QVGGTError, match="tiled"):
        resolve_schedule(768, 3, "tiled")
    with pytest.raises(QVGGTError, match="schedule"):
        resolve_schedule(1024, 1, "fast")


def test_enqueue_choice_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from qvggt_export.errors import QVGGTError
    from qvggt_export.plugins.hadamard_plugin import ENQUEUE_ENV, enqueue_choice

    monkeypatch.delenv(ENQUEUE_ENV, raising=False)
    assert enqueue_choice() == "kernel"
    monkeypatch.setenv(ENQUEUE_ENV, "torch")
    assert enqueue_choice() == "torch"
    monkeypatch.setenv(ENQUEUE_ENV, "cublas")
    with pytest.raises(QVGGTError, match=ENQUEUE_ENV):
        enqueue_choice()


_CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU: the kernel launch runs only there")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 768, 1024, 4096])
@pytest.mark.parametrize("schedule", ["auto", "simple"])
def test_kernel_on_the_gpu_matches_fwht(dtype: torch.dtype, d: int, schedule: str) -> None:
    from qvggt_export.plugins.hadamard_cuda import hadamard_cuda

    if _nvrtc_reason() is not None:
        pytest.skip(f"cuda-python / NVRTC missing: {_nvrtc_reason()}")
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(3, 37, d, generator=gen)
    signs, post = random_signs(d, seed=d), torch.rand(d, generator=gen) + 0.5
    ref = fwht(x.double(), signs=signs.double(), post_scale=post.double())
    got = hadamard_cuda(x.to("cuda", dtype), signs, post, schedule=schedule).double().cpu()
    rel = float((got - ref).norm() / ref.norm())
    bound = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # storage rounding of y
    assert rel < bound, f"{dtype} d={d} {schedule}: relative L2 {rel:.2e}"
    inplace = x.to("cuda", dtype)
    hadamard_cuda(inplace, signs, post, out=inplace, schedule=schedule)  # y == x is allowed
    assert torch.equal(inplace, got.to("cuda", dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU: the kernel launch runs only there")
def test_kernel_is_ordered_on_a_side_stream_like_tensorrts() -> None:
    # TensorRT hands enqueue its own stream: the launch must go there, ordered after the work queued before it.
    from qvggt_export.plugins.hadamard_cuda import hadamard_cuda

    if _nvrtc_reason() is not None:
        pytest.skip(f"cuda-python / NVRTC missing: {_nvrtc_reason()}")
    d = 4096
    x = torch.randn(2048, d, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        staged = x * 2.0  # queued on the side stream just before the kernel
        got = hadamard_cuda(staged)
    side.synchronize()
    assert torch.allclose(got, fwht(x * 2.0), rtol=1e-5, atol=1e-5)
