"""The Hydra entry point, building everything from a recipe, and the training loop."""
