"""`vaepipe tune`: a hyper-parameter search on Optuna where every trial is a DVC experiment and
an MLflow run.

`space` reads tune.yaml (the search and its space, checked against params.yaml); `trial` is the
train stage's side of a trial (it reports each epoch's validation bound, and stops when the
pruner says so); `study` is the worker that asks the sampler, runs `dvc exp run` and reads the
objective back from the run; `summary` the best trials, the importances and the history.
"""
