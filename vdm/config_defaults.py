"""The full config schema with defaults; every file in configs/ starts from `base_config()`.

Keeping every key here (rather than letting experiment files invent keys) is what makes a
misspelt `--config.a.b=value` override fail: the returned ConfigDict is locked, so unknown
keys raise instead of silently creating a new field.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Returns the default config: a small VDM on the embedded digits data.

    Returns:
      A ConfigDict holding every key the library reads. Experiment files override values,
      never add keys; `lock()` it (configs do this via `finalize`) so typos fail.
    """
    c = ml_collections.ConfigDict()
    c.seed = 1

    # Data: see vdm/data. Shape, vocab_size and num_classes are filled from the dataset
    # when left at their "infer" value (None / -1), so a config cannot disagree with its data.
    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits|mnist|cifar10|imagenet32|imagenet64|gaussian|mixture2d|swirl
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
    c.data.batch_size = 64  # global batch, split over all devices and processes
    c.data.eval_batch_size = 256
    c.data.augment = False  # paper's flips + 90-degree rotations; flag fed as conditioning
    c.data.dim = 2  # dimension for the gaussian dataset
    c.data.num_train = 50_000  # size of synthetic datasets
    c.data.num_eval = 10_000
    c.data.prefetch = 2  # batches the TFDS pipeline prepares ahead
    c.data.shuffle_buffer = 50_000  # TFDS per-epoch shuffle buffer (examples)

    # Score network: see vdm/nets.
    c.model = ml_collections.ConfigDict()
    c.model.type = "vdm_unet"  # vdm_unet|unet|mlp
    c.model.parameterization = "eps"  # eps|x|v: what the network predicts
    c.model.n_embd = 128  # channels (U-Nets) / hidden width (MLP)
    c.model.n_layers = 32  # ResNet blocks per side (vdm_unet) / hidden layers (mlp)
    c.model.dropout = 0.1
    c.model.with_attention = False  # attention in every block (vdm_unet)
    c.model.fourier_min = 6  # Fourier features 2^n * 2pi * z for n in [min, max]
    c.model.fourier_max = 7
    c.model.norm_groups = 32
    c.model.channel_mult = (1, 2, 2, 2)  # unet
    c.model.num_res_blocks = 2  # unet, per resolution
    c.model.attn_resolutions = (16,)  # unet
    c.model.num_heads = 1
    c.model.num_classes = 0  # >0 adds a label embedding with a reserved null label (CFG)
    c.model.cond_aug = False  # scalar augmentation-flag conditioning input
    c.model.scan = False  # build identical blocks with nn.scan (compile time flat in depth)
    c.model.remat = False  # rematerialise blocks (memory for compute)
    c.model.dtype = "float32"  # compute dtype: float32|bfloat16 (params stay float32)
    c.model.conv_grad = "xla"  # xla|patches: patches = hand-written 3x3 conv backward, fast on CPU

    # Noise schedule gamma(t) = -log SNR(t): see vdm/schedules.py.
    c.schedule = ml_collections.ConfigDict()
    c.schedule.type = "learned_linear"  # fixed_linear|learned_linear|learned_net|cosine|ddpm
    c.schedule.gamma_min = -13.3
    c.schedule.gamma_max = 5.0
    c.schedule.pin_endpoints = False  # learned_net: gamma(0), gamma(1) held at min/max
    c.schedule.n_features = 1024  # learned_net hidden width
    c.schedule.grad = "elbo"  # elbo|variance: variance = paper's variance-minimising rule

    # Training objective: see vdm/losses.py. The ELBO is always reported.
    c.loss = ml_collections.ConfigDict()
    c.loss.type = "elbo"  # elbo|simple (DDPM eps-MSE)|weighted
    c.loss.weighting = "none"  # for loss.type=weighted: none|sigmoid (name in losses.WEIGHTINGS)
    c.loss.timesteps = 0  # T; 0 = continuous time
    c.loss.antithetic = True  # low-discrepancy t over the global batch

    # Optimiser: AdamW with linear warm-up, paper values.
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off (paper)
    c.optim.ema_rate = 0.9999
    c.optim.ema_warmup = False  # EMA decay min(rate, (1 + step) / (10 + step))
    c.optim.accum_steps = 1  # gradient accumulation micro-steps per update

    # Train loop: see vdm/train.py.
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.ckpt_every = 500
    c.train.keep_ckpts = 3  # keep last K (plus the best by eval bits/dim)
    c.train.steps_per_call = 1  # >1: lax.scan over k batches per host call
    c.train.fsdp = 1  # size of the parameter-sharding mesh axis; 1 = pure data parallel
    c.train.write_samples = True

    # Evaluation: full-split ELBO bits/dim, deterministic.
    c.eval = ml_collections.ConfigDict()
    c.eval.num_draws = 1  # (t, eps) draws per example
    c.eval.max_examples = -1  # -1 = whole split
    c.eval.use_ema = True

    # Sampling (--mode=sample and the end-of-training grid).
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ancestral"  # ancestral|ddpm|ddim|sde|pc|ode|langevin
    c.sample.steps = 1000
    c.sample.num = 64
    c.sample.guidance = 0.0  # classifier-free guidance weight w
    c.sample.eta = 0.0  # DDIM
    c.sample.label = -1  # class to sample for guided models (-1: cycle over classes)
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks a config so that overriding or reading a missing key raises a KeyError."""
    config.lock()
    return config
