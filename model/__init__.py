"""The ablax decoder, assembled from `config.model` flags (see README's flag table)."""
