"""Pure diffusion math: the forward process, noise schedules, the decoder, the ELBO terms, the
variance-minimising schedule gradient, guidance and analytic denoisers.

Nothing here reads a config, touches files or knows about devices: every function takes
arrays and plain arguments, so tests check it against closed forms.
"""
