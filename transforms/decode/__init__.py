"""Decode: ``tf.train.Example`` records to model inputs (``Decode``)."""
