"""Driving a denoiser through time: one-step updates, reverse-time loops, the probability-flow
ODE, and the likelihood estimators built on them (full-split ELBO, PF-ODE NLL).

`vdm.sampling.samplers.sample` is the entry point; samplers, predictors and correctors are
looked up in registries (vdm/sampling/registries.py), so a new one is one function plus one
registration. Imports vdm.core, never the run layer.
"""
