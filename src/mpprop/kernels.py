"""The fused CPU kernel of the gated convolution (csrc/edge_gate.cpp) and its autograd.

The kernel is compiled on first use with torch's C++ extension loader (g++, ninja and the
Python headers; ~30 s, once per machine, source, flags and torch version), into
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, in a folder named by a hash of all of
those. Once built it is imported directly: torch's loader takes a lock file on every load,
and a process killed while holding it (kill -9 of a tuning worker) would leave every later
process waiting forever. Where it cannot be built, or with MPPROP_FUSED_KERNEL=0, the model
runs its plain PyTorch path, which computes the same function (tests/test_fused_kernel.py
compares the two).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "MPPROP_FUSED_KERNEL"
SOURCE = "csrc/edge_gate.cpp"
# a build lock older than this is left over from a killed build (a build takes ~30 s)
STALE_LOCK_SECONDS = 600

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def _compile_flags() -> list[str]:
    # -ffast-math at compile time only (the link does not see it, so the process's floating
    # point mode is untouched): it lets g++ vectorise exp/log1p with glibc's libmvec.
    # Non-finite inputs never reach the kernel (EdgeGate checks), which fast-math assumes.
    # -fopenmp: at::parallel_for in the kernel is OpenMP; without it the loop over atoms runs
    # on one thread whatever torch.get_num_threads() says (torch's own OpenMP is libgomp, so
    # g++'s -fopenmp links the same runtime)
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def fused_kernel_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def edge_gate_ops() -> ModuleType | None:
    """The compiled kernel module, or None where it is switched off or cannot be built."""
    if not fused_kernel_enabled():
        return None
    with _lock:
        if SOURCE not in _loaded:
            _loaded[SOURCE] = _build()
        return _loaded[SOURCE]


def _extension_name(source: bytes, flags: list[str]) -> str:
    """A module name unique to the source, flags, torch and Python it is built for."""
    key = json.dumps([hashlib.sha256(source).hexdigest(), flags, torch.__version__,
                      sys.version_info[:2]])
    return "mpprop_edge_gate_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _import_built(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    source = resources.files("mpprop").joinpath(SOURCE)
    flags = _compile_flags()
    name = _extension_name(source.read_bytes(), flags)
    build_dir = _build_root() / name
    built, lock = build_dir / f"{name}.so", build_dir / "lock"
    try:
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
        if built.exists() and not lock.exists():  # built, and not being written right now
            return _import_built(name, built)
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch runs `ninja` from PATH: the one installed beside this interpreter (a venv
        # that was not activated) counts too
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        log.warning("building the fused edge kernel (once per machine, ~30 s) in %s", build_dir)
        with resources.as_file(source) as path:
            return cpp_extension.load(
                name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir), verbose=False,
            )
    except Exception as exc:  # a missing compiler or header must not stop training
        log.warning(
            "the fused edge kernel could not be built (%s); using the plain PyTorch path "
            "(same results, about 1.6x slower training). Set %s=0 to skip this attempt.",
            str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
            ENV_SWITCH,
        )
        return None


def report_build() -> None:
    """Build (or load) the kernel and say which path training will take."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    ops = edge_gate_ops()
    if ops is not None:
        print(f"fused edge kernel: ready ({ops.__file__})")
    elif not fused_kernel_enabled():
        print(f"fused edge kernel: switched off by {ENV_SWITCH}")
    else:
        print("fused edge kernel: not available, training uses the plain PyTorch path")


class EdgeGate(torch.autograd.Function):
    """sum_e sigmoid(zn[e, :a]) * softplus(zn[e, a:]) per centre atom, zn = bn1(z), fused.

    z[e] = edge[idx[e]] + nbr[dst[e]] + self_[src[e]] as in model._EdgeSum. `bn` None means
    bn1 is already folded into the tables (inference). In training mode, bn1's running
    statistics are updated as nn.BatchNorm1d does.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        edge: torch.Tensor,
        nbr: torch.Tensor,
        self_: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        idx: torch.Tensor | None,
        dst: torch.Tensor,
        offsets: torch.Tensor,
        bn: torch.nn.BatchNorm1d | None,
    ) -> torch.Tensor:
        ops = edge_gate_ops()
        assert ops is not None
        edge, nbr, self_ = edge.contiguous(), nbr.contiguous(), self_.contiguous()
        idx_t = idx if idx is not None else dst.new_empty(0)
        channels = self_.shape[1]
        training = bn is not None and bn.training
        if bn is None:
            mean = torch.zeros(channels)
            invstd = torch.ones(channels)
            scale, shift = invstd, mean
        else:
            if training:
                n_edges = int(dst.shape[0])
                if n_edges < 2:
                    raise ValueError("batch norm in training needs more than one edge")
                total, total_sq = ops.edge_stats(edge, nbr, self_, idx_t, dst, offsets)
                mean64 = total / n_edges
                var64 = (total_sq / n_edges - mean64.square()).clamp_min(0.0)
                _update_running_stats(bn, mean64, var64 * n_edges / (n_edges - 1))
                mean, var = mean64.float(), var64.float()
            else:
                mean, var = bn.running_mean, bn.running_var
            invstd = torch.rsqrt(var + bn.eps)
            scale = (weight * invstd).detach()
            shift = (bias - mean * scale).detach()
        with_grad = any(ctx.needs_input_grad[:5])
        out, local = ops.forward(edge, nbr, self_, idx_t, dst, offsets, scale, shift, with_grad)
        ctx.save_for_backward(local, edge, nbr, self_, idx_t, dst, offsets, scale, mean, invstd)
        ctx.training = training
        ctx.has_bn = bn is not None
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        ops = edge_gate_ops()
        assert ops is not None
        local, edge, nbr, self_, idx_t, dst, offsets, scale, mean, invstd = ctx.saved_tensors
        d_edge, d_nbr, d_self, d_weight, d_bias = ops.backward(
            grad.contiguous(), local, edge, nbr, self_, idx_t, dst, offsets, scale, mean, invstd,
            ctx.training,
        )
        if not ctx.has_bn:
            d_weight = d_bias = None
        return d_edge, d_nbr, d_self, d_weight, d_bias, None, None, None, None


def _update_running_stats(bn: torch.nn.BatchNorm1d, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """nn.BatchNorm1d's update of running_mean/var in training mode."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - momentum).add_(mean.float(), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(var_unbiased.float(), alpha=momentum)


def edge_gate(
    edge: torch.Tensor,
    nbr: torch.Tensor,
    self_: torch.Tensor,
    idx: torch.Tensor | None,
    dst: torch.Tensor,
    offsets: torch.Tensor,
    bn: torch.nn.BatchNorm1d | None,
) -> torch.Tensor:
    """Fused message sum per atom (see EdgeGate); bn None = bn1 folded into the tables."""
    weight = bn.weight if bn is not None else None
    bias = bn.bias if bn is not None else None
    return EdgeGate.apply(edge, nbr, self_, weight, bias, idx, dst, offsets, bn)


def can_fuse(*tables: torch.Tensor) -> bool:
    """The kernel takes float32 CPU tables with finite values (it is compiled for that)."""
    # device and dtype first: a CUDA or bf16 run never builds the CPU kernel
    for t in tables:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
    if edge_gate_ops() is None:
        return False
    # one reduction per table: a NaN or infinity anywhere makes the sum non-finite (a finite
    # sum overflowing only sends a batch to the plain path, which is harmless)
    with torch.no_grad():
        return bool(all(torch.isfinite(t.sum()) for t in tables))
