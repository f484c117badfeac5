"""The draft precision feature in one place: ``[models] draft_precision`` and what ``"auto"`` means.

- choice.py: the precisions a device can build, the per-device default, the pick the loader opens the draft
  at, and the record of a measured choice beside the built drafts;
- ranking.py: candidates ranked by the γ controller's own expected tokens per second;
- measure.py: building the candidates and measuring them against the verifier, each through
  ``EdgeClient.generate`` like any answer.
"""
