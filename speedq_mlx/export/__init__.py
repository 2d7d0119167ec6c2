"""The artifact: weights and files mlx-vlm loads, its model card, inspection."""
