"""The undecodable images a run skipped, reported once for all of its processes."""

import sys

import pytorch_lightning as pl

from moco.data.folder import all_ranks_skipped_summaries
from moco.run.console import print_line


class ReportSkippedImages(pl.Callback):
    """At the end of training, rank 0 prints one line per image folder with the files every
    process skipped (moco/data/folder.py), instead of one line per process at exit.

    The end of training, because the counts must be summed over the processes, which takes a
    collective: at interpreter exit the process group may be gone already (Lightning destroys it
    in an exit handler of its own), and the ranks do not exit together. on_train_end runs on
    every rank at the same point of a run that succeeded, with the process group still up, after
    the last batch and the last kNN evaluation (the monitor's folders count too). A run that
    fails never gets here; each process then reports its own files at exit, as without DDP.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for line in all_ranks_skipped_summaries():
            print_line(line, file=sys.stderr)
