"""islkeras: in silico labeling with tf-keras and segmentation-models.

Importing the package selects the Keras 2 API (``TF_USE_LEGACY_KERAS=1``) and segmentation-models'
``tf.keras`` backend (``SM_FRAMEWORK=tf.keras``) before TensorFlow is imported. TensorFlow itself is
imported lazily by the submodules that need it, so ``islkeras --help`` stays fast.
"""
from islkeras import _env  # noqa: F401  (must run first)

__version__ = "0.1.0"
