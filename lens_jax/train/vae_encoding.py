"""Host batches' images -> VAE latent tokens, on every local device, one compiled program per shape.

``VAEEncoder(config)(batch)``: the packed host batch in (``image_patches [B, N_img, 768]``,
``segment_valid``, ``latent_hw``, ``token_offset``), the same dict out with ``latents [B, N_img,
128]`` (normalized packed tokens at each image's token slots, zeros at padding) and without
``image_patches``.

Images of one bucket shape are encoded together as one array sharded over this host's devices
(axis ``images`` of a 1-D mesh; VAE weights replicated). The group is padded with blank images to
``group_size(count)``: the next power of two, at least the device count and a multiple of it. So a
bucket shape compiles at most ``log2(largest group) + 1`` programs over a whole run however the
bucket mix changes from step to step, and each program runs on all devices.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens_jax.models.vae import vae_method
from lens_jax.data.buckets import unpatchify_image


def group_size(count: int, num_devices: int) -> int:
    """Images per compiled encode for ``count`` images: a power of two >= count, a multiple of the
    device count (so every device gets the same number)."""
    size = 1 << max(0, int(count) - 1).bit_length()
    return -(-max(size, num_devices) // num_devices) * num_devices


def _vae_from_config(config: ml_collections.ConfigDict):
    path = config.image_encoder.path
    if not path:
        raise ValueError("config.image_encoder.kind='vae' needs config.image_encoder.path "
                         "(a VAE folder, or 'random')")
    if path == "random":  # a tiny random VAE, for tests
        from lens_jax.checkpoints.vae import random_vae
        from lens_jax.models.vae import VAEConfig

        return random_vae(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                    layers_per_block=1), seed=int(config.seed))
    from lens_jax.checkpoints.vae import load_vae

    return load_vae(path)


class VAEEncoder:
    """See the module docstring. ``devices``: default ``jax.local_devices()``."""

    def __init__(self, config: ml_collections.ConfigDict, devices=None):
        self.vae = _vae_from_config(config)
        self.channels = int(config.model.in_channels)
        devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), ("images",))
        self.images_sharding = NamedSharding(self.mesh, PartitionSpec("images"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        graphdef, state = nnx.split(self.vae.model)
        self._state = jax.device_put(state, replicated)
        latent_channels = self.vae.config.latent_channels

        def encode(state, images):  # [G, H, W, 3] in [-1, 1] -> [G, H/16 * W/16, 128]
            model = nnx.merge(graphdef, state)  # what FluxVAE.image_to_latents runs, in one program
            moments = vae_method(model, "encode_moments", images)
            return vae_method(model, "vae_latents_to_tokens", moments[..., :latent_channels])

        self._encode = jax.jit(encode, in_shardings=(replicated, self.images_sharding),
                               out_shardings=self.images_sharding)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def compiled_programs(self) -> int:
        """Programs compiled so far (one per image shape and group size)."""
        return self._encode._cache_size()

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``[n, H, W, 3]`` float32 in [-1, 1] -> tokens ``[n, H/16 * W/16, 128]`` (padded group)."""
        n = images.shape[0]
        padded = np.zeros((group_size(n, self.num_devices),) + images.shape[1:], np.float32)
        padded[:n] = images
        tokens = self._encode(self._state, jax.device_put(padded, self.images_sharding))
        return np.asarray(tokens, np.float32)[:n]

    def __call__(self, batch: dict) -> dict:
        patches = np.asarray(batch["image_patches"])
        valid, hw, offset = (np.asarray(batch[k]) for k in ("segment_valid", "latent_hw", "token_offset"))
        b, n = patches.shape[:2]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, s in zip(*np.nonzero(valid)):
            groups.setdefault((int(hw[r, s, 0]), int(hw[r, s, 1])), []).append((int(r), int(s)))
        latents = np.zeros((b, n, self.channels), np.float32)
        for (h, w), slots in sorted(groups.items()):
            images = np.stack([unpatchify_image(patches[r, offset[r, s]:offset[r, s] + h * w], h, w)
                               for r, s in slots]).astype(np.float32)
            for (r, s), tokens in zip(slots, self.encode_images(images)):
                latents[r, offset[r, s]:offset[r, s] + h * w] = tokens
        out = {k: v for k, v in batch.items() if k != "image_patches"}
        out["latents"] = latents
        return out
