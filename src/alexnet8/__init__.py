"""AlexNet8 on CIFAR-10 as a DVC pipeline tracked in MLflow.

Stages, each runnable as `python -m alexnet8 <stage>` (dvc.yaml gives their arguments):
fetch -> preprocess -> train -> evaluate -> plot.
"""

import os

# TensorFlow prints pages of C++ start-up notices (CUDA probing, CPU features) that bury the
# pipeline's own log; keep its warnings and errors. Set before any module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow draws a "Downloading artifacts" bar for each small file it reads back (the model's
# signature, the input example): noise in a stage's log. A user's own setting wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
