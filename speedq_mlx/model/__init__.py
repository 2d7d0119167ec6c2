"""Models: InternVL facts, checkpoint sources and loading, the batched forward."""
