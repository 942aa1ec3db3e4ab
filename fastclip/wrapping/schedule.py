"""When a :class:`fastclip.SpectralNorm` wrapper refines its vectors and clips.

Each wrapper owns one :class:`ClipSchedule`: the count of its training steps and what
other wrappers already did for it in the current step. Wrappers interact in two ways,
and both go through the schedule instead of through each other's attributes:

* **order**: a Conv+BN composition wrapper runs its forward (and so its schedule)
  before the wrappers inside it, but must be clipped *last* (an inner conv's clip after
  it would move the composition again). Its clip step therefore clips the inner
  wrappers first and marks them (:meth:`ClipSchedule.mark_clipped`), so their own
  schedule, later in the same forward, does not clip a second time;
* **batched partners**: the composition's per-step iteration shares one batched pass
  with the inner conv's (they start with the same layer), and marks it
  (:meth:`ClipSchedule.mark_tracked`).

The marks last one step: :meth:`ClipSchedule.end_step` clears them and advances the
count. Epoch-end firing (:func:`fastclip.wrapper.clip_all_`) uses the same marks.

The rules, for step ``t`` (counted from 0, the first training forward):

* clip when ``clip_flag`` and ``t >= init_delay`` and ``t % clip_steps == 0``;
* refine when ``track_steps`` divides ``t`` (``track_steps > 0``), or at a clip step, or
  at a summary step (``t % summary_steps == 0`` with a writer), unless a partner did.

Example::

    >>> s = ClipSchedule(SpectralNormConfig(clip_steps=2, init_delay=0), clip_flag=True)
    >>> due = []
    >>> for _ in range(4):
    ...     due.append(s.clip_due())
    ...     s.end_step()
    >>> due
    [True, False, True, False]
"""

from __future__ import annotations

from fastclip.wrapping.config import SpectralNormConfig

__all__ = ["ClipSchedule"]


class ClipSchedule:
    """One wrapper's step count and this step's marks (host integers: the schedule must
    not read the device). ``config`` is the wrapper's :class:`SpectralNormConfig`."""

    def __init__(self, config: SpectralNormConfig, clip_flag: bool) -> None:
        self.config = config
        self.clip_flag = bool(clip_flag)
        self.step = 0
        self._clipped_at = -1  # step at which another wrapper already clipped this one
        self._tracked_at = -1  # ... already refined this one's vectors

    def __repr__(self) -> str:
        return (
            f"ClipSchedule(step={self.step}, clip_flag={self.clip_flag}, clip_steps={self.config.clip_steps})"
        )

    def started(self) -> bool:
        """Whether ``init_delay`` has passed (clips may fire)."""
        return self.step >= self.config.init_delay

    def clipped(self) -> bool:
        """Whether this step's clip was already done (by a composition or an epoch end)."""
        return self._clipped_at == self.step

    def tracked(self) -> bool:
        """Whether this step's refinement was already done by a batched partner."""
        return self._tracked_at == self.step

    def clip_due(self) -> bool:
        return (
            self.clip_flag
            and self.started()
            and self.step % self.config.clip_steps == 0
            and not self.clipped()
        )

    def logs(self, has_writer: bool) -> bool:
        """Whether this step writes the ``train/lsv_<identifier>`` scalar."""
        return has_writer and self.step % self.config.summary_steps == 0

    def track_due(self, has_writer: bool) -> bool:
        t = self.config.track_steps
        return not self.tracked() and (
            bool(t and self.step % t == 0) or self.clip_due() or self.logs(has_writer)
        )

    def mark_clipped(self) -> None:
        self._clipped_at = self.step

    def mark_tracked(self) -> None:
        self._tracked_at = self.step

    def release(self) -> None:
        """Forget this step's marks (after an out-of-step action, e.g. an epoch end)."""
        self._clipped_at = self._tracked_at = -1

    def end_step(self) -> None:
        """The step is over: clear its marks and count it."""
        self.release()
        self.step += 1

    def move_to(self, step: int) -> None:
        """Set the count (a loaded checkpoint, a benchmark forcing a clip step)."""
        self.release()
        self.step = int(step)
