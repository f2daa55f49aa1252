"""The full config schema with defaults; every file in configs/ starts from `base_config()`.

Keeping every key here (rather than letting experiment files invent keys) is what makes a
misspelt `--config.a.b=value` override fail: the returned ConfigDict is locked, so unknown
keys raise instead of silently creating a new field.

Where a concept has a registry (datasets, schedules, loss weightings, optimisers, samplers),
one key selects the part (data.name, schedule.type, loss.weighting, optim.name,
sample.sampler) and every registered part with options gets its own typed sub-dict, made
from the defaults in its signature: `config.sample.ode.rtol`, `config.optim.adamw.b1`,
`config.schedule.learned_net.n_features`, ... So a part registered anywhere (even in a test)
has its options in the schema without this file being edited.
"""

import ml_collections

from vdm import data, estimators, optim
from vdm.core import losses, schedules
from vdm.metrics import features
from vdm.registry import Registry
from vdm.sampling import samplers


def add_part_options(node: ml_collections.ConfigDict, registry: Registry) -> None:
    """Adds `node.<part>` = ConfigDict(options with defaults) for each part that has options.

    Args:
      node: the concept's config node (e.g. config.sample).
      registry: the concept's registry.
    """
    for name, options in registry.defaults().items():
        if options:
            if name in node:
                raise ValueError(f"{registry.concept} {name!r} clashes with config key {name!r}.")
            node[name] = ml_collections.ConfigDict(options)


