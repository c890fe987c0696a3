r"""Trains and evaluates pointrend-jax models.

  python launch.py --config configs/r50_fpn_1x_coco.py --workdir runs/r50 \
      [--mode train|eval|train_and_eval] [--config.train.max_steps=20 ...]

The config is an ml_collections file whose ``get_config()`` docstring states the command,
the hardware and the expected result; any field can be overridden on the command line.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                          "What to run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required (see --help).")
  # The training loop lands with the training issue; until then say so plainly.
  raise SystemExit("launch.py: training and evaluation are not implemented yet "
                   "(pointrend_jax.training arrives with the training issue).")


if __name__ == "__main__":
  app.run(main)
