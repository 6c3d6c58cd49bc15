"""Networks: generators (U-Nets), the PatchGAN discriminator and the VGG19 feature extractor."""
from islkeras.models.unet import MULTIPLE, build_generator  # noqa: F401
