"""Evaluation of frozen features: extraction, faiss kNN, linear probe, online kNN monitor.

- ``knn``: ``knn_predict`` (weighted kNN on faiss) and the one-search (k, T) sweep;
- ``features``: frozen features of a data set (backbone or head output, or raw pixels);
- ``checkpoint``: a MoCo checkpoint loaded safely, or the ``raw`` / ``random`` baselines;
- ``probe``: the linear probe on frozen features and the frozen-weights check;
- ``monitor``: ``KNNMonitor``, the Lightning callback logging ``knn_top1`` during pretraining;
- ``validate``, ``runs`` and ``report``: the offline evaluations behind scripts/: config
  checks, the runs, their outputs.
"""

from moco.eval.knn import knn_predict

__all__ = ["knn_predict"]
