"""Reading prepared datasets: clip sampling and augmentation in grain workers (the clip
code is in sora_jax.media), and global batches."""
