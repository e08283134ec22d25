"""fairseq_kd: knowledge distillation for neural machine translation, as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="fairseq_kd",
    version="0.1.0",
    description="Knowledge distillation for NMT as a fairseq plugin (--user-dir fairseq_kd)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # MIT, like fairseq.  No "License ::" classifier: setuptools >= 77 deprecates
    # them in favour of this field (a warning at every install).
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["fairseq_kd", "fairseq_kd.*"]),
    python_requires=">=3.11",
    install_requires=[
        # Install torch, numpy and cython first, then fairseq-fixed with
        # --no-build-isolation (see Makefile): its build needs torch.
        "fairseq-fixed==0.12.3.1",
        "torch>=2.0",
        "numpy",
        "sacrebleu>=2.0",
        "sentencepiece",
        "tqdm",
        # corpus/evaluate --backend ctranslate2, export --format ctranslate2, translate
        "ctranslate2==4.8.5",
        # corpus --select mbr --utility chrf: sentence chrF of all candidate pairs (compiled, no dependencies)
        "fastchrf",
    ],
    extras_require={
        # transformers: the external-teacher tests build tiny Marian/M2M100 models to convert
        # (tests/ct2_teachers.py; verified with 5.25, the version the suite runs with)
        "test": ["pytest", "pytest-xdist", "transformers>=5.25"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fairseq-kd = fairseq_kd.cli:main"]},
)
