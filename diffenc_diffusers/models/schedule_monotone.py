"""Deprecated location of :class:`MonotoneSchedule`; it lives in :mod:`diffenc_diffusers.noise_schedule` (the one
home of gamma). Kept so that `from diffenc_diffusers.models.schedule_monotone import MonotoneSchedule` still works."""

from ..noise_schedule import MonotoneSchedule

__all__ = ["MonotoneSchedule"]
