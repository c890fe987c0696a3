r"""Trains and evaluates pointrend-jax models.

  python launch.py --config configs/r50_fpn_1x_coco.py --workdir runs/r50 \
      [--mode train|eval|train_and_eval] [--config.train.max_steps=20 ...]

The config is an ml_collections file whose ``get_config()`` docstring states the command,
the hardware and the expected result; any field can be overridden on the command line
(``--config.eval.num_images=500``). Rerunning the same command resumes from the newest
checkpoint in ``--workdir``; SIGTERM checkpoints and exits cleanly (status 0). A completed
training run exports its final model to ``<workdir>/model`` (``Predictor(None, that_dir)``,
``python -m pointrend_jax.tools.predict --weights that_dir``).

Errors the user can fix -- a missing dataset / weights / image / label file, a malformed
dataset file, a bad or mismatched config value (e.g. the dataset's category count differs from
the model's: ``--config.model.num_classes``), an unreadable checkpoint, a non-finite loss (the
newest checkpoint is the last good state; nothing after it is saved) -- print one line,
``launch.py: error: ...``, and exit with status 2. Anything else shows its traceback.

Multi-host: pass ``--coordinator_address=host:port --num_processes=N --process_id=i`` on every
host, or ``--distributed`` to let JAX detect the cluster (SLURM, Open MPI, TPU pods, GKE).
"""

import time

_START = time.time()

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                          "train: train only; eval: evaluate the newest checkpoint in --workdir "
                          "(else config.init.weights); train_and_eval: train, evaluating every "
                          "config.eval.every steps and at the end.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Initialise jax.distributed from the cluster environment.")


def _parse_flags(argv):
  """absl's parser; a ``--config.*`` override of a key the config lacks gets one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:  # ml_collections: no such field on a locked config
    what: object = e
    while isinstance(what, BaseException) and what.args:  # AttributeError(KeyError(message))
      what = what.args[0]
    from pointrend_jax.errors import one_line
    key = one_line(what)  # type: ignore[arg-type]
    print(f"launch.py: error: a --config.* override names a key the config does not have "
          f"({key}); configs/common.py lists the keys (the zoo configs' "
          "config.model.overrides is empty: set the class count with "
          "--config.model.num_classes)", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required (see --help).")
  # jax.distributed must start before anything else touches JAX.
  from pointrend_jax.training import mesh as mesh_lib
  mesh_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto_detect=_DISTRIBUTED.value)
  from pointrend_jax.errors import USER_ERRORS, one_line
  from pointrend_jax.training import train
  logging.getLogger().setLevel(logging.INFO)
  # orbax logs every checkpoint operation at INFO through absl; keep ours and warnings.
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Our evaluator logs the COCO tables with per-category AP; skip the evaluator's own copy.
  logging.getLogger("pointrend_jax.evaluation.coco_eval").setLevel(logging.WARNING)
  try:
    if _MODE.value == "eval":
      train.evaluate(_CONFIG.value, _WORKDIR.value, start_time=_START)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                              evaluate_after=_MODE.value == "train_and_eval",
                              start_time=_START)
  except USER_ERRORS as e:  # the message says what to fix; no traceback
    print(f"launch.py: error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _HELP = {"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"}
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:
    # absl exits with status 1 after printing the help; asking for help is not an error.
    sys.exit(0 if _HELP & set(sys.argv[1:]) and e.code == 1 else e.code)
