"""The SmoothGrad engine: a Keras model and a batch of images in, numpy maps out; it imports nothing of Beam."""
