"""Every lorax default, grouped by section; experiment configs import this and change what differs.

Run: python -m lorax.train --config=configs/base.py [--config.lora.rank=8 ...]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds LoRA init, head init, dropout and the data order

    # --- model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = "minilm-l6"  # asset name (see lorax/assets.py) or a Hugging Face model dir
    c.model.architecture = ""  # random weights instead of model.name's (no download; for
    # lorax.plan and speed work): a decoder's Hugging Face config.json as JSON text or a path
    # to one; model.name then only gives the tokenizer ("" = none: no task data)
    c.model.pooling = "mean"  # sentence vector for the head: "mean" over tokens, or "cls" (pooler)
    c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"
    c.model.base_dtype = "float32"  # storage dtype of the frozen base: "float32" or "bfloat16"
    c.model.dropout = 0.1  # hidden dropout inside the (frozen) model during training
    c.model.head_dropout = 0.1  # dropout on the pooled vector before the classifier head
    c.model.scan = False  # decoders: run the layers under nn.scan (compiles one layer, not L)
    c.model.remat = "none"  # decoders: what each layer keeps for the backward pass: "none"
    # (everything), "block_inputs" (only its input: the layer is recomputed, ~1/3 more compute),
    # "dots" (its weight matmuls' outputs: attention, norms and activations recomputed); with
    # FSDP a layer's gathered weights are never kept unless mesh.fsdp_gather = "layer_keep"
    c.model.attention = "auto"  # attention kernel: "auto" (cuDNN's fused kernel on a GPU where
    # it runs these shapes, else XLA's), "xla" or "cudnn" (lorax/attention.py)
    c.model.loss_chunk = -1  # causal LMs: positions per chunk of the output layer + loss, so
    # no [B, T, V] logits are held; 0 = dense logits, -1 = auto (chunks on a GPU when one
    # device's rows' fp32 logits would reach 512 MiB; dense on a CPU)
    c.model.loss_grad = "forward"  # chunked LM loss: "forward" takes the hidden states'
    # gradient while each chunk's logits are at hand; "recompute" recomputes them in the
    # backward pass (one more output-layer matmul; lorax/evaluate.py Hidden)
    c.model.quantize = ""  # QLoRA base: "" (none), "nf4" or "int8" attention and MLP kernels,
    # dequantized inside each matmul (lorax/quant.py); needs method = "lora"
    c.model.quant_block = 64  # weights per absmax scale in the quantized kernels (even)

    # --- task and data -----------------------------------------------------------------------
    c.task = ml_collections.ConfigDict()
    # task: "snli", "rotten_tomatoes", or your own files as "text_classification" /
    # "pair_classification" (encoders); "snli_text", "instructions", "preferences" or "text"
    # (raw text for continued pretraining, lorax/data/text.py) (causal LMs)
    c.task.name = "snli"
    c.task.data = "snli"  # asset name, or local directory (or, for file tasks, a file)
    c.task.max_length = 128  # tokens per example (longer ones are truncated and counted);
    # for causal-LM tasks also the length of each packed training row
    c.task.buckets = (32, 64, 128)  # padded lengths; a step compiles once per bucket (for
    # causal-LM tasks only the scored-choice evaluation uses them)
    c.task.validation_size = 5000.0  # rows held out of train (the same rows for every seed):
    # a count for built-in tasks; for file tasks a count or a fraction such as 0.1
    c.task.max_eval_examples = 0  # cap on validation rows used in periodic evals (0 = all)
    c.task.max_test_examples = 0  # cap on test rows in the final eval (0 = all; smoke tests)
    # Class names in class-index order. Empty: the built-in task's, or for a file task the
    # distinct labels of its training rows, sorted; a run's config.json records them.
    c.task.labels = ()
    # Classification: weight each row's loss by its gold class (weighted cross-entropy, as
    # PyTorch's CrossEntropyLoss(weight=...)): "" (none), "balanced" (n / (classes · n_class)
    # from the training rows), or "label=w,label=w" / "{'label': w}" (classes not named: 1)
    c.task.class_weights = ""

    # Your own data (task.name = "text_classification" or "pair_classification"): task.data is
    # a file (the training rows) or a folder (train.csv / train.jsonl / ..., optionally
    # validation.* and test.*); csv, tsv, jsonl, json or parquet (csv/tsv/jsonl may be .gz or
    # .bz2). Or name each split's file. A split without a file is held out of the training
    # rows: validation_size / test_size rows, a count or a fraction, the same rows every run.
    c.task.train_file = ""  # file tasks: the training rows (else task.data)
    c.task.validation_file = ""  # file tasks: the validation rows (else held out)
    c.task.test_file = ""  # file tasks: the test rows (else held out)
    c.task.text_field = "text"  # the column holding the text (task "text": in a csv, jsonl
    # or parquet task.data each row's is one document; a .txt file is documents separated by
    # blank lines, a folder one document per .txt file)
    c.task.text_pair_field = ""  # pair_classification: the column holding the second text
    c.task.label_field = "label"  # the column holding the label (strings, ints or booleans)
    c.task.skip_labels = ()  # label values meaning "no gold label": skipped and counted
    c.task.test_size = 0.1  # file tasks without a test file: rows held out for test (task
    # "text": documents held out for test, as validation_size holds them out for validation)
    # task.name = "instructions" (causal LMs): the columns of its rows, from any file as above
    c.task.prompt_field = "instruction"  # the instruction (or prompt) column
    c.task.context_field = "context"  # an optional input column ("" = none)
    c.task.response_field = "response"  # the response the model learns to write
    # task.name = "preferences" (causal LMs, train.objective = "dpo"): pairs of responses to a
    # prompt, one preferred, from any file as above (lorax/data/preferences.py)
    c.task.pair_fields = ("prompt", "chosen", "rejected")  # its prompt, chosen, rejected columns
    c.task.chat_template = False  # wrap each prompt as a user turn in the tokenizer's chat
    # template (an error if it has none); False: the prompt text is used as it is
    c.task.margin_field = ""  # train.objective = "reward": a column of per-pair margins (as
    # TRL's "margin"; loss -log σ(r_chosen - r_rejected - margin)); "" = none (margin 0)

    # --- method ------------------------------------------------------------------------------
    # What is trained beside the head (lorax/methods.py): "lora" (a low-rank delta),
    # "adalora" (LoRA in SVD form whose rank budget is reallocated while training),
    # "full" (every base leaf), "top_k_layers" (the last k layers), "bitfit" (the biases),
    # "adapter_houlsby" (bottlenecks after attention and MLP), "adapter_lin" (after the MLP),
    # "prefix" (key/value prefixes in every layer), "prompt" (a soft prompt before the input),
    # "ptuning" (a soft prompt computed by a small MLP encoder)
    c.method = "lora"
    c.top_k_layers = ml_collections.ConfigDict()
    c.top_k_layers.k = 2  # method "top_k_layers": how many of the last layers are trained
    c.adapter = ml_collections.ConfigDict()
    c.adapter.size = 16  # methods "adapter_*": bottleneck width
    c.adapter.activation = "relu"  # between down- and up-projection: "relu", "gelu", "tanh"
    c.prefix = ml_collections.ConfigDict()
    c.prefix.length = 10  # method "prefix": key/value positions added to every layer
    c.prefix.reparam = True  # produce the prefixes from a [P, D] table by a tanh MLP
    c.prefix.hidden = 512  # that MLP's width
    c.prompt = ml_collections.ConfigDict()
    c.prompt.length = 20  # method "prompt": soft-prompt positions before each example
    c.prompt.init = "vocab"  # "vocab" (embeddings of random tokens) or "random" (std 0.02)
    c.ptuning = ml_collections.ConfigDict()
    c.ptuning.length = 20  # method "ptuning": soft-prompt positions
    c.ptuning.init = "vocab"  # init of the table the encoder reads, as prompt.init
    c.ptuning.hidden = 256  # the prompt encoder's (MLP D -> h -> h -> D) width

    # --- LoRA (used when method == "lora") ---------------------------------------------------
    c.lora = ml_collections.ConfigDict()
    c.lora.targets = "q,v"  # comma-separated canonical names (q,k,v,o,mlp_in,...) or regexes
    c.lora.rank = 4  # rank r for every target
    c.lora.alpha = 8.0  # update scaled by alpha / r
    c.lora.rank_pattern = ""  # per-target ranks, e.g. "v=8,q=2"
    c.lora.alpha_pattern = ""  # per-target alphas, e.g. "v=16"
    c.lora.layers = ""  # layers to adapt, e.g. "0,1,2" or "3-5"; empty = all
    c.lora.init = "kaiming"  # init of A: "kaiming" (uniform, 1/sqrt(d_in)) or "gaussian" (std 1/r)
    c.lora.dropout = 0.0  # dropout on the input of the low-rank branch
    c.lora.rslora = False  # scale by alpha / sqrt(r) instead of alpha / r
    c.lora.dora = False  # DoRA (Liu et al. 2024): each adapted kernel also learns a magnitude
    # per output column, m · (W0 + s·BA) / ‖W0 + s·BA‖ (PEFT's use_dora)
    c.lora.lr_ratio_b = 1.0  # LoRA+ (Hayou et al. 2024): the B factors' learning rate is this
    # many times the A factors' (their paper suggests 16); 1 = plain LoRA

    # --- AdaLoRA (method == "adalora"; the lora section gives targets, initial rank, alpha) --
    c.adalora = ml_collections.ConfigDict()
    c.adalora.target_r = 2  # average rank per adapted kernel at the end of the budget schedule
    c.adalora.tinit = 0  # steps before the first pruning
    c.adalora.tfinal = 0  # last steps with the rank pattern fixed
    c.adalora.delta_t = 1  # steps between two rank allocations
    c.adalora.beta1 = 0.85  # EMA of the sensitivity |θ·∂L/∂θ|
    c.adalora.beta2 = 0.85  # EMA of its uncertainty
    c.adalora.orth_reg_weight = 0.5  # weight of ‖PᵀP − I‖ + ‖QQᵀ − I‖ in the loss

    # --- optimisation ------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.objective = "lm"  # what the loss is: "lm" (the task's own: class cross-entropy,
    # next-token loss, choice scoring), or on preference pairs (task.name = "preferences"):
    # "reward" (a reward model: LoRA + a score head on the decoder's last non-pad token,
    # Bradley–Terry loss) or "dpo" (the dpo section below)
    c.train.trainable = ("^head/",)  # regexes of base leaves trained beside the delta (the head)
    c.train.batch_size = 32  # global batch (examples, or packed rows for causal-LM tasks),
    # split over the mesh.data × mesh.fsdp devices (a multiple of their product)
    c.train.num_steps = 2000  # optimizer steps
    c.train.learning_rate = 5e-4  # peak learning rate of the delta
    c.train.head_learning_rate = 0.0  # peak learning rate of the trainable base leaves (0 = same)
    c.train.warmup_fraction = 0.06  # linear warmup over this fraction of num_steps, then decay
    c.train.schedule = "linear"  # decay after warmup: "linear" (to 0), "cosine" or "constant"
    c.train.weight_decay = 0.01  # AdamW decoupled weight decay (on matrices, not biases/norms)
    c.train.b1 = 0.9  # Adam beta1
    c.train.b2 = 0.999  # Adam beta2
    c.train.eps = 1e-8  # Adam epsilon
    c.train.grad_clip = 1.0  # global-norm clip over the trainable tree only (0 = off)
    c.train.keep_best = ""  # keep, report and export the best checkpoint by a periodic
    # validation metric (needs eval_every > 0): "validation_accuracy", "validation_loss",
    # "validation_macro_f1" (classifiers, snli_text) or "validation_perplexity" (LM tasks
    # of tokens: text, instructions); "" = the last one
    c.train.skip_nonfinite = False  # on a NaN/Inf loss: False = stop the run, True = skip the batch
    c.train.max_skipped_consecutive = 10  # skip_nonfinite: stop after this many skips in a row
    c.train.max_skipped_fraction = 0.25  # skip_nonfinite: stop once more of the steps so far
    # were skipped (checked from step 20 on: a diverging run, not a few bad batches)

    # --- DPO (train.objective = "dpo" on task.name = "preferences"; lorax/evaluate.py dpo_sums)
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # β > 0: the implicit reward's scale, β·log(π/π_ref); larger keeps the
    # policy closer to the reference
    c.dpo.loss = "sigmoid"  # "sigmoid" (DPO), "ipo", "hinge" or "robust", as TRL's DPOTrainer
    c.dpo.label_smoothing = 0.0  # dpo.loss = "robust": the assumed fraction of flipped pairs,
    # in [0, 0.5) (the other losses have none, as in TRL)
    c.dpo.reference = ""  # the reference model: "" = this base with the delta switched off; a
    # lorax.train workdir (same base, same method) = the base + that run's adapter (e.g. the SFT
    # run), which the policy then starts from too

    # --- logging, evaluation, checkpoints -----------------------------------------------------
    c.log_every = 25  # steps between metrics.jsonl rows and progress-bar updates
    c.eval_every = 500  # steps between validation evals (0 = only at the end)
    c.eval_batch_size = 128  # examples per eval batch (a multiple of mesh.data × mesh.fsdp)
    c.checkpoint_every = 250  # steps between adapter checkpoints (0 = only at the end)
    c.keep_checkpoints = 2  # most recent checkpoints kept on disk
    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = False  # also write metrics.jsonl's rows as TensorBoard event files in
    # <workdir>/tensorboard (`tensorboard --logdir=runs`)

    # --- devices -----------------------------------------------------------------------------
    # data × fsdp × tensor must equal the number of visible devices (all hosts together);
    # -1 on one axis = the rest of them. See lorax/sharding.py for what each axis splits.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # pure data parallel: batch split, params copied on every position
    c.mesh.fsdp = 1  # data parallel too, and every large kernel split over it (FSDP / ZeRO-3)
    c.mesh.tensor = 1  # Megatron tensor parallel: q/k/v/up/gate split by output, o/down by input
    c.mesh.fsdp_gather = "layer"  # fsdp > 1: "layer" = each layer all-gathers its own weights
    # and gathers them again in the backward pass (ZeRO-3; its gradients reduce-scattered per
    # layer); "layer_keep" = kept from the forward pass instead (a layer's weights per layer
    # more memory, half the all-gathers); "tree" = the whole tree gathered before layer 0
    c.mesh.distributed = False  # multi-host: call jax.distributed.initialize() before training
    c.mesh.coordinator_address = ""  # "host:port" of process 0 ("" = auto-detect: Slurm, MPI, TPU)
    c.mesh.num_processes = 0  # processes (hosts) in the run (0 = auto-detect)
    c.mesh.process_id = -1  # this process's index, 0..num_processes-1 (-1 = auto-detect)
    return c
