"""The small MoE language model, its data (real text that ships with Python), the training loop."""
