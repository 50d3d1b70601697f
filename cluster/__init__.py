"""avssl.cluster: everything that touches Ray, DeepSpeed engines, job submission and MLflow."""
