"""Perceptual-loss training: a frozen VGG19's features of prediction and target are compared.

Loss per example (weights from ``loss.*_weight``, defaults as in the thesis)::

    0.8 * content (squared VGG19 feature difference per element relative to the target's feature
                   energy, averaged over the chosen layers -- see ``islkeras.training.losses.content_per_example``)
  + 0.1 * pixel   (mean L1 -- or L2 -- per pixel)
  + 0.1 * tv      (mean absolute neighbour difference of the prediction per pixel)
  [+ style * Gram-matrix difference, optional]

Every term is a per-element mean, so the weights mean what they say (the thesis's total variation was
a sum over the image and dominated everything else). Fluorescence is mapped to VGG's RGB input as
described in ``islkeras.models.vgg``. Logged: ``loss``, ``content``, ``pixel``, ``tv`` (``style``),
``pcc``, ``pcc_std``; validation runs the generator in inference mode.
"""
from __future__ import annotations

import tensorflow as tf

from islkeras.training.losses import PerceptualLoss
from islkeras.training.base import GeneratorModel


class PerceptualModel(GeneratorModel):
    @staticmethod
    def loss_names(style_weight: float) -> tuple[str, ...]:
        """The loss terms logged (``style`` only with a style weight)."""
        return ("loss", "content", "pixel", "tv") + (("style",) if style_weight > 0 else ())

    def __init__(self, generator, perceptual: PerceptualLoss, global_batch_size=None, **kwargs):
        names = self.loss_names(perceptual.weights["style"])
        super().__init__(generator, global_batch_size, loss_names=names, **kwargs)
        self.perceptual = perceptual
        self.vgg = perceptual.features.model  # tracked (frozen) so it is built under the strategy

    def build_optimizers(self):
        self.optimizer.build(self.generator.trainable_variables)

    def _terms(self, y, y_pred):
        t = self.perceptual.terms(y, y_pred)
        t["loss"] = t.pop("total")
        return t

    def train_step(self, data):
        x, y = self._unpack(data)
        with tf.GradientTape() as tape:
            y_pred = tf.cast(self.generator(x, training=True), tf.float32)
            terms = self._terms(y, y_pred)
            loss = self._average(terms["loss"], training=True)
        self.optimizer.minimize(loss, self.generator.trainable_variables, tape=tape)
        return self._update(terms, y, y_pred)

    def test_step(self, data):
        x, y = self._unpack(data)
        y_pred = tf.cast(self.generator(x, training=False), tf.float32)
        return self._update(self._terms(y, y_pred), y, y_pred)
