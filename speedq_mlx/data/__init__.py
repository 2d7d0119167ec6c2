"""Data: conversation records, datasets, text, images, encoding into training samples."""
