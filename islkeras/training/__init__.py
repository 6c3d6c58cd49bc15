"""Training: losses, tf metrics, the pix2pix and perceptual train_steps, callbacks, distribution, the run
folder and ``fit`` (which saves the best generator with ``models.savedmodel``).

May import ``data`` and ``models``; never ``export`` or later steps.
"""
