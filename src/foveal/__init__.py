"""foveal: run, serve, quantize, fine-tune, train and evaluate vision-language models locally."""
