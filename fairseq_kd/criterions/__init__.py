"""fairseq criterions of fairseq_kd; importing this package registers them."""
import importlib
import os

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_") and _file != "kd_base.py":
        importlib.import_module(f"fairseq_kd.criterions.{_file[:-3]}")
