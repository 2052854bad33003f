"""EfficientSAM in JAX/Flax: SAMI pretraining, finetuning, inference and conversion."""
