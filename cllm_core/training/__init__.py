"""Training: the CLLM's fine-tuning (setup, loop, objectives, losses, checkpoints, publishing), its launch across
processes, the demo teacher, and what a published CLLM ships.
"""
