"""The demo: a small audio-visual model that learns the built-in demo dataset on a CPU.

`make demo` runs it: sora-train --config configs/demo.py --workdir runs/demo
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = dict(
        dir="data/prepared",  # DATA_DIR given to sora-prep --out
        name="sora_demo",  # NAME given to sora-prep --name
        train_split="train",
        eval_split="test",
        fps=8.0,  # must equal the dataset's --fps
        num_frames=4,  # T frames per clip ...
        frame_stride=2,  # ... taken every `frame_stride` stored frames
        audio_samples=0,  # 0: the same time span as the frames at 16 kHz
        crop_size=32,
        min_crop_scale=0.6,  # random resized crop keeps at least this much of the area
        flip=True,
        eval_temporal_views=2,
        eval_spatial_views=1,  # 1 (centre) or 3 (both ends and centre of the long side)
        # grain worker processes per host (0: decode in the training process). Two keep the
        # demo's data wait near 1% on a 2-core CPU; in-process reader threads compete with
        # the training step for the interpreter and the cores (BENCHMARKS.md).
        workers=2,
        eval_batch_size=32,
    )

    c.model = dict(
        num_classes=4,
        embed_dim=64,
        dtype="float32",  # compute dtype; parameters stay float32
        modality_dropout=0.3,
        visual=dict(
            widths=(16, 32, 64),
            blocks=(1, 1, 1),
            strides=(2, 2, 2),
            norm="group",
            residual=True,
            temporal_pool="mean",
            remat=False,
            # auto: oneDNN's convolution kernels on the CPU, XLA's elsewhere; or xla, onednn.
            conv_backend="auto",
        ),
        audio=dict(
            cell="lstm",
            hidden=64,
            layers=1,
            bidirectional=False,
            num_mel_bins=32,
            spec_augment=(1, 8, 1, 4),  # time masks, max width, mel masks, max width
            unroll=4,  # time steps per scan iteration (less loop overhead, same results)
            # auto: the LSTM loop as one oneDNN-backed call on the CPU, XLA's scan elsewhere.
            lstm_backend="auto",
        ),
        fusion=dict(kind="gated", dim=64, heads=4),
        multi_label=False,
    )

    c.optimizer = dict(
        name="adamw",  # adamw | sgd
        learning_rate=3e-3,
        warmup_steps=30,
        schedule="cosine",  # cosine | constant
        weight_decay=1e-4,
        momentum=0.9,  # sgd only
        grad_clip=1.0,  # global norm; 0 disables
        ema_decay=0.0,  # 0 disables the EMA of parameters
    )
    c.batch_size = 32  # global, over all devices and processes
    c.accum_steps = 1  # gradient accumulation micro-batches per step
    c.total_steps = 300

    c.mesh = dict(fsdp=1)  # devices along the `fsdp` axis; the rest form the `data` axis
    c.log_every = 25
    c.eval_every = 0  # 0: evaluate only at the end
    c.checkpoint = dict(every_steps=100, keep=2, best_metric="top1")

    # Multi-process runs (see launch/): coordinator "host:port" with num_processes and
    # process_id, or num_processes=-1 to let JAX detect the cluster (TPU pods, SLURM).
    c.distributed = dict(
        coordinator="",
        num_processes=0,
        process_id=-1,
        heartbeat_timeout_s=100,  # a dead peer stops the others after this long
        cpu_collectives="gloo",  # how CPU-only processes exchange data
    )
    c.export = dict(platforms=("cpu", "cuda", "tpu"))  # what sora-export compiles for
    return c
