"""Support of merge-harness's own tests: helpers the test modules import, no fixtures.

``tests/`` is on ``sys.path`` (pytest inserts the folder of ``tests/conftest.py``, which has no
``__init__.py``), so test modules import these as ``from support.<module> import ...``; the
fixtures themselves live in ``tests/conftest.py``.

- :mod:`support.guard`: snapshots of folders that prove inputs stay untouched, the session's
  input guard, a network guard, test-only checks;
- :mod:`support.checkpoints`: copy checkpoints, read and rewrite their tensors and configs;
- :mod:`support.oracle`: run the oracle and the weights checks; raw LoRA math for injecting faults;
- :mod:`support.faults`: merge faults injected into a copy of a merged checkpoint (behaviour);
- :mod:`support.workshop`: the path-level view of ``tiny_merge_factory`` behind ``workshop``;
- :mod:`support.damage`: bad inputs made from private copies of a correct merge;
- :mod:`support.badinput`: the bad-input cases as data, and their markdown table.
"""
