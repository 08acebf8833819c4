"""Reading prepared datasets: decoding, clip sampling, augmentation and global batches."""
