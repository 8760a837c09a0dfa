"""transferlab: config-driven fine-tuning of pretrained image models.

Hydra composes the experiment, DVC runs it stage by stage, MLflow records it.
"""

__version__ = "0.1.0"
