"""The launcher side of balsam's Python interface: :mod:`balsam.launcher.dag` and
:mod:`balsam.launcher.futures` (legacy's ``balsam.launcher.async``)."""
