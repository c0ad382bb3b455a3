"""loradex's own CPU kernels (``serving/native.c``): NF4 and fp32 matrix products for decode.

On CPU, bitsandbytes dequantizes a 4-bit layer on every call, and a layer
dequantized once at load (``dense``) reads 4 bytes per weight per token. The
native NF4 kernel reads the 4-bit indices (half a byte per weight) and rebuilds
each weight in registers with the same fp32 product bitsandbytes dequantizes to
(``code[index] * absmax``), so it computes with the same weights, bit for bit
(checked per layer when it is built; a layer that does not rebuild exactly stays
``dense``). The fp32 kernel serves the tied LM head (the largest single read of
a decode step) with the same fp32 weights, faster than torch's GEMV here.

Every output is one dot product in a fixed order whatever the number of rows,
so a row's result does not depend on its neighbours in a batch. Up to
:func:`rows_limits` rows (decode steps, mixed batches, short prompts; per build,
measured) run in the native kernel; more rows dequantize the layer into fp32
once per call and use torch's matrix product, which wins there.

Each product splits its outputs over torch's thread count (``LORADEX_THREADS``):
the same code computes every output whatever the count, so results do not change
with it.

The library is compiled at first use with the system C compiler
(``$CC``, ``cc`` or ``gcc``; ``-mavx2 -mfma -mf16c``, plus ``-mavx512f`` for
the AVX-512 build) into ``$LORADEX_NATIVE_CACHE`` (default
``~/.cache/loradex/native``), once per source version and instruction set. It
is used only on x86-64 CPUs that report avx2, fma and f16c; elsewhere, or
without a compiler, :func:`status` says why and serving keeps the torch
kernels. ``LORADEX_NATIVE=0`` turns it off.

Which build runs is decided at run time from the CPU's flags (``/proc/cpuinfo``),
never from a CPU model name: the AVX-512 build (16 lanes; the NF4 lookup is one
``vpermps``) where the CPU reports avx512f, else the AVX2 build (8 lanes).
``LORADEX_NATIVE_ISA=avx2`` or ``avx512`` forces one (an unsupported one is a
clear error in :func:`status`). The two sum in different orders, so their
results may differ in the last bits; each keeps every property above.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("native.c")
REQUIRED_FLAGS = ("avx2", "fma", "f16c")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
ISAS = {"avx2": ((), []), "avx512": (("avx512f",), ["-mavx512f"])}
"""Instruction sets the kernels build for: the CPU flags each needs beyond REQUIRED_FLAGS, its extra compiler flags."""
MAX_ROWS = 96
"""Rows up to which the native NF4 product runs in the AVX2 build (and the largest decode batch the native
decode step takes, whatever the build); above it (a long or batched prefill), the layer is dequantized once
per call and torch multiplies. On the 2-core Zen 3 machine of this project, over the default base's 210
projections, 1 thread: native 15-19 / 34-37 / 59 / 132 / 240 / 280 ms at 1 / 8 / 16 / 43 / 72 / 96 rows,
dequantize + torch 31 / 63 / 83 / 161 / 225 / 286 ms; at 352 and 2160 rows torch wins (936 ms against 1034,
5.6 s against 6.9 s)."""
HEAD_MAX_ROWS = 32
"""The same for the fp32 kernel (the LM head, 49152 x 576), AVX2 build: native 24 / 47 ms at 16 / 32 rows
against torch's 36 / 52, torch faster at 64 (84 against 87)."""
ROWS_BY_ISA = {"avx2": (MAX_ROWS, HEAD_MAX_ROWS), "avx512": (16, 8)}
"""(NF4 rows, head rows) per build. AVX-512, a 2-core Xeon with AVX-512 (its MKL runs fp32 GEMM at 75-94 G
multiply-adds per second, twice the Zen 3's): native 51 / 87 / 135 ms at 12 / 24 / 44 rows, dequantize + torch
73 / 75 / 103 ms; the head 8.2 ms at 8 rows (Q8 tile) against torch's 16.9, torch faster at 16 (17.8 against
31 at 32)."""
BLOCK = 64
EXPORTS = ("native_threads", "native_vw", "nf4_pack", "nf4_gemm", "nf4_dequant", "f32_gemm", "q8_pack", "bf16_pack",
           "compact_gemm", "compact_dequant", "layer_in", "rope_cache", "attend", "layer_out")

_lock = threading.Lock()
_state: dict = {}
P, I = ctypes.c_void_p, ctypes.c_int


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("LORADEX_NATIVE_CACHE") or Path.home() / ".cache" / "loradex" / "native")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def supported_isas(flags: set[str] | None = None) -> list[str]:
    """The builds this CPU can run, best last (empty without avx2/fma/f16c)."""
    flags = cpu_flags() if flags is None else flags
    if any(f not in flags for f in REQUIRED_FLAGS):
        return []
    return [isa for isa, (need, _) in ISAS.items() if all(f in flags for f in need)]


