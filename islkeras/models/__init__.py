"""Networks and their saved form: generators (U-Nets), the PatchGAN discriminator, the VGG19 feature
extractor, and the SavedModel with raw-image and normalised signatures that every later step loads.

May import ``data`` (normalisation in the serving graph) and the top-level modules; never ``training`` or later.
"""
from islkeras.models.unet import MULTIPLE, build_generator  # noqa: F401
