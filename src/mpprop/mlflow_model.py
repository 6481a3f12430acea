"""The MLflow model of every logged mpprop run, as code (MLflow's models-from-code).

MLflow logs this file's source, not a pickle: loading a logged model runs this reviewed
file and mpprop's own code (shipped with the model as `code_paths`), and reads the weights
with `torch.load(weights_only=True)`. Not imported by mpprop itself.
"""

import mlflow

from mpprop.served_model import CGCNNPyfunc

mlflow.models.set_model(CGCNNPyfunc())
