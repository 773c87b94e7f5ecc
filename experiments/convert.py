r"""Converts a Hugging Face `nemotron_h` checkpoint to an Orbax params checkpoint, or back.

    python -m experiments.convert --hf_dir=/ckpt/Nemotron-Cascade-2-30B-A3B --out=/ckpt/cascade2_orbax
    python -m experiments.convert --to_hf --orbax_dir=/ckpt/cascade2_orbax --out=/ckpt/cascade2_hf

The HF side streams tensor by tensor (see `nemotron_jax.checkpoint.hf`); both outputs are written to a
temporary directory and renamed when complete.
"""

from __future__ import annotations

from absl import app, flags
from tqdm import tqdm

from nemotron_jax.checkpoint import load_hf, restore_params, save_hf, save_params

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
flags.DEFINE_string("orbax_dir", None, "nemotron-jax params checkpoint directory (with --to_hf).")
flags.DEFINE_string("out", None, "Output directory (must not exist unless --overwrite).", required=True)
flags.DEFINE_bool("to_hf", False, "Convert an Orbax params checkpoint back to Hugging Face safetensors.")
flags.DEFINE_string("param_dtype", None, "Cast parameters to this dtype on import (default: the checkpoint's).")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "Largest safetensors shard written with --to_hf, in MiB.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def _progress_bar(description: str):
    bar = tqdm(desc=description, unit="tensor")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.to_hf:
        if not FLAGS.orbax_dir:
            raise app.UsageError("--to_hf needs --orbax_dir")
        cfg, params = restore_params(FLAGS.orbax_dir)
        bar, update = _progress_bar("writing safetensors")
        save_hf(cfg, params, FLAGS.out, max_shard_bytes=FLAGS.max_shard_mb * 2**20, overwrite=FLAGS.overwrite,
                progress=update)
        bar.close()
    else:
        if not FLAGS.hf_dir:
            raise app.UsageError("--hf_dir is required (or --to_hf with --orbax_dir)")
        bar, update = _progress_bar("reading safetensors")
        cfg, params = load_hf(FLAGS.hf_dir, param_dtype=FLAGS.param_dtype, progress=update)
        bar.close()
        save_params(cfg, params, FLAGS.out, overwrite=FLAGS.overwrite)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
