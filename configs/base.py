"""Defaults shared by every lmtrace run card. Run cards call `base.defaults()` and edit it; used as a
run card itself it trains the tiny preset on a 16-word bigram language:

  python train.py --config=configs/base.py --workdir=runs/base

Expected (measured, seed 0, 200 steps): eval excess loss 0.083 nats/token at step 50, 0.022 at step
200 (eval loss 2.132 vs the exact optimum 2.110). Runtime: 4.6 min wall on a shared 2-core CPU
(dataset build and compilation included)."""

import ml_collections as mlc

from lib import model as M


def model_config(preset: str) -> mlc.ConfigDict:
  """The `model` section filled from a preset of lib/model.py (every field overridable)."""
  m = mlc.ConfigDict(vars(M.preset(preset)))
  m.preset = preset  # informational: which preset the fields came from
  return m


def defaults() -> mlc.ConfigDict:
  """Every config key with its default (unlocked, for run cards to edit)."""
  c = mlc.ConfigDict()
  c.seed = 0  # model init, dropout and data order all derive from it

  c.model = model_config("tiny")  # architecture (lib/model.py ModelConfig fields)
  c.model.vocab_size = -1  # -1: taken from the data

  c.data = mlc.ConfigDict()
  c.data.source = mlc.ConfigDict(
    dict(  # one source: kind + language parameters + split sizes
      kind="bigram", seed=0, n_terminals=16, n_train=50_000, n_validation=1_000, n_test=1_000
    )
  )
  c.data.groups = mlc.ConfigDict()  # optional named groups {name: source spec}; overrides `source`
  c.data.seed = -1  # data-order seed (-1 = use the run's `seed`)
  c.data.data_dir = ""  # TFDS data_dir ('' = $LMTRACE_DATA_DIR or ~/.cache/lmtrace/tfds)
  c.data.seq_len = 64  # tokens per row (packed documents)
  c.data.packing = True  # pack documents into rows (segment ids); False: one document per row, padded
  c.data.docs_per_row = 0  # documents tried per packed row (0 = from the mean length)
  c.data.objective = "clm"  # clm (causal LM) | mlm (masked LM; set model.causal=False)
  c.data.num_threads = 2  # grain prefetch threads
  c.data.cache_tokens = 50_000_000  # decode a training split into memory when it has fewer tokens

  c.train = mlc.ConfigDict()
  c.train.steps = 200  # optimizer updates
  c.train.init_from = ""  # 'DIR' or 'DIR:STEP': start from that run's parameters (fresh optimizer, step 0); a resume wins
  c.train.batch_size = 16  # global rows per update
  c.train.grad_accum = 1  # microbatches per update (batch_size must divide)
  c.train.log_every = 20  # console + metrics.jsonl cadence (steps)
  c.train.stop_on_nan = True  # stop with the step number on a non-finite loss
  c.train.stop_at = 0  # stop (with a resume checkpoint) after this step; 0 = run to the end
  c.train.seeds = ""  # '0,1,2,3,4' or '0-4': train these seeds as one vectorised group in WORKDIR/seed_<s> ('' = one run, `seed`)
  c.train.seeds_mode = "auto"  # seeds group: vmap (batched; accelerators) | map (runs in turn in one program; CPU) | auto

  c.opt = mlc.ConfigDict()
  c.opt.name = "adamw"  # adamw | sgd | adafactor | lion
  c.opt.lr = 3e-3  # peak learning rate
  c.opt.schedule = "cosine"  # cosine | linear | constant | inverse_sqrt (after warmup)
  c.opt.warmup_steps = 20  # linear warmup to lr over this many updates
  c.opt.warmup_from_zero = True  # True: warmup starts at lr 0 (update 1 is a no-op); False: update k uses lr·k/warmup
  c.opt.final_lr_frac = 0.1  # end of decay as a fraction of lr
  c.opt.b1 = 0.9  # Adam/Lion beta1
  c.opt.b2 = 0.98  # Adam/Lion beta2
  c.opt.eps = 1e-8  # Adam epsilon
  c.opt.weight_decay = 0.01  # decoupled, matrices only
  c.opt.momentum = 0.9  # SGD momentum (0 = plain SGD)
  c.opt.nesterov = False  # SGD Nesterov momentum
  c.opt.grad_clip = 1.0  # global-norm clip (0 = off)

  c.ckpt = mlc.ConfigDict()
  c.ckpt.schedule = "pythia:every=100"  # analysis checkpoints: ';'-joined specs (pythia, exponential, log, interval, explicit)
  c.ckpt.resume_every = 100  # full-state resume checkpoints every k steps
  c.ckpt.keep_resume = 2  # resume checkpoints kept (latest N)
  c.ckpt.params_only = False  # analysis checkpoints hold params only (saves disk)
  c.ckpt.async_save = True  # orbax async saves

  c.eval = mlc.ConfigDict()
  c.eval.every = 50  # held-out eval cadence (steps; also at the end)
  c.eval.batches = 4  # fixed validation batches (same tokens for every run)
  c.eval.batch_size = 16  # rows per eval batch
  c.eval.test_at_end = True  # after the last step, per-group test-split loss/ppl (test/<group>/ppl, test/avg_ppl)
  c.eval.mlm_sentences = 200  # mlm on PCFG/HMM: validation sentences masked at every position for the exact excess loss (0 = off)

  c.adversarial = mlc.ConfigDict()  # Liu et al. App. A.4: minimise loss − weight·(downstream head loss); data/adversarial.py
  c.adversarial.weight = 0.0  # λ (0 = off)
  c.adversarial.task = "task_C"  # task split whose adversarial part (examples [70%, 80%)) the head is fitted on
  c.adversarial.examples = 64  # examples per half (head fitted on k, its loss measured on another k) each step
  c.adversarial.ridge = 0.1  # ridge strength, relative to the mean diagonal of the feature kernel

  c.mixture = mlc.ConfigDict()
  c.mixture.method = "stratified"  # stratified | static | aioli | skillit | doremi | doge (lib/mixture.py)
  c.mixture.proportions = ""  # static: 'name=p,...' or 'p1,p2,...'
  c.mixture.rows = "exact"  # exact: each batch's group counts round B·p (largest remainder) | sampled: each row drawn from p
  c.mixture.update_steps = 250  # aioli, skillit: steps per round (U)
  c.mixture.lp_rounds = 4  # aioli: LearnParams sweeps per round (R)
  c.mixture.lp_steps = 4  # aioli: training steps per LearnParams sub-phase (s)
  c.mixture.one_hot_factor = 0.625  # aioli: weight f of the probed group in q^(j)
  c.mixture.lp_branches = ""  # aioli: '' = chained LearnParams (released); 'vmap'|'sequential' = R·m branches forked per round
  c.mixture.eta = 0.2  # aioli, skillit: step size η
  c.mixture.ema = 0.0  # aioli: EMA γ of Â, Ā¹ = Â¹, p ∝ p⁰·exp(η·1ᵀĀ) (0 = cumulative multiplicative update)
  c.mixture.prior = ""  # aioli restricted mode: 'name=p,...' trained for prior_steps, then p⁰ of every round's update
  c.mixture.prior_steps = 0  # aioli restricted mode: steps trained on the prior before the first round
  c.mixture.window = 3  # skillit: number of recent evaluations summed in the update
  c.mixture.graph = ""  # skillit: skills graph 'a,b;c,d' (row i = trained group), see mixture.skills_graph
  c.mixture.skillit_form = "released"  # skillit: released (eval every eval_every, stale window, p¹ ∝ e^{ηA1}) | fresh
  c.mixture.eval_every = 0  # skillit released form: evaluation cadence E, must divide update_steps (0 = update_steps/2)
  c.mixture.doge_clip = 1.0  # doge: clip each per-group and the validation gradient to this norm first (released; 0 = off)
  c.mixture.reference = ""  # doremi: reference run dir (its params: per-token ref losses) or 'name=loss,...'
  c.mixture.mu = 0.01  # doremi: step size of log w; doge: log w += s/mu
  c.mixture.smoothing = 1e-3  # doremi: w <- (1-eps) w + eps/m

  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # device mesh; one axis may be -1

  c.probes = mlc.ConfigDict()
  c.probes.enabled = False  # in-training per-token surprisal hook (analysis/trajectories.py)
  c.probes.schedule = "log:num=50"  # steps at which probe surprisals are recorded
  c.probes.sequences = 64  # validation sequences in the probe set
  c.probes.positions = 0  # random positions per sequence (0 = every position)
  c.probes.seed = 0  # probe-set selection seed (recorded with the results)

  c.log = mlc.ConfigDict()
  c.log.tensorboard = True  # also write TensorBoard event files under WORKDIR/tb
  c.log.peak_flops = 0.0  # per-device peak FLOP/s for MFU (0 = from the device kind)

  c.distributed = mlc.ConfigDict()
  c.distributed.coordinator = ""  # host:port for jax.distributed.initialize ('' = auto/none)
  c.distributed.num_processes = 0  # total processes (GPU clusters / local multi-process)
  c.distributed.process_id = -1  # this process's id
  c.distributed.timeout_s = 300  # give up (one clear line) when the coordinator is not reachable within this
  return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = defaults()
  if arg:
    c.model = model_config(arg)
    c.model.vocab_size = -1
  c.lock()
  return c