def base_config() -> ml_collections.ConfigDict:
    """Returns the default config: a small VDM on the embedded digits data.

    Returns:
      A ConfigDict holding every key the library reads. Experiment files override values,
      never add keys; `lock()` it (configs do this via `finalize`) so typos fail.
    """
    c = ml_collections.ConfigDict()
    c.seed = 1

    # Data: see vdm/data. The shape, vocabulary and class count come from the dataset (for
    # npz, folder and tfds:NAME they are inferred and recorded in workdir/config.json).
    c.data = ml_collections.ConfigDict()
    # A vdm.data.DATASETS name: digits|mnist|cifar10|imagenet32|imagenet64|tfds:NAME[/CONFIG]|
    # npz|folder|gaussian|mixture2d|swirl.
    c.data.name = "digits"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
    c.data.path = ml_collections.config_dict.placeholder(str)  # the .npz file or image folder
    c.data.num_bits = 0  # keep the top bits of 8-bit values: 5 -> vocab 32; 0 = as stored
    c.data.vocab_size = 0  # values per sub-pixel of integer-coded npz/folder/tfds data; 0 = infer
    c.data.batch_size = 64  # global batch, split over all devices and processes
    c.data.eval_batch_size = 256
    c.data.augment = False  # paper's flips + 90-degree rotations; flag fed as conditioning
    c.data.prefetch = 2  # batches the TFDS pipeline prepares ahead
    c.data.shuffle_buffer = 50_000  # TFDS per-epoch shuffle buffer (examples)
    # Each source's options: data.tfds.{image_key, label_key, train_split, eval_split,
    # image_size, channels}, data.folder.{image_size, channels, eval_fraction},
    # data.npz.eval_fraction, data.gaussian.dim, data.swirl.num_train, ...
    add_part_options(c.data, data.DATASETS)

    # Score network: see vdm/nets.
    c.model = ml_collections.ConfigDict()
    c.model.type = "vdm_unet"  # vdm_unet|unet|mlp
    c.model.parameterization = "eps"  # eps|x|v|score: what the network predicts
    # True: the published network's output eps_hat = out + z_t (eps_hat = z_t at init); for x
    # and v the base implying the same eps, for score rejected (vdm/nets/base_measure.py).
    c.model.base_measure = False
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
    c.model.time_embed_dim = 128  # vdm_unet: sinusoidal time-embedding width (official: n_embd)
    c.model.scan = False  # build identical blocks with nn.scan (compile time flat in depth)
    c.model.remat = False  # rematerialise blocks (memory for compute)
    c.model.dtype = "float32"  # compute dtype: float32|bfloat16 (params stay float32)
    c.model.conv_grad = "xla"  # xla|patches: patches = hand-written 3x3 conv backward, fast on CPU
    # softmax|deferred_norm: deferred_norm divides by the row sums after the value matmul (same
    # function; see vdm/nets/layers.py AttentionBlock and experiments/results/perf_attempts.md)
    c.model.attention = "softmax"
    # concat|split: split feeds each U-Net up block its carry and skip as two parts, never
    # concatenated (same parameters and function, faster: vdm/nets/layers.py join_skip)
    c.model.skip_join = "split"
    # swish(GroupNorm(x)) as one function whose backward recomputes the normalised values (same
    # parameters and float32 numbers, a quarter less activation memory: vdm/nets/group_norm.py)
    c.model.fused_norm_swish = True

    # Noise schedule gamma(t) = -log SNR(t): see vdm/schedules.py.
    c.schedule = ml_collections.ConfigDict()
    # fixed_linear|learned_linear|learned_net|cosine|ddpm|multivariate (one learned gamma per
    # element: schedule.multivariate.per=per_pixel|per_channel, n_basis, learn_endpoints)
    c.schedule.type = "learned_linear"
    c.schedule.gamma_min = -13.3
    c.schedule.gamma_max = 5.0
    # elbo|variance: variance = paper's variance-minimising rule for the shape (endpoints keep
    # ELBO gradients; continuous time only). Under any loss.type the schedule is trained by
    # the ELBO (or this rule); loss.type chooses what trains the network.
    c.schedule.grad = "elbo"
    # schedule.learned_net.{n_features, pin_endpoints}, schedule.ddpm.beta_min,
    # schedule.multivariate.{per, n_basis, learn_endpoints}:
    add_part_options(c.schedule, schedules.SCHEDULES)

    # Training objective: see vdm/losses.py. The ELBO is always reported.
    c.loss = ml_collections.ConfigDict()
    c.loss.type = "elbo"  # elbo|simple (DDPM eps-MSE)|weighted
    c.loss.weighting = "none"  # for loss.type=weighted: none|sigmoid|edm (losses.WEIGHTINGS)
    add_part_options(c.loss, losses.WEIGHTINGS)  # loss.sigmoid.bias
    c.loss.timesteps = 0  # T; 0 = continuous time
    c.loss.antithetic = True  # low-discrepancy t over the training batch (eval: iid t)
    # Importance-sampled training times (vdm/core/time_proposals.py): proposal uniform |
    # schedule (uniform in log-SNR) | adaptive_lambda (Kingma & Gao's adaptive noise schedule:
    # q ~ running mean weighted loss per bin) | adaptive (q(t) ~ sqrt of the running mean squared
    # diffusion loss in each of `bins` bins of t, kept in the train state with EMA decay
    # `rate`), mixed with uniform by `floor`; combinable with antithetic draws.
    c.loss.time = ml_collections.ConfigDict(dict(proposal="uniform", bins=32, floor=0.1, rate=0.99))

    # Optimiser: AdamW with linear warm-up, paper values (optim.adamw.{b1, b2, eps,
    # weight_decay} default to 0.9, 0.99, 1e-8, 0.01).
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # a vdm.optim.OPTIMIZERS name: adamw|adam|lamb|sgd
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off (paper)
    c.optim.ema_rate = 0.9999
    c.optim.ema_warmup = False  # EMA decay min(rate, (1 + step) / (10 + step))
    c.optim.accum_steps = 1  # gradient accumulation micro-steps per update
    add_part_options(c.optim, optim.OPTIMIZERS)

    # Train loop: see vdm/run/loop.py.
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.ckpt_every = 500
    c.train.keep_ckpts = 3  # keep last K (plus the best by eval bits/dim)
    c.train.steps_per_call = 1  # >1: lax.scan over k batches per host call
    c.train.fsdp = 1  # size of the parameter-sharding mesh axis; 1 = pure data parallel
    c.train.write_samples = True
    c.train.profile_steps = 0  # >0: clu Profile traces this many steps (TensorBoard profile)

    # Multi-process runs (vdm/distributed.py): a process silent for heartbeat_timeout_s is
    # declared lost and every other process stops with an error naming it; a finishing
    # process waits at most shutdown_timeout_s for the others; joining waits init_timeout_s.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.heartbeat_timeout_s = 20
    c.distributed.shutdown_timeout_s = 30
    c.distributed.init_timeout_s = 300

    # Evaluation: full-split likelihoods in bits/dim, deterministic (vdm/run/evaluate.py).
    c.eval = ml_collections.ConfigDict()
    # Likelihood estimators (vdm/estimators.py), comma-separated: elbo | ode | elbo,ode. Each
    # one's options: eval.ode.{dequantization, trace, num_probes, probe, solver, rtol, ...}.
    c.eval.estimator = "elbo"
    add_part_options(c.eval, estimators.ESTIMATORS)
    c.eval.num_draws = 1  # (t, eps) draws per example (independent times at evaluation)
    c.eval.max_examples = -1  # -1 = whole split
    c.eval.use_ema = True
    c.eval.split = "eval"  # eval: the dataset's test/validation split; train: its train split
    # Class-conditional models, comma-separated: label = -log p(x | y) with the data's labels;
    # null = -log p(x) through the null label (trained by label dropout). Ignored otherwise.
    c.eval.condition = "label,null"
    # --mode=eval: seconds between progress lines and saves of the finished batches'
    # partial results (workdir/eval/partial/), from which a relaunch resumes; 0 = every batch.
    c.eval.report_every = 30.0

    # Sampling (--mode=sample and the end-of-training grid).
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ancestral"  # a SAMPLERS name: ancestral|ddpm|ddim|sde|pc|ode|langevin
    c.sample.steps = 1000
    c.sample.num = 64
    # Classifier-free guidance weight, in the eps_null + w (eps_cond - eps_null) convention of
    # vdm/core/guidance.py: 0 = unconditional, 1 = conditional (the default: a class-conditional
    # model's grid follows sample.label), > 1 = over-weighted. Ho & Salimans (2022) write
    # (1 + w') eps_cond - w' eps_null, so their w' = guidance - 1 (their w' = 0: conditional).
    # No effect on a model with model.num_classes = 0.
    c.sample.guidance = 1.0
    c.sample.label = -1  # class to sample for guided models (-1: cycle over classes)
    # Each sampler's options: sample.ddim.eta, sample.ode.{solver, rtol, atol, ...}, ...
    add_part_options(c.sample, samplers.SAMPLERS)
    # Sample quality (--mode=sample, --mode=reference_stats; vdm/run/sample_metrics.py):
    # FID and KID of the samples against the reference split in the features of a FEATURES
    # network (vdm/metrics/features.py), and for guided samples of a class-conditional model
    # the classifier's accuracy on the classes asked for. One JSON line per call goes to
    # workdir/sample_metrics.jsonl; the feature network and the reference features are
    # cached in workdir/metrics/.
    m = c.sample.metrics = ml_collections.ConfigDict()
    m.enabled = False
    m.features = "digits_classifier"  # digits_classifier (no download) | inception
    m.split = "eval"  # the reference: eval (the dataset's test split) | train
    m.max_reference = -1  # the reference split's first N examples; -1 = all
    m.kid_subsets = 10  # KID: random subsets averaged
    m.kid_subset_size = 1000  # KID: examples per subset (capped at the smaller set)
    # sample.metrics.digits_classifier.{hidden, feature_dim, steps, learning_rate, ...},
    # sample.metrics.inception.{weights (a local .npz: README "Sample quality"), batch_size}:
    add_part_options(m, features.FEATURES)
    return c


# The objective of configs/digits.py:best and of the :improved variants of configs/cifar10.py,
# imagenet32.py and imagenet64.py: the variant of experiments/objectives.py with the lowest
# measured test bits/dim (experiments/results/objectives.md). Its gain over the VDM objective
# is stated, with its standard error, in README.md and the configs' docstrings.
# Measured: importance-sampled time (adaptive proposal) with v-prediction (`combo`, fixed before
# it was measured), -0.143 +- 0.023 bits/dim against the VDM objective on digits at 300 steps,
# 3 seeds, raw parameters; each alone gave -0.053 +- 0.015 and -0.039 +- 0.024.
IMPROVED_OBJECTIVE = {"loss.time.proposal": "adaptive", "model.parameterization": "v"}


def with_improved_objective(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (not yet finalized) with IMPROVED_OBJECTIVE's settings."""
    config.update_from_flattened_dict(IMPROVED_OBJECTIVE)
    return config


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks a config so that overriding or reading a missing key raises a KeyError."""
    config.lock()
    return config
