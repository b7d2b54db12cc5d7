"""The stages of a compression: train -> stats -> compress -> finetune -> evaluate -> export
(docs/architecture.md maps the modules)."""

# The kinds of the pipeline's artifacts are registered with the writers of
# afmrec.common.files when this module is imported: importing any module of the pipeline
# first imports it, so every writer recognises every kind of artifact, whatever the order.
from . import artifacts  # noqa: F401
