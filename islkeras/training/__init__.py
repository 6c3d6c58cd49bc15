"""Training: losses wired into Keras models (pix2pix, perceptual), callbacks, the run folder and ``fit``."""
