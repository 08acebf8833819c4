"""The common base of every config: each key, documented once, with the values a
realistic run starts from. Configs in this folder are small differences from it, and each
takes presets: `get_config("runlocal")` (on the command line `configs/X.py:runlocal`)
shrinks any of them to run on a laptop CPU in a minute, as the tests do.
"""

import ml_collections

from sora_jax import objectives


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every key with its realistic value; `runlocal` shrinks it (apply_preset)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = dict(
        dir="data/prepared",  # DATA_DIR given to sora-prep --out (a gs:// path on pods)
        name="",  # NAME given to sora-prep --name
        train_split="train",
        eval_split="test",
        fps=12.5,  # must equal the dataset's --fps
        num_frames=16,  # T frames per clip ...
        frame_stride=2,  # ... taken every `frame_stride` stored frames
        audio_samples=0,  # 0: the same time span as the frames at 16 kHz
        crop_size=112,
        min_crop_scale=0.3,  # random resized crop keeps at least this much of the area
        flip=True,
        # 2: two random windows of each training clip; with a contrastive loss each
        # window's sound is then also a positive for the other window's picture.
        train_views=1,
        eval_temporal_views=4,
        eval_spatial_views=3,  # 1 (centre) or 3 (both ends and centre of the long side)
        # grain worker processes per host (0: decode in the training process). Two keep the
        # demo's data wait near 1% on a 2-core CPU; in-process reader threads compete with
        # the training step for the interpreter and the cores (BENCHMARKS.md).
        workers=16,
        eval_batch_size=64,
        # Train on several prepared datasets at once: dicts of dir, name and weight, e.g.
        # ({"dir": "gs://B/data", "name": "labelled", "weight": 1.0},
        #  {"dir": "gs://B/data", "name": "web_unlabeled", "weight": 3.0}). Clips are drawn
        # in proportion to the weights; an unlabeled dataset's clips are left out of the
        # supervised loss. Evaluation reads dir and name above. (): dir and name alone.
        mixture=(),
        # Cross-fitting (sora-curate): with folds=K > 0, train on every clip of the train
        # split but those of fold holdout_fold (clip i is in fold i % K; sora-prep stores a
        # split's clips in a shuffled order). K runs, each holding out one fold, score
        # every clip with a model that never saw it.
        folds=0,
        holdout_fold=0,
    )

    c.model = dict(
        num_classes=32,  # must equal the dataset's
        embed_dim=512,
        dtype="bfloat16",  # compute dtype (float32 | bfloat16); parameters stay float32
        modality_dropout=0.2,  # chance of hiding one of two present senses in training
        visual=dict(
            widths=(64, 128, 256, 512),  # channels per stage ...
            blocks=(2, 2, 2, 2),  # ... residual blocks per stage ...
            strides=(2, 2, 2, 2),  # ... and the stride of each stage's first block
            norm="group",  # none | group | layer
            residual=True,
            temporal_pool="attention",  # mean | max | attention
            remat=True,  # recompute the tower's activations in the backward pass
            # auto: oneDNN's convolution kernels on the CPU, XLA's elsewhere; or xla, onednn.
            conv_backend="auto",
            # A bias on each conv a norm follows. The norm's own shift makes it nearly
            # redundant, and on a TPU its gradient costs passes over the activations: the
            # production configs leave it out (BENCHMARKS.md section 7).
            conv_bias_before_norm=True,
        ),
        audio=dict(
            cell="lstm",  # lstm | gru
            hidden=512,
            layers=2,
            bidirectional=True,
            num_mel_bins=64,
            spec_augment=(2, 40, 2, 12),  # time masks, max width, mel masks, max width
            unroll=4,  # time steps per scan iteration (less loop overhead, same results)
            time_stack=1,  # log-mel frames per recurrent step (k: the scan runs F/k steps)
            # auto: each LSTM loop as one oneDNN-backed call on the CPU, one Pallas kernel on
            # a TPU (hidden a multiple of 128), XLA's scan elsewhere; or xla, onednn, pallas.
            lstm_backend="auto",
        ),
        fusion=dict(kind="attention", dim=512, heads=8),  # concat | mean | gated | attention
        multi_label=False,  # sigmoid cross-entropy and mAP for several labels per clip
        # Contrastive heads (only in runs with the contrastive objective): each sense's embedding
        # is projected to `dim`; the temperature is learned from `temperature`, clamped.
        projection=dict(dim=128, temperature=0.07, min_temperature=0.01),
    )

    # What training minimises: the weighted sum of the objectives with weight > 0. Each is
    # a module of sora_jax/objectives/ that documents its own settings, and each has its
    # section here (weight 0 but supervised), set as --config.objectives.NAME.weight=W:
    #   supervised   cross-entropy on the labels (0: labels are never read, as in pretraining)
    #   contrastive  audio-visual InfoNCE, a clip's picture and sound against every other
    #                clip of the global batch (configs/pretrain_av.py)
    #   av_sync      the picture against its own soundtrack shifted in time (configs/av_sync.py)
    c.objectives = objectives.defaults()

    # Transfer: start from another run's parameters (a work dir's latest checkpoint, a
    # step dir WORKDIR/checkpoints/STEP, or a sora-export dir); which parts load, of
    # visual | audio | fusion | head | projection. A head for another number of classes
    # is initialised anew. Ignored when the work dir has checkpoints (the run resumes).
    c.init_from = ""
    c.init_parts = ("visual", "audio", "fusion", "head")

    c.optimizer = dict(
        name="adamw",  # adamw | sgd
        learning_rate=1e-3,
        warmup_steps=2_000,
        schedule="cosine",  # cosine | constant
        weight_decay=0.05,
        momentum=0.9,  # sgd only
        grad_clip=1.0,  # global norm; 0 disables
        ema_decay=0.9999,  # 0 disables the EMA of parameters
        freeze=(),  # parts (as init_parts) that never change: no updates, no optimizer state
        pretrained_lr_scale=1.0,  # learning rate multiplier of the parts init_from loaded
    )
    c.batch_size = 512  # global, over all devices and processes
    c.accum_steps = 1  # gradient accumulation micro-batches per step
    c.total_steps = 60_000

    c.mesh = dict(fsdp=4)  # devices along the `fsdp` axis; the rest form the `data` axis
    c.log_every = 100  # steps between host syncs: logs, TensorBoard, the NaN check
    c.eval_every = 5_000  # 0: evaluate only at the end
    # Representation measures of runs with the contrastive objective: held-out cross-modal
    # retrieval, and (labelled data) k-nearest-neighbour top-1 against the train split's
    # first `knn_bank_size` clips.
    c.eval = dict(knn_k=20, knn_bank_size=50_000)
    # More measures, each a module of sora_jax/evaluators/: name -> {type, split,
    # every_steps (0: at every evaluation), and the type's settings}, e.g.
    # {"sync": {"type": "av_sync", "split": "test", "every_steps": 0}}. Their metrics are
    # NAME/METRIC (TensorBoard eval/NAME/METRIC; checkpoint.best_metric may name one).
    c.evals = {}
    c.profile_steps = ()  # (first, last): a profiler trace of those steps in tensorboard/
    # CPU only: compile the train and eval steps without LLVM's optimisations. They compile
    # in ~60% of the time and run 1.5-2x slower: for runs of a few dozen steps (runlocal),
    # where compiling is most of the run. Accelerators ignore it.
    c.cpu_fast_compile = False
    # best_metric: top1 | top5 | map | retrieval_r1 (the mean of video->audio and
    # audio->video recall@1) | NAME/METRIC of an evaluator in `evals`: the checkpoint kept
    # besides the last `keep`
    c.checkpoint = dict(every_steps=1_000, keep=3, best_metric="top1")

    # Multi-process runs (see launch/): coordinator "host:port" with num_processes and
    # process_id, or num_processes=-1 to let JAX detect the cluster (TPU pods, SLURM).
    c.distributed = dict(
        coordinator="",
        num_processes=0,
        process_id=-1,
        heartbeat_timeout_s=100,  # a dead peer stops the others after this long
        cpu_collectives="gloo",  # how CPU-only processes exchange data
    )
    # What sora-export compiles for, and whether it also writes a TensorFlow SavedModel.
    c.export = dict(platforms=("cpu", "cuda", "tpu"), saved_model=True)
    return apply_preset(c, arg)


