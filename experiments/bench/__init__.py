"""The measurements behind `python -m experiments.benchmark`, one module per concept.

  configs    the default reduced U-Net config (also a --config file), the depth sweep's
             config and the named variants (sets of config overrides)
  timing     wall-clock medians and the dense-matmul reference
  costs      compiling the train step from `build_run`, XLA's FLOPs and memory figures
  profiling  one profiled step's time by op kind, and the lone 3x3 convolution's speed
  throughput train-step, ELBO-evaluation and sampler images/s
  report     the Markdown tables and the README's performance section

Every figure comes from the devices JAX sees in this process.
"""
