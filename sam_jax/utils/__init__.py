"""Host-side helpers, as the official `segment_anything.utils`: `transforms` (images, points
and boxes to the encoder's input frame) and `amg` (the automatic mask generator's helpers)."""
