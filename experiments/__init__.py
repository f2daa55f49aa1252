"""Experiments on top of the vdm library: benchmarks, config sweeps and reproduction notes.

Every script here is a module run from the repository root, so that both `vdm` and
`experiments` import without any path set-up:

  python -m experiments.benchmark            # train/eval/sampling throughput of a config
  python -m experiments.bench_samplers       # sampler cost vs quality on an exact denoiser
  python -m experiments.bench_scan_compile   # U-Net compile and step time, unrolled vs scan
  python -m experiments.sweep print|run|collect ...   # grids of vdm.main runs
  python -m experiments.base_measure         # test bits/dim with and without the base measure
  python -m experiments.objectives           # test bits/dim of the training-objective variants

experiments/bench/ holds the measurements behind `benchmark` (and its default config),
experiments/sweeps/ example sweep files, experiments/results/ the recorded outputs and
experiments/reproduce/README.md the commands and estimates for the published results.
"""
