"""Getting weights: the models `edgellm pull` knows, and where they are cached."""
