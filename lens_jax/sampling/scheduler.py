"""The Lens sampler's noise schedule and Euler step (spec 2.3).

Flow matching with velocity prediction: ``x_t = (1 - sigma) x0 + sigma noise``, the model predicts
``v = noise - x0`` and one Euler step moves ``x`` from ``sigma_i`` to ``sigma_{i+1}``. The sigmas are
``linspace(1, 1/N, N)`` warped by the exponential time shift ``e^mu / (e^mu + (1/sigma - 1))`` with
an empirical ``mu`` that depends on the image token count and the step count (the constants of the
FLUX.2 pipeline), followed by a terminal 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Empirical mu (spec 2.3 step 1).
MU_A1, MU_B1 = 8.73809524e-05, 1.89833333
MU_A2, MU_B2 = 0.00016927, 0.45666666
MU_STEP_INDEPENDENT_ABOVE = 4300  # image tokens

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The shift parameter ``mu`` for ``image_seq_len`` image tokens and ``num_steps`` steps."""
    if image_seq_len <= 0 or num_steps <= 0:
        raise ValueError(f"need image_seq_len > 0 and num_steps > 0, got {image_seq_len}, {num_steps}")
    m200 = MU_A2 * image_seq_len + MU_B2
    if image_seq_len > MU_STEP_INDEPENDENT_ABOVE:
        return float(m200)
    m10 = MU_A1 * image_seq_len + MU_B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


def exponential_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """``e^mu / (e^mu + (1/sigma - 1))`` elementwise, float32 like the reference."""
    sigmas = np.asarray(sigmas, np.float32)
    e = np.float32(math.exp(mu))
    return (e / (e + (np.float32(1.0) / sigmas - np.float32(1.0)))).astype(np.float32)


def linear_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """``mu / (mu + (1/sigma - 1))`` (diffusers' ``time_shift_type="linear"``), float32."""
    sigmas = np.asarray(sigmas, np.float32)
    return (np.float32(mu) / (np.float32(mu) + (np.float32(1.0) / sigmas - np.float32(1.0)))
            ).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of ``scheduler/scheduler_config.json`` the sampler uses (defaults: Lens, spec 2.3)."""

    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    shift: float = 3.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type {self.time_shift_type!r}: expected exponential|linear")

    @classmethod
    def from_json(cls, data: Mapping, source: str = "scheduler_config.json") -> "SchedulerConfig":
        """From a diffusers ``FlowMatchEulerDiscreteScheduler`` config dict."""
        name = data.get("_class_name")
        if name not in (None, SCHEDULER_CLASS):
            raise ValueError(f"{source}: _class_name {name!r}, expected {SCHEDULER_CLASS!r}")
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "stochastic_sampling") if data.get(k)]
        if data.get("shift_terminal"):
            unsupported.append("shift_terminal")
        if unsupported:
            raise ValueError(f"{source}: options {unsupported} are not supported by the Lens sampler")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SchedulerConfig":
        import json
        path = Path(path)
        with open(path) as f:
            return cls.from_json(json.load(f), source=str(path))

    def to_json(self) -> dict:
        """The ``scheduler_config.json`` of the Lens checkpoints (spec 2.3, verbatim values)."""
        return {
            "_class_name": SCHEDULER_CLASS, "_diffusers_version": "0.42.1",
            "base_image_seq_len": self.base_image_seq_len, "base_shift": self.base_shift,
            "invert_sigmas": False, "max_image_seq_len": self.max_image_seq_len,
            "max_shift": self.max_shift, "num_train_timesteps": self.num_train_timesteps,
            "shift": self.shift, "shift_terminal": None, "stochastic_sampling": False,
            "time_shift_type": self.time_shift_type, "use_beta_sigmas": False,
            "use_dynamic_shifting": self.use_dynamic_shifting, "use_exponential_sigmas": False,
            "use_karras_sigmas": False,
        }


def sigmas_for(num_steps: int, image_seq_len: int, config: SchedulerConfig = SchedulerConfig(),
               mu: float | None = None) -> np.ndarray:
    """The N + 1 sigmas (float32, shifted, terminal 0) of an N-step run over ``image_seq_len`` tokens.

    ``mu`` defaults to ``empirical_mu(image_seq_len, num_steps)`` (what the Lens pipeline passes).
    Timesteps as the reference writes them are ``num_train_timesteps * sigmas[:-1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if config.use_dynamic_shifting:
        if mu is None:
            mu = empirical_mu(image_seq_len, num_steps)
        shift = exponential_shift if config.time_shift_type == "exponential" else linear_shift
        shifted = shift(mu, base)
    else:  # static shift
        s = np.float32(config.shift)
        shifted = (s * base / (np.float32(1.0) + (s - np.float32(1.0)) * base)).astype(np.float32)
    return np.concatenate([shifted, np.zeros((1,), np.float32)])


def model_timestep(sigma: jax.Array, num_train_timesteps: int = 1000,
                   bf16_rounding: bool = False) -> jax.Array:
    """The time value fed to the denoiser for ``sigma`` (spec 2.4): ``sigma`` itself in float32.

    ``bf16_rounding`` reproduces the reference pipeline run in bf16, which computes
    ``bf16(bf16(1000 sigma) / 1000)`` (e.g. 0.9942 -> 0.99609).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    if not bf16_rounding:
        return sigma
    t = (sigma * num_train_timesteps).astype(jnp.bfloat16)
    return (t / jnp.asarray(num_train_timesteps, jnp.bfloat16)).astype(jnp.bfloat16).astype(jnp.float32)


def euler_step(x: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """``x + (sigma_next - sigma) * v`` computed in float32, returned in the velocity's dtype."""
    dt = (jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32))
    return (x.astype(jnp.float32) + dt * velocity.astype(jnp.float32)).astype(velocity.dtype)
