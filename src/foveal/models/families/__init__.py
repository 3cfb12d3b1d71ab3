"""Vision-language model families: one package or module per family, each owning its specifics."""
