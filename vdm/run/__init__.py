"""Running an experiment: assembling it from a config (setup.py), the train state, step and
loop, evaluation and sampling workflows, checkpoints, logs and pictures.

This is the only layer that reads a ConfigDict; vdm/run/setup.py turns one into the parts
every entry point (train, eval, sample, benchmarks, tests) uses.
"""

from vdm.run import deferred_tensorflow

# Before any module here imports clu: TensorFlow is then loaded only by a TensorBoard writer.
deferred_tensorflow.defer()
