"""The SPEED-Q stages: (1) vision tower, (2) projector, (3) language model."""
