"""Encode time of a small GPT-OSS configuration: lens_jax vs transformers, same CPU, one run.

Both sides hold the same random weights (fp32); each is run once to warm up (JAX compiles) and
then timed for one call. Prints a markdown table with the ratio to transformers.

    python benchmarks/text_encoder.py [--batch 2] [--length 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SMALL = {"model_type": "gpt_oss", "vocab_size": 2048, "hidden_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512,
         "num_local_experts": 8, "num_experts_per_tok": 4, "sliding_window": 32, "swiglu_limit": 7.0,
         "rms_norm_eps": 1e-5, "attention_bias": True, "pad_token_id": 2047, "max_position_embeddings": 4096,
         "layer_types": ["sliding_attention", "full_attention"] * 2,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False}}
LAYERS = (1, 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="prompts per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--threads", type=int, default=0,
                        help="1: both sides single-threaded (torch.set_num_threads(1) and XLA without its "
                             "multi-threaded Eigen pool), steadier on a shared machine; 0: library defaults")
    args = parser.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GptOssConfig as HFConfig, GptOssModel
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from lens_jax.checkpoints.keymap import torch_tensors
    from lens_jax.checkpoints.text_encoder import text_encoder_mappings
    from lens_jax.models.text_encoder import GptOssConfig, TextEncoder, random_params

    config = GptOssConfig.from_hf(SMALL)
    params = random_params(config, 4, True, np.float32, seed=0, scale=0.05)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2000, size=(args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1:, args.length * 3 // 4:] = False

    def timed(fn):
        fn()  # warm-up / compile
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rows = []
    # transformers (eager attention, dense experts dequantized by transformers itself).
    hf_config = HFConfig(**{k: v for k, v in SMALL.items()})
    hf_config._attn_implementation = "eager"
    model = GptOssModel(hf_config).eval()
    tensors = dict(torch_tensors(params, text_encoder_mappings(config, 4, True, prefix="")))
    state = {"norm.weight": torch.ones(512)}
    for key, value in tensors.items():
        if key.endswith("_blocks"):
            state[key[:-7]] = convert_moe_packed_tensors(
                torch.from_numpy(value), torch.from_numpy(tensors[key[:-7] + "_scales"]), dtype=torch.float32)
        elif not key.endswith("_scales"):
            state[key] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
    model.load_state_dict(state)
    tids, tmask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()

    def run_torch():
        with torch.no_grad():
            model(input_ids=tids, attention_mask=tmask, output_hidden_states=True)

    torch_s = timed(run_torch)
    rows.append(("transformers GptOssModel (eager, dense experts)", torch_s))

    host = {p: jnp.asarray(v) for p, v in params.items()}
    dense_host = dict(host)
    from lens_jax.models import mxfp4
    for proj in ("gate_up", "down"):
        blocks, scales = dense_host.pop(("layers", f"{proj}_blocks")), dense_host.pop(("layers", f"{proj}_scales"))
        dense_host[("layers", proj)] = jnp.swapaxes(mxfp4.dequantize(blocks, scales, jnp.float32), 2, 3)
    variants = [("lens_jax, MXFP4 packed, moe_impl=dense (default)", host, True, "dense"),
                ("lens_jax, dense experts, moe_impl=dense", dense_host, False, "dense"),
                ("lens_jax, MXFP4 packed, moe_impl=ragged", host, True, "ragged")]
    for name, arrays, packed, impl in variants:
        encoder = TextEncoder(config, arrays, layers=LAYERS, mxfp4=packed, moe_impl=impl)
        jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
        rows.append((name, timed(lambda: jax.block_until_ready(encoder(jids, jmask)))))

    print(f"GPT-OSS small config (hidden 512, 4 layers, 8 experts top-4, 8/2 heads), batch {args.batch} x "
          f"{args.length} tokens, fp32, CPU ({os.cpu_count()} cores, threads: {args.threads or 'default'}), "
          "one timed run after warm-up\n")
    print("| implementation | encode time (ms) | ratio vs transformers |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / torch_s:.2f} |")
    print("| GPU | not measured: no GPU | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
