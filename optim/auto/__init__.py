"""Automatic compression under an accuracy budget (`minicnn compress --auto`).

Given a trained model file and a budget of validation accuracy (max_drop points),
find per-layer settings of the project's techniques (pruning, weight sharing,
int8, binary weights, filter pruning) and return the Pareto front of validation
accuracy, bytes on disk and batch-1 speedup over the base model, with the smallest (or fastest)
model within the budget. Every decision is taken on a validation split of the
training images (read twice: each image with its eight one-pixel translations,
and the images alone; a model is within the budget on both); the test
images are looked at once, at the end (evaluate_chosen).

What lives where:
    sensitivity.py  stage 1: each layer compressed alone by each technique (Han et al. 2015/2016,
                    Distiller), the curves saved as JSON and plotted
    search.py       stage 2: tolerance ladder and bisection on the curves, the fine-tuning round,
                    auto_compress (the whole run) and evaluate_chosen
    recipe.py       one trial: a candidate's settings applied, retrained, saved as model files
    trials.py       running trials in this process, a process pool or on Dask; the resumable trial log
    pareto.py       the front (no dominated point), the choice within the budget, latency, the plot
"""

from .pareto import READINGS, choose, dominates, front, within
from .search import TECHNIQUES, auto_compress, evaluate_chosen

__all__ = ["READINGS", "TECHNIQUES", "auto_compress", "choose", "dominates", "evaluate_chosen", "front", "within"]
