"""Which branches the model takes: Apple silicon's ("metal") or the Linux CPU's ("cpu").

Apple silicon is the target, but MLX's CPU backend off macOS runs ``mx.exp`` one element at a
time, so there the model reaches the same numbers by other routes (models/layers.py: a
power-of-two exp, blocked attention through it, the plain rms_norm formula; interop/model.py:
float16 weights computed in float32). Every such branch asks :func:`metal_kernels`.

``MLX_TRM_KERNELS`` overrides the device's choice: ``metal`` takes Apple silicon's branches on any
device, ``cpu`` the Linux CPU's. Both compute the same numbers and MLX's CPU backend runs every
operation of both, so the tests run each set on one machine; only speed depends on the device.
Unset, the device chooses (as before the variable existed).

A compiled function traces one set of branches: code that keeps compiled functions keys them by
:func:`kernels_setting`, so changing the variable in a process never reuses the other set.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx

from .config import ConfigError

ENV = "MLX_TRM_KERNELS"
CHOICES = ("metal", "cpu")


def kernels_setting() -> str | None:
    """``MLX_TRM_KERNELS`` checked: "metal", "cpu", or None when unset (the device chooses)."""
    value = os.environ.get(ENV, "")
    if value == "":
        return None
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={value!r} is not a choice: use {ENV}=metal (Apple silicon's "
                          f"branches), {ENV}=cpu (the Linux CPU's), or leave it unset (by device)")
    return value


def metal_kernels(apple_cpu: bool = False) -> bool:
    """Take Apple silicon's branch here? ``MLX_TRM_KERNELS`` decides when set; unset, yes when
    the default device is a GPU, and with ``apple_cpu`` also on macOS's CPU (for the exp: Apple's
    vectorised CPU kernels make ``mx.exp`` the fast op there too)."""
    setting = kernels_setting()
    if setting is not None:
        return setting == "metal"
    return mx.default_device() != mx.cpu or (apple_cpu and sys.platform == "darwin")
