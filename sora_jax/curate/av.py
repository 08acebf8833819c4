"""Does a clip's sound belong to its picture? Under a model trained to align the two
(the contrastive objective), a clip's picture should match its own sound better than other
clips' sounds, and its sound its own picture. `av_score` is the share of other clips that
its own partner beats, both ways, averaged: about 1 for a clip whose sound is its own, about
0.5 (or less) for one whose sound came from elsewhere (dubbed, music laid over it).

"Other clips" are one bank of `BANK` clips drawn with a fixed seed from every clip read, the
same for every process: a clip's score depends on neither how the clips were split over
processes nor on its neighbours in the file.
"""

import numpy as np

BANK = 1024
SEED = 0


def bank_positions(split_sizes: dict[str, int], size: int = BANK) -> list[tuple[str, int]]:
    """(split, index) of the bank's clips: a seeded sample of every clip read."""
    total = sum(split_sizes.values())
    chosen = np.sort(np.random.default_rng(SEED).choice(total, min(size, total), replace=False))
    positions, start = [], 0
    for split, n in split_sizes.items():
        positions += [(split, int(i - start)) for i in chosen if start <= i < start + n]
        start += n
    return positions


def av_scores(
    video: np.ndarray,  # [N, P] unit vectors; NaN rows: no picture
    audio: np.ndarray,  # [N, P] unit vectors; NaN rows: no sound
    ids: np.ndarray,  # [N] str
    bank_video: np.ndarray,  # [M, P] the bank's clips, both senses present
    bank_audio: np.ndarray,  # [M, P]
    bank_ids: np.ndarray,  # [M] str
) -> np.ndarray:
    """[N] float32 in [0, 1]; NaN where the clip lacks a sense (then nothing to compare)."""
    own = np.sum(video * audio, axis=1)  # [N]
    to_sounds = video @ bank_audio.T  # [N, M]: the picture against the bank's sounds
    to_pictures = audio @ bank_video.T  # [N, M]: the sound against the bank's pictures
    others = ids[:, None] != bank_ids[None, :]  # a clip is not its own stranger
    count = np.maximum(others.sum(axis=1), 1)
    beats_sounds = ((to_sounds < own[:, None]) & others).sum(axis=1) / count
    beats_pictures = ((to_pictures < own[:, None]) & others).sum(axis=1) / count
    score = (beats_sounds + beats_pictures) / 2
    return np.where(np.isnan(own), np.nan, score).astype(np.float32)
