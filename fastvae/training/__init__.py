"""The training engine behind ``fastvae train``, ``fastvae eval``, ``fastvae sample`` and ``fastvae encode``.

* :mod:`~fastvae.training.config`: :class:`TrainConfig`, its validation, resume merging;
* :mod:`~fastvae.training.builders`: the one place that maps a config to a model;
* :mod:`~fastvae.training.loop`: :func:`train`, the run itself;
* :mod:`~fastvae.training.rundir`: the run folder and the files in it;
* :mod:`~fastvae.training.schedule`: the learning-rate schedule;
* :mod:`~fastvae.training.metrics`: the metrics log (``metrics.jsonl``);
* :mod:`~fastvae.training.progress`: status lines and progress bars;
* :mod:`~fastvae.training.tensorboard_log`: the TensorBoard event files (``--tensorboard``);
* :mod:`~fastvae.training.checkpoint`: atomic checkpoints, and rebuilding a model from one;
* :mod:`~fastvae.training.files`: atomic writes that Ctrl-C and a full disk cannot leave half done;
* :mod:`~fastvae.training.seeds`: the random streams derived from the run's seed;
* :mod:`~fastvae.training.distributed`: one process's place in a torchrun job;
* :mod:`~fastvae.training.evaluate`: held-out evaluation (from clean and from corrupted inputs), codes in batches;
* :mod:`~fastvae.training.figures`: the PNG figures of a run.
"""

from fastvae.training.config import TrainConfig
from fastvae.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
