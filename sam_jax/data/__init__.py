"""Data: record layout and builders (tensorflow-datasets), bad-record policy, input pipeline.

Reading prepared data needs neither TensorFlow nor this package's builders'
preparation code: the pipeline reads ArrayRecord files through
`tfds.data_source` and grain.
"""
