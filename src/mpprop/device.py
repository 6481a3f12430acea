"""Where the training core runs: `train.device` and `train.precision` made concrete.

torch only. "auto" is the first CUDA device when one is visible, else the CPU. bf16 is
autocast of the forward pass (weights, optimiser state and the loss stay float32); on CPU it
is allowed for testing the code path but slower than float32 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("fp32", "bf16")


class DeviceError(ValueError):
    """A requested device that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """torch.device for `auto` | `cpu` | `cuda` | `cuda:N`, with a clear error if absent."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (use one of {', '.join(DEVICE_CHOICES)})") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {name!r}: only {', '.join(DEVICE_CHOICES)} are supported")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but torch sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} "
                          "CUDA device(s) are visible")
    return torch.device("cuda", index)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast of the enclosed forward pass where asked, else nothing."""
    if check_precision(precision) == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def training_device(device: str, precision: str) -> tuple[torch.device, str]:
    """The torch device and precision of `train.device` and `train.precision`."""
    return resolve_device(str(device)), check_precision(str(precision))


def pin_host_memory(device: torch.device) -> bool:
    """Page-locked host batches pay only when copying to a CUDA device."""
    return device.type == "cuda"
