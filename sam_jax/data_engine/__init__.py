"""The paper's data engine beyond the model: the fully automatic stage over a whole data set
(`auto_label`). The assisted and semi-automatic stages are `sam-jax serve --annotate`
(`sam_jax.serve.annotations`); both write SA-1B files (`sam_jax.data.sa1b_writer`)."""
