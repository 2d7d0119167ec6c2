"""The tiny-shapes task (rendered scenes and questions) and the training of the bundled
tiny-shapes model (`python -m devkit.tiny_shapes.train`)."""