def rows_limits() -> tuple[int, int]:
    """(rows up to which NF4 products run natively, the same for the fp32/compact head) for the loaded build."""
    library()
    return ROWS_BY_ISA.get(_state.get("isa") or "avx2", ROWS_BY_ISA["avx2"])


def requested_isa() -> str:
    return os.environ.get("LORADEX_NATIVE_ISA", "auto").strip().lower() or "auto"


def _build(cc: str, isa: str) -> Path:
    src = SOURCE.read_bytes()
    cflags = [*CFLAGS, *ISAS[isa][1]]
    tag = hashlib.sha256(src + " ".join([cc, *cflags]).encode()).hexdigest()[:16]
    name = f"loradex-native-{isa}-{tag}.so"
    folder = cache_dir()
    if (folder / name).exists():
        return folder / name
    if not _writable(folder):  # a read-only home: build in this user's temp folder instead
        folder = Path(tempfile.gettempdir()) / f"loradex-native-{os.getuid()}"
        if (folder / name).exists():
            return folder / name
        folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *cflags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).strip().splitlines()
            raise OSError(f"{cc} failed: {first[0] if first else 'exit ' + str(proc.returncode)}")
        os.replace(tmp, out)  # atomic: concurrent builders agree on one file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    if os.environ.get("LORADEX_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
        _state.update(lib=None, reason="LORADEX_NATIVE=0")
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _state.update(lib=None, reason=f"the native kernels are for x86-64, this is {platform.machine()}")
        return
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        _state.update(lib=None, reason=f"this CPU lacks {', '.join(missing)}")
        return
    isas, want = supported_isas(), requested_isa()
    if want != "auto" and want not in ISAS:
        _state.update(lib=None, reason=f"LORADEX_NATIVE_ISA must be auto, {' or '.join(ISAS)}; got {want!r}")
        return
    if want != "auto" and want not in isas:
        _state.update(lib=None, reason=f"LORADEX_NATIVE_ISA={want}, but this CPU lacks {', '.join(ISAS[want][0])}")
        return
    isa = isas[-1] if want == "auto" else want
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        _state.update(lib=None, reason="no C compiler (cc/gcc) to build the native kernels")
        return
    try:
        path = _build(cc, isa)
        lib = ctypes.CDLL(str(path))
        for name in EXPORTS:
            getattr(lib, name)
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        _state.update(lib=None, reason=f"could not build the native kernels: {exc}")
        return
    lib.nf4_gemm.argtypes = [P, I, I, I, P, P, P, P, P]
    lib.native_threads.argtypes = [I]
    lib.native_threads.restype = I
    lib.native_vw.argtypes = []
    lib.native_vw.restype = I
    lib.nf4_dequant.argtypes = [P, P, P, I, I, P]
    lib.nf4_pack.argtypes = [P, I, I, P, P, P]
    lib.nf4_pack.restype = ctypes.c_int
    lib.f32_gemm.argtypes = [P, I, I, I, P, P, P]
    lib.q8_pack.argtypes = [P, I, I, P, P]
    lib.bf16_pack.argtypes = [P, I, I, P]
    lib.q8_pack.restype = lib.bf16_pack.restype = ctypes.c_int
    lib.compact_gemm.argtypes = [I, P, I, I, I, P, P, P, P]
    lib.compact_dequant.argtypes = [I, P, P, I, I, P]
    for fn in (lib.nf4_gemm, lib.nf4_dequant, lib.f32_gemm, lib.compact_gemm, lib.compact_dequant):
        fn.restype = None
    _state.update(lib=lib, reason="built " + path.name, path=str(path), isa=isa, lanes=lib.native_vw())


def library():
    """The loaded kernels, or None (see :func:`status` for why)."""
    with _lock:
        if "lib" not in _state:
            _load()
    return _state["lib"]


def status() -> dict:
    lib = library()
    return {"available": lib is not None, "reason": _state.get("reason"), "path": _state.get("path"),
            "isa": _state.get("isa"), "lanes": _state.get("lanes")}


def _forget_threads() -> None:
    _state.pop("threads", None)  # a forked child starts without the pool's workers (the C side resets too)


os.register_at_fork(after_in_child=_forget_threads)


