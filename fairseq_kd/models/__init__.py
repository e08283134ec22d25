"""Student architectures; importing this package registers them."""
from fairseq_kd.models import students  # noqa: F401
