"""The pipeline's stages above the core: each module is one DVC stage (or command), a
function with explicit inputs (params, property) and outputs (files, MLflow runs)."""
