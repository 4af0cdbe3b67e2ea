"""Data: record layout and builders (tensorflow-datasets), bad-record policy, input pipeline.

Preparing a data set (the builders) encodes images with TensorFlow; reading
it does not: `pipeline.open_source` reads the ArrayRecord files through
`tfds.data_source`, and grain batches them.
"""
