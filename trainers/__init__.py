"""Command-line trainers: ``python -m trainers.<experiment>``.

A localization dataset's trainer (``mvtec``, ``ucsd``, ``mnist``) is its flags, its
loader and a :class:`trainers.localization.LocalizationExperiment` (evaluation rows,
figures, report) run by ``localization.run``; ``dsprites`` keeps its own flow. What they
share: ``cli`` (flag groups, every check before TensorFlow starts), ``devices``
(precision, strategy), ``run_dirs`` (which run folder, its lock, its end), ``fit`` (the
one-class fit and its callbacks), ``sanity`` (the explanation checks), ``guard`` (how a
run ends on an error or Ctrl-C) and ``api`` (how another package asks for a run).
"""
