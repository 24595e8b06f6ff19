"""The hub's pure core: the rollout engine, the fleet registry, maintenance windows, plan drafts.

Nothing here does I/O or reads a clock: events and the time come in as
arguments, actions go out as values, and the shell (``hub.service``,
``hub.rollouts``, ``hub.plan``, ``hub.store``) carries them out.
``tests/unit/test_import_hygiene.py`` keeps it so.
"""
