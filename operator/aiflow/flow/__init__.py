"""The data plane: captioning model, codecs, Triton stages, client and local runtime."""
