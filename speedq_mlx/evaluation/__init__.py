"""Evaluation: eval, compare, fidelity, generation, VQA scoring, VLMEvalKit data."""