def apply_preset(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`None`: the config as written. `runlocal`: the same run, shrunk to a laptop CPU
    minute (a tiny model, a few steps, decoding in-process); point it at your data with
    --config.data.dir/name. `wide`: the visual tower's first stage as wide as its second
    (64 -> 128 channels in the production configs), a larger model that suits a TPU."""
    if arg in (None, ""):
        return c
    if arg == "wide":
        # A TPU's matrix units are 128 lanes wide: 64-channel convolutions run at about a
        # third of the rate of 128-channel ones. Compiled for v5e:4x4, kinetics_sounds then
        # does 1.67x the FLOPs in 1.40x the expected step, and is compute-bound; the demo's
        # accuracy with and without it: BENCHMARKS.md section 7.
        widths = tuple(c.model.visual.widths)
        c.model.visual.widths = widths[1:2] + widths[1:] if len(widths) > 1 else widths
        return c
    if arg != "runlocal":
        raise ValueError(f"unknown preset {arg!r}: the presets are 'runlocal' and 'wide'")
    c.data.update(
        num_frames=min(c.data.num_frames, 4),
        crop_size=32,
        eval_temporal_views=min(c.data.eval_temporal_views, 2),
        eval_spatial_views=1,
        workers=0,  # in-process decoding: worker start-up would dominate runs this short
        eval_batch_size=8,
    )
    c.model.update(embed_dim=16, dtype="float32")
    c.model.visual.update(widths=(8, 16), blocks=(1, 1), strides=(2, 2), remat=False)
    c.model.audio.update(
        hidden=16, layers=1, bidirectional=False, num_mel_bins=16, spec_augment=(1, 8, 1, 4)
    )
    c.model.fusion.update(dim=16, heads=4)
    c.optimizer.update(warmup_steps=2, ema_decay=0.0)
    c.batch_size, c.accum_steps, c.total_steps = 8, 1, 12
    c.mesh.fsdp = 1
    c.log_every, c.eval_every = 4, 0
    c.checkpoint.update(every_steps=4, keep=2)
    c.cpu_fast_compile = True  # a dozen steps: the compile is most of the minute
    return c
