"""The leaf every other folder may import, and which imports none of them.

* :mod:`.errors`: :class:`~afmrec.common.errors.InputError`, the one exception type the
  CLI prints as a one-line error.
* :mod:`.files`: atomic, never-overwriting writes of files and folders, and the kinds of
  output they may replace.
"""
