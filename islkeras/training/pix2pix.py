"""pix2pix: conditional GAN (PatchGAN discriminator) plus lambda * L1, with two optimizers.

``Pix2Pix.train_step`` runs the generator once in training mode (its output feeds both the generator's
update and the discriminator's "fake" example), the discriminator on (input, target) and
(input, generated), and applies

* generator: non-saturating BCE on the discriminator's logits for the fake pair + ``l1_lambda`` * L1
  (``l1_lambda`` = 100 by default, as in pix2pix);
* discriminator: 0.5 * (BCE(real, 1) + BCE(fake, 0)).

``test_step`` (validation) runs both networks in inference mode (the thesis code evaluated the
generator with ``training=True``). Logged separately: ``loss`` and ``g_loss`` (the same: the generator's total),
``g_gan``, ``g_l1``, ``d_loss``, plus ``pcc``/``pcc_std`` -- the thesis's learning curves (Figure 23).
"""
from __future__ import annotations

import tensorflow as tf

from islkeras.training import losses as L
from islkeras.training.base import GeneratorModel


class Pix2Pix(GeneratorModel):
    LOSS_NAMES = ("loss", "g_loss", "g_gan", "g_l1", "d_loss")

    def __init__(self, generator, discriminator, l1_lambda: float = 100.0, global_batch_size=None, **kwargs):
        super().__init__(generator, global_batch_size, **kwargs)
        self.discriminator = discriminator
        self.l1_lambda = float(l1_lambda)
        self.d_optimizer = None

    def compile(self, g_optimizer, d_optimizer, **kwargs):
        super().compile(optimizer=g_optimizer, **kwargs)
        # Keras' own wrapping, as compile does for the generator's: a LossScaleOptimizer under mixed_float16
        self.d_optimizer = self._get_optimizer(d_optimizer)

    def build_optimizers(self):
        """Create the optimizers' slots now so a checkpoint (BackupAndRestore) restores them eagerly."""
        self.optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    def _terms(self, x, y, fake, training: bool):
        d_real = self.discriminator([x, y], training=training)
        d_fake = self.discriminator([x, fake], training=training)
        g = L.pix2pix_generator_per_example(y, fake, d_fake, self.l1_lambda)
        d = L.discriminator_per_example(d_real, d_fake)
        return {"loss": g["g_loss"], "g_loss": g["g_loss"], "g_gan": g["g_gan"], "g_l1": g["g_l1"], "d_loss": d}

    def train_step(self, data):
        x, y = self._unpack(data)
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = tf.cast(self.generator(x, training=True), tf.float32)
            terms = self._terms(x, y, fake, training=True)
            g_loss = self._average(terms["loss"], training=True)
            d_loss = self._average(terms["d_loss"], training=True)
        self.optimizer.minimize(g_loss, self.generator.trainable_variables, tape=g_tape)
        self.d_optimizer.minimize(d_loss, self.discriminator.trainable_variables, tape=d_tape)
        return self._update(terms, y, fake)

    def test_step(self, data):
        x, y = self._unpack(data)
        fake = tf.cast(self.generator(x, training=False), tf.float32)
        return self._update(self._terms(x, y, fake, training=False), y, fake)
