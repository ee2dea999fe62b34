"""Tasks beyond classification, each a ``runner.Task`` with its own targets and record:
``segment`` (semantic segmentation); detection will sit beside it."""
