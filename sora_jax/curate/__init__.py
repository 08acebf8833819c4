"""sora-curate: measure a prepared corpus before a pretraining run spends pod time on it
(cli.py), and write it again without the clips that would hurt (apply.py)."""


class CurateError(ValueError):
    """Bad input (a dataset, split, run or report that does not fit): one line, exit 2."""