def kernels():
    """The library with its thread count matched to torch's (``LORADEX_THREADS``); call before each product."""
    lib = library()
    n = torch.get_num_threads()
    if _state.get("threads") != n:
        _state["threads"] = lib.native_threads(n)
    return lib


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class NF4Linear(nn.Module):
    """A Linear whose weight is NF4 (4-bit indices + one fp32 scale per 64 weights), computed natively."""

    def __init__(self, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = q.shape[0]
        self.in_features = q.shape[1] * 8
        self.register_buffer("q", q)            # int32 [N, K/8]: weight 8j+i is nibble i of word j
        self.register_buffer("absmax", absmax)  # fp32 [N, K/64]
        self.register_buffer("code", code)      # fp32 [16]
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, code: torch.Tensor, bias: torch.Tensor | None = None) -> "NF4Linear | None":
        """Pack fp32 weights that are NF4 values (``code[i] * scale`` per block of 64), or None if they are not."""
        lib = library()
        n, k = w.shape
        if lib is None or k % BLOCK or w.dtype != torch.float32:
            return None
        code = code.detach().to(torch.float32).cpu().contiguous()
        if not bool((code[1:] > code[:-1]).all()):  # the packer searches an ascending table
            return None
        w = w.detach().contiguous()
        q = torch.empty(n, k // 8, dtype=torch.int32)
        absmax = torch.empty(n, k // BLOCK, dtype=torch.float32)
        if lib.nf4_pack(w.data_ptr(), n, k, code.data_ptr(), q.data_ptr(), absmax.data_ptr()) != 0:
            return None
        lin = cls(q, absmax, code, None if bias is None else bias.detach().to(torch.float32).contiguous())
        if not torch.equal(lin.dequantize(), w):  # bit for bit, or not at all
            return None
        return lin

    def dequantize(self) -> torch.Tensor:
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        library().nf4_dequant(self.q.data_ptr(), self.absmax.data_ptr(), self.code.data_ptr(),
                              self.out_features, self.in_features, w.data_ptr())
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        x2 = _rows(x, k)
        m = x2.shape[0]
        if m > rows_limits()[0]:
            y = nn.functional.linear(x2, self.dequantize(), self.bias)
        else:
            y = torch.empty(m, n, dtype=torch.float32)
            kernels().nf4_gemm(x2.data_ptr(), m, k, n, self.q.data_ptr(), self.absmax.data_ptr(),
                               self.code.data_ptr(), _ptr(self.bias), y.data_ptr())
        return y.reshape(*x.shape[:-1], n).to(x.dtype)


COMPACT_KINDS = {"q8": 1, "bf16": 2}


def compact(weight: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """``weight`` (fp32 [N, K]) in the smallest form that rebuilds it bit for bit: ``("q8", int8 q, fp32 scale
    per 32)`` when every block of 32 is exactly ``scale * int8`` (a GGUF Q8_0 tensor, dequantized), else
    ``("bf16", bf16 bits, None)`` when every value is a bf16 (a model shipped in bf16), else None."""
    lib = library()
    if lib is None or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    n, k = weight.shape
    n4 = -(-n // 4) * 4  # rows grouped by four, the last group padded with zero rows
    w = weight.detach().contiguous()
    found = None
    if k % 32 == 0:
        q = torch.empty(n4, k, dtype=torch.int8)
        d = torch.empty(n4, k // 32, dtype=torch.float32)
        if lib.q8_pack(w.data_ptr(), n, k, q.data_ptr(), d.data_ptr()) == 0:
            found = ("q8", q, d)
    if found is None and k % 8 == 0:
        h = torch.empty(n4, k, dtype=torch.int16)
        if lib.bf16_pack(w.data_ptr(), n, k, h.data_ptr()) == 0:
            found = ("bf16", h, None)
    if found is None:
        return None
    back = torch.empty(n, k, dtype=torch.float32)
    lib.compact_dequant(COMPACT_KINDS[found[0]], found[1].data_ptr(), _ptr(found[2]), n, k, back.data_ptr())
    if not torch.equal(back.view(torch.int32), w.view(torch.int32)):  # bit for bit, or not at all
        return None
    return found


class F32Linear(nn.Module):
    """A Linear over fp32 weights (shared with the original layer, no copy), computed natively for few rows.

    When the weights have an exact compact form (:func:`compact`: Q8 or bf16), few-row products read that
    instead, 9 or 16 bits per weight instead of 32, with the same result bit for bit. ``form`` says which."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight          # the same Parameter (a tied LM head stays tied to the embedding)
        self.bias = bias
        packed = compact(weight) if weight.is_contiguous() else None
        self.form = packed[0] if packed else "fp32"
        self.register_buffer("packed", packed[1] if packed else None)
        self.register_buffer("scales", packed[2] if packed else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        x2 = _rows(x, k)
        m = x2.shape[0]
        if m > rows_limits()[1] or not self.weight.is_contiguous():
            y = nn.functional.linear(x2, self.weight, self.bias)
        elif self.packed is not None:
            y = torch.empty(m, n, dtype=torch.float32)
            kernels().compact_gemm(COMPACT_KINDS[self.form], x2.data_ptr(), m, k, n, self.packed.data_ptr(),
                                   _ptr(self.scales), _ptr(self.bias), y.data_ptr())
        else:
            y = torch.empty(m, n, dtype=torch.float32)
            kernels().f32_gemm(x2.data_ptr(), m, k, n, self.weight.data_ptr(), _ptr(self.bias), y.data_ptr())
        return y.reshape(*x.shape[:-1], n).to(x.dtype)
