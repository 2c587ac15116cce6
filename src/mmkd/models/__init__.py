"""Models: open_clip config registry, checkpoint I/O and the encoder interface every model is evaluated through."""
