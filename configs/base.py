"""The original guide's configuration: every hyperparameter of a jaxlm run.

Use: python -m jaxlm.main --config=configs/base.py --config.training.learning_rate=5e-4
     python -m jaxlm.main --config=configs/base.py:tiny   # seconds on a CPU, for smoke runs

`jaxlm.config.validate` checks every value before any work starts.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = "runs/experiment_1"  # metrics.jsonl, tensorboard/, checkpoints/{last,best}
  config.device = "auto"  # auto | cpu | gpu (alias: cuda) | tpu; auto lets JAX choose
  # Compiled programs kept across runs (JAX's persistent compilation cache, for programs that took 1 s
  # or more): a resumed or repeated run loads its training step instead of compiling it again (the
  # GPU config's: 3 s instead of 25 s on an H200). "" = none set here (JAX_COMPILATION_CACHE_DIR applies).
  config.compile_cache_dir = "~/.cache/jaxlm/xla"

  # How the run spreads over the devices of that platform (every GPU of every host): a mesh of
  # data x fsdp devices. Both axes split the batch; `fsdp` also shards the parameters and the
  # optimizer state (ZeRO-3), `data` replicates them. -1: every device the other axis leaves.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1

  config.data = data = ml_collections.ConfigDict()
  data.dataset_name = "wikitext"  # Hugging Face hub dataset, used when data_dir is empty
  data.dataset_config = "wikitext-2-raw-v1"
  # A local copy instead of the hub: train/validation/test as .txt or .raw files (one row per line,
  # WikiText raw layout) or .parquet files with a `text` column (as the hub ships them).
  data.data_dir = ""
  data.raw_dir = "data/raw"  # the `datasets` download cache
  data.processed_dir = "data/processed"  # tokenized splits, one folder per source + tokenizer
  data.seq_length = 128  # tokens per training sequence; the model predicts seq_length - 1 of them
  # False: the train split is cut into the same windows every epoch (as the original guide does).
  # True: each epoch's windows start at a new offset in [0, seq_length), drawn from (seed, epoch), so
  # every token comes at other positions and after other context (augmentation for small corpora).
  data.shift_windows = False
  data.tokenizer = tok = ml_collections.ConfigDict()
  # Exactly one source: a byte-level BPE trained on the train split (the default), an existing
  # tokenizer.json, or a pretrained tokenizer from the hub (e.g. "gpt2").
  tok.vocab_size = 8192  # for the trained BPE
  tok.file = ""
  tok.pretrained = ""

  config.model = model = ml_collections.ConfigDict()
  model.d_model = 256
  model.num_layers = 4
  model.num_heads = 4
  model.d_ff = 1024
  model.dropout = 0.1  # on the embeddings and on each residual branch's output, as the guide
  # On the attention probabilities too (none in the guide). Training then computes attention unfused,
  # with [batch, heads, length, length] scores, whatever model.attention says; evaluation does not.
  model.attention_dropout = 0.0
  # Zero the whole embedding of an input token with this probability in training (its position's
  # embedding stays): the next tokens must be predicted without it (none in the guide).
  model.token_dropout = 0.0
  # learned: an embedding per position, added to the tokens' (the guide's and GPT-2's) | rope: rotary
  # embeddings of the queries and keys in attention (no parameters; a GPT-2 export cannot hold them)
  model.positions = "learned"
  model.max_seq_length = -1  # positions the model reads; -1: data.seq_length
  model.tie_embeddings = True  # output projection = token embedding transposed
  model.init_std = 0.02
  model.scaled_residual_init = False  # GPT-2: residual projections get init_std / sqrt(2 * num_layers)
  model.layer_norm_eps = 1e-5
  # Computation dtype: auto = bfloat16 on GPU/TPU (mixed precision: float32 parameters, optimizer,
  # softmax and loss), float32 on CPU.
  model.dtype = "auto"
  model.param_dtype = "float32"
  # auto: cuDNN's fused flash attention on an NVIDIA GPU in bfloat16 for sequences of 256 tokens or
  # more (where it is faster), attention by blocks of queries on a CPU, XLA's otherwise
  # | blocked | xla | cudnn
  model.attention = "auto"
  model.activation = "gelu"  # gelu (exact, as the guide) | gelu_tanh (GPT-2's approximation)
  # Trace and compile one block, scanned over the layers' stacked parameters, instead of each layer
  # in turn: compile time no longer grows with depth. The parameters are then stored stacked.
  model.scan_layers = False
  # Start from a Hugging Face GPT-2 checkpoint (a directory with config.json, model.safetensors and
  # tokenizer.json) instead of random weights: its shape and tokenizer replace the ones above.
  model.init_from = ""

  config.training = training = ml_collections.ConfigDict()
  training.epochs = 3
  training.batch_size = 2  # the global batch: split over the mesh's devices
  training.eval_batch_size = 16  # validation/test only; the per-token loss is exact at any size
  training.learning_rate = 3e-4  # peak of the warmup-cosine schedule
  training.min_learning_rate = 0.0  # the cosine's floor, reached at num_steps
  training.warmup_steps = 300
  # Schedule length in optimizer steps. -1: epochs x steps per epoch, derived from the data. The
  # original guide's 3000 is far shorter than 3 epochs of WikiText-2: the rate would then sit at
  # its floor for most of the run (a warning says so).
  training.num_steps = -1
  training.weight_decay = 0.01
  training.decay_all_params = True  # False: no decay on biases, LayerNorm and embeddings
  training.clip_norm = 1.0
  # > 0: keep an exponential moving average of the weights with this decay per update (e.g. 0.999:
  # about the last 1,000 updates); the average is what is evaluated, kept as `best` and used.
  training.ema_decay = 0.0
  training.b1 = 0.9
  training.b2 = 0.999
  training.eps = 1e-8
  training.patience = 2  # epochs without a better validation loss before stopping
  training.seed = 0
  training.log_every_steps = 100  # progress line and TensorBoard scalars
  # Save `last` within an epoch too, in the background, so that a crash loses little (0 = off;
  # whichever comes first). Every epoch's end is saved regardless.
  training.checkpoint_every_steps = 0
  training.checkpoint_every_minutes = 10.0
  # Optimizer steps per jitted call (a lax.scan over steps gathering their batches on the device).
  # -1: on a GPU/TPU up to 16 for steps under 1 TFLOP per device, whose work is shorter than their
  # dispatch; up to 2 for larger steps in runs of 100,000 steps or more; else 1.
  training.steps_per_call = -1
  # The training loss's output projection and cross-entropy over this many tokens at a time (whole
  # positions of every row), never holding all [B, L, V] logits: 0 = all at once; -1 = by device
  # (chunks of 256 on a CPU, where they run faster; all at once elsewhere).
  training.loss_chunk = -1
  # The training step's matmuls on a GPU: "xla" (XLA times Triton's and cuBLAS's kernels for each and
  # keeps the faster), "cublas" (cuBLAS alone), or "auto": cublas for steps of 1 TFLOP or more per
  # GPU, where it trains faster; xla below. Other devices ignore "auto" and "xla".
  training.gpu_matmuls = "auto"

  # A sample from a fixed prompt at every validation, on the console and in TensorBoard (text), so
  # that you see the model learn. The same sampling settings are jaxlm.generate's defaults.
  config.sample = sample = ml_collections.ConfigDict()
  sample.prompt = " The"  # WikiText's style: a leading space, spaces around punctuation
  sample.max_new_tokens = 48  # 0: no samples while training
  sample.temperature = 0.8  # 0: greedy
  sample.top_k = 200  # 0: no top-k cut
  sample.top_p = 1.0  # nucleus sampling; 1: off
  sample.seed = 0

  if variant == "tiny":
    # Trains in seconds on a CPU (tests, smoke runs). Needs a local corpus: --config.data.data_dir.
    data.seq_length = 32
    tok.vocab_size = 512
    model.d_model, model.num_layers, model.num_heads, model.d_ff = 32, 2, 2, 64
    training.epochs = 2
    training.batch_size = 8
    training.warmup_steps = 10
    training.learning_rate = 3e-3
    training.log_every_steps = 20
    sample.max_new_tokens = 8
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}: use configs/base.py or configs/base.py:tiny")
  config.lock()  # a mistyped key in an override or a config file fails instead of adding a key
  return config
