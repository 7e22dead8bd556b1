"""The engine's compiled CPU kernels: ``cpu_kernels.c`` (4-bit or 8-bit weights x activations in two int8
levels, on AMX tiles for 16 rows or more (int8: 8) where the CPU has AMX-INT8, else with AVX-512 VNNI,
AVX-VNNI, or AVX2 without them; and the float32 RMSNorm and paged attention around them), built
once per machine with the system C compiler (``-O3 -march=native -fopenmp``; no FMA contraction, so the C
source alone decides every rounding), cached by source, compiler flags and CPU, and called through ctypes.
The engine runs them wherever its weights are quantized on a CPU (``ModelRunner``).

``kernel()`` returns the loaded kernels, or None when it cannot run here: no C compiler, a CPU without
AVX2/FMA/F16C, a failed build, or ``SWITCHYARD_NATIVE_KERNELS=0``. Callers then use torch's own kernels;
``unavailable_reason()`` says why (logged once by the engine). ``SWITCHYARD_NATIVE_AMX=0`` keeps the AMX
tiles off (the VNNI path then runs every product; the results are the same bits).

The cache lives in ``$SWITCHYARD_HOME/kernels`` (default ``~/.cache/switchyard/kernels``): the same
variable ``backends.models`` reads, read here because the engine imports nothing outside itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
GROUP_SIZE = 32

_lock = threading.Lock()
_state: dict[str, object] = {}


class CpuKernels:
    """The compiled kernels. ``q4_linear`` / ``q8_linear(x, blocks, out_features, bias)``: ``x`` [M, K] float32
    contiguous, ``blocks`` the packed weights (``pack_q4`` / ``pack_q8``) → [M, out_features] float32.
    ``rms_norm`` and ``paged_attention``: the float32 ops around them (``None`` where a shape does not suit the
    kernel: the caller runs torch's op)."""

    def __init__(self, lib: ctypes.CDLL, isa: str) -> None:
        self.isa = isa
        self._q4, self._q8 = lib.q4_linear, lib.q8_linear
        for fn in (self._q4, self._q8):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            fn.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._rms_norm = lib.rms_norm
        self._rms_norm.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ctypes.c_float, ptr]
        self._rms_norm.restype = None
        self._attention = lib.paged_attention
        self._attention.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, i64,
                                    ptr, ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._amx_enable = lib.amx_enable
        self._amx_enable.argtypes = [ctypes.c_int]
        self._amx_enable.restype = ctypes.c_int
        self.amx = self.use_amx(os.environ.get("SWITCHYARD_NATIVE_AMX", "1") != "0")

    def use_amx(self, on: bool) -> bool:
        """Run products of 16 rows or more (int8: 8) on AMX tiles (where the CPU and Linux allow it) or not;
        returns whether they do now. Both paths give the same bits."""
        self.amx = bool(self._amx_enable(int(on)))
        return self.amx

    def q4_linear(self, x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
        return self._call(self._q4, x, blocks, out_features, bias)

    def q8_linear(self, x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
        return self._call(self._q8, x, blocks, out_features, bias)

    @staticmethod
    def _call(fn, x: torch.Tensor, blocks: torch.Tensor, out_features: int,
              bias: torch.Tensor | None) -> torch.Tensor:
        m, k = x.shape
        y = torch.empty(m, out_features, dtype=torch.float32)
        rc = fn(x.data_ptr(), m, k, blocks.data_ptr(), out_features,
                None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
        if rc == -1:
            raise ValueError(f"in_features {k} is not a multiple of {GROUP_SIZE}")
        if rc != 0:
            raise MemoryError(f"the quantized kernel could not allocate {2 * m * k} bytes of activations")
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor | None:
        """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last dim of float32 ``x`` [M, D] (rows
        may be strided, elements contiguous); None when D is not a multiple of 8 or the dtypes differ."""
        m, d = x.shape
        if d % 8 or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.stride(1) != 1:
            return None
        y = torch.empty(m, d, dtype=torch.float32)
        self._rms_norm(x.data_ptr(), m, d, x.stride(0), weight.data_ptr(), eps, offset, y.data_ptr())
        return y

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: AttentionRows,
                        scale: float, window: int | None) -> torch.Tensor | None:
        """Causal attention of q [T, Hq, D] (float32; tokens may be strided, heads contiguous) over the paged
        caches [num_blocks, block_size, Hkv, D] for the keys ``rows`` names → [T, Hq, D]; None when the shapes
        or dtypes do not suit the kernel."""
        t, hq, d = q.shape
        hkv = k_cache.shape[2]
        if (d % 8 or hq % hkv or q.dtype != torch.float32 or k_cache.dtype != torch.float32
                or q.stride(2) != 1 or q.stride(1) != d):
            return None
        out = torch.empty(t, hq, d, dtype=torch.float32)
        rc = self._attention(q.data_ptr(), t, q.stride(0), hq, hkv, d, k_cache.data_ptr(), v_cache.data_ptr(),
                             rows.slots.data_ptr(), rows.offsets.data_ptr(), rows.lengths.data_ptr(), scale,
                             window or 0, out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError("the attention kernel could not allocate its score buffer")
        return out


@dataclass
class AttentionRows:
    """The keys of each query row of a step, for ``paged_attention``: row t attends to the cache rows
    ``slots[offsets[t] : offsets[t] + lengths[t]]`` (int64; positions 0 up to its own, in order)."""

    slots: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor


TILE = 16  # output rows per tile


def _groups(weight: torch.Tensor, what: str) -> torch.Tensor:
    """[N, K] → float32 [N', K / 32, 32] with N' = N rounded up to whole tiles (zero rows)."""
    w = weight.detach().float()
    n, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"in_features {k} is not a multiple of the {what} size {GROUP_SIZE}")
    padded = -(-n // TILE) * TILE
    w = torch.cat([w, w.new_zeros(padded - n, k)]) if padded != n else w
    return w.reshape(padded, k // GROUP_SIZE, GROUP_SIZE)


def _by_tile(per_row: torch.Tensor) -> torch.Tensor:
    """[N', G] per row and block → [N' / 16, G, 16]: each block's 16 rows of a tile side by side."""
    rows, g = per_row.shape
    return per_row.reshape(rows // TILE, TILE, g).permute(0, 2, 1).contiguous()


def _b_order(q: torch.Tensor) -> torch.Tensor:
    """[N', G, 4 J] per row and block → [N' / 16, G, J * 64]: byte [j * 64 + r * 4 + i] = q[r][4 j + i], the
    order of AMX's B matrix (and of the VNNI path's broadcast products)."""
    rows, g, k = q.shape
    tiled = q.reshape(rows // TILE, TILE, g, k // 4, 4).permute(0, 2, 3, 1, 4)  # [T, G, J, 16, 4]
    return tiled.reshape(rows // TILE, g, k * TILE).contiguous()


def _from_b_order(q: torch.Tensor, j: int) -> torch.Tensor:
    """``_b_order``'s inverse: [T, G, j * 64] → [T, G, 16, 4 j]."""
    tiles, g, _ = q.shape
    return q.reshape(tiles, g, j, TILE, 4).permute(0, 1, 3, 2, 4).reshape(tiles, g, TILE, 4 * j)


def pack_q4(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float weights → [ceil(N / 16), K / 32, 320] uint8, the layout ``cpu_kernels.c`` reads: per tile of
    16 output rows and block of 32 inputs, 256 bytes of 4-bit ``q`` (byte ``j * 64 + r * 4 + i`` holds row r's
    weight 4 j + i low and weight 16 + 4 j + i high), then the rows' fp16 scales ``d`` and fp16 offsets ``o``
    (the block's minimum), so that ``w ≈ q * d + o``. ``q`` is rounded against the fp16 values the kernel
    reads; rows past N are zeros."""
    groups = _groups(weight, "int4 group")
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    d = ((hi - lo) / 15.0).to(torch.float16)
    o = lo.to(torch.float16)
    d32 = d.float().clamp(min=1e-10)
    q = torch.round((groups - o.float()[..., None]) / d32[..., None]).clamp(0, 15).to(torch.uint8)
    nibbles = _b_order(q[..., :16]) | (_b_order(q[..., 16:]) << 4)  # [T, G, 256]
    return torch.cat([nibbles, _by_tile(d).view(torch.uint8), _by_tile(o).view(torch.uint8)], dim=2).contiguous()


def unpack_q4(blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """The float weights ``pack_q4`` encodes: [out_features, K]."""
    tiles, g, _ = blocks.shape
    qs = blocks[..., : TILE * 16]
    q = torch.cat([_from_b_order(qs & 0x0F, 4), _from_b_order(qs >> 4, 4)], dim=3).float()  # [T, G, 16, 32]
    d = blocks[..., TILE * 16: TILE * 18].contiguous().view(torch.float16).float()
    o = blocks[..., TILE * 18:].contiguous().view(torch.float16).float()
    w = q * d[..., None] + o[..., None]  # [T, G, 16, 32]
    return w.permute(0, 2, 1, 3).reshape(tiles * TILE, g * GROUP_SIZE)[:out_features]


def pack_q8(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float weights → [ceil(N / 16), K / 32, 544] uint8: per tile of 16 output rows and block of 32
    inputs, 512 bytes of int8 ``q`` (byte ``j * 64 + r * 4 + i`` = row r's weight 4 j + i) then the rows' fp16
    scales ``d`` (``max|w| / 127`` of the block), so that ``w ≈ q * d``; rows past N are zeros."""
    groups = _groups(weight, "int8 block")
    d = (groups.abs().amax(dim=2) / 127.0).to(torch.float16)
    d32 = d.float().clamp(min=1e-10)
    q = torch.round(groups / d32[..., None]).clamp(-127, 127).to(torch.int8)
    return torch.cat([_b_order(q.view(torch.uint8)), _by_tile(d).view(torch.uint8)], dim=2).contiguous()


def unpack_q8(blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """The float weights ``pack_q8`` encodes: [out_features, K]."""
    tiles, g, _ = blocks.shape
    q = _from_b_order(blocks[..., : TILE * GROUP_SIZE].contiguous().view(torch.int8), 8).float()
    d = blocks[..., TILE * GROUP_SIZE:].contiguous().view(torch.float16).float()
    w = q * d[..., None]
    return w.permute(0, 2, 1, 3).reshape(tiles * TILE, g * GROUP_SIZE)[:out_features]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc`` or ``gcc`` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    home = os.environ.get("SWITCHYARD_HOME") or Path.home() / ".cache" / "switchyard"
    return Path(home) / "kernels"


def _build() -> tuple[CpuKernels | None, str]:
    if os.environ.get("SWITCHYARD_NATIVE_KERNELS", "1") == "0":
        return None, "SWITCHYARD_NATIVE_KERNELS=0"
    flags = _cpu_flags()
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    cc = compiler()
    if not cc:
        return None, "no C compiler (cc/gcc) on PATH"
    wide = {"avx512_vnni", "avx512bw", "avx512dq"} <= flags
    isa = "avx512-vnni" if wide else "avx-vnni" if "avx_vnni" in flags or "avx512_vnni" in flags else "avx2"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS, *sorted(flags))).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if not target.exists():
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache is a reason, not a crash
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                return None, f"building {SOURCE.name} failed: {proc.stderr.strip().splitlines()[-1:]}"
            os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"building {SOURCE.name} failed: {e}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return CpuKernels(ctypes.CDLL(str(target)), isa), ""
    except OSError as e:
        return None, f"loading {target.name} failed: {e}"


def kernel() -> CpuKernels | None:
    """The kernels, built on first use (thread-safe); None where it cannot run (``unavailable_reason``)."""
    with _lock:
        if "kernel" not in _state:
            _state["kernel"], _state["reason"] = _build()
            if _state["kernel"] is None:
                log.info("native quantized kernels unavailable (%s): int4/int8 layers use torch's", _state["reason"])
        return _state["kernel"]  # type: ignore[return-value]


def unavailable_reason() -> str:
    kernel()
    return str(_state["reason"])
