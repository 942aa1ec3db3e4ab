"""The machinery behind the layer wrappers: the validated settings of
:class:`fastclip.SpectralNorm`, the step schedule that decides when a wrapper tracks and
clips, the clip step shared by a single wrapper and the batched tracker, and the batched
tracker's operator groups, buffer plan and lockstep clip step (:mod:`fastclip.batched`)."""
