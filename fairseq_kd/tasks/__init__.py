"""fairseq tasks of fairseq_kd; importing this package registers them."""
from fairseq_kd.tasks import translation_kd  # noqa: F401
